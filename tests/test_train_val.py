"""End-to-end tests of train.py and val.py on the CPU, on a tiny synthetic dataset (10 images of 32x32).

Everything runs in temporary directories (the scripts use the relative folders inputs/, models/, outputs/).
"""
import hashlib
import math
import os
import random
import re
import shutil
import signal
import time
from argparse import Namespace
from contextlib import contextmanager

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from sklearn.model_selection import KFold, train_test_split

import checkpoints
import device_data
import engine
import ensemble
import inference
import predict
import predict_notes
import preprocess_dsb2018
import train
import trainer
import val
import visualize
from archs import build_model
from checkpoints import load_checkpoint
from config import parse_train_args
from conftest import ROOT, TINY_NAME, held_by_another_process, make_synthetic, train_argv
from dataset import decode_image, image_modality, mostly_foreground_note, train_transform
from image_files import image_to_float, read_labels
from metrics import NUCLEUS_SCORES
from trainer import Trainer
from utils import DataError, UsageError, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# val.py writes round(sigmoid(logit) * 255) as 8-bit PNG and the metrics count a pixel as predicted when
# logit > 0, i.e. prob > 0.5, i.e. prob * 255 > 127.5. Rounding maps (127.5, 128.5) to 128 and [127.5 - 1, 127.5)
# to 127, so "predicted" <=> PNG value >= 128 (> 127.5). (Only |logit| < ~1e-7, where float32 sigmoid is exactly
# 0.5 and rounds to 128, could disagree; that does not happen with real weights.)
PRED_THRESHOLD = 127.5

# unet: albumentations in a DataLoader; the others augment on the device. borders: + a touching-border channel,
# trained but not scored. --precise_bn 2: after 4 steps BatchNorm's running statistics are still mostly their
# initial values, so an eval-mode prediction would be all one class or not depending on the CPU's bf16
# rounding; recomputed on the training images they give partly-foreground predictions in bf16 and fp32 alike.
RUNS = {
    "unet": ("UNet", ["--loader", "workers", "--precise_bn", "2"]),
    "nested": ("NestedUNet", ["--deep_supervision", "True", "--lr", "0.003", "--precise_bn", "2"]),
    "borders": ("UNet", ["--borders", "True", "--precise_bn", "2"]),
}


@contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def valid_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.size > 0, f"{path} cannot be decoded"
    return image


def read_split(workdir, name):
    return pd.read_csv(workdir / "models" / name / "split.csv", dtype=str, keep_default_na=False)


