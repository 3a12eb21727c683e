"""utils.BatchedThreads, and evaluation.ImageWriter on it, fed by engine.evaluate: the per-image work done in
threads, in batches of waiting images, gives the rows, scores and files of one image at a time, and the rows'
scores are those of the definitions."""
import os
import time
from argparse import Namespace

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import write_image

from engine import Precision, evaluate
from evaluation import (ImageWriter, bootstrap_interval, evaluation_ids, interval_line, model_epoch, summary,
                        training_copies, untrained_line)
from losses import build_loss
from image_files import read_label_image
from metrics import separation_scores
import utils
from utils import BatchedThreads, DataError


def _batches(folder, rng, num_batches=3, batch=2, size=24):
    """Random logits and images, masks and label files of blobs: [(meta, images, logits, masks)] and the label
    files {img_id: (path, None)}, as ImageWriter takes them (a label image needs no image file)."""
    batches, labels = [], {}
    for b in range(num_batches):
        ids = [f"img{b}{i}" for i in range(batch)]
        truth = np.zeros((batch, size, size), np.uint16)
        for i, img_id in enumerate(ids):
            for n, (y, x) in enumerate(rng.integers(2, size - 6, (3, 2))):
                truth[i, y:y + 5, x:x + 5] = n + 1
            labels[img_id] = write_image(os.path.join(folder, "labels", img_id + ".png"), truth[i]), None
        masks = torch.from_numpy(truth[:, None] > 0).float()
        logits = torch.from_numpy(4 * masks.numpy() - 2 + rng.normal(0, 1.5, masks.shape).astype(np.float32))
        images = torch.from_numpy(rng.normal(0, 1, (batch, 3, size, size)).astype(np.float32))
        batches.append(({"img_id": ids, "kind": ["fluorescence"] * batch}, images, logits, masks))
    return batches, labels


class Replay(torch.nn.Module):
    """A stand-in network whose outputs are the given logits, one batch per call, in order."""

    def __init__(self, logits):
        super().__init__()
        self.logits = list(logits)

    def forward(self, images):
        return self.logits.pop(0)


def _evaluate(writer, batches, classes=1):
    """engine.evaluate over ``batches`` [(meta, images, logits, masks)] with ``writer`` as its on_batch."""
    loader = [(images, masks, meta) for meta, images, _, masks in batches]
    return evaluate(Replay(logits for _, _, logits, _ in batches), loader, build_loss("BCEWithLogitsLoss"),
                    Precision.choose(torch.device("cpu"), "fp32"), progress=False, on_batch=writer, classes=classes)


def _write(out_dir, batches, labels, **kwargs):
    with ImageWriter(str(out_dir), 1, labels, ["watershed", "cc"], {"min_size": 3, "min_confidence": 0.5},
                     **kwargs) as writer:
        _evaluate(writer, batches)
        return writer.write_table("run r (val split)"), writer.dsb_means()


def test_threads_and_waiting_give_what_one_image_at_a_time_gives(tmp_path):
    batches, labels = _batches(tmp_path, np.random.default_rng(0))
    one, one_dsb = _write(tmp_path / "one", batches, labels, workers=1, buffer_mb=0)
    many, many_dsb = _write(tmp_path / "many", batches, labels, workers=2, buffer_mb=1)
    assert one.equals(many) and one_dsb == many_dsb
    assert len(one) == 6 and one["dsb"].notna().all()
    for name in ("0", "overlays"):
        for img_id in one["img_id"]:
            a, b = (open(os.path.join(tmp_path, run, name, img_id + ".png"), "rb").read() for run in ("one", "many"))
            assert a == b, f"{name}/{img_id}.png differs"
    # the scores are those of each image on its own
    meta, _, logits, _ = batches[1]
    expected = separation_scores(torch.sigmoid(logits[1, 0]).numpy(), read_label_image(labels[meta["img_id"][1]][0]),
                                 ["watershed", "cc"], min_size=3, min_confidence=0.5)["watershed"]
    row = one.set_index("img_id").loc[meta["img_id"][1]]
    assert row[list(expected)].to_dict() == pytest.approx(expected, nan_ok=True)


