"""Training curves from models/<name>/log.csv: loss, IoU/Dice and learning rate against epoch.

    python plot.py --name dsb2018_96_NestedUNet_wDS                 # -> models/<name>/curves.png
    python plot.py --name run_a run_b run_c --out compare.png       # several runs on one figure

train.py redraws models/<name>/curves.png as it trains: after an epoch (after several when epochs are so short that
drawing would take more than 5 % of the run's time) and when it ends or stops. The best epoch (highest val IoU) is
marked.
"""
import os

import pandas as pd
# A Figure of its own, not pyplot's: no backend is chosen (matplotlib.use would switch the one a notebook or script
# that imports train.py shows its own figures with) and no figure is left in pyplot's list
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from config import derived_files_dir, run_name_suggestion, saved_run_dir
from files import atomic_write
from utils import ArgumentParser, UsageError, path_arg, run_cli


def plot_runs(logs, names, out_path):
    """Draw one figure of three panels for one or more runs and write it atomically as PNG; returns the Figure.

    logs: pandas DataFrames with log.csv's columns (missing or NaN values are skipped); names: one per log.
    """
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_score, ax_lr = fig.subplots(1, 3)
    for i, (log, name) in enumerate(zip(logs, names)):
        colour = f"C{i}"
        label = (lambda s: f"{name} {s}") if len(logs) > 1 else (lambda s: s)
        _line(ax_loss, log, "loss", colour, "--", "o", label("train loss"))
        _line(ax_loss, log, "val_loss", colour, "-", "s", label("val loss"))
        _line(ax_score, log, "iou", colour, "--", "o", label("train IoU"))
        _line(ax_score, log, "val_iou", colour, "-", "s", label("val IoU"))
        _line(ax_score, log, "val_dice", colour, ":", "^", label("val Dice"))
        _line(ax_lr, log, "lr", colour, "-", "o", label("lr"))
        if "val_iou" in log and log["val_iou"].notna().any():
            best = log.loc[log["val_iou"].idxmax()]
            ax_score.scatter([best["epoch"]], [best["val_iou"]], color=colour, marker="*", s=160, zorder=3,
                             label=label(f"best epoch {int(best['epoch'])}: val IoU {best['val_iou']:.4f}"))
            for ax in (ax_loss, ax_lr):
                ax.axvline(best["epoch"], color=colour, alpha=0.3, linewidth=1)
    if len(names) == 1:  # several runs are named in the legends
        fig.suptitle(f"run {names[0]}")
    for ax, title, quantity in ((ax_loss, "loss", "loss"), (ax_score, "IoU / Dice (threshold 0.5)", "IoU / Dice"),
                                (ax_lr, "learning rate", "learning rate")):
        ax.set_title(title)
        ax.set_ylabel(quantity)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    lrs = [v for log in logs if "lr" in log for v in log["lr"].dropna()]
    if lrs and min(lrs) > 0:
        ax_lr.set_yscale("log")
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    return fig


def _line(ax, log, column, colour, style, marker, label):
    """The marker of each series differs, for a log of a few epochs: a series of one point has no line style."""
    if column not in log:
        return
    data = log[["epoch", column]].dropna()
    if len(data):
        ax.plot(data["epoch"], data[column], style, color=colour, marker=marker if len(data) < 3 else None, label=label)


def main(argv):
    p = ArgumentParser(prog="plot.py", description="Plot training curves from models/<name>/log.csv.")
    p.add_argument("--name", nargs="+", required=True, help="one or more run names")
    p.add_argument("--out", type=path_arg, default=None,
                   help="PNG to write (default models/<name>/curves.png for one run, "
                   "outputs/<name>_files/curves.png for the bundled run, compare.png for several)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = p.parse_args(argv)
    if args.out and not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: plot.py writes PNG; give a name ending in .png")
    logs = []
    for name in args.name:
        path = os.path.join(saved_run_dir(name), "log.csv")
        if not os.path.isfile(path):
            if not os.path.isfile(os.path.join(saved_run_dir(name), "config.yml")):
                raise UsageError(f"--name {name}: no run of that name in models/{run_name_suggestion(name)}")
            raise UsageError(f"--name {name}: {path} not found (has the run finished an epoch?)")
        try:
            log = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            log = pd.DataFrame()
        if "epoch" not in log:
            raise UsageError(f"{path} has no 'epoch' column: is it a log.csv written by train.py?")
        logs.append(log)
    out = args.out or (os.path.join(derived_files_dir(args.name[0]), "curves.png") if len(args.name) == 1 else
                       "compare.png")
    plot_runs(logs, args.name, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