def split_ids(split, part):
    return split.loc[split["split"] == part, "img_id"].tolist()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One working directory with inputs/tiny and two finished runs (UNet; NestedUNet with deep supervision),
    each trained for 2 epochs and evaluated with val.py; returns (workdir, ids, {key: val scores})."""
    root = tmp_path_factory.mktemp("runs")
    ids = make_synthetic(root)
    scores = {}
    with cwd(root):
        for key, (arch, extra) in RUNS.items():
            train.main(train_argv(key, *extra, arch=arch))
            scores[key] = val.main(["--name", key, "--device", "cpu"])
    return root, ids, scores


# ------------------------------------------------------------------------------------------ files of a run

@pytest.mark.parametrize("key", list(RUNS))
def test_config_yml(work, key):
    root, _, _ = work
    with open(root / "models" / key / "config.yml") as f:
        cfg = yaml.safe_load(f)
    arch, _ = RUNS[key]
    assert cfg["arch"] == arch and cfg["name"] == key and cfg["epochs"] == 2 and cfg["dataset"] == TINY_NAME
    assert cfg["deep_supervision"] is (key == "nested")
    assert cfg["input_w"] == 32 and cfg["batch_size"] == 4


@pytest.mark.parametrize("key", list(RUNS))
def test_split_csv_is_the_seed_split(work, key):
    root, ids, _ = work
    split = read_split(root, key)
    assert list(split.columns) == ["img_id", "split", "sha256"]
    train_ids, val_ids = train_test_split(sorted(ids), test_size=0.2, random_state=41)
    assert split_ids(split, "train") == list(train_ids)
    assert split_ids(split, "val") == list(val_ids)
    assert len(split) == len(ids) == 10 and len(val_ids) == 2
    assert set(split["split"]) == {"train", "val"}


@pytest.mark.parametrize("key", list(RUNS))
def test_log_csv(work, key):
    root, _, _ = work
    log = pd.read_csv(root / "models" / key / "log.csv")
    assert list(log.columns[:7]) == ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice"]
    assert log["epoch"].tolist() == [1, 2]
    assert np.isfinite(log[["loss", "iou", "val_loss", "val_iou", "val_dice"]].to_numpy()).all()
    assert ((log[["iou", "val_iou", "val_dice"]] >= 0) & (log[["iou", "val_iou", "val_dice"]] <= 1)).all().all()
    # the lr each epoch trained with: CosineAnnealingLR(T_max=2, eta_min=1e-5) from --lr, stepped after the epoch
    lr0, eta_min = (0.003 if key == "nested" else 0.01), 1e-5
    assert log["lr"][0] == pytest.approx(lr0, rel=1e-9)
    assert log["lr"][1] == pytest.approx(eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi / 2)) / 2, rel=1e-6)
    assert log["lr"][1] < log["lr"][0]
    last = torch.load(root / "models" / key / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(eta_min, rel=1e-6)


@pytest.mark.parametrize("key", list(RUNS))
def test_model_pth_is_a_plain_state_dict(work, key):
    root, _, _ = work
    weights = torch.load(root / "models" / key / "model.pth", map_location="cpu", weights_only=True)
    assert isinstance(weights, dict) and weights
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    arch, _ = RUNS[key]
    model = build_model(arch, 2 if key == "borders" else 1, 3, key == "nested")
    model.load_state_dict(weights)  # strict: every key and shape of the network, nothing else


@pytest.mark.parametrize("key", list(RUNS))
def test_curves_png(work, key):
    root, _, _ = work
    image = valid_png(root / "models" / key / "curves.png")
    assert image.shape[0] > 50 and image.shape[1] > 50


@pytest.mark.parametrize("key", list(RUNS))
def test_train_batch_png_outlines_the_first_batch(work, key):
    """Every run, on either loader, draws its first training batch: one panel per sample (a batch of 4 32x32 crops,
    enlarged 4x), with green mask outlines."""
    root, _, _ = work
    picture = valid_png(root / "models" / key / trainer.BATCH_PICTURE)
    outlined = (picture == visualize.CLASS_OUTLINES[0]).all(axis=2)
    assert outlined.any()
    rows = np.flatnonzero(outlined.any(axis=1))
    assert picture.shape[1] == 4 * 128 + 3 * visualize.GAP and rows.max() - rows.min() < 128 + 22 + visualize.GAP


# ------------------------------------------------------------------------------------------------ val.py

@pytest.mark.parametrize("key", list(RUNS))
def test_val_outputs(work, key):
    root, _, all_scores = work
    scores = all_scores[key]
    out = root / "outputs" / key
    val_ids = split_ids(read_split(root, key), "val")
    assert sorted(os.listdir(out / "0")) == sorted(i + ".png" for i in val_ids)
    for sid in val_ids:
        prob = valid_png(out / "0" / f"{sid}.png")
        assert prob.dtype == np.uint8 and prob.shape == (32, 32)
        overlay = valid_png(out / "overlays" / f"{sid}.png")
        assert overlay.ndim == 3 and overlay.shape[0] == 32
    assert sorted(os.listdir(out / "overlays")) == sorted(i + ".png" for i in val_ids)
    valid_png(out / "summary.png")
    table = pd.read_csv(out / "scores.csv", dtype={"img_id": str})
    assert list(table.columns) == ["img_id", "iou", "dice", "kind", *NUCLEUS_SCORES]  # one class: none by class
    assert sorted(table["img_id"]) == sorted(val_ids)
    for sid, kind in zip(table["img_id"], table["kind"]):
        assert kind == image_modality(decode_image(str(root / "inputs" / TINY_NAME / "images" / f"{sid}.png")))
    assert table["iou"].is_monotonic_increasing, "scores.csv must list the worst image first"
    assert set(scores) >= {"iou", "dice", "iou_mean", "dice_mean", "loss"}


def test_val_reads_each_image_once(work, monkeypatch):
    """val.py takes each image's kind from the loader's read of it: a first pass over every image for the kinds
    alone took 12 s for 300 images of 1000 x 1000, before the evaluation's own bar appeared (the first image is
    read once more, to check that the masks are not all empty)."""
    root, ids, _ = work
    monkeypatch.chdir(root)
    reads = []
    monkeypatch.setattr("dataset.decode_image", lambda path: reads.append(path) or decode_image(path))
    val.main(["--name", "unet", "--device", "cpu", "--dataset", TINY_NAME, "--output", "once", "--no_overlays"])
    assert len(reads) == len(ids) + 1 and len(set(reads)) == len(ids)
    kinds = pd.read_csv(root / "once" / "scores.csv", dtype={"img_id": str}).set_index("img_id")["kind"]
    assert kinds.to_dict() == {i: image_modality(decode_image(str(root / "inputs" / TINY_NAME / "images" /
                                                                    f"{i}.png"))) for i in ids}


@pytest.mark.parametrize("key", list(RUNS))
def test_val_scores_recomputed_from_written_files(work, key):
    """Pooled IoU/Dice from the probability PNGs (value > 127.5, i.e. prob > 0.5) and the mask files."""
    root, _, all_scores = work
    scores = all_scores[key]
    val_ids = split_ids(read_split(root, key), "val")
    inter = union = pred_sum = true_sum = 0
    per_image = {}
    for sid in val_ids:
        prob = cv2.imread(str(root / "outputs" / key / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(root / "inputs" / TINY_NAME / "masks" / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED) > 0
        pred = prob > PRED_THRESHOLD
        i, u = int((pred & truth).sum()), int((pred | truth).sum())
        inter, union, pred_sum, true_sum = inter + i, union + u, pred_sum + int(pred.sum()), true_sum + int(truth.sum())
        per_image[sid] = i / u if u else 1.0
    assert union > 0 and true_sum > 0
    # these settings give partly-foreground predictions, so the threshold matters for the comparison
    assert 0 < pred_sum < len(val_ids) * 32 * 32, "prediction is all background or all foreground"
    assert scores["iou"] == pytest.approx(inter / union, abs=1e-3)
    assert scores["dice"] == pytest.approx(2 * inter / (pred_sum + true_sum), abs=1e-3)
    assert scores["iou_mean"] == pytest.approx(np.mean(list(per_image.values())), abs=1e-3)
    table = pd.read_csv(root / "outputs" / key / "scores.csv", dtype={"img_id": str})
    for sid, iou in zip(table["img_id"], table["iou"]):
        assert iou == pytest.approx(per_image[sid], abs=1e-5)


@pytest.mark.parametrize("key", list(RUNS))
def test_val_matches_best_epoch_of_training(work, key):
    """model.pth holds the epoch with the best val IoU; val.py on the same split scores it the same, up to the
    few pixels that bf16 rounding moves across the threshold once val.py has folded BatchNorm into the convs
    (measured: at most 0.0019 here; 0.0004 mean IoU on the bundled model's 134 validation images)."""
    root, _, all_scores = work
    log = pd.read_csv(root / "models" / key / "log.csv")
    assert all_scores[key]["iou"] == pytest.approx(log["val_iou"].max(), abs=0.005)


def test_borders_run_scores_nuclei_and_splits_along_borders(work, monkeypatch, capsys):
    """A --borders run: 2 output channels, the border probabilities in outputs/<name>/borders/, the DSB2018 score
    for all three separations; val.py and predict.py split along the borders unless --separation says otherwise."""
    root, _, all_scores = work
    scores = all_scores["borders"]
    assert yaml.safe_load((root / "models" / "borders" / "config.yml").read_text())["borders"] is True
    assert torch.load(root / "models" / "borders" / "model.pth")["final.weight"].shape[0] == 2
    val_ids = split_ids(read_split(root, "borders"), "val")
    assert sorted(os.listdir(root / "outputs" / "borders" / "borders")) == sorted(i + ".png" for i in val_ids)
    for key in ("dsb", "dsb_borders", "dsb_watershed", "dsb_cc"):
        assert 0 <= scores[key] <= 1
    assert scores["dsb"] == scores["dsb_borders"]  # the default separation of a --borders run
    assert "dsb_borders" not in all_scores["unet"] and all_scores["unet"]["dsb"] == all_scores["unet"]["dsb_watershed"]
    monkeypatch.chdir(root)
    chosen = val.main(["--name", "borders", "--separation", "watershed", "--device", "cpu", "--no_overlays",
                       "--output", "val_watershed"])
    assert chosen["dsb"] == pytest.approx(scores["dsb_watershed"])
    table = pd.read_csv(root / "val_watershed" / "scores.csv")
    assert table["dsb"].mean() == pytest.approx(scores["dsb_watershed"])
    image = root / "inputs" / TINY_NAME / "images" / f"{val_ids[0]}.png"
    for separation in ([], ["--separation", "borders"], ["--separation", "cc"]):
        out = "pred" + "".join(separation[1:])
        predict.main(["--name", "borders", "--input", str(image), "--output", out, "--instances", "--device", "cpu",
                      "--min_confidence", "0", *separation])
        if not separation:
            assert "objects (borders) in objects.csv" in capsys.readouterr().out
        assert sorted(os.listdir(root / out)) == sorted([f"{val_ids[0]}.png", f"{val_ids[0]}_instances.png",
                                                         "images.csv", "objects.csv", "prediction.yml"])
    instances = {out: read_labels(root / out / f"{val_ids[0]}_instances.png") for out in ("pred", "predborders")}
    assert np.array_equal(instances["pred"], instances["predborders"])
    # a dataset without instance labels: the masks are scored as with them, the border channel and DSB left out
    shutil.copytree(root / "inputs" / TINY_NAME, root / "inputs" / "no_labels", ignore=shutil.ignore_patterns("labels"))
    labelled, unlabelled = (val.main(["--name", "borders", "--dataset", dataset, "--device", "cpu", "--no_overlays"])
                            for dataset in (TINY_NAME, "no_labels"))
    printed = capsys.readouterr().out
    assert "the masks alone are scored, for every image" in printed
    assert "all of inputs/no_labels, 8 of them the run's training images, 10 images at 32x32, " in printed
    masks_only = ("iou", "dice", "iou_mean", "dice_mean")
    assert {k: unlabelled[k] for k in masks_only} == {k: labelled[k] for k in masks_only}
    assert "dsb" in labelled and "dsb" not in unlabelled
    with pytest.raises(UsageError, match="--borders True"):
        val.main(["--name", "unet", "--separation", "borders", "--device", "cpu"])
    with pytest.raises(UsageError, match="--min_confidence"):
        val.main(["--name", "unet", "--min_confidence", "1.5", "--device", "cpu"])
    with pytest.raises(UsageError, match="--borders True"):
        predict.main(["--name", "unet", "--input", str(image), "--output", "pred2", "--instances",
                      "--separation", "borders", "--device", "cpu"])


def test_precise_bn_run_is_reproduced_by_val(tmp_path, monkeypatch):
    """With --precise_bn the recalibrated statistics are what is validated and saved: val.py scores model.pth
    exactly as the best epoch of the log."""
    make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    # fp32: val.py folds BatchNorm into the convs, which in bf16 moves a few pixels across the threshold
    train.main(train_argv("pbn", "--precise_bn", "1", "--amp", "fp32"))
    scores = val.main(["--name", "pbn", "--device", "cpu", "--no_overlays", "--amp", "fp32"])
    assert scores["iou"] == pytest.approx(pd.read_csv(tmp_path / "models" / "pbn" / "log.csv")["val_iou"].max(),
                                          abs=1e-6)


def test_val_unknown_run_and_missing_test_split(work, monkeypatch):
    root, _, _ = work
    monkeypatch.chdir(root)
    with pytest.raises(UsageError) as e:
        val.main(["--name", "no_such_run", "--device", "cpu"])
    assert "no_such_run" in str(e.value)
    with pytest.raises(UsageError) as e:
        val.main(["--name", "unet", "--split", "test", "--device", "cpu", "--output", str(root / "scratch")])
    assert "test" in str(e.value)


def test_val_scores_a_split_whose_dataset_gained_an_unlabelled_image(tiny_workdir):
    """val.py reads the split's own ids: an image added to the dataset since training, still without its mask, is
    no reason to refuse (train.py on that dataset would say it lacks a mask)."""
    train.main(train_argv("grown", epochs=1))
    cv2.imwrite(str(tiny_workdir / "inputs" / TINY_NAME / "images" / "new_unlabelled.png"),
                np.zeros((32, 32, 3), np.uint8))
    assert val.main(["--name", "grown", "--device", "cpu", "--no_overlays"])["iou"] >= 0


def test_val_and_resume_note_images_that_are_not_those_the_run_was_split_with(tiny_workdir, capsys):
    """split.csv records the SHA-256 of the val and test images: the same ids holding other images (a dataset made
    again under the same name) are noted by val.py, on the run's split and on its dataset as a whole, and by
    --resume; the same files, or an older run's split.csv without the column, give no note."""
    note = "are not the files the run was split with"
    train.main(train_argv("fp", epochs=1))
    split = read_split(tiny_workdir, "fp")
    run = ["--name", "fp", "--device", "cpu", "--no_overlays"]
    val.main(run)
    assert note not in capsys.readouterr().out
    images = tiny_workdir / "inputs" / TINY_NAME / "images"
    changed = split_ids(split, "val")[1]
    shutil.copy(images / f"{split_ids(split, 'train')[0]}.png", images / f"{changed}.png")
    val.main(run)
    assert (f"note: 1 of the 2 val images in inputs/{TINY_NAME} {note} (their SHA-256 differs from its split.csv's: "
            f"{changed}): the scores are of these files, not of the run's val images; another dataset under the same "
            "name?") in capsys.readouterr().out
    val.main([*run, "--dataset", TINY_NAME])
    assert (f"note: 1 of the 2 val/test images in inputs/{TINY_NAME} {note} (their SHA-256 differs from its "
            f"split.csv's: {changed}): the scores are of these files, and the run's training images may not be among "
            "them") in capsys.readouterr().out
    train.main(["--resume", "fp", "--epochs", "2"])
    assert (f"note: 1 of the 2 val/test images in inputs/{TINY_NAME} {note} (their SHA-256 differs from its "
            f"split.csv's: {changed}): the val scores it logs from now on are of these files, not of the images of the "
            "epochs log.csv holds so far") in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_split(tiny_workdir, "fp"), split)  # the recorded files, not those of now
    split[["img_id", "split"]].to_csv(tiny_workdir / "models" / "fp" / "split.csv", index=False)  # an older run's
    assert val.main(run)["iou"] >= 0
    assert note not in capsys.readouterr().out


# ------------------------------------------------------------------------------------- other train options

def test_seed_makes_cpu_runs_repeatable(work, monkeypatch):
    root, _, _ = work
    monkeypatch.chdir(root)
    arch, extra = RUNS["unet"]
    train.main(train_argv("unet_again", *extra, arch=arch))
    a = pd.read_csv(root / "models" / "unet" / "log.csv")
    b = pd.read_csv(root / "models" / "unet_again" / "log.csv")
    for column in ("lr", "loss", "iou", "val_loss", "val_iou", "val_dice"):
        assert a[column].tolist() == b[column].tolist(), column


def test_training_gives_the_sessions_random_numbers_back(tiny_workdir):
    """A notebook that trains between its own random draws goes on with its own numbers: train.py seeds Python,
    NumPy and torch for the run (--seed) and then gives their states back."""
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    for state in (random.seed, np.random.seed, torch.manual_seed):
        state(5)
    expected = draws()
    for state in (random.seed, np.random.seed, torch.manual_seed):
        state(5)
    train.main(train_argv("own_numbers", epochs=1))
    assert draws() == expected