def test_rows_score_the_mask_channel_against_a_numpy_reference(tmp_path):
    """A row's IoU and Dice are those of class 0 alone, computed here from the definitions: the border channel
    after it (here all wrong) does not count, and an image with empty truth and prediction scores 1."""
    rng = np.random.default_rng(1)
    batches, labels = _batches(tmp_path, rng, num_batches=2)
    meta, images, logits, masks = batches[0]
    logits[1, 0], masks[1, 0] = -5.0, 0.0  # nothing to find and nothing found
    batches[0] = (meta, images, torch.cat([logits, -logits], 1), torch.cat([masks, masks], 1))
    meta, images, logits, masks = batches[1]
    batches[1] = (meta, images, torch.cat([logits, -logits], 1), torch.cat([masks, masks], 1))
    with ImageWriter(str(tmp_path / "out"), 1, {}, ["watershed"], {}, overlays=False, workers=1) as writer:
        _evaluate(writer, batches)
        rows = writer.write_table("run r (val split)").set_index("img_id")
    for meta, _, logits, masks in batches:
        for i, img_id in enumerate(meta["img_id"]):
            pred, truth = logits[i, 0].numpy() > 0, masks[i, 0].numpy() > 0.5
            both, either, total = (pred & truth).sum(), (pred | truth).sum(), pred.sum() + truth.sum()
            assert rows["iou"][img_id] == pytest.approx(both / either if either else 1.0, abs=1e-6)
            assert rows["dice"][img_id] == pytest.approx(2 * both / total if total else 1.0, abs=1e-6)
    assert rows["iou"][batches[0][0]["img_id"][1]] == 1.0


def test_nan_output_is_a_data_error(tmp_path):
    """A network that puts out NaN (an overflow) is a DataError saying so, not instances.py's ValueError with a
    traceback about 0-255 probability maps."""
    batches, labels = _batches(tmp_path, np.random.default_rng(2), num_batches=1)
    batches[0][2][1, 0, :3] = float("nan")
    with pytest.raises(DataError, match="the network put out NaN"):
        _write(tmp_path / "out", batches, labels, workers=1)


def test_rows_of_two_classes_give_each_class_and_their_mean(tmp_path):
    """With two classes a row's iou and dice are the mean of the image's classes, and iou_class<c> / dice_class<c>
    each class's, from the definitions here (a class empty in truth and prediction scores 1); the worst image of
    each class is printed, and the worst image by the mean says so."""
    batches, _ = _batches(tmp_path, np.random.default_rng(2), num_batches=2)
    for b, (meta, images, logits, masks) in enumerate(batches):
        shifted = torch.from_numpy(np.roll(masks.numpy(), 3, axis=-1))  # class 1: the nuclei moved aside
        batches[b] = (meta, images, torch.cat([logits, 4 * shifted - 2 + torch.randn_like(shifted)], 1),
                      torch.cat([masks, shifted], 1))
    meta, images, logits, masks = batches[0]
    logits[0, 1], masks[0, 1] = -5.0, 0.0  # class 1 of the first image: nothing to find and nothing found
    with ImageWriter(str(tmp_path / "out"), 2, {}, ["watershed"], {}, overlays=False, workers=1) as writer:
        scores = _evaluate(writer, batches, classes=2)
        table = writer.write_table("run r (val split)")
    assert list(table.columns) == ["img_id", "iou", "dice", "kind", "iou_class0", "dice_class0", "iou_class1",
                                   "dice_class1"]
    rows = table.set_index("img_id")
    for meta, _, logits, masks in batches:
        for i, img_id in enumerate(meta["img_id"]):
            pred, truth = logits[i].numpy() > 0, masks[i].numpy() > 0.5
            both, either = (pred & truth).sum((1, 2)), (pred | truth).sum((1, 2))
            total = pred.sum((1, 2)) + truth.sum((1, 2))
            iou = np.where(either > 0, both / np.maximum(either, 1), 1.0)
            dice = np.where(total > 0, 2 * both / np.maximum(total, 1), 1.0)
            for c in (0, 1):
                assert rows[f"iou_class{c}"][img_id] == pytest.approx(iou[c], abs=1e-12)
                assert rows[f"dice_class{c}"][img_id] == pytest.approx(dice[c], abs=1e-12)
            assert rows["iou"][img_id] == pytest.approx(iou.mean(), abs=1e-12)
            assert rows["dice"][img_id] == pytest.approx(dice.mean(), abs=1e-12)
    assert rows["iou_class1"][batches[0][0]["img_id"][0]] == 1.0
    text = summary("run", scores, table, {}, "outputs/run", False)
    worst = [rows[f"iou_class{c}"].idxmin() for c in (0, 1)]
    assert (f"  worst image by class: 0 {worst[0]} (IoU {rows['iou_class0'].min():.3f}), 1 {worst[1]} "
            f"(IoU {rows['iou_class1'].min():.3f})\n") in text
    assert f"  worst image {table['img_id'][0]} (IoU {table['iou'][0]:.3f}, the mean of its classes); files" in text
    assert "worst image by class" not in summary("run", scores, table[["img_id", "iou", "dice", "kind"]], {},
                                                 "outputs/run", False)


