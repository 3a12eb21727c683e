"""Export a trained run to ONNX, for ONNX Runtime, TensorRT, OpenVINO or any other ONNX consumer.

    python export.py --name dsb2018_96_NestedUNet_wDS                 # -> models/<name>/model.onnx
    python export.py --name dsb2018_96_NestedUNet_wDS --prune 2 --output small.onnx

The ONNX graph has one input ``image``: float32 [batch, C, height, width], the image scaled to [0, 1] as the run
was trained (``--normalization``: /255, or stretched by its own percentiles; image_files.image_to_float) and then
normalised as in training, ``(x - 0.5) / 0.25`` (image_files.normalize); batch, height and width are dynamic, but height
and width must be multiples of 16 (pad first, as predict.py does). It has one output ``logits``: float32
[batch, K, height, width]; apply a sigmoid for probabilities. A deep-supervision NestedUNet is exported with its
final head only (X0,4), or with head L and only the nodes it needs when ``--prune L`` is given.

Uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs the ``onnx`` package but not
``onnxscript``; opset 17. The file is written atomically. When ``onnxruntime`` is installed the exported model
is run once on a random input and its largest difference from PyTorch is printed.
"""
import io
import os
import warnings

import numpy as np
import torch

from archs import final_logits
from checkpoints import load_run
from config import derived_files_dir, output_channels
from utils import ArgumentParser, UsageError, UserError, atomic_write, run_cli

OPSET = 17
SCALING = {  # how image_files.image_to_float scales an image for each --normalization, in the printed input contract
    "fixed": "8-bit / 255, 16-bit by its min and max",
    "percentile": "by its 1st and 99.8th percentiles",
    "percentile_dark": "by its 1st and 99.8th percentiles, inverted when its mean is above 0.5",
}


def build_parser():
    p = ArgumentParser(prog="export.py",
                       description="Export models/<name>/model.pth to ONNX (dynamic batch, height and width).")
    p.add_argument("--name", required=True, help="run name: a folder in models/, or nuclei (the bundled model)")
    p.add_argument("--output", default=None, help="the .onnx file to write (default models/<name>/model.onnx, "
                                                  "model_L<L>.onnx with --prune; for the bundled run in "
                                                  "outputs/<name>_files/)")
    p.add_argument("--height", type=int, default=96, help="height of the example input used for tracing "
                   "(a multiple of 16; the exported model accepts any multiple of 16)")
    p.add_argument("--width", type=int, default=96, help="width of the example input (a multiple of 16)")
    p.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: export only the sub-network up to head X0,L")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def export_module(model, prune=None):
    """An nn.Module in eval mode returning only the logits tensor [B, K, H, W] that the export keeps: the
    final head (deep supervision), or head ``prune``."""
    class FinalHead(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return final_logits(self.net(x) if prune is None else self.net(x, prune=prune))

    # eval() on the wrapper itself: the exporter restores the wrapper's own mode afterwards, and a wrapper left
    # in training mode would put the network's BatchNorm layers back into training mode with it.
    return FinalHead(model).eval()


def export_onnx(module, example, path):
    """Trace ``module`` on ``example`` [1, C, H, W] and write ONNX (opset 17, dynamic batch/height/width)
    atomically to ``path``; returns the number of bytes written."""
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
    except ImportError:
        raise UserError("exporting to ONNX needs the 'onnx' package: pip install onnx") from None
    buffer = io.BytesIO()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape checks, the legacy-exporter notice
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": dynamic, "logits": dynamic},
                          do_constant_folding=True)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    with atomic_write(path, "wb") as f:
        f.write(data)
    return len(data)


def onnxruntime_difference(path, module, example):
    """Largest |ONNX Runtime - PyTorch| on ``example``, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})[0]
    with torch.no_grad():
        want = module(example).numpy()
    return float(np.abs(got - want).max())


def main(argv):
    args = build_parser().parse_args(argv)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value < 16 or value % 16:
            raise UsageError(f"--{flag} {value} must be a positive multiple of 16")
    device = torch.device("cpu")
    cfg, model = load_run(args.name, device, args.prune)
    path = args.output or os.path.join(derived_files_dir(args.name),
                                       f"model_L{args.prune}.onnx" if args.prune else "model.onnx")
    module = export_module(model, args.prune)
    torch.manual_seed(0)
    example = torch.randn(1, cfg.input_channels, args.height, args.width)
    size = export_onnx(module, example, path)
    diff = onnxruntime_difference(path, module, example)
    head = f"head X0,{args.prune} (pruned)" if args.prune else \
        ("final head X0,4" if cfg.arch == "NestedUNet" and cfg.deep_supervision else "single output")
    check = f"; ONNX Runtime vs PyTorch max |diff| {diff:.2e}" if diff is not None else \
        " (install onnxruntime to check it)"
    print(f"wrote {path} ({size / 2**20:.1f} MiB, opset {OPSET}, {cfg.arch} {head}): input 'image' float32 "
          f"[batch, {cfg.input_channels}, height, width], the image scaled to [0, 1] ({SCALING[cfg.normalization]}) then "
          f"(x - 0.5) / 0.25, with height and width "
          f"multiples of 16, output 'logits' [batch, {output_channels(cfg)}, height, width]"
          f"{' (the last channel: touching borders)' if cfg.borders else ''}{check}")
    return {"path": path, "bytes": size, "max_abs_diff": diff}


if __name__ == "__main__":
    run_cli(main)
