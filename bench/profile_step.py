"""Where one training step's time goes: torch.profiler over ``engine.step`` (forward, loss over the heads,
backward, AdamW update as in the recipes), the operators sorted by their own time, with their share of the step.

The step is the one bench/fused_optimizer.py times (timing.step_model_and_batch: a seeded network, one random
batch), after ``--warmup`` steps. ``--by_shape`` splits each operator by its input shapes (which convolution,
which BatchNorm): it shows the layers that cost more than their FLOPs. On a GPU the CUDA kernels' time is what is
sorted and shared. The last line is a JSON summary.

    python bench/profile_step.py                                    # NestedUNet + DS, batch 16, 96x96
    python bench/profile_step.py --by_shape --rows 20 --arch UNet --size 256 --batch_size 8
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import add_amp_arg, add_device_arg  # noqa: E402
from engine import Precision, choose_device, step  # noqa: E402
from losses import build_loss  # noqa: E402
from optim import build_optimizer, fused_update  # noqa: E402
from timing import (add_step_args, cpu_counts, cpu_name, cpus_text, seconds_per_image,  # noqa: E402
                    step_model_and_batch, sync)
from utils import ArgumentParser, at_least, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/profile_step.py", description=__doc__.split("\n\n")[0])
    add_step_args(p)
    add_amp_arg(p)
    add_device_arg(p)
    p.add_argument("--steps", type=at_least(1), default=3, help="profiled steps")
    p.add_argument("--warmup", type=at_least(0), default=5,
                   help="steps run first (the first ones create oneDNN's kernels and the allocator's pools)")
    p.add_argument("--rows", type=at_least(1), default=25, help="operators (or operator and shapes) listed")
    p.add_argument("--by_shape", action="store_true", help="one row per operator and input shapes")
    return p.parse_args(argv)


def profiled_steps(model, images, masks, criterion, precision, optimizer, steps):
    """torch.profiler's record of ``steps`` calls of engine.step on one batch (CPU, and CUDA on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if precision.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(precision.device)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step(model, images, masks, criterion, precision, optimizer)
        sync(precision.device)
    return prof


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    cuda = device.type == "cuda"
    precision = Precision.choose(device, args.amp)
    model, batch, arch = step_model_and_batch(args, device)
    model = precision.prepare(model)
    optimizer = build_optimizer("AdamW", model.parameters(), 1e-3, 0.9, False, 1e-4,
                                fused=fused_update("AdamW", device.type))
    criterion = build_loss("BCEDiceLoss")
    images, masks = precision.to_device(*batch)
    if args.warmup:
        seconds_per_image(model, images, masks, criterion, precision, args.warmup, optimizer)
    events = profiled_steps(model, images, masks, criterion, precision, optimizer, args.steps).key_averages(
        group_by_input_shape=args.by_shape)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    own = {id(e): getattr(e, sort) / 1e3 / args.steps for e in events}  # ms per step
    total = sum(own.values())
    where = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {cpus_text()}"
    print(f"{arch}, batch {args.batch_size} at {args.size}x{args.size}, AdamW, {precision.describe().split(';')[0]} "
          f"on {device} ({where}), torch {torch.__version__}: {total:.1f} ms of {'CUDA' if cuda else 'CPU'} time "
          f"per step ({args.steps} steps after {args.warmup} warm-up steps)")
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=48, max_shapes_column_width=90))
    top = sorted(events, key=lambda e: -own[id(e)])[:args.rows]
    print(json.dumps({"bench": "profile_step", "cpu": cpu_name(), **cpu_counts(), "torch": torch.__version__,
                      "device": str(device), "precision": precision.describe().split(";")[0], "arch": arch,
                      "batch_size": args.batch_size, "size": args.size, "steps": args.steps,
                      "ms_per_step": round(total, 2),
                      "ops": [{"op": e.key, "shapes": str(e.input_shapes) if args.by_shape else None,
                               "calls_per_step": e.count / args.steps, "ms_per_step": round(own[id(e)], 3),
                               "share": round(own[id(e)] / total, 4)} for e in top]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # the glibc malloc settings of train.py (utils.keep_freed_memory), one-line errors
