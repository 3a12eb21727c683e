"""The training step with the optimizer's single-kernel ("fused") update (optim.fused_update, what train.py
uses wherever torch has it) against torch's default per-tensor update, side by side in one process.

Two copies of the same network, each with its own optimizer (``--optimizer``, the recipes' AdamW by default),
run ``engine.step`` with the update on one random batch, in pairs of ``--steps`` steps each (the order swapped
every pair; timing.time_in_pairs) after a warm-up step each. The script prints the median images/s of each and
the speed-up as the median over the pairs of their time ratio. By default a NestedUNet with deep supervision,
batch 16 at 96x96: the 96x96 recipes' step, where the update is a larger share than at full size.

    python bench/fused_optimizer.py
    python bench/fused_optimizer.py --arch UNet --optimizer SGD
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
    p = ArgumentParser(prog="bench/fused_optimizer.py", description=__doc__.split("\n\n")[0])
    add_step_args(p)
    p.add_argument("--optimizer", default="AdamW", choices=["Adam", "AdamW", "SGD"])
    add_pair_args(p, pairs=10, steps=3)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    if not fused_update(args.optimizer, device.type):
        raise SystemExit(f"torch {torch.__version__} has no fused {args.optimizer} update on {device.type}")
    precision = Precision.choose(device, args.amp)
    model, batch, arch = step_model_and_batch(args, device)
    model = precision.prepare(model)
    models = {"default": model, "fused": copy.deepcopy(model)}
    criterion = build_loss("BCEDiceLoss")
    images, masks = precision.to_device(*batch)
    runs = {}
    for name, net in models.items():
        optimizer = build_optimizer(args.optimizer, net.parameters(), 1e-3, 0.9, False, 1e-4, fused=name == "fused")
        runs[name] = functools.partial(seconds_per_image, net, images, masks, criterion, precision, args.steps,
                                       optimizer)
        seconds_per_image(net, images, masks, criterion, precision, 1, optimizer)  # warm-up, optimizer state
    median, speedup = time_in_pairs(runs, args.pairs)
    print(f"{arch}, batch {args.batch_size} at {args.size}x{args.size}, {args.optimizer}, "
          f"{precision.describe().split(';')[0]} on {device}: default update {1 / median['default']:.1f} img/s, "
          f"fused {1 / median['fused']:.1f} img/s, {speedup:.2f}x (median of the pairs' ratios)")
    print(json.dumps({"bench": "fused_optimizer", "cpu": cpu_name(), **cpu_counts(),
                      "torch": torch.__version__, "device": str(device),
                      "precision": precision.describe().split(";")[0], "arch": arch, "optimizer": args.optimizer,
                      "batch_size": args.batch_size, "size": args.size, "pairs": args.pairs, "steps": args.steps,
                      "images_per_s": {k: round(1 / v, 2) for k, v in median.items()},
                      "speedup": round(speedup, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # the glibc malloc settings of train.py (utils.keep_freed_memory), one-line errors
