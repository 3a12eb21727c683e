"""What pruning a deep-supervision UNet++ costs and saves: for L = 1..4, the depth-L sub-network alone.

    python bench/prune.py --name dsb2018_96_NestedUNet_wDS
    python bench/prune.py --name dsb2018_96_NestedUNet_wDS_3way --split test --repeats 10 --device cpu

For each L: the parameters that sub-network uses (archs.count_parameters), its throughput in images/s (the
median over ``--repeats`` timed passes over the split, after one warm-up pass, on one device, the images
already on the device so that only the network is timed), and pooled IoU and Dice on the split (engine.evaluate,
the evaluation of val.py --prune L). Prints a table, then as the last line one JSON object with every figure.
"""
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after the path set-up above)

from archs import build_model, count_parameters  # noqa: E402
from checkpoints import load_run  # noqa: E402
from config import (INPUTS_DIR, add_amp_arg, add_device_arg, load_run_config, output_channels,  # noqa: E402
                    saved_run_dir)
from dataset import eval_loader, reading_of  # noqa: E402
from engine import Precision, choose_device, evaluate, forward  # noqa: E402
from losses import build_loss  # noqa: E402
from splits import read_split, split_ids  # noqa: E402
from timing import sync  # noqa: E402
from utils import ArgumentParser, UsageError, at_least, run_cli  # noqa: E402

LEVELS = (1, 2, 3, 4)


def build_parser():
    p = ArgumentParser(prog="bench/prune.py",
                       description="Parameters, speed and scores of a NestedUNet+DS run pruned at L = 1..4.")
    p.add_argument("--name", required=True, help="run name (a folder in models/); NestedUNet with deep supervision")
    p.add_argument("--split", default="val", choices=["val", "test", "train"], help="which ids of split.csv")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed passes per L (the median is reported)")
    p.add_argument("--batch_size", type=at_least(1), default=None, help="default: the run's batch size")
    add_device_arg(p)
    add_amp_arg(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def throughput(model, inputs, prune, precision, repeats):
    """Images/s of the network pruned at ``prune`` on ``inputs`` (batches [B, C, H, W] already on the device as
    the model takes them) in ``precision``: the median over ``repeats`` timed passes. Run it after a warm-up pass."""
    times = []
    with torch.inference_mode(), precision.autocast():
        for _ in range(repeats):
            start = time.perf_counter()
            for x in inputs:
                forward(model, x, prune=prune)
            sync(precision.device)
            times.append(time.perf_counter() - start)
    return sum(x.shape[0] for x in inputs) / statistics.median(times)


def main(argv):
    args = build_parser().parse_args(argv)
    cfg = load_run_config(args.name)
    if not (cfg.arch == "NestedUNet" and cfg.deep_supervision):
        raise UsageError(f"bench/prune.py needs a NestedUNet trained with deep supervision; {args.name} is "
                         f"{cfg.arch} {'with' if cfg.deep_supervision else 'without'} deep supervision")
    device = choose_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg, model = load_run(args.name, device)
    precision = Precision.choose(device, args.amp)
    model = precision.prepare(model)
    ids = split_ids(read_split(os.path.join(saved_run_dir(args.name), "split.csv")), args.split)
    if not ids:
        raise UsageError(f"{saved_run_dir(args.name)}/split.csv has no '{args.split}' ids")
    cfg.batch_size = args.batch_size or cfg.batch_size
    loader = eval_loader(os.path.join(INPUTS_DIR, cfg.dataset), ids, reading_of(cfg),
                         (cfg.input_h, cfg.input_w, cfg.crop_size), cfg.batch_size, 0)
    inputs = [precision.to_device(images, masks)[0] for images, masks, _ in loader]  # as evaluate() passes them
    criterion = build_loss(cfg.loss, border_after=cfg.num_classes if cfg.borders else None)
    # counted on the network as trained: load_run folds BatchNorm into the convs, which drops its parameters
    trained = build_model(cfg.arch, output_channels(cfg), cfg.input_channels, cfg.deep_supervision)
    rows = []
    for level in LEVELS:
        scores = evaluate(model, loader, criterion, precision, progress=False, prune=level,
                          classes=cfg.num_classes)  # also the warm-up pass
        speed = throughput(model, inputs, level, precision, args.repeats)
        rows.append({"prune": level, "params": count_parameters(trained, level), "images_per_s": round(speed, 2),
                     "iou": round(scores["iou"], 4), "dice": round(scores["dice"], 4)})
    full = rows[-1]
    size = "whole images" if cfg.crop_size else f"{cfg.input_h}x{cfg.input_w}"
    print(f"{args.name}: {args.split} split, {len(ids)} images ({size}), batch {cfg.batch_size}, on {device} "
          f"({precision.describe()}), median of {args.repeats} passes after a warm-up")
    print(f"{'L':>2}  {'params':>10}  {'% of L=4':>8}  {'images/s':>9}  {'speedup':>7}  {'IoU':>6}  {'Dice':>6}")
    for r in rows:
        print(f"{r['prune']:>2}  {r['params']:>10,}  {100 * r['params'] / full['params']:>7.1f}%  "
              f"{r['images_per_s']:>9.1f}  {r['images_per_s'] / full['images_per_s']:>6.2f}x  {r['iou']:>6.4f}  "
              f"{r['dice']:>6.4f}")
    result = {"name": args.name, "split": args.split, "images": len(ids), "device": str(device),
              "precision": precision.describe(), "batch_size": cfg.batch_size, "repeats": args.repeats, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
