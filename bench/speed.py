"""Training throughput: the seed's loop (bench/seed_loop.py) against ours (a real Trainer), on the same data.

For every row (architecture x batch size x loss x device) it times, after warm-up epochs, ``--repeats`` training
epochs of

(a) ``seed``: the loop of 4uiiurz1/pytorch-nested-unet's train.py written plainly (see bench/seed_loop.py):
    cv2 decode of every PNG at every item, the seed's augmentations and double normalisation, workers started
    again every epoch, fp32, a host sync per step (``loss.item()`` and a numpy IoU);
(b) ``ours``: a Trainer built with ``config.parse_train_args`` exactly as train.py builds it, whose training half
    ``Trainer.train_epoch`` (the training part of ``Trainer.fit``'s epoch: ``engine.train_one_epoch`` on the
    Trainer's cached loader with persistent workers, its model, optimizer and precision) is called as is.

Both see the same training split of the same images, the same model architecture and initial weights, the same
batch size, the same number of steps (``--steps`` caps each epoch; default a whole epoch) and the same
``--num_workers``. Throughput is training images / wall seconds of the epoch, data loading included; validation
is not timed. Memory is the peak RSS of the measuring process (``ru_maxrss``) on the CPU and
``torch.cuda.max_memory_allocated`` on a GPU. By default each measurement runs in a fresh subprocess so that
``ru_maxrss``, a process-wide high-water mark, belongs to that loop alone; ``--in_process`` runs everything in
this process and reports the increase of the high-water mark instead (0 when a loop stays below an earlier peak).

Everything happens in a temporary folder (synthetic data generated there, Trainer's models/<name>/ there),
removed at the end. The table is followed, as the last line, by one JSON object with all the figures.

    python bench/speed.py --quick                       # a couple of minutes on 2 CPU cores
    python bench/speed.py                               # all rows, CPU (and CUDA when present)
    python bench/speed.py --device cuda --batch_sizes 16,64 --loss BCEDiceLoss,LovaszHingeLoss
"""
import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for _p in (ROOT, BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402  (after the path set-up above)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from archs import build_model  # noqa: E402
from config import parse_train_args  # noqa: E402
from layouts import list_ids  # noqa: E402
from engine import choose_device, seed_everything  # noqa: E402
from files import interrupts_held  # noqa: E402
from losses import build_loss, loss_over_heads  # noqa: E402
from seed_loop import seed_criterion, seed_loader, seed_train_epoch  # noqa: E402
from splits import make_split  # noqa: E402
from synthetic import ensure_synthetic  # noqa: E402
from timing import cpu_counts, cpu_matmul_flops, cpu_name, cpus_text, device_list, sync  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import ArgumentParser, compile_mode, keep_freed_memory, stop_signals_as_interrupts, usable_cpus  # noqa: E402

import resource  # noqa: E402  (POSIX only: after utils, which names WSL on Windows)

ARCH_ROWS = {"UNet": ("UNet", False), "NestedUNet": ("NestedUNet", False), "NestedUNet_wDS": ("NestedUNet", True)}
LOOPS = ("seed", "ours")


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small run: 1 step per epoch, 1 warm-up and 2 timed epochs (unless given explicitly)")
    p.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when present), cpu or cuda")
    p.add_argument("--archs", default="UNet,NestedUNet,NestedUNet_wDS",
                   help="comma-separated rows among " + ", ".join(ARCH_ROWS))
    p.add_argument("--batch_sizes", default="16", help="comma-separated batch sizes, e.g. 16,64")
    p.add_argument("--loss", default="BCEDiceLoss",
                   help="comma-separated: BCEDiceLoss, LovaszHingeLoss, BCEWithLogitsLoss (the seed loop uses the "
                        "seed's BCEDice and its per-image Python-loop Lovasz)")
    p.add_argument("--dataset", default="synthetic",
                   help="'synthetic' (generated into a temporary folder) or a dataset under inputs/ (e.g. "
                        "dsb2018_96) or a path to a dataset folder")
    p.add_argument("--num_images", default=160, type=int, help="synthetic images to generate")
    p.add_argument("--size", default=96, type=int, help="synthetic image size and the training input_h/input_w")
    p.add_argument("--steps", default=None, type=int, help="at most this many steps per epoch (default: whole epoch)")
    p.add_argument("--repeats", default=None, type=int, help="timed epochs per measurement; the median is reported "
                   "(default 3, --quick 2)")
    p.add_argument("--warmup", default=None, type=int, help="untimed epochs first (default 1)")
    p.add_argument("--num_workers", default=None, type=int,
                   help="DataLoader workers for both loops (default min(4, CPU count); the seed's default is 4)")
    p.add_argument("--amp", default="auto", help="ours: --amp (auto, bf16, fp16, fp32)")
    p.add_argument("--channels_last", default="auto", help="ours: --channels_last")
    p.add_argument("--loader", default="auto", help="ours: --loader (auto, device, workers)")
    p.add_argument("--compile", default=False, type=compile_mode,
                   help="ours: --compile (e.g. reduce-overhead: the step in CUDA graphs)")
    p.add_argument("--in_process", action="store_true",
                   help="measure in this process (no subprocesses); memory is then a high-water-mark increase")
    p.add_argument("--seed", default=0, type=int, help="weights, shuffling and augmentation seed")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 1 if args.steps is None else args.steps
        args.repeats = 2 if args.repeats is None else args.repeats
    args.repeats = 3 if args.repeats is None else args.repeats
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.num_workers is None:
        args.num_workers = min(4, usable_cpus())
    args.arch_list = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in args.arch_list if a not in ARCH_ROWS]
    if unknown:
        p.error(f"--archs: unknown {unknown}; choose among {', '.join(ARCH_ROWS)}")
    args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.loss_list = [x.strip() for x in args.loss.split(",") if x.strip()]
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        p.error("--repeats must be >= 1, --warmup >= 0, --steps >= 1")
    if any(b < 1 for b in args.batch_list):
        p.error("--batch_sizes must be positive")
    return args


