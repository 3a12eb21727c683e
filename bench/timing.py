"""Timing helpers shared by the bench/ scripts: the CPU's name, the devices to measure on, a CUDA sync, the
flags and the model and batch of the scripts that time one training step, the alternating pairs of timed
blocks that keep a ratio steady on a shared CPU whose speed drifts, and the CPU's measured matmul speed.
"""
if __name__ == "__main__":  # a module, not a command
    raise SystemExit(f"{__file__} is imported by the other bench/ scripts; it is not a command "
                     "(see python bench/speed.py --help)")

import os
import platform
import statistics
import time

import torch

from archs import build_model
from config import ARCHS, DEEP_SUPERVISION_ARCHS, add_amp_arg, add_device_arg
from engine import step
from utils import at_least, usable_cpus


def sync(device):
    """Wait for ``device``'s queued work (a torch.device or its name), so that a timer reads finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_list(requested):
    """The devices a measurement runs on for --device ``requested``: auto = the CPU and CUDA when present."""
    if requested == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if requested not in ("cpu", "cuda"):
        raise SystemExit(f"--device {requested!r} is not one of auto, cpu, cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch")
    return [requested]


def add_pair_args(p, pairs, steps):
    """The flags of the scripts that alternate two variants in one process: --amp, --device, --pairs, --steps."""
    add_amp_arg(p)
    add_device_arg(p)
    p.add_argument("--pairs", type=at_least(1), default=pairs, help="timed pairs of blocks")
    p.add_argument("--steps", type=at_least(1), default=steps, help="steps per block")


def add_step_args(p, batch_size=16, size=96):
    """The flags of the scripts that time one training step: --arch, --deep_supervision, --batch_size, --size."""
    p.add_argument("--arch", default="NestedUNet", choices=ARCHS)
    p.add_argument("--deep_supervision", type=int, default=1, choices=[0, 1], help="NestedUNet's deep supervision")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--size", type=int, default=size, help="image height and width")


def step_model_and_batch(args, device):
    """For the scripts of :func:`add_step_args`: the seeded network of --arch/--deep_supervision in train mode on
    ``device``, a random batch on the CPU (images [B, 3, S, S] in [0, 1), masks [B, 1, S, S] in {0, 1}) and the
    network's label. Returns (model, (images, masks), label)."""
    torch.manual_seed(0)
    deep_supervision = bool(args.deep_supervision and args.arch in DEEP_SUPERVISION_ARCHS)
    model = build_model(args.arch, 1, 3, deep_supervision).to(device).train()
    batch = (torch.rand(args.batch_size, 3, args.size, args.size),
             (torch.rand(args.batch_size, 1, args.size, args.size) > 0.5).float())
    return model, batch, args.arch + (" + DS" if deep_supervision else "")


def seconds_per_image(model, images, masks, criterion, precision, steps, optimizer=None):
    """Wall seconds of one ``engine.step`` (with the update when ``optimizer`` is given) per image, averaged over
    ``steps``, synchronised on CUDA."""
    sync(precision.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, images, masks, criterion, precision, optimizer)
    sync(precision.device)
    return (time.perf_counter() - start) / steps / images.shape[0]


def time_in_pairs(runs, pairs):
    """Time each of two ``runs`` ({name: function -> seconds}) ``pairs`` times, in turn, the order swapped every
    pair. Returns ({name: median seconds}, the median over the pairs of first / second). On a shared CPU whose
    speed drifts by up to 2x within minutes, a ratio taken within each pair of neighbouring runs stays steady
    where the ratio of two overall medians does not."""
    (first, run_first), (second, run_second) = runs.items()
    times = {first: [], second: []}
    for pair in range(pairs):
        order = ((first, run_first), (second, run_second))
        for name, run in (order if pair % 2 == 0 else order[::-1]):
            times[name].append(run())
    ratio = statistics.median(a / b for a, b in zip(times[first], times[second]))
    return {name: statistics.median(values) for name, values in times.items()}, ratio


def cpu_name():
    """The CPU model as /proc/cpuinfo names it (name every timing by it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_counts():
    """The CPUs a timing had, for a JSON summary: ``cpus``, those this process may use (its affinity and cgroup CPU
    quota, utils.usable_cpus), and ``cpu_count``, the machine's logical CPUs (os.cpu_count)."""
    return {"cpus": usable_cpus(), "cpu_count": os.cpu_count()}


def cpus_text():
    """The CPUs a timing had, for a header: '2 logical CPUs', or '2 of 64 logical CPUs' when this process may use
    fewer than the machine has (taskset, a batch job, a container's CPU quota)."""
    counts = cpu_counts()
    if counts["cpus"] == counts["cpu_count"]:
        return f"{counts['cpus']} logical CPU{'s' if counts['cpus'] > 1 else ''}"
    return f"{counts['cpus']} of {counts['cpu_count']} logical CPUs"


def cpu_matmul_flops(dtype=torch.float32, size=2048, repeats=4):
    """FLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on the CPU with the torch threads this process
    has (the best of ``repeats`` after one untimed): what this CPU's BLAS reaches on dense work, about the most that
    the convolutions of a training step reach; the measure of a CPU, whose peak no table here lists."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / min(times)