def test_same_name_twice_is_refused(work, monkeypatch):
    root, _, _ = work
    monkeypatch.chdir(root)
    model = root / "models" / "unet" / "model.pth"
    before = (model.stat().st_mtime_ns, model.read_bytes())
    with pytest.raises(UsageError) as e:
        train.main(train_argv("unet"))
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert (model.stat().st_mtime_ns, model.read_bytes()) == before


def test_resume_with_more_epochs_keeps_the_cosine_falling_and_refuses_other_changes(tiny_workdir, capsys):
    """A cosine run resumed with more --epochs goes on falling from its last rate to --min_lr over the new length,
    and a finished one stays at --min_lr (the saved schedule alone would climb back up after its last epoch); a
    flag that the saved state overrides (--lr) is refused, not written to config.yml unused; a run that has
    trained all its epochs says so."""
    log = tiny_workdir / "models" / "more" / "log.csv"
    train.main(train_argv("more", "--optimizer", "SGD", "--lr", "0.1", "--min_lr", "0.001", "--early_stopping", "0",
                          epochs=4))  # stops after epoch 1 of 4
    config = (tiny_workdir / "models" / "more" / "config.yml").read_text()
    with pytest.raises(UsageError, match=r"--lr 0\.5 differs from the run's 0\.1.*--init more"):
        train.main(["--resume", "more", "--lr", "0.5", "--epochs", "6"])
    with pytest.raises(UsageError, match=r"--init other differs from the run's None"):  # saved as null
        train.main(["--resume", "more", "--init", "other", "--epochs", "6"])
    recipe = tiny_workdir / "more.yml"  # its values were dropped without a word under the saved config
    recipe.write_text("epochs: 6\nlr: 0.5\n")
    with pytest.raises(UsageError, match=r"--resume continues a run with its own saved settings.*leave out --config"):
        train.main(["--resume", "more", "--config", str(recipe)])
    assert (tiny_workdir / "models" / "more" / "config.yml").read_text() == config
    # the dataset may have moved: another spelling of its folder is accepted (split.csv checks its ids)
    train.main(["--resume", "more", "--epochs", "6", "--early_stopping", "-1",
                "--dataset", str(tiny_workdir / "inputs" / TINY_NAME)])
    lr = pd.read_csv(log)["lr"].tolist()
    assert len(lr) == 6 and lr[0] == 0.1 and all(a > b for a, b in zip(lr, lr[1:])) and lr[-1] > 0.001, lr
    with pytest.raises(UsageError, match=r"already trained its 6 epochs; pass a larger --epochs .*; they would train "
                                         r"at --min_lr, where its cosine schedule has ended.*--init more --name"):
        train.main(["--resume", "more"])
    (tiny_workdir / "models" / "more" / "model.onnx").write_bytes(b"exported before")
    train.main(["--resume", "more", "--epochs", "8"])
    lr = pd.read_csv(log)["lr"].tolist()
    assert len(lr) == 8 and lr[6:] == pytest.approx([0.001, 0.001]), lr
    assert "note: model.onnx in models/more was exported before this training resumed" in capsys.readouterr().out
    assert yaml.safe_load((tiny_workdir / "models" / "more" / "config.yml").read_text())["epochs"] == 8


def test_early_stopping_zero_still_trains_one_epoch(work, monkeypatch):
    """As in the seed, --early_stopping N stops once N epochs in a row brought no better val IoU; 0 stops after
    the first epoch (and must not stop before it)."""
    root, _, _ = work
    monkeypatch.chdir(root)
    train.main(train_argv("early", "--early_stopping", "0", epochs=3))
    assert pd.read_csv(root / "models" / "early" / "log.csv")["epoch"].tolist() == [1]
    assert (root / "models" / "early" / "model.pth").is_file()