def _square_slowly(x):
    time.sleep(0.002 * (10 - x))  # the later jobs finish first
    return x * x


def _fail(path):
    raise DataError(f"{path}: broken")


def test_batched_threads_run_when_the_buffer_fills_and_keep_the_order():
    got = []
    with BatchedThreads(got.append, buffer_mb=1, workers=3) as jobs:
        jobs.submit(_square_slowly, 3, nbytes=2 ** 19)
        assert got == []  # half the buffer: the job waits
        jobs.submit(_square_slowly, 2, nbytes=2 ** 19)
        assert got == [9, 4]
        for x in range(10):
            jobs.submit(_square_slowly, x)
        jobs.flush()
        assert got == [9, 4] + [x * x for x in range(10)]
        jobs.submit(_fail, "a.png")
        with pytest.raises(DataError, match="a.png: broken"):
            jobs.flush()


def _four_squares_and_one(desc):
    got = []
    with BatchedThreads(got.append, workers=2, desc=desc) as jobs:
        for x in range(4):
            jobs.submit(_square_slowly, x)
        jobs.flush()
        jobs.flush()  # nothing waiting: no bar
    return got


def test_batched_threads_show_a_bar_while_they_run_only_when_named_and_on_a_terminal(capsys, monkeypatch):
    """The bar sits below the caller's own (predict.py's "write" under "predict"): in a log file (pytest's stderr is
    none) its cursor moves landed as escape codes ("\x1b[A"), so there it is left out."""
    assert _four_squares_and_one("scores and PNGs") == [0, 1, 4, 9] and capsys.readouterr().err == ""
    monkeypatch.setattr(utils, "stderr_is_terminal", lambda: True)
    assert _four_squares_and_one("scores and PNGs") == [0, 1, 4, 9]
    assert capsys.readouterr().err.count(" 0/4 [") == 1  # one bar, over the 4 jobs
    assert _four_squares_and_one(None) == [0, 1, 4, 9] and capsys.readouterr().err == ""


