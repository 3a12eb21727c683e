"""Time lost in the kernel: the same training steps with glibc's default malloc and with utils.keep_freed_memory.

Each row runs ``--steps`` steps of ``engine.step`` (forward, loss, backward, optimizer) on random images in a fresh
process, after one warm-up step, and reports images/s, user and system CPU seconds and minor page faults of the
timed steps (getrusage). By default: UNet, 256x256, batch 8, AdamW (the full-size crop recipe's step), in fp32
and in the precision ``--amp auto`` picks on this CPU.

    python bench/kernel_time.py
    python bench/kernel_time.py --arch NestedUNet --deep_supervision --size 96 --batch 16 --optimizer SGD
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from archs import build_model  # noqa: E402
from config import ARCHS  # noqa: E402
from engine import Precision, step  # noqa: E402
from losses import build_loss  # noqa: E402
from timing import cpu_counts, cpu_name  # noqa: E402
from utils import ArgumentParser, keep_freed_memory  # noqa: E402

import resource  # noqa: E402  (POSIX only: after utils, which names WSL on Windows)


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/kernel_time.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="UNet", choices=ARCHS)
    p.add_argument("--deep_supervision", action="store_true")
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--optimizer", default="AdamW", choices=["AdamW", "SGD"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--amps", default="fp32,auto", help="comma-separated --amp values")
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args, amp, allocator):
    """Run the steps in this process; returns the row's figures."""
    if allocator == "keep_freed_memory":
        keep_freed_memory()
    torch.manual_seed(0)
    precision = Precision.choose(torch.device("cpu"), amp)
    model = precision.prepare(build_model(args.arch, 1, 3, args.deep_supervision))
    cls = torch.optim.AdamW if args.optimizer == "AdamW" else torch.optim.SGD
    optimizer = cls(model.parameters(), lr=1e-3)
    criterion = build_loss("BCEDiceLoss")
    images, masks = precision.to_device(torch.randn(args.batch, 3, args.size, args.size),
                                        (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float())
    step(model, images, masks, criterion, precision, optimizer)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step(model, images, masks, criterion, precision, optimizer)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"amp": amp, "precision": precision.describe().split(";")[0], "allocator": allocator,
            "images_per_s": round(args.steps * args.batch / seconds, 3),
            "user_s": round(after.ru_utime - before.ru_utime, 2), "sys_s": round(after.ru_stime - before.ru_stime, 2),
            "minor_faults": after.ru_minflt - before.ru_minflt}


def main(argv=None):
    args = parse_args(argv)
    if args._row:
        amp, allocator = args._row.split(":")
        print(json.dumps(measure(args, amp, allocator)), flush=True)
        return 0
    rows = []
    for amp in args.amps.split(","):
        for allocator in ("default", "keep_freed_memory"):
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--_row", f"{amp}:{allocator}"]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{rows[-1]['precision']:28} {allocator:18} {rows[-1]['images_per_s']:8.2f} img/s  "
                  f"user {rows[-1]['user_s']:6.1f} s  sys {rows[-1]['sys_s']:5.1f} s  "
                  f"minor faults {rows[-1]['minor_faults']:>10,}", flush=True)
    print(json.dumps({"bench": "kernel_time", "cpu": cpu_name(), **cpu_counts(), "torch": torch.__version__,
                      "arch": args.arch, "deep_supervision": args.deep_supervision, "size": args.size,
                      "batch": args.batch, "optimizer": args.optimizer, "steps": args.steps, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
