"""Train and evaluate recipes from configs/ one after another and print a table of their scores (docs/results.md).

    python bench/quality.py configs/dsb2018_96_*_bcedice.yml configs/dsb2018_96_*_lovasz.yml
    python bench/quality.py configs/dsb2018_96_UNet_bcedice.yml --epochs 10 --suffix _cpu10

Each row: pooled val IoU, mean per-image IoU and Dice (with and without flip TTA), the DSB2018 instance score
(each way of splitting nuclei) when the dataset has instance labels, test-split numbers when the recipe
holds one out, epochs, wall time, hardware, and the exact command. Runs train.py and val.py as users do
(train in a subprocess, val in-process), in the current folder (inputs/, models/ as for train.py). Writes
bench/results/quality.csv (appending) and prints one JSON line last.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pandas as pd  # noqa: E402  (after the path set-up above)
import torch  # noqa: E402

import val  # noqa: E402
from config import parse_train_args  # noqa: E402
from files import atomic_write  # noqa: E402
from timing import cpu_name, cpus_text  # noqa: E402
from utils import ArgumentParser  # noqa: E402


def hardware():
    """'NVIDIA H100 80GB HBM3' or the CPU model with the logical CPUs this process may use (and the machine's)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {cpus_text()}"


def run_recipe(config, extra, train=True):
    """Train one recipe; returns (its flags, seconds, command). ``train=False`` only reads the finished run's
    log.csv, whose epoch times give the seconds (e.g. after a benchmark stopped during evaluation)."""
    args = parse_train_args(["--config", config] + extra)
    cmd = ["train.py", "--config", config] + extra
    if train:
        t0 = time.time()
        subprocess.run([sys.executable, os.path.join(REPO, cmd[0])] + cmd[1:] + ["--overwrite"], check=True)
        seconds = time.time() - t0
    else:
        seconds = float(pd.read_csv(os.path.join("models", args.name, "log.csv"))["seconds"].sum())
    return args, seconds, " ".join(["python"] + cmd)


def evaluate_run(name, split, tta):
    return val.main(["--name", name, "--split", split, "--no_overlays"] + (["--tta"] if tta else []))


def append_row(path, row):
    """Add one result row to the CSV at ``path``, atomically; a row with new columns widens the table."""
    table = pd.DataFrame([row])
    if os.path.isfile(path):
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    with atomic_write(path) as f:
        table.to_csv(f, index=False)


def main(argv=None):
    p = ArgumentParser(prog="bench/quality.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="recipes to run, in order")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (say so in the table)")
    p.add_argument("--suffix", default="", help="appended to each run name (e.g. _cpu10), and to the --init run of a "
                   "fine-tuning recipe")
    p.add_argument("--no_tta", action="store_true", help="skip the flip-TTA evaluation")
    p.add_argument("--evaluate_only", action="store_true",
                   help="do not train: evaluate the runs already in models/ (wall time: their log's epoch times)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "quality.csv"))
    args = p.parse_args(argv)
    rows = []
    for path in args.configs:
        recipe = parse_train_args(["--config", path])
        name = recipe.name + args.suffix
        extra = ["--name", name] + (["--epochs", str(args.epochs)] if args.epochs else [])
        if recipe.init and args.suffix and not recipe.init.endswith(".pth"):
            extra += ["--init", recipe.init + args.suffix]  # a fine-tuning recipe starts from the same-suffix run
        run, seconds, command = run_recipe(path, extra, train=not args.evaluate_only)
        log = pd.read_csv(os.path.join("models", name, "log.csv"))
        best = log.loc[log["val_iou"].idxmax()]
        val = evaluate_run(name, "val", False)
        row = {"run": name, "arch": run.arch + (" + DS" if run.deep_supervision else ""), "loss": run.loss,
               "val_iou": round(val["iou"], 4), "val_iou_mean": round(val["iou_mean"], 4),
               "val_dice_mean": round(val["dice_mean"], 4), "epochs": len(log), "best_epoch": int(best["epoch"]),
               "minutes": round(seconds / 60, 1), "hardware": hardware(), "command": command}
        row.update({k: round(v, 4) for k, v in val.items() if k.startswith("dsb")})
        if not args.no_tta:
            tta = evaluate_run(name, "val", True)
            row.update(val_iou_tta=round(tta["iou"], 4), val_iou_mean_tta=round(tta["iou_mean"], 4))
        if run.test_size:
            test = evaluate_run(name, "test", False)
            row.update(test_iou=round(test["iou"], 4), test_iou_mean=round(test["iou_mean"], 4),
                       test_dice_mean=round(test["dice_mean"], 4))
        rows.append(row)
        append_row(args.out, row)
    table = pd.DataFrame(rows)
    print(table.drop(columns=["command"]).to_string(index=False))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