def test_test_split(tmp_path, monkeypatch):
    ids = make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("three", "--test_size", "0.2", epochs=1))
    split = read_split(tmp_path, "three")
    assert set(split["split"]) == {"train", "val", "test"}
    rest, test_ids = train_test_split(sorted(ids), test_size=0.2, random_state=41)
    train_ids, val_ids = train_test_split(rest, test_size=0.2 / 0.8, random_state=41)
    assert split_ids(split, "test") == list(test_ids)
    assert split_ids(split, "val") == list(val_ids)
    assert split_ids(split, "train") == list(train_ids)
    assert sorted(split["img_id"]) == sorted(ids)
    assert split["sha256"].tolist() == [  # of the val and test images' files only (train rows: empty)
        "" if s == "train" else hashlib.sha256((tmp_path / "inputs" / TINY_NAME / "images" / f"{i}.png").read_bytes())
        .hexdigest() for i, s in zip(split["img_id"], split["split"])]
    val.main(["--name", "three", "--device", "cpu"])
    scores = val.main(["--name", "three", "--split", "test", "--device", "cpu", "--no_overlays"])
    assert 0 <= scores["iou"] <= 1
    # each split in its own folder (outputs/<name>_test), never mixed with the validation outputs
    assert sorted(os.listdir(tmp_path / "outputs" / "three_test" / "0")) == sorted(i + ".png" for i in test_ids)
    assert sorted(os.listdir(tmp_path / "outputs" / "three" / "0")) == sorted(i + ".png" for i in val_ids)
    # evaluated again, a folder is replaced as a whole: no overlays left from the run with them
    assert (tmp_path / "outputs" / "three" / "overlays").is_dir()
    val.main(["--name", "three", "--device", "cpu", "--no_overlays"])
    assert sorted(os.listdir(tmp_path / "outputs" / "three")) == ["0", "evaluation.yml", "scores.csv"]
    assert not [f for f in os.listdir(tmp_path / "outputs") if f.startswith(".")]  # no temporary folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="mine exists and is not an output folder of val.py"):
        val.main(["--name", "three", "--device", "cpu", "--output", "mine"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(UsageError, match="--output .* is the current folder or holds it"):
        val.main(["--name", "three", "--device", "cpu", "--output", "."])
    # a symbolic link to an output folder: the folder it points to gets the new outputs, the link stays
    (tmp_path / "link").symlink_to(tmp_path / "outputs" / "three_test")
    val.main(["--name", "three", "--split", "test", "--device", "cpu", "--output", "link"])
    assert (tmp_path / "link").is_symlink() and (tmp_path / "outputs" / "three_test" / "overlays").is_dir()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_val_stopped_by_sigterm_keeps_the_old_outputs_and_no_temporary_folder(work, monkeypatch):
    """SIGTERM (a killed job) mid-evaluation is handled as Ctrl-C: exit 130, the previous outputs intact, the
    temporary folder of the unfinished evaluation removed."""
    root, _, _ = work
    monkeypatch.chdir(root)
    before = sorted(os.listdir(root / "outputs" / "unet"))
    scores = (root / "outputs" / "unet" / "scores.csv").read_bytes()

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises KeyboardInterrupt before this ends

    monkeypatch.setattr(engine, "evaluate", killed)
    with pytest.raises(SystemExit) as e:
        run_cli(val.main, ["--name", "unet", "--device", "cpu"])
    assert e.value.code == 130
    assert sorted(os.listdir(root / "outputs" / "unet")) == before
    assert (root / "outputs" / "unet" / "scores.csv").read_bytes() == scores
    assert not [f for f in os.listdir(root / "outputs") if f.startswith(".")]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # run_cli puts the previous handler back


def test_one_val_at_a_time_writes_an_output_folder(work, monkeypatch):
    """Two val.py into one folder both went on, and the one that ended last replaced the other's outputs, also those
    of another evaluation that it refuses to replace when run after it (run r's --split test and a run named r_test
    share outputs/r_test): while one writes the folder (outputs/.<name>.lock, beside it) a second is refused, by
    another path too, before it replaces anything; one into another folder goes on."""
    root, _, _ = work
    monkeypatch.chdir(root)
    scores = (root / "outputs" / "unet" / "scores.csv").read_bytes()
    (root / "link").symlink_to(root / "outputs" / "unet")
    with held_by_another_process(root / "outputs" / ".unet.lock") as pid:
        for output in ([], ["--output", "link"]):
            with pytest.raises(UsageError, match=rf"^{output[-1] if output else 'outputs/unet'} is being written by "
                                                 rf"another process \(pid {pid}\); wait for it to end, or choose "
                                                 "another --output$"):
                val.main(["--name", "unet", "--device", "cpu", *output])
        val.main(["--name", "unet", "--device", "cpu", "--output", "elsewhere", "--no_overlays"])
    assert (root / "outputs" / "unet" / "scores.csv").read_bytes() == scores
    assert [f for f in os.listdir(root / "outputs") if f.startswith(".")] == [".unet.lock"]  # the killed holder's
    for path in (root / "outputs" / ".unet.lock", root / "link"):  # the module's other tests see no trace
        os.remove(path)
    shutil.rmtree(root / "elsewhere")


def test_val_names_the_epoch_of_the_weights_it_loaded(work, monkeypatch, tmp_path):
    """val.py read log.csv after the evaluation: when a train.py of the run saved a better epoch meanwhile, its title
    and evaluation.yml named that epoch, not the one of the weights it had evaluated."""
    root, _, _ = work
    monkeypatch.chdir(root)
    log_path = root / "models" / "unet" / "log.csv"
    log = pd.read_csv(log_path)
    real_evaluate = engine.evaluate

    def better_epoch_saved_meanwhile(*args, **kwargs):
        later = log.iloc[[-1]].assign(epoch=len(log) + 1, val_iou=1.0)
        pd.concat([log, later]).to_csv(log_path, index=False)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", better_epoch_saved_meanwhile)
    try:
        val.main(["--name", "unet", "--device", "cpu", "--output", str(tmp_path / "out"), "--no_overlays"])
    finally:
        log.to_csv(log_path, index=False)
    best = int(log["epoch"][log["val_iou"].idxmax()])
    with open(tmp_path / "out" / "evaluation.yml") as f:
        assert yaml.safe_load(f)["settings"]["model"] == f"epoch {best} of {len(log)}"


def test_a_run_being_trained_is_refused_to_a_second_train_py(tmp_path, monkeypatch):
    """While a process holds models/.<name>.lock (a train.py of that run), a new run of the name, --overwrite and
    --resume are refused before they touch the folder; the lock goes with the process, killed or not, and the file
    with the next run that holds it."""
    make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("busy", epochs=1))
    with held_by_another_process(tmp_path / "models" / ".busy.lock") as pid:
        for argv in (train_argv("busy", "--overwrite", epochs=1), ["--resume", "busy", "--epochs", "2"],
                     train_argv("busy", epochs=1)):
            with pytest.raises(UsageError, match=rf"models/busy is being trained or exported by another process \(pid "
                                                 rf"{pid}\); wait for it to end, or choose another --name"):
                train.main(argv)
        assert pd.read_csv(tmp_path / "models" / "busy" / "log.csv")["epoch"].tolist() == [1]
        assert not (tmp_path / "models" / ".busy.replaced").exists()
    train.main(["--resume", "busy", "--epochs", "2"])  # the killed holder's lock file is taken, then removed
    assert not [f for f in os.listdir(tmp_path / "models") if f.startswith(".")]


def test_split_file_is_used_as_given(tmp_path, monkeypatch, capsys):
    ids = sorted(make_synthetic(tmp_path))
    monkeypatch.chdir(tmp_path)
    given = pd.DataFrame({"img_id": ids[:8], "split": ["train"] * 4 + ["val"] * 3 + ["test"]})  # 2 ids unused
    given.to_csv(tmp_path / "mine.csv", index=False)
    train.main(train_argv("given", "--split_file", "mine.csv", "--val_size", "0.5", epochs=1))
    assert (f"note: --split_file mine.csv lists 8 of the 10 images of inputs/tiny; the other 2 are in no part "
            f"and left out: {ids[8]}, {ids[9]}") in capsys.readouterr().out
    written = read_split(tmp_path, "given")
    pd.testing.assert_frame_equal(written[["img_id", "split"]], given)
    assert (written["sha256"] != "").tolist() == [False] * 4 + [True] * 4  # the val and test images' SHA-256
    val.main(["--name", "given", "--device", "cpu", "--no_overlays"])
    assert sorted(os.listdir(tmp_path / "outputs" / "given" / "0")) == sorted(i + ".png" for i in ids[4:7])


@pytest.mark.parametrize("rows, error, words", [
    (None, UsageError, "no such file"),
    ([("nope", "train"), ("other", "val")], DataError, "nope"),
    ([("{0}", "train"), ("{1}", "train")], DataError, "at least one 'train' and one 'val'"),
    ([("{0}", "train"), ("{1}", "validation")], DataError, "'{1}' has the part 'validation'; each must be train"),
    ([("{0}", "train"), ("{1}", " val")], DataError, "'{1}' has the part ' val'"),
    ([("{0}", "train"), ("{1}", "train"), ("{1}", "val")], DataError, "more than once, e.g. {1}"),
    ("", DataError, "columns img_id,split (found: none)"),  # an empty file
    ("img_id;split\n{0};train\n{1};val\n", DataError, "columns img_id,split (found: img_id;split); separate them "
                                                       "with commas"),
    ("folder", UsageError, "--split_file s.csv: is a folder"),
])
def test_split_file_errors_name_the_file(tmp_path, monkeypatch, rows, error, words):
    ids = sorted(make_synthetic(tmp_path))
    monkeypatch.chdir(tmp_path)
    words = words.format(*ids)
    if rows == "folder":
        (tmp_path / "s.csv").mkdir()
    elif isinstance(rows, str):
        (tmp_path / "s.csv").write_text(rows.format(*ids))
    elif rows is not None:
        pd.DataFrame([(i.format(*ids), s) for i, s in rows], columns=["img_id", "split"]).to_csv("s.csv", index=False)
    with pytest.raises(error, match="s.csv") as e:
        train.main(train_argv("bad_split", "--split_file", "s.csv", epochs=1))
    assert words in str(e.value)
    assert not (tmp_path / "models" / "bad_split").exists()


def test_crop_training_validates_whole_images(tmp_path, monkeypatch):
    make_synthetic(tmp_path, "tiny48", size=48)
    monkeypatch.chdir(tmp_path)
    shapes = {"train": set(), "eval": set()}
    real_step = engine.step

    def recording_step(model, images, masks, criterion, precision, optimizer=None, **kw):
        shapes["train" if optimizer is not None else "eval"].add(tuple(images.shape[-2:]))
        return real_step(model, images, masks, criterion, precision, optimizer, **kw)

    monkeypatch.setattr(engine, "step", recording_step)
    train.main(train_argv("crop", "--crop_size", "32", "--dataset", "tiny48", "--arch", "NestedUNet",
                          "--deep_supervision", "True", epochs=1))
    assert shapes == {"train": {(32, 32)}, "eval": {(48, 48)}}
    scores = val.main(["--name", "crop", "--device", "cpu"])
    assert 0 <= scores["iou"] <= 1
    val_ids = split_ids(read_split(tmp_path, "crop"), "val")
    for sid in val_ids:
        prob = valid_png(tmp_path / "outputs" / "crop" / "0" / f"{sid}.png")
        assert prob.shape == (48, 48)


def test_val_batch_size_of_a_crop_run_gets_a_note(tiny_workdir, capsys):
    """val.py scores a crop-trained run's whole images one at a time (their sizes differ), so --batch_size changes
    nothing there, which it says (it was taken without a word); a run trained on resized images takes it."""
    train.main(train_argv("crop", "--crop_size", "32", epochs=1))
    train.main(train_argv("resized", epochs=1))
    capsys.readouterr()
    common = ["--device", "cpu", "--amp", "fp32", "--no_overlays"]
    scores = {b: val.main(["--name", "crop", "--batch_size", b, *common, "--output", f"crop{b}"]) for b in ("1", "4")}
    printed = capsys.readouterr().out
    assert "note: --batch_size 4: run crop was trained on crops and is scored on whole images, one at a time; no " \
        "effect here" in printed and "--batch_size 1" not in printed
    assert scores["1"]["iou"] == scores["4"]["iou"]
    val.main(["--name", "resized", "--batch_size", "4", *common])
    assert "note: --batch_size" not in capsys.readouterr().out


def test_crop_runs_validate_images_beyond_the_memory_budget_in_windows(tmp_path, monkeypatch):
    """A crop-trained run validates whole images, in train.py and val.py: one whose forward pass exceeds the memory
    budget goes through the network in windows (64 x 64 here, the smallest), as predict.py predicts it, instead of
    exhausting the memory (a whole slide); the scores stay those of the whole image, nearly."""
    make_synthetic(tmp_path, "tiny96", num_images=6, size=96)
    monkeypatch.chdir(tmp_path)
    seen = set()  # (training mode, input size) of every forward pass of the network

    def recorded(net):
        net.register_forward_pre_hook(lambda module, inputs: seen.add((module.training, inputs[0].shape[-2:])))
        return net

    def recorded_run(*args):
        cfg, net = real_load(*args)
        return cfg, recorded(net)

    real_build, real_load = trainer.build_model, checkpoints.load_run
    monkeypatch.setattr(trainer, "build_model", lambda *args: recorded(real_build(*args)))
    monkeypatch.setattr(ensemble, "load_run", recorded_run)  # as val.py loads its run (ensemble.load_models)
    # 64 x 64 windows beside a 96 x 96 image's input, sums and weights (5 floats a pixel)
    per_pixel, _ = inference.forward_bytes_per_pixel(build_model("UNet", 1, 3, False), 3, torch.device("cpu"))
    monkeypatch.setattr(inference, "memory_budget", lambda device: per_pixel * 64 * 64 + 96 * 96 * 5 * 4)
    train.main(train_argv("windows", "--crop_size", "32", "--dataset", "tiny96", "--precise_bn", "2", epochs=1))
    windowed = val.main(["--name", "windows", "--device", "cpu"])
    assert (True, (32, 32)) in seen and (False, (64, 64)) in seen and (False, (96, 96)) not in seen
    log = pd.read_csv(tmp_path / "models" / "windows" / "log.csv")
    assert windowed["iou"] == pytest.approx(log["val_iou"].max(), abs=0.005)
    monkeypatch.undo()  # the real memory budget: each image whole
    monkeypatch.chdir(tmp_path)
    whole = val.main(["--name", "windows", "--device", "cpu", "--output", "whole"])
    assert whole["iou"] == pytest.approx(windowed["iou"], abs=0.02)
    sid = split_ids(read_split(tmp_path, "windows"), "val")[0]
    assert valid_png(tmp_path / "whole" / "0" / f"{sid}.png").std() > 10  # not one value everywhere


def test_missing_dataset_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        train.main(train_argv("nothing", "--dataset", "nope"))
    assert os.path.join("inputs", "nope") in str(e.value)


def test_batch_larger_than_training_set(tmp_path, monkeypatch):
    make_synthetic(tmp_path, num_images=5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as e:
        train.main(train_argv("big_batch", batch=8))
    assert "--batch_size" in str(e.value)


# ------------------------------------------------------------------------------------------ real DSB2018 data

DSB_SRC = (ROOT / ".." / "shared" / "data" / "dsb2018" / "stage1_train").resolve()


def test_dsb2018_preprocess_train_val(tmp_path, monkeypatch):
    if not DSB_SRC.is_dir():
        pytest.skip(f"DSB2018 stage1_train not found at {DSB_SRC} (../shared/data/dsb2018/stage1_train from the repo)")
    dst = tmp_path / "inputs" / "dsb2018_32"
    preprocess_dsb2018.main(["--src", str(DSB_SRC), "--limit", "12", "--img_size", "32", "--dst", str(dst),
                             "--num_workers", "1"])
    assert len(os.listdir(dst / "images")) == 12 and len(os.listdir(dst / "masks" / "0")) == 12
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("dsb", dataset="dsb2018_32", epochs=1))
    log = pd.read_csv(tmp_path / "models" / "dsb" / "log.csv")
    assert log["epoch"].tolist() == [1] and np.isfinite(log["loss"]).all()
    scores = val.main(["--name", "dsb", "--device", "cpu"])
    assert 0 <= scores["iou"] <= 1
    val_ids = split_ids(read_split(tmp_path, "dsb"), "val")
    assert len(val_ids) == 3
    assert sorted(os.listdir(tmp_path / "outputs" / "dsb" / "0")) == sorted(i + ".png" for i in val_ids)


# ------------------------------------------------------------------------------------- fine-tuning, balancing

def test_init_starts_from_another_runs_weights_and_balance_draws_by_kind(tiny_workdir, capsys):
    train.main(train_argv("base", epochs=1))
    for init, saved in (("base", "model.pth"), ("models/base/last.pth", "last.pth")):
        weights = load_checkpoint(f"models/base/{saved}", "cpu")
        weights = weights.get("model", weights)
        argv = train_argv("tuned", "--init", init, "--balance", "1", "--overwrite", "--loader", "workers", epochs=1)
        with Trainer(parse_train_args(argv), progress=False) as t:
            assert all(torch.equal(v, weights[k]) for k, v in t.net.state_dict().items())
            kinds = t.train_loader.dataset.modalities()
            t.fit()
    out = capsys.readouterr().out
    assert "--balance 1: " in out and all(f"{kinds.count(k)} {k} images" in out for k in set(kinds))
    assert "like training images of --init" not in out  # the same split: its val images stay held out
    assert "on cpu (" in out and ", from --init base" in out  # the run's header line says where it starts
    cfg = yaml.safe_load(open("models/tuned/config.yml"))
    assert cfg["init"] == "models/base/last.pth" and cfg["balance"] == 1
    assert len(pd.read_csv("models/tuned/log.csv")) == 1
    # another split of the same images (seed 1: both val images are ones base trained on): they are named
    with Trainer(parse_train_args(train_argv("resplit", "--init", "base", "--split_seed", "1")), progress=False) as t:
        base_train = set(pd.read_csv("models/base/split.csv").query("split == 'train'").img_id)
        seen = sorted(base_train & set(t.ids("val")))
    # one of them for an example: DSB2018's ids are 64 characters each
    assert len(seen) == 2 and "note: 2 of this run's 2 val/test images are named like training images of --init " \
        f"base (e.g. {seen[0]} and 1 more): " in capsys.readouterr().out


def test_init_from_a_borders_run_leaves_its_border_channel_out(tiny_workdir, capsys):
    """A --borders run fine-tuned without --borders (data with masks but no instance labels): every weight is
    copied, the heads' mask channel too; only the border channel is left out."""
    train.main(train_argv("withborders", "--borders", "True", epochs=1))
    weights = load_checkpoint("models/withborders/model.pth", "cpu")
    with Trainer(parse_train_args(train_argv("plain", "--init", "withborders", epochs=1)), progress=False) as t:
        state = t.net.state_dict()
    assert weights["final.weight"].shape[0] == 2 and state["final.weight"].shape[0] == 1
    assert all(torch.equal(v, weights[k][:1] if k.startswith("final.") else weights[k]) for k, v in state.items())
    assert "--init withborders: its learned-border channel is left out" in capsys.readouterr().out
    # the same weights as a bare file, without the config.yml that says the extra channel is a border map: a note
    # that does not guess, and one for a two-class run that takes the two channels as its classes
    shutil.copy("models/withborders/model.pth", "bare.pth")
    with Trainer(parse_train_args(train_argv("plain2", "--init", "bare.pth", epochs=1)), progress=False):
        pass
    assert ("--init bare.pth: bare.pth has no config.yml beside it: its last output channel (a learned-border map, "
            "or a class) is left out to fit this run's 1 output channel") in capsys.readouterr().out
    shutil.copytree("inputs/tiny/masks/0", "inputs/tiny/masks/1")
    try:
        with Trainer(parse_train_args(train_argv("two", "--init", "bare.pth", "--num_classes", "2", epochs=1)),
                     progress=False):
            pass
    finally:
        shutil.rmtree("inputs/tiny/masks/1")
    assert ("--init bare.pth: bare.pth has no config.yml beside it: its 2 output channels are taken as this run's "
            "classes (and border map) in their order; if it was trained with --borders, its last channel is a border "
            "map") in capsys.readouterr().out


def test_resume_with_a_flag_that_changes_the_weights_says_start_again(tiny_workdir):
    """--init would refuse another --num_classes (or arch, ...): the message does not suggest it for those."""
    train.main(train_argv("kept", epochs=1))
    with pytest.raises(UsageError, match="--num_classes changes the network or the images it expects, so --init "
                                         "cannot carry its weights over either: train a new run from scratch$"):
        train.main(["--resume", "kept", "--num_classes", "2", "--epochs", "2"])
    with pytest.raises(UsageError, match="start a new run from its weights: --init kept --name <new name>$"):
        train.main(["--resume", "kept", "--lr", "0.5", "--epochs", "2"])


def test_val_scores_every_image_of_another_dataset(work, capsys):
    """val.py --dataset: a dataset the run never saw, every image scored at the run's size, outputs beside (never
    over) the run's own validation outputs; the pooled IoU is the one the written files give. The title says which
    of the images the run trained on."""
    root, _, all_scores = work
    with cwd(root):
        other = make_synthetic(root, name="unseen", num_images=5, size=48, seed=7)
        before = sorted(os.listdir(root / "outputs" / "unet" / "0"))
        scores = val.main(["--name", "unet", "--dataset", "unseen", "--device", "cpu", "--amp", "fp32"])
        with pytest.raises(UsageError, match="give one of the two"):
            val.main(["--name", "unet", "--dataset", "unseen", "--split", "test"])
    out = root / "outputs" / "unet_on_unseen"
    assert sorted(os.listdir(out / "0")) == sorted(i + ".png" for i in other)
    assert sorted(os.listdir(root / "outputs" / "unet" / "0")) == before
    table = pd.read_csv(out / "scores.csv", dtype={"img_id": str})
    assert sorted(table["img_id"]) == sorted(other) and "dsb" in table.columns
    inter = union = 0
    for sid in other:
        prob = cv2.imread(str(out / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(root / "inputs" / "unseen" / "masks" / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        assert prob.shape == (32, 32)  # the run's 32x32 evaluation size, not the dataset's 48x48
        truth = cv2.resize(truth, (32, 32), interpolation=cv2.INTER_NEAREST_EXACT) > 0
        pred = prob > PRED_THRESHOLD
        inter, union = inter + int((pred & truth).sum()), union + int((pred | truth).sum())
    assert scores["iou"] == pytest.approx(inter / union, abs=1e-3)
    assert "all of inputs/unseen (not trained on), 5 images" in capsys.readouterr().out
    with cwd(root):  # the run's own dataset: said to hold the images it trained on
        val.main(["--name", "unet", "--dataset", TINY_NAME, "--device", "cpu", "--no_overlays"])
    printed = capsys.readouterr().out
    assert f"all of inputs/{TINY_NAME}, the run's own dataset: its training images included" in printed
    # and the scores of the images it did not train on, from scores.csv and split.csv
    table = pd.read_csv(root / "outputs" / f"unet_on_{TINY_NAME}" / "scores.csv", dtype={"img_id": str})
    split = pd.read_csv(root / "models" / "unet" / "split.csv", dtype=str)
    trained = set(split.loc[split["split"] == "train", "img_id"])
    unseen = table[~table["img_id"].isin(trained)]
    assert f"without the {len(table) - len(unseen)} training images ({len(unseen)}): IoU " \
        f"{unseen['iou'].mean():.4f} mean per image, DSB2018 {unseen['dsb'].mean():.4f}" in printed, printed
    shutil.copytree(root / "inputs" / TINY_NAME, root / "inputs" / "tiny_copy")
    with cwd(root):  # a copy of it elsewhere: its training images counted by their pixels ("unseen" shares names)
        val.main(["--name", "unet", "--dataset", "tiny_copy", "--device", "cpu", "--no_overlays"])
    assert "all of inputs/tiny_copy, 8 of them the run's training images, 10 images" in capsys.readouterr().out


def test_val_separation_flags_on_a_dataset_without_instance_labels_get_a_note(work, capsys):
    """--separation, --min_size and --min_confidence shape the nuclei scored against instance labels: on a dataset of
    masks alone they change nothing, which val.py says (it said nothing, and evaluation.yml named them as used);
    where labels are, --min_size changes the nuclei's scores."""
    root, _, _ = work
    shutil.copytree(root / "inputs" / TINY_NAME, root / "inputs" / "masks_only",
                    ignore=shutil.ignore_patterns("labels"))
    common = ["--name", "unet", "--device", "cpu", "--amp", "fp32", "--no_overlays"]
    flags = ["--separation", "cc", "--min_size", "50", "--min_confidence", "0"]
    tables = {}
    with cwd(root):
        for key, dataset, extra in (("plain", "masks_only", []), ("flags", "masks_only", flags),
                                    ("labelled", TINY_NAME, []), ("labelled_flags", TINY_NAME, flags)):
            val.main([*common, "--dataset", dataset, "--output", key, *extra])
            printed = capsys.readouterr().out
            said = "note: --separation cc and --min_size 50 and --min_confidence 0: no image scored here has " \
                "instance labels in inputs/masks_only, so no nuclei are made or scored"
            assert (said in printed) == (key == "flags"), printed
            tables[key] = pd.read_csv(root / key / "scores.csv")
            with open(root / key / "evaluation.yml") as f:
                settings = yaml.safe_load(f)["settings"]
            assert (settings["separation"] is None) == dataset.startswith("masks"), settings
    pd.testing.assert_frame_equal(tables["plain"], tables["flags"])
    assert "dsb" not in tables["flags"] and settings["min_size"] == 50
    assert not tables["labelled"]["pred_nuclei"].equals(tables["labelled_flags"]["pred_nuclei"])


def test_val_reads_a_dataset_stored_with_other_extensions(work):
    """A run trained on PNGs scores a copy of a dataset whose images are TIFFs and masks BMPs: the error without
    --img_ext names the value to pass, and with --img_ext/--mask_ext the scores are those of the PNG dataset."""
    root, _, _ = work
    with cwd(root):
        make_synthetic(root, name="as_png", num_images=4, size=32, seed=3)
        png, other = root / "inputs" / "as_png", root / "inputs" / "as_tif"
        (other / "masks" / "0").mkdir(parents=True)
        (other / "images").mkdir()
        for f in os.listdir(png / "images"):
            stem = os.path.splitext(f)[0]
            tifffile.imwrite(other / "images" / f"{stem}.tif", cv2.imread(str(png / "images" / f))[..., ::-1])
            cv2.imwrite(str(other / "masks" / "0" / f"{stem}.bmp"), cv2.imread(str(png / "masks" / "0" / f), 0))
        # both flags named at once, not one error after the other
        with pytest.raises(DataError, match=r"found \.tif files: pass --img_ext \.tif and --mask_ext \.bmp \(the "):
            val.main(["--name", "unet", "--dataset", "as_tif", "--device", "cpu"])
        with pytest.raises(DataError, match=r"found \.bmp files: pass --mask_ext \.bmp"):
            val.main(["--name", "unet", "--dataset", "as_tif", "--img_ext", ".tif", "--device", "cpu"])
        common = ["--name", "unet", "--device", "cpu", "--amp", "fp32", "--no_overlays"]
        want = val.main([*common, "--dataset", "as_png"])
        got = val.main([*common, "--dataset", "as_tif", "--img_ext", ".tif", "--mask_ext", ".bmp"])
    assert got["iou"] == pytest.approx(want["iou"], abs=1e-6) and got["iou_mean"] == pytest.approx(want["iou_mean"])


@pytest.mark.parametrize("img_suffix,ext", [("_img", ".png"), ("", ".png"), ("", ".tif")])
def test_trains_and_scores_a_cellpose_layout_of_label_images(tiny_workdir, tiny_ids, img_suffix, ext):
    """The tiny set as Cellpose shares data (<id>_img.png + <id>_masks.png, label images) and as its own training
    folders hold it (<id>.png + <id>_masks.png, with the <id>_flows.tif it writes there): a --borders run trains
    on it and val.py scores its nuclei with the DSB2018 metric, no conversion by hand."""
    folder = tiny_workdir / "inputs" / "cellpose"
    folder.mkdir()
    for sid in tiny_ids:
        for part, name in (("images", f"{sid}{img_suffix}"), ("labels", f"{sid}_masks")):
            array = cv2.imread(str(tiny_workdir / "inputs" / TINY_NAME / part / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
            if ext == ".png":
                cv2.imwrite(str(folder / f"{name}.png"), array)
            else:  # tifffile writes RGB, OpenCV read BGR
                tifffile.imwrite(folder / f"{name}.tif", array[..., ::-1] if array.ndim == 3 else array)
        if not img_suffix:
            shutil.copy(folder / f"{sid}{ext}", folder / f"{sid}_flows{ext}")
    train.main(train_argv("cp", "--borders", "True", "--img_ext", ext, "--mask_ext", ext, dataset="cellpose",
                          epochs=1))
    scores = val.main(["--name", "cp", "--device", "cpu", "--no_overlays"])
    assert 0 <= scores["dsb"] <= 1 and 0 <= scores["iou"] <= 1
    assert len(os.listdir(tiny_workdir / "outputs" / "cp" / "borders")) == len(split_ids(read_split(tiny_workdir,
                                                                                                  "cp"), "val"))
    # every image of it, given as a folder path (no images/ folder in this layout) as well as by name
    for dataset in (os.path.join("inputs", "cellpose"), str(folder), "cellpose"):
        val.main(["--name", "cp", "--dataset", dataset, "--device", "cpu", "--no_overlays"])
        table = pd.read_csv(tiny_workdir / "outputs" / "cp_on_cellpose" / "scores.csv", dtype={"img_id": str})
        assert sorted(table["img_id"]) == sorted(tiny_ids)


def test_crop_training_names_an_image_too_small_for_any_crop_and_stale_labels(tmp_path, monkeypatch, capsys):
    """An image under 16 px can take no --crop_size (the hint said 'at most 0', which means no crops); label images
    without nuclei beside masks that have them record no diameter, and the note says so."""
    make_synthetic(tmp_path, "crops", size=32)
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "inputs" / "crops" / "images" / "syn_0000.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(small)), (15, 15)))
    mask = tmp_path / "inputs" / "crops" / "masks" / "0" / "syn_0000.png"
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), (15, 15),
                                      interpolation=cv2.INTER_NEAREST))
    os.remove(tmp_path / "inputs" / "crops" / "labels" / "syn_0000.png")
    with pytest.raises(UsageError, match=r"--crop_size 32 is larger than image .*syn_0000.png \(15x15\); leave it out "
                                         r"of the training images \(--split_file\), or train on resized images"):
        train.main(train_argv("small", "--crop_size", "32", "--dataset", "crops", "--val_size", "0.5", epochs=1))
    # without the cache too, where the small image is not the first training image
    others = sorted(p.stem for p in small.parent.iterdir() if p != small)
    split = tmp_path / "split.csv"
    split.write_text("img_id,split\n" + "".join(f"{i},train\n" for i in others[1:]) +
                     f"syn_0000,train\n{others[0]},val\n")
    with pytest.raises(UsageError, match=r"--crop_size 32 is larger than image .*syn_0000.png \(15x15\)"):
        train.main(train_argv("uncached", "--crop_size", "32", "--dataset", "crops", "--split_file", str(split),
                              "--cache", "False", "--loader", "workers", "--borders", "False", epochs=1))
    shutil.rmtree(tmp_path / "inputs" / "crops")
    make_synthetic(tmp_path, "crops", size=32)
    for path in (tmp_path / "inputs" / "crops" / "labels").iterdir():
        cv2.imwrite(str(path), np.zeros((32, 32), np.uint16))
    capsys.readouterr()
    train.main(train_argv("stale", "--crop_size", "32", "--dataset", "crops", epochs=1))
    assert "label images in inputs/crops hold no nuclei (stale labels beside the masks?)" in capsys.readouterr().out


def test_a_validation_split_without_nuclei_is_noted_in_training_and_by_val_py(tiny_workdir, tiny_ids, capsys):
    """Empty masks in every validation image: val IoU cannot choose the best epoch (1 for a network that finds
    nothing, 0 otherwise): train.py says so before training, val.py before scoring."""
    split = tiny_workdir / "split.csv"
    pd.DataFrame({"img_id": tiny_ids, "split": ["val"] * 2 + ["train"] * (len(tiny_ids) - 2)}).to_csv(split,
                                                                                                   index=False)
    for i in tiny_ids[:2]:
        cv2.imwrite(str(tiny_workdir / "inputs" / "tiny" / "masks" / "0" / f"{i}.png"), np.zeros((32, 32), np.uint8))
    train.main(train_argv("blank_val", "--split_file", str(split), epochs=1))
    assert "note: every validation mask is empty, so val IoU reads 1" in capsys.readouterr().out
    val.main(["--name", "blank_val", "--device", "cpu", "--no_overlays"])
    assert "note: every mask of these 2 images is empty: pooled IoU and Dice read 1" in capsys.readouterr().out
    train.main(train_argv("usual", epochs=1))
    val.main(["--name", "usual", "--device", "cpu", "--no_overlays"])
    assert "is empty" not in capsys.readouterr().out


def test_two_classes_are_scored_each_and_the_scores_are_those_of_the_written_pngs(tiny_workdir, capsys):
    """A two-class run: log.csv and val.py give each class's pooled IoU and Dice, and scores.csv each image's, after
    its columns of one class (the mean of the image's classes); they are those that its probability PNGs
    (thresholded at 128) give against the masks, recomputed here with numpy, and the pooled ones sum the images'
    pixel counts. The worst image of each class is printed."""
    rings = tiny_workdir / "inputs" / "tiny" / "masks" / "1"
    rings.mkdir()
    for path in (tiny_workdir / "inputs" / "tiny" / "masks" / "0").iterdir():  # class 1: a ring around the nuclei
        nuclei = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(rings / path.name), cv2.dilate(nuclei, np.ones((5, 5), np.uint8)) - nuclei)
    train.main(train_argv("two", "--num_classes", "2", epochs=2))
    assert {"val_iou_class0", "val_dice_class1"} <= set(pd.read_csv("models/two/log.csv").columns)
    capsys.readouterr()
    scores = val.main(["--name", "two", "--device", "cpu", "--amp", "fp32", "--no_overlays"])
    printed = capsys.readouterr().out
    val_ids = split_ids(pd.read_csv("models/two/split.csv", dtype=str), "val")
    table = pd.read_csv("outputs/two/scores.csv", dtype={"img_id": str}).set_index("img_id").loc[val_ids]
    assert list(table.columns) == ["iou", "dice", "kind", *NUCLEUS_SCORES, "iou_class0", "dice_class0", "iou_class1",
                                   "dice_class1"]
    per_class = {}
    for c in (0, 1):
        pred = np.stack([cv2.imread(f"outputs/two/{c}/{i}.png", cv2.IMREAD_GRAYSCALE) >= 128 for i in val_ids])
        truth = np.stack([cv2.imread(f"inputs/tiny/masks/{c}/{i}.png", cv2.IMREAD_GRAYSCALE) > 0 for i in val_ids])
        both, either = (pred & truth).sum((1, 2)), (pred | truth).sum((1, 2))
        total = pred.sum((1, 2)) + truth.sum((1, 2))
        assert either.all() and total.all()  # every image has nuclei and rings: no 0 / 0 here
        per_class[c] = both / either, 2 * both / total
        np.testing.assert_allclose(table[f"iou_class{c}"], per_class[c][0], atol=1e-6)
        np.testing.assert_allclose(table[f"dice_class{c}"], per_class[c][1], atol=1e-6)
        assert scores[f"iou_class{c}"] == pytest.approx(both.sum() / either.sum(), abs=1e-9)
        assert scores[f"dice_class{c}"] == pytest.approx(2 * both.sum() / total.sum(), abs=1e-9)
        assert f"{c} {scores[f'iou_class{c}']:.4f} / {scores[f'dice_class{c}']:.4f}" in printed
        worst = table[f"iou_class{c}"].idxmin()
        assert f"{c} {worst} (IoU {table[f'iou_class{c}'][worst]:.3f})" in printed
    np.testing.assert_allclose(table["iou"], (per_class[0][0] + per_class[1][0]) / 2, atol=1e-6)
    np.testing.assert_allclose(table["dice"], (per_class[0][1] + per_class[1][1]) / 2, atol=1e-6)
    assert "IoU / Dice by class (pooled): 0 " in printed
    assert "worst image by class: 0 " in printed and ", the mean of its classes); files in" in printed


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_freeze_bn_keeps_the_init_statistics_while_the_weights_train(tiny_workdir, capsys, loader):
    """--freeze_bn True: every BatchNorm's running statistics stay those of --init (through training and a
    --precise_bn that it skips) while convolutions and the BatchNorm scale train; False: they change."""
    train.main(train_argv("base", epochs=1))
    start = load_checkpoint("models/base/model.pth", "cpu")
    for frozen in (True, False):
        train.main(train_argv(f"tuned_{frozen}", "--init", "base", "--freeze_bn", str(frozen), "--precise_bn", "1",
                              "--loader", loader, epochs=1))
        tuned = load_checkpoint(f"models/tuned_{frozen}/last.pth", "cpu")["model"]
        stats = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert stats and all(torch.equal(tuned[k], start[k]) for k in stats) == frozen
        assert not torch.equal(tuned["conv0_0.conv1.weight"], start["conv0_0.conv1.weight"])
        assert not torch.equal(tuned["conv0_0.bn1.weight"], start["conv0_0.bn1.weight"])
        assert yaml.safe_load(open(f"models/tuned_{frozen}/config.yml"))["freeze_bn"] is frozen
    out = capsys.readouterr().out
    assert out.count("; BatchNorm frozen at the statistics of --init base (--precise_bn 1 skipped)") == 1
    with pytest.raises(UsageError, match="--freeze_bn False differs from the run's True"):
        parse_train_args(["--resume", "tuned_True", "--epochs", "2", "--freeze_bn", "False"])
    with pytest.raises(UsageError, match="--freeze_bn True keeps the BatchNorm statistics .* give --init RUN"):
        parse_train_args(train_argv("scratch", "--freeze_bn", "True"))


def test_masks_drawn_dark_on_light_get_a_note(tiny_workdir, tiny_ids, capsys):
    """Masks that mark most of their images (nuclei drawn black on white, read as background) would train a model
    of the background without a word: train.py names the share and the fullest mask (counted independently here);
    the masks as made get no note."""
    masks = tiny_workdir / "inputs" / "tiny" / "masks" / "0"
    data = trainer.Dataset(tiny_ids, masks.parent.parent)
    assert mostly_foreground_note(data, "the masks") == ""
    shares = {}
    for path in sorted(masks.iterdir()):
        inverted = np.where(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0, 0, 255).astype(np.uint8)
        cv2.imwrite(str(path), inverted)
        shares[path.name] = (inverted > 0).mean()
    capsys.readouterr()
    train.main(train_argv("inverted", epochs=1))
    out = capsys.readouterr().out
    split = pd.read_csv(tiny_workdir / "models" / "inverted" / "split.csv")
    trained = {f"{i}.png": shares[f"{i}.png"] for i in split.loc[split["split"] == "train", "img_id"]}
    fullest = max(trained, key=trained.get)
    expected = (f"note: the training masks mark {np.mean(list(trained.values())):.0%} of their pixels as nuclei on "
                f"average (inputs/tiny/masks/0/{fullest}: {trained[fullest]:.0%})")
    assert expected in out and "masks drawn dark on a light background must be inverted" in out, out
    # scored on a dataset of its own (every image counts), val.py says the same of that dataset's masks
    val.main(["--name", "inverted", "--device", "cpu", "--dataset", "tiny", "--output", "scored", "--no_overlays"])
    everything = (f"note: the masks of inputs/tiny mark {np.mean(list(shares.values())):.0%} of their pixels as "
                  f"nuclei on average (inputs/tiny/masks/0/{max(shares, key=shares.get)}: {max(shares.values()):.0%})")
    assert everything in capsys.readouterr().out


def test_label_images_without_a_background_of_0_get_a_note(tmp_path):
    """StarDist-layout label images whose background is 1 (a tool that counts from 1) read as one nucleus over the
    whole image: the note names the label image, read alone (no cache); the same labels with background 0 get none."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    ids = [f"f{i}" for i in range(3)]
    for i in ids:
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), rng.integers(0, 255, (32, 32), dtype=np.uint8))
        labels = np.zeros((32, 32), np.uint16)
        labels[4:12, 4:12], labels[16:28, 18:30] = 2, 3
        cv2.imwrite(str(tmp_path / "labels" / f"{i}.png"), labels)
    assert mostly_foreground_note(trainer.Dataset(ids, str(tmp_path)), "these") == ""
    for i in ids:
        labels = cv2.imread(str(tmp_path / "labels" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(tmp_path / "labels" / f"{i}.png"), np.where(labels == 0, 1, labels).astype(np.uint16))
        if i == ids[0]:  # one of three: 100 %, 20 % and 20 % are 47 % on average, no note
            assert mostly_foreground_note(trainer.Dataset(ids, str(tmp_path)), "these") == ""
    note = mostly_foreground_note(trainer.Dataset(ids, str(tmp_path)), "these")
    assert note.startswith(f"note: these mark 100% of their pixels as nuclei on average ({tmp_path}/labels/f0.png: "
                           "100%)") and "label images need a background of 0" in note


def test_training_images_of_8_and_16_bits_get_a_note(tmp_path):
    """--normalization fixed divides an 8-bit image by 255 but stretches a 16-bit one from its minimum to its maximum:
    one dim scene saved both ways reads 0.24 and 1.0 at its brightest. A first image of 8 bits hid the rest."""
    scene = np.zeros((32, 32), np.uint8)
    scene[8:20, 8:20] = 60
    mask = (scene > 0).astype(np.uint8) * 255
    for i, image in enumerate((scene, scene, scene.astype(np.uint16) * 257)):
        for folder, written in ((tmp_path / "images", image), (tmp_path / "masks" / "0", mask)):
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i}.png"), written)
    brightest = [image_to_float(decode_image(str(tmp_path / "images" / f"{i}.png")), 1).max() for i in (0, 2)]
    assert brightest == pytest.approx([60 / 255, 1.0])  # what the note is about
    note = trainer.min_max_note(trainer.Dataset(["0", "1", "2"], str(tmp_path)))
    assert note.startswith(f"note: the training images mix 8-bit and uint16 ones (e.g. {tmp_path}/images/0.png and "
                           f"{tmp_path}/images/2.png)")
    assert "--normalization percentile scales every image alike" in note
    assert trainer.min_max_note(trainer.Dataset(["0", "1"], str(tmp_path))) == ""


def test_dim_training_images_get_a_note_with_the_share_the_colour_jitter_blackens(tmp_path):
    """An 8-bit export of dim fluorescence (nuclei at 20 of 255) under --normalization fixed: the colour jitter's
    additive brightness shift clips a share of its samples to black where the mask holds nuclei. The note's share is
    checked against counting it in both loaders' jitter (albumentations in the workers, device_data's batches)."""
    dim, bright = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    dim[8:20, 8:20], bright[8:20, 8:20] = 20, 200
    mask = (dim > 0).astype(np.uint8) * 255
    for name, image in (("dim", dim), ("bright", bright)):
        for folder, written in ((tmp_path / "images", image), (tmp_path / "masks" / "0", mask)):
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{name}.png"), written)
    note = trainer.dim_images_note(trainer.Dataset(["dim"], str(tmp_path)))
    share = float(re.search(r"clips about (\d+)% of the training samples", note).group(1)) / 100
    assert note.startswith(f"note: the training images are dim (the brightest 1% of {tmp_path}/images/dim.png lies "
                           "at 0.08 of full scale)") and "--normalization percentile" in note
    image = image_to_float(dim[:, :, None], 3)
    transform, draws = train_transform(32, 32), 4000  # the workers' whole pipeline: resize, flips, jitter
    transform.set_random_seed(0)
    workers = np.mean([out["image"][out["mask"] > 0].max() == 0
                       for out in (transform(image=image, mask=mask) for _ in range(draws))])
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(draws, 1, 1, 1)
    device = (device_data.colour_jitter(batch, torch.Generator().manual_seed(0))[:, :, 8:20, 8:20]
              .amax((1, 2, 3)) == 0).float().mean().item()
    assert workers == pytest.approx(share, abs=0.02) and device == pytest.approx(share, abs=0.02), (workers, device)
    assert trainer.dim_images_note(trainer.Dataset(["dim", "bright", "bright"], str(tmp_path))) == ""  # 4 % on average
    assert trainer.dim_images_note(trainer.Dataset(["dim"], str(tmp_path), normalization="percentile")) == ""


def test_training_tiffs_of_3_fluorescence_channels_get_a_note(tmp_path):
    """An ImageJ hyperstack of 3 channels (axis C) is read as RGB, as 2 or 4 channels are refused: whether the
    network should see the nuclei alone cannot be told, so train.py says how it reads them."""
    planes = np.random.default_rng(0).integers(0, 4096, (3, 32, 32), dtype=np.uint16)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    for folder in (tmp_path / "images", tmp_path / "masks" / "0"):
        folder.mkdir(parents=True)
    tifffile.imwrite(tmp_path / "images" / "c.tif", planes, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "images" / "s.tif", planes.transpose(1, 2, 0), photometric="rgb")
    for i in ("c", "s"):
        cv2.imwrite(str(tmp_path / "masks" / "0" / f"{i}.png"), mask)
    assert decode_image(str(tmp_path / "images" / "c.tif")).shape == (32, 32, 3)  # what the note is about
    note = trainer.channels_note(trainer.Dataset(["s", "c"], str(tmp_path), img_ext=".tif"))
    assert note.startswith(f"note: the training image {tmp_path}/images/c.tif has 3 channels on a C axis")
    assert trainer.channels_note(trainer.Dataset(["s"], str(tmp_path), img_ext=".tif")) == ""


def test_training_tiffs_of_3_pages_without_axes_get_the_note_predict_gives(tmp_path):
    """3 pages without ImageJ or OME axes are read as one image's colours (a short stack saved so looks the same):
    predict.py noted it, train.py trained on them silently; now it says the same of them. An RGB TIFF gets none."""
    planes = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    for folder in (tmp_path / "images", tmp_path / "masks" / "0"):
        folder.mkdir(parents=True)
    tifffile.imwrite(tmp_path / "images" / "p.tif", planes, photometric="minisblack")
    tifffile.imwrite(tmp_path / "images" / "s.tif", planes.transpose(1, 2, 0), photometric="rgb")
    for i in ("p", "s"):
        cv2.imwrite(str(tmp_path / "masks" / "0" / f"{i}.png"), mask)
    path = f"{tmp_path}/images/p.tif"
    assert decode_image(path).shape == (32, 32, 3)  # what the note is about: the pages as colours
    note = trainer.channels_note(trainer.Dataset(["s", "p"], str(tmp_path), img_ext=".tif"))
    assert note.startswith(f"note: the training image {path} has 3 or 4 pages and no ImageJ or OME axes: read as "
                           "the colours of one image; ")
    said = predict_notes.tiff_notes([path], predict.tiff_headers([path]), None)[0]
    assert said.split(";")[0] == note.split(";")[0].replace("the training image ", "")
    assert trainer.channels_note(trainer.Dataset(["s"], str(tmp_path), img_ext=".tif")) == ""


def test_16_bit_training_images_under_fixed_normalization_get_a_note(tiny_workdir, tiny_ids, capsys):
    """--normalization fixed scales a 16-bit image by its own minimum and maximum, so that one hot pixel darkens the
    rest of it (bench/robustness.py): train.py says so and names the robust choice; 8-bit images get no note."""
    images = tiny_workdir / "inputs" / "tiny" / "images"
    assert trainer.min_max_note(trainer.Dataset(tiny_ids, images.parent)) == ""
    for path in images.iterdir():
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 257)
    capsys.readouterr()
    train.main(train_argv("wide", epochs=1))
    out = capsys.readouterr().out
    assert re.search(r"note: the training images are uint16 \(e\.g\. inputs/tiny/images/syn_\d{4}\.png\), and "
                     "--normalization fixed scales each by its own minimum and maximum", out), out
    assert "--normalization percentile (the bundled model's) is not thrown off by a few" in out
    train.main(train_argv("robust", "--normalization", "percentile", epochs=1))
    assert "note: the training images are" not in capsys.readouterr().out


def test_a_fold_run_validates_its_fold_and_keeps_it_on_resume(tmp_path, monkeypatch):
    """train.py --folds 3 --fold 1: the run's split.csv validates fold 1 of scikit-learn's KFold of the sorted ids,
    shuffled by --split_seed (what another --fold 1 run of these images gets), its default name says the fold, and a
    resume with another --fold is refused (it would validate on images the run trained on); --folds with
    --split_file is refused."""
    ids = sorted(make_synthetic(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = [a for a in train_argv("x", "--folds", "3", "--fold", "1", epochs=1) if a not in ("--name", "x")]
    train.main(argv)
    run = "tiny_UNet_woDS_fold1"
    written = read_split(tmp_path, run)
    val_at = list(KFold(3, shuffle=True, random_state=41).split(ids))[1][1]
    assert sorted(written.loc[written["split"] == "val", "img_id"]) == sorted(ids[i] for i in val_at)
    assert (written["split"] == "val").sum() in (3, 4)  # a third of 10
    with pytest.raises(UsageError, match=r"--fold 2 differs from the run's 1"):
        train.main(["--resume", run, "--fold", "2", "--epochs", "2"])
    with pytest.raises(UsageError, match=r"--folds 3 deals the ids into folds and --split_file s.csv gives the split"):
        train.main(train_argv("both", "--folds", "3", "--split_file", "s.csv", epochs=1))


def test_folds_check_the_test_size_alone_as_val_size_is_unused(tmp_path, monkeypatch):
    """With --folds the folds validate and --val_size is unused: a --test_size that leaves less than the default
    --val_size (0.85 + 0.2 >= 1) is a fold run's own (a fifth of the other 15%), and one of 1 or more is refused naming
    --test_size alone, not the --val_size the user never gave."""
    make_synthetic(tmp_path, num_images=20)
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("big_test", "--folds", "2", "--fold", "1", "--test_size", "0.85", epochs=1, batch=2))
    written = read_split(tmp_path, "big_test")
    assert written["split"].value_counts().to_dict() == {"test": 17, "train": 2, "val": 1}
    with pytest.raises(UsageError, match=r"^--test_size 1.0: the test part must be at least 0 and below 1; --folds 2"):
        train.main(train_argv("all_test", "--folds", "2", "--test_size", "1.0", epochs=1))


def test_init_from_another_fold_names_the_fold_run_to_start_from(tmp_path, monkeypatch, capsys):
    """--init from the run of another fold trains on images this fold validates: the note's way out is --init of a
    run of the same fold (whose training images are this run's), not --split_file, which --folds refuses."""
    ids = sorted(make_synthetic(tmp_path))
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("f0", "--folds", "2", "--fold", "0", epochs=1))
    capsys.readouterr()
    train.main(train_argv("f1", "--folds", "2", "--fold", "1", "--init", "f0", epochs=1))
    out = capsys.readouterr().out
    trained_by_f0 = sorted(ids[i] for i in list(KFold(2, shuffle=True, random_state=41).split(ids))[0][0])
    assert f"note: {len(trained_by_f0)} of this run's {len(trained_by_f0)} val/test images are named like training " \
           "images of --init f0" in out
    assert "to hold them out, --init a run of --fold 1 (same --folds, --test_size, --split_seed, dataset)" in out
    assert "--split_file" not in out
    train.main(train_argv("f1_again", "--folds", "2", "--fold", "1", "--init", "f1", epochs=1))
    assert "named like training images" not in capsys.readouterr().out  # the same fold's run: no leak


def test_another_fold_of_a_named_recipe_is_told_to_take_a_name_of_its_own(tmp_path, monkeypatch):
    """A recipe that names its run gives every fold that name: --auto_resume of --fold 1 finds the run of fold 0 and
    is refused, and the way out is a name of its own, not --init of fold 0's run (trained on fold 1's images)."""
    make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yml").write_text("name: named\n")
    train.main(train_argv("named", "--folds", "3", "--fold", "0", epochs=1))
    with pytest.raises(UsageError) as refused:
        argv = train_argv("named", "--folds", "3", "--fold", "1", epochs=1)[2:]  # its name from the recipe
        train.main(argv + ["--config", "r.yml", "--auto_resume"])
    message = str(refused.value)
    assert message.startswith("--fold 1 differs from the run's 0; --auto_resume continues models/named")
    assert "Each fold trains a run of its own, from scratch: give this one --name named_fold1" in message
    assert "--init named" not in message


def test_val_s_title_counts_one_image_in_the_singular():
    """A user's one validation image: '1 image', not '1 images'."""
    run, cfg = Namespace(name="r", ensemble=[], tta=False, prune=None), Namespace(crop_size=32)
    assert val.title_parts(run, cfg, "epoch 3", "val", 1) == ("r (epoch 3, val, 1 image", ")")
    assert val.title_parts(run, cfg, "", "val", 2)[0] == "r (val, 2 images"


def test_a_few_16_bit_training_images_among_many_8_bit_ones_get_the_note(tmp_path):
    """The mixed-types note reads every training image's type: 2 16-bit images among 40 8-bit ones, at ids that 16
    evenly spaced images left out (1 and 40 of 0..41), are named."""
    scene = np.zeros((8, 8), np.uint8)
    scene[2:6, 2:6] = 60
    for folder in (tmp_path / "images", tmp_path / "masks" / "0"):
        folder.mkdir(parents=True)
    ids = [f"{i:02d}" for i in range(42)]
    for i in ids:
        image = scene.astype(np.uint16) * 257 if i in ("01", "40") else scene
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), image)
        cv2.imwrite(str(tmp_path / "masks" / "0" / f"{i}.png"), (scene > 0).astype(np.uint8) * 255)
    assert {1, 40}.isdisjoint(np.linspace(0, 41, 16).round())  # 16 evenly spaced images left them out
    wide = [i for i in ids if decode_image(str(tmp_path / "images" / f"{i}.png")).dtype == np.uint16]
    assert wide == ["01", "40"]
    note = trainer.min_max_note(trainer.Dataset(ids, str(tmp_path)))
    assert note.startswith(f"note: the training images mix 8-bit and uint16 ones (e.g. {tmp_path}/images/00.png and "
                           f"{tmp_path}/images/01.png)"), note