def test_the_model_is_named_by_its_epoch_from_the_log(tmp_path, monkeypatch):
    """val.py's title says which epoch model.pth holds: the first with the highest val IoU (train.py keeps that one)
    of the epochs logged so far, so that a run still training is not taken for a finished one; '' without a log."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("models/r")
    assert model_epoch("r") == ""
    with open("models/r/log.csv", "w") as f:
        f.write("epoch,val_iou\n1,0.5\n2,0.7\n3,0.6\n4,0.7\n")
    assert model_epoch("r") == "epoch 2 of 4"
    with open("models/r/log.csv", "w") as f:
        f.write("epoch,loss\n1,0.5\n")  # no val_iou column
    assert model_epoch("r") == ""


def test_training_copies_are_found_in_another_bit_depth_and_channel_count(tmp_path, monkeypatch):
    """val.py --dataset: a training image saved again as 16-bit (x 257), or its grey values in three equal channels,
    is the run's training image; another picture of the same name, or a copy of a validation image, is not."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    grey = {i: rng.integers(0, 256, (16, 16), dtype=np.uint8) for i in "abcd"}
    for i, img in grey.items():
        write_image(tmp_path / "inputs" / "theirs" / "images" / f"{i}.png", img)
    os.makedirs(tmp_path / "models" / "r")
    (tmp_path / "models" / "r" / "split.csv").write_text("img_id,split\na,train\nb,train\nc,train\nd,val\n")
    ours = tmp_path / "ours" / "images"
    os.makedirs(ours)
    tifffile.imwrite(ours / "a.tif", grey["a"].astype(np.uint16) * 257)
    tifffile.imwrite(ours / "b.tif", np.dstack([grey["b"]] * 3))
    tifffile.imwrite(ours / "c.tif", 255 - grey["c"])
    tifffile.imwrite(ours / "d.tif", grey["d"])
    cfg = Namespace(dataset="theirs", img_ext=".png", mask_ext=".png")
    reading = {"img_ext": ".tif", "mask_ext": ".png", "num_classes": 1}
    assert training_copies("r", cfg, str(tmp_path / "ours"), list("abcd"), reading) == ["a", "b"]


def test_training_copies_include_a_training_field_under_another_id_at_another_contrast(tmp_path, monkeypatch):
    """A test set that holds a training field again, stretched to another contrast and named otherwise (4 of
    DSB2018's stage1_test images are such copies of stage1_train ones): scored as unseen, it overstates the run;
    another field of the same size, or a copy of a validation image, is no training image."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    fields = {i: rng.integers(0, 150, (48, 64), dtype=np.uint8) for i in ("t", "u", "v")}
    for i, img in fields.items():
        write_image(tmp_path / "inputs" / "theirs" / "images" / f"{i}.png", img)
    os.makedirs(tmp_path / "models" / "r")
    (tmp_path / "models" / "r" / "split.csv").write_text("img_id,split\nt,train\nu,train\nv,val\n")
    write_image(tmp_path / "ours" / "images" / "x.png", (fields["t"] * 1.6 + 10).astype(np.uint8))
    write_image(tmp_path / "ours" / "images" / "y.png", rng.integers(0, 150, (48, 64), dtype=np.uint8))
    write_image(tmp_path / "ours" / "images" / "z.png", fields["v"])
    cfg = Namespace(dataset="theirs", img_ext=".png", mask_ext=".png")
    reading = {"img_ext": ".png", "mask_ext": ".png", "num_classes": 1}
    assert training_copies("r", cfg, str(tmp_path / "ours"), list("xyz"), reading) == ["x"]


def test_training_copies_include_a_training_field_resized_to_another_size(tmp_path, monkeypatch):
    """A dataset that holds the training images resized (inputs/dsb2018_96 is dsb2018_full at 96x96, OpenCV's
    linear resize, which changes the aspect ratio) is scored as the run's training images, not as unseen ones; a
    validation field resized likewise is not one."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    fields = {i: cv2.normalize(cv2.GaussianBlur(rng.random((120, 160)), (0, 0), 3), None, 0, 255,
                               cv2.NORM_MINMAX).astype(np.uint8) for i in ("t", "v")}
    for i, img in fields.items():
        write_image(tmp_path / "inputs" / "theirs" / "images" / f"{i}.png", img)
        write_image(tmp_path / "ours" / "images" / f"{i}.png", cv2.resize(img, (48, 48)))  # INTER_LINEAR
    os.makedirs(tmp_path / "models" / "r")
    (tmp_path / "models" / "r" / "split.csv").write_text("img_id,split\nt,train\nv,val\n")
    cfg = Namespace(dataset="theirs", img_ext=".png", mask_ext=".png")
    reading = {"img_ext": ".png", "mask_ext": ".png", "num_classes": 1}
    assert training_copies("r", cfg, str(tmp_path / "ours"), ["t", "v"], reading) == ["t"]


