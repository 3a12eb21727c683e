"""plot.py: curves for one run, for a log with one row or NaN values, and several runs on one figure."""
import importlib
import os

import cv2
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import plot
from plot import plot_runs
from utils import UsageError, run_cli

COLUMNS = ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "val_iou_mean", "val_dice_mean",
           "seconds"]


def _log(rows, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.uniform(0.1, 0.9, size=(rows, len(COLUMNS)))
    data[:, 0] = np.arange(1, rows + 1)
    return pd.DataFrame(data, columns=COLUMNS)


def _png_size(path):
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a readable image"
    return img.shape[:2]


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_plot_one_run(tmp_path, rows):
    out = tmp_path / "curves.png"
    plot_runs([_log(rows)], ["a"], str(out))
    h, w = _png_size(out)
    assert w > h > 200


def test_plot_with_nan_values(tmp_path):
    log = _log(5)
    log.loc[2, ["val_iou", "val_loss"]] = np.nan
    log["lr"] = np.nan  # a column with no value at all
    out = tmp_path / "curves.png"
    plot_runs([log], ["a"], str(out))
    assert _png_size(out)[0] > 200


def test_plot_cli_compares_several_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["a", "b", "c"]):
        os.makedirs(f"models/{name}")
        _log(3 + i, seed=i).to_csv(f"models/{name}/log.csv", index=False)
    run_cli(plot.main, ["--name", "a", "b", "c", "--out", "compare.png"])
    assert _png_size(tmp_path / "compare.png")[0] > 200
    run_cli(plot.main, ["--name", "a"])
    assert (tmp_path / "models" / "a" / "curves.png").is_file()


def test_plot_missing_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--name nope: no run of that name in models/$"):
        plot.main(["--name", "nope"])
    os.makedirs("models/nope")
    open("models/nope/config.yml", "w").close()  # a run that has not finished an epoch
    with pytest.raises(UsageError, match="models/nope/log.csv not found"):
        plot.main(["--name", "nope"])
    with pytest.raises(UsageError, match=r"--name nopes: no run of that name in models/ \(did you mean nope\?\)"):
        plot.main(["--name", "nopes"])


def test_plot_empty_log_and_non_png_name_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("models/empty")
    open("models/empty/log.csv", "w").close()
    with pytest.raises(UsageError, match="models/empty/log.csv has no 'epoch' column"):
        plot.main(["--name", "empty"])
    with pytest.raises(UsageError, match="--out c.jpg: plot.py writes PNG"):
        plot.main(["--name", "empty", "--out", "c.jpg"])


def _figure(tmp_path, logs, names):
    """The three panels of the matplotlib figure that plot_runs draws."""
    return plot_runs(logs, names, str(tmp_path / "curves.png")).axes[:3]


def test_a_run_of_one_epoch_tells_its_series_apart(tmp_path):
    """One point per series has no line to tell train from val by: each series of a panel has its own marker, and
    the epoch axis has whole epochs only."""
    for ax in _figure(tmp_path, [_log(1)], ["a"]):
        markers = [line.get_marker() for line in ax.get_lines() if len(line.get_xdata()) == 1]
        assert markers and "None" not in markers and len(set(markers)) == len(markers)
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0]


def test_curves_name_their_run_and_label_their_axes(tmp_path):
    """A curves.png opened on its own says which run it shows, and every axis what it measures."""
    axes = _figure(tmp_path, [_log(4)], ["dsb_unet"])
    assert "dsb_unet" in axes[0].figure.get_suptitle()
    for ax in axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()


def test_drawing_curves_keeps_the_sessions_backend_and_figures(tmp_path):
    """A notebook or script that imports plot.py (train.py does) keeps the matplotlib backend it shows its own
    figures with, and curves.png leaves no figure in pyplot's list."""
    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # stands for a notebook's inline backend
    try:
        importlib.reload(plot)
        plot.plot_runs([_log(3)], ["a"], str(tmp_path / "curves.png"))
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        plt.switch_backend(before)


@pytest.mark.parametrize("low, high", [(0.0012, 0.004), (-0.31, -0.12), (1e-4, 1.2e-4)])
def test_long_loss_tick_labels_stay_inside_the_figure(tmp_path, low, high):
    """Losses whose ticks read 0.0015, -0.30 or 0.0001150 are wider than the fixed left margin: the loss panel's y
    label and tick labels are still drawn inside the figure."""
    log = _log(6)
    log["loss"], log["val_loss"] = np.linspace(high, low, 6), np.linspace(high, low, 6) * 1.01
    fig = plot_runs([log], ["a"], str(tmp_path / "curves.png"))
    renderer = FigureCanvasAgg(fig).get_renderer()
    assert fig.axes[0].get_tightbbox(renderer).x0 >= 0
