"""The training step in channels_last against NCHW (contiguous) memory format, in one precision, side by side in
one process: which layout `--channels_last auto` should pick on this machine.

Two copies of the same network, one per layout, each with its own AdamW, run ``engine.step`` with the update on one
random batch, in pairs of ``--steps`` steps each (the order swapped every pair; timing.time_in_pairs) after a warm-up
step each. The script prints the median images/s of each and the speed-up of channels_last as the median over the
pairs of their time ratio. By default a NestedUNet with deep supervision, batch 16 at 96x96 (the 96x96 recipes'
step); ``--arch UNet --batch_size 8 --size 256`` is the full-size crop recipe's step.

    python bench/memory_format.py --amp fp32
    python bench/memory_format.py --amp fp32 --arch UNet --batch_size 8 --size 256
"""
import copy
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from engine import Precision, choose_device  # noqa: E402
from losses import build_loss  # noqa: E402
from optim import build_optimizer, fused_update  # noqa: E402
from timing import (add_pair_args, add_step_args, cpu_counts, cpu_name, seconds_per_image,  # noqa: E402
                    step_model_and_batch, time_in_pairs)
from utils import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/memory_format.py", description=__doc__.split("\n\n")[0])
    add_step_args(p)
    add_pair_args(p, pairs=8, steps=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    model, batch, arch = step_model_and_batch(args, device)
    criterion = build_loss("BCEDiceLoss")
    runs = {}
    for name in ("channels_last", "nchw"):
        precision = Precision.choose(device, args.amp, channels_last=name == "channels_last")
        net = precision.prepare(copy.deepcopy(model))
        optimizer = build_optimizer("AdamW", net.parameters(), 1e-3, 0.9, False, 1e-4,
                                    fused=fused_update("AdamW", device.type))
        images, masks = precision.to_device(*batch)
        runs[name] = functools.partial(seconds_per_image, net, images, masks, criterion, precision, args.steps,
                                       optimizer)
        runs[name]()  # warm-up: oneDNN's kernels for these shapes, the optimizer's state
    median, speedup = time_in_pairs(runs, args.pairs)
    dtype = precision.describe().split(";")[0].split(",")[0]
    print(f"{arch}, batch {args.batch_size} at {args.size}x{args.size}, {dtype} on {device} ({cpu_name()}): "
          f"NCHW {1 / median['nchw']:.2f} img/s, channels_last {1 / median['channels_last']:.2f} img/s, "
          f"channels_last {1 / speedup:.2f}x (median of the pairs' ratios)")
    print(json.dumps({"bench": "memory_format", "cpu": cpu_name(), **cpu_counts(),
                      "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "device": str(device), "precision": dtype, "arch": arch, "batch_size": args.batch_size,
                      "size": args.size, "pairs": args.pairs, "steps": args.steps,
                      "images_per_s": {k: round(1 / v, 2) for k, v in median.items()},
                      "channels_last_speedup": round(1 / speedup, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # the glibc malloc settings of train.py (utils.keep_freed_memory), one-line errors