def test_training_copies_of_a_run_whose_dataset_was_rearranged_are_unknown(tmp_path, monkeypatch):
    """The run's dataset folder without its images/ (moved or rearranged): the folder being scored is still scored,
    not refused with an error about the run's folder, and not taken for images the run never saw (None)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "inputs" / "theirs" / "imgs")
    os.makedirs(tmp_path / "models" / "r")
    (tmp_path / "models" / "r" / "split.csv").write_text("img_id,split\na,train\n")
    write_image(tmp_path / "ours" / "images" / "a.png", np.zeros((16, 16), np.uint8))
    cfg = Namespace(dataset="theirs", img_ext=".png", mask_ext=".png")
    reading = {"img_ext": ".png", "mask_ext": ".png", "num_classes": 1}
    assert training_copies("r", cfg, str(tmp_path / "ours"), ["a"], reading) is None


def test_a_dataset_scored_without_the_run_s_own_is_not_called_unseen(tmp_path, monkeypatch):
    """val.py --dataset of a run handed over without its dataset (or without its split.csv): its training images
    cannot be looked for, so the evaluation does not claim that the run never trained on these images."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "ours" / "images" / "a.png", np.zeros((16, 16), np.uint8))
    write_image(tmp_path / "ours" / "masks" / "0" / "a.png", np.zeros((16, 16), np.uint8))
    os.makedirs(tmp_path / "models" / "r")
    (tmp_path / "models" / "r" / "split.csv").write_text("img_id,split\na,train\n")
    cfg = Namespace(dataset="theirs", img_ext=".png", mask_ext=".png")
    reading = {"img_ext": ".png", "mask_ext": ".png", "num_classes": 1}
    for with_split in (True, False):
        if not with_split:
            os.remove(tmp_path / "models" / "r" / "split.csv")
        assert training_copies("r", cfg, str(tmp_path / "ours"), ["a"], reading) is None
        _, ids, part, trained = evaluation_ids("r", None, str(tmp_path / "ours"), cfg, reading)
        assert ids == ["a"] and trained == [] and "not trained on" not in part
        assert part.endswith("(not compared with the run's training images: that needs its split.csv and its "
                             "dataset inputs/theirs as trained)")


@pytest.mark.parametrize("n", [10, 40, 300, 6000], ids=["ten", "few", "many", "chunked"])
def test_the_bootstrap_interval_matches_scipy_and_the_t_approximation(n):
    """The expanded percentile interval of the mean against scipy.stats.bootstrap's percentile interval (its own
    resamples) at the level widened as a t interval's, and mean +- sqrt(n / (n - 1)) t s / sqrt(n): each within a
    sixth of the half-width (the resampling's own scatter is about a twentieth)."""
    stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(3).beta(5, 2, n)
    low, high = bootstrap_interval(values)
    z = np.sqrt(n / (n - 1)) * stats.t.ppf(0.975, n - 1)
    half = z * values.std() / np.sqrt(n)
    reference = stats.bootstrap((values,), np.mean, confidence_level=2 * stats.norm.cdf(z) - 1, n_resamples=4000,
                                method="percentile", random_state=np.random.default_rng(7)).confidence_interval
    for a, b in ((low, reference.low), (high, reference.high), (low, values.mean() - half),
                 (high, values.mean() + half)):
        assert abs(a - b) < half / 6, (a, b, half)
    assert bootstrap_interval(values) == (low, high)  # the same scores print the same interval
    assert bootstrap_interval(np.full(20, 0.7)) == pytest.approx((0.7, 0.7))