# ------------------------------------------------------------------------------------------ one measurement

# dense bf16/fp16 tensor-core peaks (FLOP/s) by device name; MFU is reported where the device is listed
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s, or None (CPUs and unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def training_flops_per_image(spec, device):
    """FLOPs of one training step per image (forward + backward, counted by torch's FlopCounterMode on one image of
    the benchmark's size)."""
    model = build_model(spec["arch"], 1, 3, spec["ds"]).to(device)
    x = torch.randn(1, 3, spec["size"], spec["size"], device=device)
    y = torch.zeros(1, 1, spec["size"], spec["size"], device=device)
    with FlopCounterMode(display=False) as counter:
        loss_over_heads(build_loss("BCEDiceLoss"), model(x), y).backward()
    return counter.get_total_flops()


def _max_rss_mib(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


# A run name per measurement: the --in_process ones share a pid, and saving no epoch, each would leave the run an
# --overwrite of the one before set aside, which the third refused
RUN_NUMBERS = itertools.count()


def _build_ours(spec):
    """A Trainer from train.py's own flags; returns (epoch function, steps per epoch, description)."""
    argv = ["--dataset", spec["dataset"], "--arch", spec["arch"], "--deep_supervision", str(spec["ds"]),
            "--batch_size", str(spec["batch_size"]), "--loss", spec["loss"], "--num_workers", str(spec["num_workers"]),
            "--device", spec["device"], "--amp", spec["amp"], "--channels_last", spec["channels_last"],
            "--loader", spec["loader"], "--compile", str(spec["compile"]),
            "--input_h", str(spec["size"]), "--input_w", str(spec["size"]), "--seed", str(spec["seed"]),
            "--epochs", str(spec["warmup"] + spec["repeats"]), "--name", f"bench_{os.getpid()}_{next(RUN_NUMBERS)}"]
    trainer = Trainer(parse_train_args(argv), progress=False)
    steps = min(len(trainer.train_loader), spec["steps"] or len(trainer.train_loader))

    def epoch(e):
        return trainer.train_epoch(e, max_steps=spec["steps"])

    loader = "device" if trainer.on_device else "workers"
    return trainer, epoch, steps, trainer.device, f"{trainer.precision.describe().split(';')[0]}, {loader}"


def _build_seed(spec):
    """The seed's loop on the same training ids (the seed's 80/20 split, random_state 41)."""
    device = choose_device(spec["device"])
    dataset_dir = os.path.join("inputs", spec["dataset"])
    split = make_split(list_ids(dataset_dir, ".png", ".png", 1))
    train_ids = split.loc[split["split"] == "train", "img_id"].tolist()
    if len(train_ids) < spec["batch_size"]:
        raise SystemExit(f"batch size {spec['batch_size']} is larger than the {len(train_ids)} training images")
    torch.backends.cudnn.benchmark = True
    loader = seed_loader(train_ids, dataset_dir, {"img_ext": ".png", "mask_ext": ".png", "num_classes": 1,
                                                  "input_h": spec["size"], "input_w": spec["size"]},
                         spec["batch_size"], spec["num_workers"])
    seed_everything(spec["seed"])
    model = build_model(spec["arch"], 1, 3, spec["ds"]).to(device)
    criterion = seed_criterion(spec["loss"]).to(device)
    optimizer = torch.optim.SGD(filter(lambda q: q.requires_grad, model.parameters()), lr=1e-3, momentum=0.9,
                                nesterov=False, weight_decay=1e-4)
    steps = min(len(loader), spec["steps"] or len(loader))

    def epoch(e):
        return seed_train_epoch(loader, model, criterion, optimizer, device, spec["ds"], max_steps=spec["steps"])

    return loader, epoch, steps, device, "fp32"


def measure(spec):
    """Build one loop, run warm-up and timed epochs; returns a dict of figures."""
    rss_before = _max_rss_mib()
    if spec["loop"] == "ours":
        keep_freed_memory()  # as train.py does (utils.run_cli)
    build = _build_ours if spec["loop"] == "ours" else _build_seed
    holder, epoch, steps, device, precision = build(spec)
    for e in range(spec["warmup"]):
        epoch(e)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, last = [], None
    for r in range(spec["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        last = epoch(spec["warmup"] + r)
        sync(device)
        times.append(time.perf_counter() - t0)
    images = steps * spec["batch_size"]
    epoch_s = statistics.median(times)
    flops = training_flops_per_image(spec, device)
    out = {"loop": spec["loop"], "precision": precision, "steps_per_epoch": steps, "images_per_epoch": images,
           "epoch_s": round(epoch_s, 4), "epoch_s_all": [round(t, 4) for t in times],
           "images_per_s": round(images / epoch_s, 3), "loss": round(float(last["loss"]), 5),
           "iou": round(float(last["iou"]), 5), "train_flop_per_image": flops,
           "tflop_per_s": round(images / epoch_s * flops / 1e12, 3)}
    peak = peak_flops(device)
    out["mfu"] = round(images / epoch_s * flops / peak, 4) if peak else None
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["mem_kind"] = "cuda_max_allocated"
    elif spec["in_process"]:
        out["peak_mem_mib"] = round(_max_rss_mib() - rss_before, 1)
        out["mem_kind"] = "rss_high_water_increase"
    else:
        out["peak_mem_mib"] = round(_max_rss_mib(), 1)
        out["mem_kind"] = "peak_rss"
    out["rss_at_start_mib"] = round(rss_before, 1)
    del holder, epoch  # shuts the loader's workers down, so their peak is counted below
    gc.collect()
    if not spec["in_process"]:
        out["worker_peak_rss_mib"] = round(_max_rss_mib(resource.RUSAGE_CHILDREN), 1)
    return out


def run_measurement(spec, workdir):
    if spec["in_process"]:
        return measure(spec)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = None
    try:
        # a stop signal while Popen starts the child (it exists as soon as forked) raised out of Popen, leaving the
        # child measuring on, unknown to this script: held, it acts once the child can be killed
        with interrupts_held():
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                                    cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with proc:
            out, err = proc.communicate()
    except KeyboardInterrupt:  # Ctrl-C or a stop signal: the measurement ends with the script
        if proc is not None:
            proc.kill()
            proc.wait()  # subprocess.run waits 0.25 s at most, then leaves a killed child slow to exit to init
        raise
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:] + err[-4000:])
        raise SystemExit(f"measurement {spec['loop']} {spec['arch']} failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the driver

def prepare_dataset(args, workdir):
    """Put the dataset at <workdir>/inputs/<name>; returns the name the Trainer gets as --dataset."""
    inputs = os.path.join(workdir, "inputs")
    os.makedirs(inputs, exist_ok=True)
    if args.dataset == "synthetic":
        ensure_synthetic(os.path.join(inputs, "synthetic"), args.num_images, args.size, seed=0, progress=False)
        return "synthetic"
    candidates = [args.dataset, os.path.join("inputs", args.dataset), os.path.join(ROOT, "inputs", args.dataset)]
    found = next((os.path.abspath(c) for c in candidates if os.path.isdir(os.path.join(c, "images"))), None)
    if found is None:
        raise SystemExit(f"--dataset {args.dataset}: no images/ folder in {', '.join(candidates)}")
    name = os.path.basename(found.rstrip("/"))
    os.symlink(found, os.path.join(inputs, name))
    return name


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({cpus_text()}, {torch.get_num_threads()} torch threads)"


def mfu(m):
    if m["mfu"] is not None:
        return f"{100 * m['mfu']:.1f}%"
    return f"{100 * m['matmul_share']:.0f}%*" if m.get("matmul_share") is not None else "-"


def matmul_precision(m):
    """The precision of a loop's matmul ceiling: 'bf16' for a bf16 loop (autocast), else 'fp32'."""
    return "bf16" if m["precision"].startswith("bf16") else "fp32"


def cpu_matmul_ceilings(rows):
    """{precision: FLOP/s} of a matrix product on this CPU (timing.cpu_matmul_flops) in each precision that the
    CPU rows' loops trained in."""
    used = {matmul_precision(row[loop]) for row in rows if row["device"] == "cpu" for loop in LOOPS}
    return {p: cpu_matmul_flops(torch.bfloat16 if p == "bf16" else torch.float32) for p in sorted(used)}


def add_matmul_shares(rows, ceilings):
    """Each CPU row's loops get matmul_share: their training FLOP/s over the matmul ceiling of their precision."""
    for row in rows:
        for loop in LOOPS:
            m = row[loop]
            if row["device"] == "cpu":
                ceiling = ceilings[matmul_precision(m)]
                m["matmul_share"] = round(m["images_per_s"] * m["train_flop_per_image"] / ceiling, 3)


def print_table(rows):
    head = f"{'device':6} {'arch':15} {'batch':>5} {'loss':16} {'loop':5} {'precision':32} {'steps':>5} " \
           f"{'s/epoch':>8} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} {'ours/seed':>9}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for loop in LOOPS:
            m = row[loop]
            ratio = f"{row['ratio']:.2f}x" if loop == "ours" else ""
            print(f"{row['device']:6} {row['arch_row']:15} {row['batch_size']:>5} {row['loss']:16} {loop:5} "
                  f"{m['precision']:32} {m['steps_per_epoch']:>5} {m['epoch_s']:>8.3f} {m['images_per_s']:>8.1f} "
                  f"{m['tflop_per_s']:>8.3f} {mfu(m):>6} {m['peak_mem_mib']:>9.1f} {ratio:>9}")
    print(flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(json.loads(args._worker))), flush=True)
        return 0
    devices = device_list(args.device)
    workdir = tempfile.mkdtemp(prefix="bench_speed_")
    old_cwd = os.getcwd()
    rows = []
    try:
        dataset = prepare_dataset(args, workdir)
        os.chdir(workdir)
        for device in devices:
            for arch_row in args.arch_list:
                arch, ds = ARCH_ROWS[arch_row]
                for batch in args.batch_list:
                    for loss in args.loss_list:
                        row = {"device": device, "arch_row": arch_row, "arch": arch, "deep_supervision": ds,
                               "batch_size": batch, "loss": loss}
                        for loop in LOOPS:
                            spec = {"loop": loop, "device": device, "arch": arch, "ds": ds, "batch_size": batch,
                                    "loss": loss, "dataset": dataset, "size": args.size, "steps": args.steps,
                                    "repeats": args.repeats, "warmup": args.warmup, "num_workers": args.num_workers,
                                    "amp": args.amp, "channels_last": args.channels_last, "loader": args.loader,
                                    "compile": args.compile, "seed": args.seed,
                                    "in_process": args.in_process}
                            print(f"[{device}] {arch_row} batch {batch} {loss}: {loop} ...", file=sys.stderr,
                                  flush=True)
                            row[loop] = run_measurement(spec, workdir)
                        row["ratio"] = round(row["ours"]["images_per_s"] / row["seed"]["images_per_s"], 3)
                        rows.append(row)
    finally:
        os.chdir(old_cwd)
        shutil.rmtree(workdir, ignore_errors=True)
    ceilings = cpu_matmul_ceilings(rows)
    add_matmul_shares(rows, ceilings)
    print_table(rows)
    if ceilings:
        print("* on the CPU, no datasheet peak: the share of a 2048x2048 matmul's speed measured here ("
              + ", ".join(f"{p} {f / 1e12:.3f} TFLOP/s" for p, f in ceilings.items())
              + f" on {torch.get_num_threads()} torch threads), about the most that dense convolutions reach")
    ratios = [r["ratio"] for r in rows]
    geomean = float(torch.tensor(ratios, dtype=torch.float64).log().mean().exp())
    print(f"ours/seed training throughput: geometric mean {geomean:.2f}x over {len(rows)} rows "
          f"(images/s of the training epoch incl. data loading; median of {args.repeats} epochs after "
          f"{args.warmup} warm-up)")
    summary = {
        "bench": "speed", "torch": torch.__version__, "python": platform.python_version(),
        **cpu_counts(), "torch_threads": torch.get_num_threads(),
        "devices": {d: device_name(d) for d in devices}, "dataset": args.dataset, "image_size": args.size,
        "num_workers": args.num_workers, "steps_cap": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "in_process": args.in_process, "quick": args.quick, "amp": args.amp, "channels_last": args.channels_last,
        "loader": args.loader, "compile": args.compile,
        "memory": ("MiB; peak_mem_mib is, on CPU, the peak RSS of the measuring process (ru_maxrss; with "
                   "--in_process the increase of that high-water mark) and on CUDA "
                   "torch.cuda.max_memory_allocated; worker_peak_rss_mib is the largest DataLoader worker's "
                   "peak RSS (forked: counts pages shared with the parent)"),
        "cpu_matmul_tflop_per_s": {p: round(f / 1e12, 4) for p, f in ceilings.items()},
        "rows": rows, "geomean_ratio": round(geomean, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    # the signals that end a job (utils.STOP_SIGNALS) as Ctrl-C: the measuring subprocess is killed and the work
    # folder removed (not run_cli: its malloc settings would apply to the seed loop of --in_process too)
    try:
        with stop_signals_as_interrupts():
            sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
