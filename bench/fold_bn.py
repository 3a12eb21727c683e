"""Inference with BatchNorm folded into the convolutions (archs.fold_batchnorm, what val.py and predict.py run)
against the same network unfolded, side by side in one process.

Both copies hold the same weights and random non-trivial BatchNorm statistics. They run ``engine.step`` without
an optimizer (val.py's evaluation step: forward and loss) on one random image, in pairs of ``--steps`` steps
each (the order swapped every pair; timing.time_in_pairs) after a warm-up. The script prints the median seconds
per image of each, the speed-up as the median over the pairs of their time ratio, and the largest difference
between their logits. By default a UNet on one 520x696 field (the size of most DSB2018 fluorescence images).

    python bench/fold_bn.py
    python bench/fold_bn.py --arch NestedUNet --deep_supervision --height 256 --width 320
"""
import copy
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from archs import build_model, fold_batchnorm  # noqa: E402
from config import ARCHS  # noqa: E402
from engine import Precision, choose_device, forward  # noqa: E402
from losses import build_loss  # noqa: E402
from timing import add_pair_args, cpu_counts, cpu_name, seconds_per_image, time_in_pairs  # noqa: E402
from utils import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/fold_bn.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="UNet", choices=ARCHS)
    p.add_argument("--deep_supervision", action="store_true")
    p.add_argument("--height", type=int, default=520)
    p.add_argument("--width", type=int, default=696)
    add_pair_args(p, pairs=20, steps=1)
    return p.parse_args(argv)


def two_networks(arch, deep_supervision, precision):
    """(unfolded, folded): the same random network in eval mode, BatchNorm statistics away from 0 and 1."""
    torch.manual_seed(0)
    model = build_model(arch, 1, 3, deep_supervision).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    folded = fold_batchnorm(copy.deepcopy(model))
    return (precision.prepare(model.to(precision.device)), precision.prepare(folded.to(precision.device)))


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    precision = Precision.choose(device, args.amp)
    networks = dict(zip(("unfolded", "folded"), two_networks(args.arch, args.deep_supervision, precision)))
    criterion = build_loss("BCEDiceLoss")
    images, masks = precision.to_device(torch.rand(1, 3, args.height, args.width),
                                        (torch.rand(1, 1, args.height, args.width) > 0.5).float())
    with torch.inference_mode():
        with precision.autocast():
            logits = {name: forward(model, images) for name, model in networks.items()}
        difference = max((a.float() - b.float()).abs().max().item() for a, b in
                         zip(*(out if isinstance(out, list) else [out] for out in logits.values())))
        median, speedup = time_in_pairs(
            {name: functools.partial(seconds_per_image, model, images, masks, criterion, precision, args.steps)
             for name, model in networks.items()}, args.pairs)
    arch = args.arch + (" + DS" if args.deep_supervision else "")
    print(f"{arch}, {args.height}x{args.width}, {precision.describe().split(';')[0]} on {device}: "
          f"unfolded {median['unfolded'] * 1e3:.0f} ms/image, folded {median['folded'] * 1e3:.0f} ms/image, "
          f"{speedup:.2f}x (median of the pairs' ratios); largest logit difference {difference:.2g}")
    print(json.dumps({"bench": "fold_bn", "cpu": cpu_name(), **cpu_counts(), "torch": torch.__version__,
                      "device": str(device), "precision": precision.describe().split(";")[0], "arch": arch,
                      "size": [args.height, args.width], "pairs": args.pairs, "steps": args.steps,
                      "seconds_per_image": {k: round(v, 5) for k, v in median.items()},
                      "speedup": round(speedup, 3), "max_logit_difference": difference}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # the glibc malloc settings of train.py (utils.keep_freed_memory), one-line errors