def test_the_dim_images_note_samples_a_set_that_alternates_dim_and_bright_images(tmp_path):
    """31 images, two exports of each field in turn, every second one dim (nuclei at 20 of 255): 16 evenly spaced
    images were the 16 bright ones, and the note that every image's share gives (6 %) was not said. A sample spread
    over the set holds both kinds and says about what all the images say."""
    for folder in (tmp_path / "images", tmp_path / "masks" / "0"):
        folder.mkdir(parents=True)
    ids = [f"field{f // 2:02d}_{'ab'[f % 2]}" for f in range(31)]
    for f, img_id in enumerate(ids):
        scene = np.full((16, 16), 5, np.uint8)
        scene[4:12, 4:12] = 20 if f % 2 else 200
        cv2.imwrite(str(tmp_path / "images" / f"{img_id}.png"), scene)
        cv2.imwrite(str(tmp_path / "masks" / "0" / f"{img_id}.png"), (scene > 10).astype(np.uint8) * 255)
    data = trainer.Dataset(ids, str(tmp_path))
    assert {i % 2 for i in np.linspace(0, 30, 16).round().astype(int)} == {0}  # the bright ones alone
    shares = [re.search(r"clips about (\d+)%", trainer.dim_images_note(data, samples=samples)) for samples in (31, 16)]
    assert shares[0] and shares[1], shares
    assert abs(int(shares[1].group(1)) - int(shares[0].group(1))) <= 2