def test_the_bootstrap_interval_of_ten_skewed_scores_holds_the_mean_more_often_than_the_plain_one():
    """Ten per-image IoUs of a skewed population (beta(5, 1.5): most near 0.85, a tail down to 0.2): the plain 95 %
    percentile interval held the population's mean in 346 of 400 samples (86.5 %), the expanded one in 372 (93 %)."""
    population = np.random.default_rng(0).beta(5, 1.5, 1000)
    rng = np.random.default_rng(0)
    plain = expanded = 0
    for k in range(400):
        sample = rng.choice(population, 10)
        low, high = bootstrap_interval(sample, draws=1000, seed=k)
        expanded += low <= population.mean() <= high
        means = sample[np.random.default_rng(k).integers(0, 10, (1000, 10))].mean(1)
        low, high = np.percentile(means, [2.5, 97.5])
        plain += low <= population.mean() <= high
    assert expanded >= plain + 12 and expanded >= 0.9 * 400, (plain, expanded)


def test_the_summary_gives_the_interval_of_the_means_from_ten_images():
    table = pd.DataFrame({"img_id": [f"i{k}" for k in range(10)], "iou": np.linspace(0.5, 0.9, 10),
                          "dice": np.linspace(0.6, 0.95, 10), "kind": "fluorescence",
                          "dsb": [np.nan] + list(np.linspace(0.2, 0.6, 9))})
    table = table.assign(**{c: table["dsb"] for c in ("f1", "precision", "recall", "pq", "sq", "tp", "fp",
                                                       "true_nuclei")})  # metrics.nucleus_scores' columns
    scores = {"iou": 0.7, "iou_mean": 0.7, "dice": 0.8, "dice_mean": 0.8}
    text = summary("run", scores, table, {"watershed": 0.4, "cc": 0.35}, "outputs/run", False)
    low, high = bootstrap_interval(table["iou"].to_numpy())
    assert f"  95 % interval of the means per image (bootstrap over the 10 images): IoU {low:.3f}-{high:.3f}\n" in text
    assert low < 0.7 < high
    with_labels = pd.DataFrame({"img_id": [f"i{k}" for k in range(11)], "iou": np.linspace(0.5, 0.9, 11),
                                "dsb": list(np.linspace(0.2, 0.6, 10)) + [np.nan]})
    low, high = bootstrap_interval(with_labels["dsb"].dropna().to_numpy())
    # the line bootstraps 11 images; the DSB2018 interval says it is of the 10 that have scores
    assert ("(bootstrap over the 11 images): IoU" in interval_line(with_labels, "watershed")[0] and
            f"DSB2018 (watershed, over the 10 with instance labels) {low:.3f}-{high:.3f}" in
            interval_line(with_labels, "watershed")[0])
    # nine images with DSB2018 scores are too few for theirs; ten are enough
    table.loc[0, "dsb"] = 0.3
    assert "DSB2018 (watershed) 0." in interval_line(table, "watershed")[0]
    # nine images get none, and are told so (a user's few validation images: their means read as exact)
    assert interval_line(table.iloc[:9], "watershed") == [
        "  no 95 % interval of the means: 9 images are too few for one (at least 10); another image of the same kind "
        "could move them far"]


def test_the_scores_without_the_images_trained_on_are_their_means():
    table = pd.DataFrame({"img_id": ["a", "b", "c", "d"], "iou": [0.9, 0.5, 0.7, 0.2], "dsb": [0.8, np.nan, 0.4, 0.1]})
    assert untrained_line(table, ["a", "x"], "borders") == [
        "  without the 1 training image (3): IoU 0.4667 mean per image, DSB2018 0.2500 (learned borders, over "
        "the 2 with instance labels); they are a"]
    assert "DSB2018 0.4333 (learned borders); they are b" in untrained_line(table, ["b"], "borders")[0]
    assert untrained_line(table, [], "borders") == [] and untrained_line(table, list("abcd"), "borders") == []
    assert untrained_line(table[["img_id", "iou"]], ["d"], None) == [
        "  without the 1 training image (3): IoU 0.7000 mean per image; they are d"]
    # one id named: DSB2018's are 64 characters long, and three of them took the line to four
    assert untrained_line(table[["img_id", "iou"]], ["a", "b", "c"], None)[0].endswith("; they are a and 2 more")

