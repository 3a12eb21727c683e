"""Export a trained run to ONNX, for ONNX Runtime, TensorRT, OpenVINO or any other ONNX consumer.

    python export.py --name dsb2018_96_NestedUNet_wDS                 # -> models/<name>/model.onnx
    python export.py --name dsb2018_96_NestedUNet_wDS --prune 2 --output small.onnx

The ONNX graph has one input ``image``: float32 [batch, C, height, width], the image scaled to [0, 1] as the run
was trained (``--normalization``: /255, or stretched by its own 1st and 99.8th percentiles taken over all its
channels at once and clipped to [0, 1], unlike CSBDeep's per-call defaults; image_files.image_to_float) and then
normalised as in training, ``(x - 0.5) / 0.25`` (image_files.normalize); batch, height and width are dynamic, but height
and width must be multiples of 16 (pad first, as predict.py does). It has one output ``logits``: float32
[batch, K, height, width]; apply a sigmoid for probabilities. A deep-supervision NestedUNet is exported with its
final head only (X0,4), or with head L and only the nodes it needs when ``--prune L`` is given.

To get predict.py's probabilities from it, prepare each image as predict.py does (inference.Predictor): channels
in RGB order (OpenCV reads BGR: convert), a grey image (also one saved as three equal channels) taken as one channel
and repeated to 3; scale it to [0, 1] first; a run trained on resized images (``crop_size`` 0) then takes the
scaled image resized to its input_h x input_w (bilinear) and its output is resized back; then pad the bottom and
right edges by reflection (numpy's ``reflect``, PyTorch's ``F.pad(mode="reflect")``) to multiples of 16 and crop
the output back. Zero padding or BGR order change the result well beyond rounding. The exported model is fp32:
compare it with ``predict.py --amp fp32``, since predict.py runs bf16 on CPUs and GPUs that have it (probabilities
then differ by up to 0.015, 0.04 in a border channel, with the bundled model).

The export itself (opset 17, PyTorch's TorchScript-based exporter, which needs the ``onnx`` package) is in
onnx_export.py. The file is written atomically. When ``onnxruntime`` is installed the exported model is run once
on a random input and its largest difference from PyTorch is printed.
"""
import os
from contextlib import nullcontext

from files import written_alone
from utils import ArgumentParser, UsageError, path_arg, run_cli

SCALING = {  # how image_files.image_to_float scales an image for each --normalization, in the printed input contract
    "fixed": "8-bit / 255, 16-bit by its min and max",
    "percentile": "by its 1st and 99.8th percentiles over all channels at once (min and max when they are equal), "
                  "clipped to [0, 1]",
    "percentile_dark": "by its 1st and 99.8th percentiles over all channels at once (min and max when equal), "
                       "clipped to [0, 1], inverted when its mean is above 0.5",
}


def build_parser():
    p = ArgumentParser(prog="export.py",
                       description="Export models/<name>/model.pth to ONNX (dynamic batch, height and width).")
    p.add_argument("--name", required=True, help="run name: a folder in models/, or nuclei (the bundled model)")
    p.add_argument("--output", type=path_arg, default=None,
                   help="the .onnx file to write (default models/<name>/model.onnx, "
                                                  "model_L<L>.onnx with --prune; for the bundled run in "
                                                  "outputs/<name>_files/)")
    p.add_argument("--height", type=int, default=96, help="height of the example input used for tracing "
                   "(a multiple of 16; the exported model accepts any multiple of 16)")
    p.add_argument("--width", type=int, default=96, help="width of the example input (a multiple of 16)")
    p.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: export only the sub-network up to head X0,L")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value < 16 or value % 16:
            raise UsageError(f"--{flag} {value} must be a positive multiple of 16")
    if args.output and (os.path.isdir(args.output) or args.output.endswith(("/", os.sep))):
        raise UsageError(f"--output {args.output} is a folder; give the file to write, e.g. "
                         f"{os.path.join(args.output, 'model.onnx')}")
    # Heavy imports only now, so that --help and flag errors answer at once.
    import torch
    from checkpoints import load_run
    from config import derived_files_dir, output_channels, run_dir, run_lock_file
    from onnx_export import OPSET, export_module, export_onnx, onnxruntime_difference

    path = args.output or os.path.join(derived_files_dir(args.name),
                                       f"model_L{args.prune}.onnx" if args.prune else "model.onnx")
    # Into the run's own folder only while no train.py writes it: a file exported mid-training would go stale there
    # without a word, and the weights loaded before an --overwrite replaced the run would land in the new run's folder
    folder = os.path.realpath(run_dir(args.name))
    in_run = os.path.commonpath([folder, os.path.realpath(os.path.dirname(os.path.abspath(path)))]) == folder
    with written_alone(run_dir(args.name), "--output", run_lock_file(args.name)) if in_run else nullcontext():
        cfg, model = load_run(args.name, torch.device("cpu"), args.prune)
        module = export_module(model, args.prune)
        print(f"exporting {args.name} ({cfg.arch}) to {path} ...", flush=True)  # the tracing takes seconds
        # a generator of its own: torch's global one is the session's (a notebook's own draws)
        example = torch.randn(1, cfg.input_channels, args.height, args.width,
                              generator=torch.Generator().manual_seed(0))
        size = export_onnx(module, example, path)
    diff = onnxruntime_difference(path, module, example)
    head = f"head X0,{args.prune} (pruned)" if args.prune else \
        ("final head X0,4" if cfg.arch == "NestedUNet" and cfg.deep_supervision else "single output")
    resized = "" if cfg.crop_size else f"; trained on resized images: resize each image to {cfg.input_h}x{cfg.input_w}"
    channels = "channels in RGB order" if cfg.input_channels == 3 else f"{cfg.input_channels} channel(s), grey"
    scaled = SCALING[cfg.normalization]
    check = f"; ONNX Runtime vs PyTorch max |diff| {diff:.2e}" if diff is not None else \
        " (install onnxruntime to check it)"
    print(f"wrote {path} ({size / 2**20:.1f} MiB, opset {OPSET}, {cfg.arch} {head}): input 'image' float32 "
          f"[batch, {cfg.input_channels}, height, width], the image scaled to [0, 1] ({scaled}) then "
          f"(x - 0.5) / 0.25, {channels}, height and width multiples of 16 (pad the bottom and right "
          f"by reflection){resized}, output 'logits' [batch, {output_channels(cfg)}, height, width]"
          f"{' (the last channel: touching borders)' if cfg.borders else ''}{check}")
    return {"path": path, "bytes": size, "max_abs_diff": diff}


if __name__ == "__main__":
    run_cli(main)
