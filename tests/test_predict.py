"""Tests for predict.py: odd sizes and formats, stacks, instances, --resume, the tables, --prune and the error messages.

One tiny NestedUNet + deep supervision run is trained once (1 epoch on 8 synthetic 32x32 images, resized
training). Copies of it with ``crop_size: 32`` in config.yml (full-resolution prediction), a UNet run with
random weights, and a run without model.pth are made beside it without training.
"""
import contextlib
import errno
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import weakref
from argparse import Namespace
from datetime import datetime, timezone

import cv2
import numpy as np
import pandas as pd
import psutil
import pytest
import tifffile
import torch
import yaml
from matplotlib.path import Path
from roifile import roiread
from skimage.measure import perimeter

import checkpoints
import evaluation
import files
import finished_images
import image_files
import inference
import measurements
import plane_outputs
import predict
import predict_notes
import synthetic
import train
import utils
import val
from archs import build_model
from conftest import ROOT, Pointwise, held_by_another_process
from layouts import nucleus_diameter
from splits import read_split, split_ids
from image_files import decode_image, image_to_float
from instances import link_planes, split_instances
from utils import DataError, UsageError, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with inputs/synthetic and models/{p, pc, u, nomodel}; returns its path (tests chdir into it)."""
    root = tmp_path_factory.mktemp("predict_runs")
    old = os.getcwd()
    os.chdir(root)
    try:
        synthetic.generate_synthetic(os.path.join("inputs", "synthetic"), num_images=8, size=32)
        train.main(["--dataset", "synthetic", "--arch", "NestedUNet", "--deep_supervision", "True", "--epochs", "1",
                    "--input_w", "32", "--input_h", "32", "-b", "2", "--num_workers", "0", "--name", "p",
                    "--device", "cpu"])
        with open(os.path.join("models", "p", "config.yml")) as f:
            config = yaml.safe_load(f)

        def make_run(name, weights=None, **changes):
            os.makedirs(os.path.join("models", name))
            with open(os.path.join("models", name, "config.yml"), "w") as f:
                yaml.safe_dump({**config, "name": name, **changes}, f, sort_keys=False)
            shutil.copy(os.path.join("models", "p", "split.csv"), os.path.join("models", name, "split.csv"))
            if weights is not None:
                torch.save(weights, os.path.join("models", name, "model.pth"))

        p_weights = torch.load(os.path.join("models", "p", "model.pth"), weights_only=True)
        make_run("pc", p_weights, crop_size=32)
        make_run("pa", p_weights, crop_size=32, nucleus_diameter=3.0)  # the nuclei it finds: mostly rescaled
        make_run("pp", p_weights, normalization="percentile")
        make_run("pd", p_weights, normalization="percentile_dark")
        torch.manual_seed(0)
        make_run("u", build_model("UNet", 1, 3, False).state_dict(), arch="UNet", deep_supervision=False)
        make_run("nomodel")
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs)
    return runs


def sample_bgr(height, width):
    """A synthetic nuclei image (BGR uint8) resized to height x width."""
    src = cv2.imread(os.path.join("inputs", "synthetic", "images", "syn_0000.png"))
    return cv2.resize(src, (width, height), interpolation=cv2.INTER_LINEAR)


def write(path, image):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return str(path)


def read(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} missing or unreadable"
    return image


def test_odd_sizes_and_formats_keep_their_size(in_runs, tmp_path, capsys):
    folder = tmp_path / "images"
    write(folder / "grey.png", sample_bgr(519, 161)[:, :, 0])
    rgba = np.dstack([sample_bgr(64, 48), np.full((64, 48), 200, np.uint8)])
    write(folder / "rgba.PNG", rgba)
    write(folder / "deep.tif", sample_bgr(50, 70)[:, :, 0].astype(np.uint16) * 180)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image extension
    extra = write(tmp_path / "other" / "photo.JPG", sample_bgr(40, 36))
    out = tmp_path / "out"
    # --min_confidence 0: this barely trained network is unsure of everything; keep its objects to check them
    predict.main(["--name", "p", "--input", str(folder), extra, "--output", str(out), "--instances", "--overlay",
                  "--save_prob", "--min_confidence", "0", "--device", "cpu"])
    summary = capsys.readouterr().out
    assert "4 images" in summary and "objects.csv" in summary and "try --min_confidence 0" not in summary
    predict.main(["--name", "p", "--input", extra, "--output", str(tmp_path / "strict"), "--instances",
                  "--min_confidence", "0.999", "--device", "cpu"])
    assert "0 objects (watershed) in objects.csv (the filters --min_confidence 0.999 and --min_size 3 dropped every " \
        "one: try --min_confidence 0 or a smaller --min_size)" in capsys.readouterr().out
    blank = write(tmp_path / "blank" / "blank.png", np.zeros((40, 36), np.uint8))  # nothing found: nothing dropped
    predict.main(["--name", "p", "--input", blank, "--output", str(tmp_path / "none"), "--instances", "--device",
                  "cpu", "--threshold", "0.99"])
    summary = capsys.readouterr().out
    assert ("mean foreground 0.0%, 0 objects (watershed) in objects.csv; a row per image in images.csv (1 with no "
            "nuclei); files") in summary, summary
    sizes = {"grey": (519, 161), "rgba": (64, 48), "deep": (50, 70), "photo": (40, 36)}
    table = pd.read_csv(out / "objects.csv")
    assert list(table.columns) == measurements.OBJECT_COLUMNS
    for img_id, shape in sizes.items():
        mask = read(out / f"{img_id}.png")
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        prob = read(out / f"{img_id}_prob.png")
        assert prob.shape == shape and prob.dtype == np.uint8
        assert np.all(mask[prob >= 129] == 255) and np.all(mask[prob <= 127] == 0)
        labels = read(out / f"{img_id}_instances.png")
        assert labels.shape == shape and labels.dtype == np.uint16
        assert np.all(mask[labels > 0] == 255)  # objects lie in the mask (those below min_size are dropped)
        assert read(out / f"{img_id}_overlay.png").shape == shape + (3,)
        rows = table[table["image"] == img_id]
        assert sorted(rows["label"].tolist()) == list(range(1, int(labels.max()) + 1))
        for row in rows.itertuples():
            assert row.area == int((labels == row.label).sum())
            assert 0 <= row.bbox_min_y < row.bbox_max_y <= shape[0] and 0 <= row.bbox_min_x < row.bbox_max_x <= shape[1]
    assert not (out / "notes.png").exists()


def test_stacks_are_predicted_plane_by_plane(in_runs, tmp_path, capsys, monkeypatch):
    """A TIFF stack (16-bit, three time points) gives TIFF stacks whose pages are what each plane, saved as an image
    of its own, gives; objects.csv numbers the planes. Two stacks written with a flush of the threads after every
    plane give the same."""

    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    stack = np.stack([grey * 180, grey[::-1] * 90 + 7, grey[:, ::-1] * 250])  # each plane scaled on its own
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "movie.tif", stack, imagej=True, metadata={"axes": "TYX"})
    for t, plane in enumerate(stack):
        write(tmp_path / "single" / f"t{t}.png", plane)
    # --min_confidence 0: this barely trained network is unsure of everything; keep its objects to compare them
    flags = ["--name", "pc", "--instances", "--overlay", "--save_prob", "--min_confidence", "0", "--device", "cpu",
             "--amp", "fp32"]
    predict.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *flags])
    assert "1 image (0.00 Mpx, 3 planes in all" in capsys.readouterr().out
    predict.main(["--input", str(tmp_path / "single"), "--output", str(tmp_path / "one_by_one"), *flags])
    for suffix in ("", "_prob", "_instances", "_overlay"):
        with tifffile.TiffFile(tmp_path / "out" / f"movie{suffix}.tif") as tif:
            assert tif.series[0].axes[0] == "T"
            pages = tif.asarray()
        assert len(pages) == 3
        for t in range(3):
            expected = read(tmp_path / "one_by_one" / f"t{t}{suffix}.png")
            np.testing.assert_array_equal(pages[t], expected[..., ::-1] if suffix == "_overlay" else expected)
    objects = pd.read_csv(tmp_path / "out" / "objects.csv")
    one_by_one = pd.read_csv(tmp_path / "one_by_one" / "objects.csv")
    assert len(objects) > 0 and set(objects["plane"]) <= {0, 1, 2} and set(one_by_one["plane"]) == {0}
    t = one_by_one["image"].str[1].astype(int)  # a time-lapse's plane is its time point
    pd.testing.assert_frame_equal(objects.drop(columns=["image"]),
                                  one_by_one.assign(plane=t, t=t).drop(columns=["image"]))
    with pytest.raises(UsageError, match="overwrite the input"):
        predict.main(["--name", "pc", "--input", str(tmp_path / "in" / "movie.tif"), "--output", str(tmp_path / "in")])
    tifffile.imwrite(tmp_path / "in" / "movie2.tif", stack[::-1], imagej=True, metadata={"axes": "TYX"})
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    predict.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "flushed"), *flags])
    for suffix in ("", "_prob", "_instances", "_overlay"):
        pages = tifffile.imread(tmp_path / "out" / f"movie{suffix}.tif")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "flushed" / f"movie{suffix}.tif"), pages)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "flushed" / f"movie2{suffix}.tif"), pages[::-1])


@pytest.mark.parametrize("shape, axes, dtype, pixel_size", [
    ((5, 20, 12), "TYX", np.uint8, 0.325), ((2, 3, 20, 12), "TZYX", np.uint16, None),
    ((4, 20, 12, 3), "ZYX", np.uint8, 0.1)])  # ImageJ's RGB is 8-bit
def test_a_tiff_written_page_by_page_is_the_one_written_whole(tmp_path, shape, axes, pixel_size, dtype):
    """files.atomic_tiff_pages, its pages given in any order, writes the bytes that tifffile.imwrite of the whole
    stack writes (what predict.py wrote before): an ImageJ hyperstack with its axes, calibration, RGB pages; a page
    of another shape or type, or beyond the stack, is refused."""
    stack = np.random.default_rng(0).integers(0, 250, shape).astype(dtype)
    rgb = len(shape) > len(axes)
    metadata, resolution = {"axes": axes + "S" * rgb}, None
    if pixel_size is not None:
        metadata["unit"], resolution = "um", (1 / pixel_size, 1 / pixel_size)
    tifffile.imwrite(tmp_path / "whole.tif", stack, imagej=True, photometric="rgb" if rgb else "minisblack",
                     metadata=metadata, resolution=resolution)
    pages = stack.reshape(-1, *shape[len(axes) - 2:])
    with files.atomic_tiff_pages(str(tmp_path / "paged.tif"), shape, dtype, axes, pixel_size) as write:
        for index in np.random.default_rng(1).permutation(len(pages)):
            write(index, pages[index])
        for index, page in ((len(pages), pages[0]), (0, pages[0][:-1]), (0, pages[0].astype(np.int32))):
            with pytest.raises(ValueError, match="expected one of"):
                write(index, page)
    assert (tmp_path / "paged.tif").read_bytes() == (tmp_path / "whole.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "paged.tif") as tif:
        assert tif.series[0].axes == axes[:-2] + "YX" + "S" * rgb and tif.imagej_metadata["images"] == len(pages)
        np.testing.assert_array_equal(tif.asarray(), stack)
    assert sorted(os.listdir(tmp_path)) == ["paged.tif", "whole.tif"]  # no temporary file left


class FullDisk:
    """A file whose writes fail as on a full disk once ``full`` holds anything (ENOSPC, naming no file)."""

    def __init__(self, f, full):
        self.f, self.full = f, full

    def write(self, data):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_page_that_cannot_be_written_names_its_own_stack(tmp_path, monkeypatch):
    """A page of movie_prob.tif that a full disk refuses is an error naming movie_prob.tif, not the stack of the
    same image that removing them named last (movie_overlay.tif); no file of them is left."""
    real, full = files.atomic_write, []

    @contextlib.contextmanager
    def atomic_write(path, *args, **kwargs):
        with real(path, *args, **kwargs) as f:
            yield FullDisk(f, full) if path.endswith("_prob.tif") else f

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    arrays = {"": np.zeros((4, 3), np.uint8), "_prob": np.zeros((4, 3), np.uint8),
              "_overlay": np.zeros((4, 3, 3), np.uint8)}
    opened, writes = plane_outputs.open_stack(str(tmp_path), "movie", arrays, 2,
                                              image_files.TiffHeader("T", plane_shape=(2,)))
    full.append("the disk")
    with pytest.raises(OSError) as raised, opened:  # as predict_all's discard removes the stack
        plane_outputs.write_planes(writes, 0, arrays)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "movie_prob.tif")
    assert os.listdir(tmp_path) == []


def stack_flags(model="pc"):
    """predict.py's flags for every output of a stack (--min_confidence 0: the barely trained network's objects)."""
    return ["--name", model, "--instances", "--rois", "--overlay", "--save_prob", "--min_confidence", "0", "--device",
            "cpu", "--amp", "fp32"]


def movie(folder, planes=6):
    """A 16-bit ImageJ time-lapse ``folder``/movie.tif of ``planes`` 40x36 planes, calibrated; returns its path."""
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    stack = np.stack([np.roll(grey, 3 * t, axis=1) * (100 + 30 * t) for t in range(planes)])
    os.makedirs(folder, exist_ok=True)
    tifffile.imwrite(folder / "movie.tif", stack, imagej=True, metadata={"axes": "TYX", "unit": "um"},
                     resolution=(1 / 0.5, 1 / 0.5))
    return str(folder / "movie.tif")


STACK_OUTPUTS = ["movie.tif", "movie_instances.tif", "movie_overlay.tif", "movie_prob.tif", "movie_rois.zip"]


def test_stack_planes_that_finish_out_of_order_land_in_their_pages(in_runs, tmp_path, monkeypatch):
    """The planes' outputs reach the stacks being written in the order their jobs finish; each lands in its own
    page: the stacks are those of the planes finished in order."""
    path = movie(tmp_path / "in")
    predict.main(["--input", path, "--output", str(tmp_path / "in_order"), *stack_flags()])

    class FinishingBackwards(utils.BatchedThreads):
        def flush(self):
            self.waiting.reverse()
            super().flush()

    monkeypatch.setattr(predict, "BatchedThreads", FinishingBackwards)
    predict.main(["--input", path, "--output", str(tmp_path / "backwards"), *stack_flags()])
    for name in STACK_OUTPUTS:
        assert (tmp_path / "backwards" / name).read_bytes() == (tmp_path / "in_order" / name).read_bytes(), name
    with tifffile.TiffFile(tmp_path / "in_order" / "movie_overlay.tif") as tif:
        assert tif.series[0].axes == "TYXS" and tif.pages.first.resolution == (2.0, 2.0)


def test_a_stack_s_outputs_are_written_as_its_planes_come_not_held_to_its_end(in_runs, tmp_path, monkeypatch):
    """The outputs of a stack's planes are not all held until its last plane is done (a 500-frame time-lapse's
    would not fit in memory): with the jobs run after each plane, at most 2 planes' outputs are alive at once."""
    alive, most = set(), []
    segment = predict.segment

    def counted(*args, **kwargs):
        arrays, labels = segment(*args, **kwargs)
        alive.add(id(arrays[""]))
        weakref.finalize(arrays[""], alive.discard, id(arrays[""]))
        most.append(len(alive))
        return arrays, labels

    monkeypatch.setattr(predict, "segment", counted)
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    predict.main(["--input", movie(tmp_path / "in", planes=8), "--output", str(tmp_path / "out"), *stack_flags()])
    assert len(most) == 8 and max(most) <= 2
    assert tifffile.imread(tmp_path / "out" / "movie_prob.tif").shape == (8, 40, 36)


def interrupted(at, error):
    """A stand-in for inference.Predictor.predict that raises ``error`` at its ``at``-th call."""
    real, calls = inference.Predictor.predict, []

    def predict_plane(self, image, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error
        return real(self, image, *args, **kwargs)
    return predict_plane


@pytest.mark.parametrize("error", [KeyboardInterrupt(), DataError("no memory for this plane"),
                                   RuntimeError("a bug in a job")])
def test_a_stack_stopped_midway_leaves_no_file_of_it(in_runs, tmp_path, monkeypatch, error):
    """Ctrl-C, an error, or a plane left out (a DataError: the other images go on) after some planes' pages are
    written leaves no <id>*.tif and no temporary file; an earlier prediction's stacks stay as they were."""
    path = movie(tmp_path / "in")
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "movie_prob.tif").write_bytes(b"an earlier prediction's")
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    if isinstance(error, RuntimeError):  # in a job, run in a thread
        segment = predict.segment

        def failing(img_id, image, prob, *args, **kwargs):
            if failing.calls == 3:
                raise error
            failing.calls += 1
            return segment(img_id, image, prob, *args, **kwargs)
        failing.calls = 0
        monkeypatch.setattr(predict, "segment", failing)
    else:
        monkeypatch.setattr(inference.Predictor, "predict", interrupted(4, error))
    other = write(tmp_path / "in" / "other.png", sample_bgr(40, 36))
    with pytest.raises(type(error)):  # the one DataError left out is the error that names it, after the other image
        predict.main(["--input", path, other, "--output", str(out), *stack_flags()])
    left = sorted(os.listdir(out))
    assert [n for n in left if n.startswith("movie") or n.startswith(".")] == ["movie_prob.tif"]
    assert open_count(path) == 0
    assert (out / "movie_prob.tif").read_bytes() == b"an earlier prediction's"
    if isinstance(error, DataError):
        assert "other.png" in left


def test_a_stack_killed_midway_leaves_only_temporary_files_that_the_next_run_removes(in_runs, tmp_path):
    """A prediction killed outright (SIGKILL, out of memory) after some planes' pages are written leaves their
    temporary files, named as files.remove_killed_writes knows them, and no <id>*.tif; the next run removes them."""
    path, out = movie(tmp_path / "in"), tmp_path / "out"
    killed = (f"import functools, os, sys; sys.path.insert(0, {str(ROOT)!r}); import inference, predict, utils\n"
              "predict.BatchedThreads = functools.partial(utils.BatchedThreads, buffer_mb=0)\n"
              "real, calls = inference.Predictor.predict, []\n"
              "def predict_plane(self, *args, **kwargs):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 4:\n"
              "        os._exit(9)\n"
              "    return real(self, *args, **kwargs)\n"
              "inference.Predictor.predict = predict_plane\n"
              f"predict.main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", killed, "--input", path, "--output", str(out), *stack_flags()],
                          capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert done.returncode == 9, done.stderr[-2000:]
    temporary = [n for n in os.listdir(out) if files.KILLED_WRITE.fullmatch(n)]
    assert len(temporary) == len(STACK_OUTPUTS) and not [n for n in os.listdir(out) if n.startswith("movie")]
    predict.main(["--input", path, "--output", str(out), *stack_flags()])
    assert sorted(os.listdir(out)) == ["images.csv", *STACK_OUTPUTS, "objects.csv", "prediction.yml"]


def resume_inputs(folder):
    """Three 2D images and a 4-plane time-lapse between them (list_images' order: a, b, movie, z); their paths."""
    paths = [write(folder / f"{n}.png", np.roll(sample_bgr(40, 36), 5 * i, axis=0)) for i, n in enumerate("ab")]
    return [*paths, movie(folder, planes=4), write(folder / "z.png", sample_bgr(36, 40))]


def outputs_of(folder):
    """{file name: its bytes} of a folder's files but prediction.yml (its date and command differ)."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))
            if n != predict.PREDICTION_FILE and (folder / n).is_file()}


def stop_prediction(argv, at, monkeypatch):
    """predict.main(``argv``) stopped by Ctrl-C at the network's ``at``-th call, its jobs run after each plane, so
    that the images before it are finished."""
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    with monkeypatch.context() as m:
        m.setattr(inference.Predictor, "predict", interrupted(at, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            predict.main(argv)


def test_resume_goes_on_where_a_stopped_prediction_ended_as_one_prediction(in_runs, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a job's signal) in the middle of a time-lapse: the images whose files were all written are recorded
    and the note says how to go on; --resume predicts only the others (the stack again from its first plane) and
    leaves the files and tables of one uninterrupted prediction, its records removed."""
    resume_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), *stack_flags(), "--geojson"]
    predict.main([*argv, "--output", str(tmp_path / "whole"), "--resume"])  # none stopped there: all predicted
    assert "held no image finished by a stopped prediction; all predicted now" in capsys.readouterr().out
    out = tmp_path / "out"
    # a, b, then the stack's first two planes: stopped at its third
    stop_prediction([*argv, "--output", str(out)], 5, monkeypatch)
    assert "note: stopped with 2 of 4 images finished; the same command with --resume predicts the 2 not finished" \
        in capsys.readouterr().err
    assert sorted(os.listdir(out / ".predict_finished")) == ["a.json", "b.json"]
    assert not [n for n in os.listdir(out) if n.startswith(("movie", "z"))]
    calls = []
    real = inference.Predictor.predict
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    predict.main([*argv, "--output", str(out), "--resume"])
    assert len(calls) == 5  # the stack's 4 planes and z
    assert "note: --resume: 2 of the 4 images were finished by the stopped prediction, 2 predicted now" in \
        capsys.readouterr().out
    assert outputs_of(out) == outputs_of(tmp_path / "whole")
    assert not (out / ".predict_finished").exists()
    with open(out / predict.PREDICTION_FILE) as f:
        assert yaml.safe_load(f)["predicted"] == {"images": 4, "planes": 7, "finished_before_resume": 2}


def test_a_finished_image_s_record_gives_back_its_rows_and_objects_exactly(tmp_path):
    """finished_images' record of an image read back: its ImageRows and objects table equal to the last bit and dtype,
    with NaN (no pixel size, a marker channel NaN in a nucleus), two channels' columns, an id pandas would read as
    NaN, and a plane without nuclei (an empty table of the same dtypes)."""
    labels = np.zeros((30, 30), np.int32)
    labels[2:9, 3:12], labels[15:27, 10:19], labels[20:24, 24:29] = 1, 2, 3
    raw = np.random.default_rng(0).random((30, 30, 2)).astype(np.float32)
    raw[16, 12, 1] = np.nan
    prob = np.random.default_rng(1).random((1, 30, 30)).astype(np.float32)
    tables = [measurements.object_rows("NA", 0, labels, raw, prob[0], None, 0, (2, 1)),
              measurements.object_rows("NA", 1, np.zeros_like(labels), raw, prob[0], None, 0, (2, 1))]
    rows = [measurements.image_row("NA", plane, prob, 0.5, 0.7, table, None, (2, 1))
            for plane, table in enumerate(tables)]
    source = write(tmp_path / "NA.png", np.zeros((30, 30), np.uint8))
    settings = finished_images.json_ready({"threshold": 0.5, "input_size": (96, 96), "nan": float("nan")})
    finished_images.record_finished(str(tmp_path), settings, {"NA": source}, "NA", rows, tables)
    finished = finished_images.read_finished(str(tmp_path), {"NA": source}, {"NA": ["NA.png"]}, settings)
    read_rows, table = finished["NA"]
    assert read_rows == rows and [type(v) for v in read_rows[1]] == [type(v) for v in rows[1]]
    pd.testing.assert_frame_equal(table, pd.concat(tables, ignore_index=True), check_exact=True)
    assert table["mean_intensity_c1"].isna().sum() == 1 and table["image"].tolist() == ["NA"] * 3
    empty = finished_images.table_from_record(finished_images.table_record(tables[1]))
    assert empty.empty and empty.dtypes.equals(tables[1].dtypes)
    record = tmp_path / finished_images.FOLDER / "NA.json"
    record.write_text(record.read_text()[:-20])  # cut short: the image is not finished
    assert finished_images.read_finished(str(tmp_path), {"NA": source}, {"NA": ["NA.png"]}, settings) == {}


@pytest.mark.parametrize("edit", ["{}", "[]", "null", '"a"', '{"settings": [], "source": [], "rows": [], "objects": 1}',
                                  "another image's rows", "a row cut short", "objects of a list"])
def test_a_record_that_is_json_but_not_an_image_s_record_is_not_finished(tmp_path, edit):
    """A record edited by hand into other JSON, or into rows of another image, is no record of the image: it is
    predicted again, as for a record cut short, instead of a traceback or another image's rows in the tables."""
    sources = {n: write(tmp_path / f"{n}.png", np.zeros((30, 30), np.uint8)) for n in "ab"}
    prob = np.zeros((1, 30, 30), np.float32)
    settings = finished_images.json_ready({"threshold": 0.5})
    for n in "ab":
        finished_images.record_finished(str(tmp_path), settings, sources, n,
                                        [measurements.image_row(n, 0, prob, 0.5, 1.0, None, None, (1, 1))], [])
    folder = tmp_path / finished_images.FOLDER
    record = json.loads((folder / "b.json").read_text())
    if edit == "another image's rows":
        record["rows"][0][0] = "c"
    elif edit == "a row cut short":
        record["rows"][0].pop()
    elif edit == "objects of a list":
        record["objects"] = [1]
    (folder / "b.json").write_text(edit if edit[0] in '{["n' else json.dumps(record))
    outputs = {n: [f"{n}.png"] for n in "ab"}
    assert list(finished_images.read_finished(str(tmp_path), sources, outputs, settings)) == ["a"]


def test_resume_needs_the_same_settings_and_predicts_changed_or_missing_images_again(in_runs, tmp_path, monkeypatch,
                                                                                    capsys):
    """--resume with another setting is refused in one line naming it, but not another memory budget; an input
    rewritten since it was finished, or one whose output file is gone, is predicted again; without --resume every
    image is, with a note."""
    paths = resume_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), *stack_flags(), "--output", str(tmp_path / "out")]
    stop_prediction(argv, 7, monkeypatch)  # at z: a, b, movie finished
    with pytest.raises(UsageError, match=r"^--resume: the prediction that stopped in .*out/ \(image a\) was made "
                                         r"with other settings than this one: threshold 0\.5 -> 0\.6; give the flags"):
        predict.main([*argv, "--resume", "--threshold", "0.6"])
    with monkeypatch.context() as m:  # another version of the toolkit: no flag gives the old one back
        m.setattr(checkpoints, "code_version", lambda folder: "another")
        with pytest.raises(UsageError, match=r'other settings than this one: toolkit ".*" -> "another"; leave out '
                                             r"--resume to predict every image again$"):
            predict.main([*argv, "--resume"])
    write(paths[0], sample_bgr(40, 36)[::-1])  # a is another image now
    os.remove(tmp_path / "out" / "movie_prob.tif")
    # a requeued job on a node with less memory: windows sized from another budget (64x64, still above these images)
    monkeypatch.setattr(inference, "memory_budget", lambda device: 2 ** 20)
    calls = []
    real = inference.Predictor.predict
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    capsys.readouterr()
    predict.main([*argv, "--resume"])
    assert len(calls) == 6  # a, movie, z
    assert ("note: --resume: 1 of the 4 images were finished by the stopped prediction, 3 predicted now; 2 more had a "
            "record there that did not hold (an input file changed since") in capsys.readouterr().out
    predict.main([*argv[:-1], str(tmp_path / "whole")])
    assert outputs_of(tmp_path / "out") == outputs_of(tmp_path / "whole")
    stop_prediction(argv, 2, monkeypatch)
    calls.clear()
    predict.main(argv)
    assert len(calls) == 7
    assert "had finished 1 of these images; this one predicts them all again (--resume would have" in \
        capsys.readouterr().out
    assert not (tmp_path / "out" / ".predict_finished").exists()


def test_a_resume_stopped_again_counts_an_image_changed_since_as_not_finished(in_runs, tmp_path, monkeypatch, capsys):
    """A --resume that predicts an image again (its input rewritten since) and stops before it is finished: the note
    counts it among those not finished, as the next --resume then finds them."""
    paths = resume_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), *stack_flags(), "--output", str(tmp_path / "out")]
    stop_prediction(argv, 7, monkeypatch)  # at z: a, b, movie finished
    write(paths[0], sample_bgr(40, 36)[::-1])  # a is another image now
    capsys.readouterr()
    stop_prediction([*argv, "--resume"], 1, monkeypatch)  # at a, predicted again
    assert "with 2 of 4 images finished: it may now mix the two; the same command with --resume predicts the 2 not " \
        "finished" in capsys.readouterr().err  # a's files are those of its input before
    assert sorted(os.listdir(tmp_path / "out" / finished_images.FOLDER)) == ["b.json", "movie.json"]
    predict.main([*argv, "--resume"])
    assert "note: --resume: 2 of the 4 images were finished by the stopped prediction, 2 predicted now" in \
        capsys.readouterr().out


def test_resume_stopped_over_an_earlier_prediction_says_it_mixes_the_two(in_runs, tmp_path, monkeypatch, capsys):
    """--resume (a requeued job's command) into a folder that holds a finished prediction of these images, stopped:
    the note says, as without --resume, that the folder now mixes the two and that the tables are the earlier one's;
    not so after a prediction stopped in a new folder, whose images not finished have no files."""
    resume_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), *stack_flags(), "--resume"]
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    predict.main([*argv, "--output", str(tmp_path / "out")])
    mixed = ("held outputs of an earlier prediction of these images, and this one stopped before its end with {} of 4 "
             "images finished: it may now mix the two (objects.csv and images.csv are the earlier one's)")
    for out, note in [("out", mixed.format(1)), ("out", mixed.format(2)),
                      ("new", "note: stopped with 1 of 4 images finished;"), ("new", "note: stopped with 2 of 4")]:
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setattr(inference.Predictor, "predict", interrupted(2, KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                predict.main([*argv, "--output", str(tmp_path / out)])
        assert note in capsys.readouterr().err


def test_three_pages_without_axes_are_read_as_colours_with_a_note(tmp_path):
    """3 pages without ImageJ or OME axes are one image's colours (channels-first RGB); predict.py says so, since a
    short stack saved that way looks the same. The same pages with ImageJ axes, or an RGB TIFF, get no note."""

    pages = np.zeros((3, 20, 24), np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", pages, photometric="minisblack")  # 3 pages, axes unknown ("QYX")
    tifffile.imwrite(tmp_path / "movie.tif", pages, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((20, 24, 3), np.uint8), photometric="rgb")
    files = [str(tmp_path / f) for f in ("plain.tif", "movie.tif", "rgb.tif")]
    headers = predict.tiff_headers(files)
    assert [header.plane_axes for header in headers] == ["", "T", ""]
    notes = predict_notes.tiff_notes(files, headers, None)
    assert len(notes) == 1 and files[0] in notes[0] and "ImageJ or OME TIFF" in notes[0]


def test_arrays_written_without_axes_that_read_otherwise_get_a_note(tmp_path):
    """tifffile.imwrite of a bare array guesses: [4, H, W] became planar RGBA (the 4th plane dropped as alpha) and
    [H, W, 2] becomes H planes of W x 2 pixels. Both are read as the file says, with a note; a planar RGB image of
    ordinary size gets the first note only."""
    tifffile.imwrite(tmp_path / "four.tif", np.zeros((4, 32, 32), np.uint8), photometric="rgb",
                     planarconfig="separate")  # what tifffile (2026.3) writes for a bare [4, H, W] array
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((32, 32, 2), np.uint8))
    files = [str(tmp_path / f) for f in ("four.tif", "two.tif")]
    headers = predict.tiff_headers(files)
    assert [(h.channel_axis, h.channels_first, h.plane_size) for h in headers] == [("S", True, (32, 32)),
                                                                                   ("", False, (32, 2))]
    notes = predict_notes.tiff_notes(files, headers, None)
    assert len(notes) == 2 and "four.tif stores 4 samples before its rows (planar RGB)" in notes[0]
    assert "two.tif is read as 32 plane(s) of 32x2 pixels, too small to hold a nucleus" in notes[1]


def test_a_stack_of_time_points_and_z_planes_keeps_both_axes(in_runs, tmp_path):
    """A TZCYX hyperstack (2 time points x 3 z planes, 2 channels) gives TZYX outputs, each page the one of its
    plane in the input's order, so that they lie on the input in Fiji; objects.csv numbers the planes t * Z + z, and
    gives their t and z."""
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    planes = np.stack([grey * (50 + 20 * k) for k in range(6)]).reshape(2, 3, 40, 36)
    hyperstack = np.stack([planes, planes[..., ::-1]], axis=2)  # T, Z, C, Y, X; the nuclei in channel 0
    tifffile.imwrite(tmp_path / "tzc.tif", hyperstack, imagej=True, metadata={"axes": "TZCYX"})
    tifffile.imwrite(tmp_path / "flat.tif", planes.reshape(6, 40, 36), imagej=True, metadata={"axes": "TYX"})
    flags = ["--name", "pc", "--channel", "0", "--instances", "--min_confidence", "0", "--device", "cpu",
             "--amp", "fp32"]
    predict.main(["--input", str(tmp_path / "tzc.tif"), "--output", str(tmp_path / "out"), *flags])
    predict.main(["--input", str(tmp_path / "flat.tif"), "--output", str(tmp_path / "flat_out"), *flags])
    for suffix in ("", "_instances"):
        with tifffile.TiffFile(tmp_path / "out" / f"tzc{suffix}.tif") as tif:
            assert tif.series[0].axes == "TZYX" and tif.series[0].shape == (2, 3, 40, 36)
            pages = tif.asarray()
        np.testing.assert_array_equal(pages.reshape(6, 40, 36), tifffile.imread(tmp_path / "flat_out" /
                                                                                f"flat{suffix}.tif"))
    objects, flat = (pd.read_csv(tmp_path / out / "objects.csv") for out in ("out", "flat_out"))
    assert set(objects["plane"]) <= set(range(6)) and objects["t"].between(0, 1).all()
    assert objects["z"].between(0, 2).all()
    assert (objects["t"] * 3 + objects["z"] == objects["plane"]).all() and objects["t"].nunique() == 2
    assert (flat["t"] == flat["plane"]).all() and (flat["z"] == 0).all()  # a time-lapse's planes are its time points
    images = pd.read_csv(tmp_path / "out" / "images.csv")  # the same t and z, for each plane's row
    assert list(images["plane"]) == list(range(6)) and list(zip(images["t"], images["z"])) == [
        (t, z) for t in range(2) for z in range(3)]


def enclosed_pixels(roi, shape):
    """bool [H, W]: the pixels whose centres ImageJ's fill finds inside ``roi`` (matplotlib's Path test; even-odd over
    a composite ROI's rings)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]
    inside = np.zeros(len(centres), bool)
    for ring in roi.coordinates(multi=True):
        inside ^= Path(ring).contains_points(centres)
    return inside.reshape(shape)


def test_rois_are_the_nuclei_of_objects_csv_in_plane_order(in_runs, tmp_path):
    """--rois (implying --instances) writes <id>_rois.zip: one ROI per row of objects.csv, named by its label (and
    plane), enclosing exactly that nucleus's pixels of <id>_instances; a T x Z stack's ROIs sit at their time point
    and z plane, in plane order."""
    image = write(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    planes = np.stack([np.roll(grey, 4 * k, axis=0) * (60 + 20 * k) for k in range(6)]).reshape(2, 3, 40, 36)
    tifffile.imwrite(tmp_path / "in" / "tz.tif", planes, imagej=True, metadata={"axes": "TZYX"})
    out = tmp_path / "out"
    predict.main(["--input", image, str(tmp_path / "in" / "tz.tif"), "--output", str(out), "--name", "pc", "--rois",
                  "--min_confidence", "0", "--device", "cpu", "--amp", "fp32"])
    objects = pd.read_csv(out / "objects.csv")
    flat = roiread(out / "flat_rois.zip")
    labels = read(out / "flat_instances.png")
    assert [int(roi.name) for roi in flat] == list(objects.query("image == 'flat'")["label"]) and flat
    for roi in flat:
        assert np.array_equal(enclosed_pixels(roi, labels.shape), labels == int(roi.name)), roi.name
    stack = roiread(out / "tz_rois.zip")
    rows = objects.query("image == 'tz'")
    assert [roi.name for roi in stack] == [f"{p:04d}-{k:04d}" for p, k in zip(rows["plane"], rows["label"])]
    assert list(rows["plane"]) == sorted(rows["plane"]) and rows["plane"].nunique() > 2
    stack_labels = tifffile.imread(out / "tz_instances.tif").reshape(6, 40, 36)
    for roi, plane in zip(stack, rows["plane"]):
        assert (roi.position, roi.t_position, roi.z_position) == (plane + 1, plane // 3 + 1, plane % 3 + 1)
        label = int(roi.name.split("-")[1])
        assert np.array_equal(enclosed_pixels(roi, (40, 36)), stack_labels[plane] == label), roi.name


def test_three_fluorescence_channels_and_further_series_are_named(tmp_path):
    """3 channels on a C axis (DAPI, GFP, RFP) are read as RGB unless --channel picks one: a note says so. Series
    after the first (positions of a multi-position OME-TIFF) are not read: a note names them."""
    channels = np.zeros((3, 20, 24), np.uint16)
    tifffile.imwrite(tmp_path / "composite.tif", channels, imagej=True, metadata={"axes": "CYX"})
    with tifffile.TiffWriter(tmp_path / "positions.tif", ome=True) as tif:
        for _ in range(3):
            tif.write(channels[0], metadata={"axes": "YX"})
    files = [str(tmp_path / f) for f in ("composite.tif", "positions.tif")]
    headers = predict.tiff_headers(files)
    assert [(h.channel_axis, h.channels, h.series) for h in headers] == [("C", 3, 1), ("", 1, 3)]
    notes = predict_notes.tiff_notes(files, headers, None)
    assert len(notes) == 2 and "composite.tif has 3 channels (axis C)" in notes[0] and "--channel" in notes[0]
    assert "positions.tif holds 3 series" in notes[1] and "only the first" in notes[1]
    assert predict_notes.tiff_notes(files, headers, 0) == notes[1:]  # a channel chosen: no note on the channels
    tifffile.imwrite(tmp_path / "two_pages.tif", channels[:2])  # 2 channels written without axes: 2 planes
    pages = [str(tmp_path / "two_pages.tif")]
    assert predict_notes.tiff_notes(pages, predict.tiff_headers(pages), None) == []
    assert predict_notes.tiff_notes(pages, predict.tiff_headers(pages), 1) == [
        f"note: {pages[0]} has no channel axis: its planes (axes Q) are segmented one by one and --channel does not "
        "apply; if they are channels, save it as an ImageJ or OME TIFF with a C axis"]


def test_files_that_get_the_same_note_share_its_line(tmp_path):
    """A folder of alike TIFFs (a microscope's export) gets each note once, naming how many files it is about,
    not a line per file above the summary."""
    files = [str(tmp_path / f"well{k}.tif") for k in range(4)]
    for f in files:
        tifffile.imwrite(f, np.zeros((3, 20, 24), np.uint16), imagej=True, metadata={"axes": "CYX"})
    notes = predict_notes.tiff_notes(files, predict.tiff_headers(files), None)
    assert len(notes) == 1 and notes[0].startswith(f"note: {files[0]} has 3 channels (axis C)")
    assert notes[0].endswith(f"(the same for 3 more files: {files[1]}, {files[2]}, {files[3]})")


def test_channel_picks_the_nucleus_channel(in_runs, tmp_path):
    """--channel K predicts channel K of a multi-channel TIFF stack or of an RGB image as the grey image alone."""

    nuclei = sample_bgr(40, 36)[:, :, 0].astype(np.uint16) * 200
    noise = np.random.default_rng(0).integers(0, 60000, nuclei.shape, dtype=np.uint16)
    stack = np.stack([np.stack([noise, nuclei]), np.stack([noise[::-1], nuclei[::-1]])])  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "two.tif", stack, ome=True, metadata={"axes": "ZCYX"})
    rgb_nuclei = sample_bgr(40, 36)[:, :, 0]
    write(tmp_path / "rgb.png", np.dstack([rgb_nuclei, rgb_nuclei // 3, rgb_nuclei // 2]))  # BGR: nuclei in blue
    write(tmp_path / "alone" / "z0.png", nuclei)
    write(tmp_path / "alone" / "z1.png", nuclei[::-1])
    write(tmp_path / "alone" / "blue.png", rgb_nuclei)
    flags = ["--name", "pc", "--device", "cpu", "--amp", "fp32"]
    predict.main(["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "out"), "--channel", "1", *flags])
    predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "2", *flags])
    predict.main(["--input", str(tmp_path / "alone" / "z0.png"), "--output", str(tmp_path / "grey_out"), "--channel",
                  "1", *flags])  # a grey image is its own nucleus channel
    predict.main(["--input", str(tmp_path / "alone"), "--output", str(tmp_path / "alone_out"), *flags])
    pages = tifffile.imread(tmp_path / "out" / "two.tif")
    np.testing.assert_array_equal(pages[0], read(tmp_path / "alone_out" / "z0.png"))
    np.testing.assert_array_equal(pages[1], read(tmp_path / "alone_out" / "z1.png"))
    np.testing.assert_array_equal(read(tmp_path / "out" / "rgb.png"), read(tmp_path / "alone_out" / "blue.png"))
    np.testing.assert_array_equal(read(tmp_path / "grey_out" / "z0.png"), read(tmp_path / "alone_out" / "z0.png"))
    with pytest.raises(DataError, match="two.tif has 2 channels.*--channel"):
        predict.main(["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "out"), *flags])
    with pytest.raises(DataError, match="--channel 3: image .*rgb.png has 3 channels"):
        predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "3",
                      *flags])
    with pytest.raises(UsageError, match="--channel -1"):
        predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "-1",
                      *flags])


def predicted_as_they_are_and_linked(tmp_path, capsys, monkeypatch, flags, linking):
    """predict.py with ``flags`` and the Pointwise network (the barely trained one's nucleus fills a plane: a pixel's
    own is no better), into tmp_path/own as it is and into tmp_path/linked with ``linking`` (--stitch_z or --track
    and an IoU); returns what the second printed."""
    load_run = checkpoints.load_run
    monkeypatch.setattr(checkpoints, "load_run", lambda *args: (load_run(*args)[0], Pointwise()))
    predict.main([*flags, "--output", str(tmp_path / "own")])
    capsys.readouterr()
    predict.main([*flags, "--output", str(tmp_path / "linked"), *linking])
    return capsys.readouterr().out


def test_stitch_z_links_the_nuclei_of_a_z_stack_alike_in_every_output(in_runs, tmp_path, capsys, monkeypatch):
    """--stitch_z: a T x Z stack's <id>_instances.tif holds its planes' own labels linked by instances.link_planes
    within each time point, objects.csv's t, z and labels and the ROIs' names agree with it, also when its planes
    finish out of order; a time-lapse and a 2D image beside it get one note and their outputs without it; the
    summary counts the 3D nuclei and prediction.yml records the IoU."""
    planes = np.full((2, 3, 40, 36), 200, np.uint16)
    # (y, x, radius, the z planes holding it): one through all three, moving; one that ends; one that begins; one
    # missing from the middle plane, which comes back as another
    for y, x, radius, zs in ((10, 9, 5, (0, 1, 2)), (10, 27, 5, (0, 1)), (29, 10, 6, (1, 2)), (29, 27, 4, (0, 2))):
        for t, z in ((t, z) for t in range(2) for z in zs):
            cv2.circle(planes[t, z], (x + z - t, y), radius, 3000 + 500 * z, -1)
    movie(tmp_path / "in", planes=3)
    tifffile.imwrite(tmp_path / "in" / "tz.tif", planes, imagej=True, metadata={"axes": "TZYX"})
    write(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
    flags = ["--input", str(tmp_path / "in"), "--name", "pc", "--rois", "--min_confidence", "0", "--device", "cpu",
             "--amp", "fp32"]
    printed = predicted_as_they_are_and_linked(tmp_path, capsys, monkeypatch, flags, ["--stitch_z", "0.5"])
    own = tifffile.imread(tmp_path / "own" / "tz_instances.tif")
    linked = tifffile.imread(tmp_path / "linked" / "tz_instances.tif")
    expected = np.zeros_like(own)
    for t in range(2):
        largest = 0
        for z in range(3):
            mapping = link_planes(expected[t, z - 1] if z else np.zeros_like(own[t, z]), own[t, z], 0.5, largest + 1)
            largest = max(largest, int(mapping.max()))
            expected[t, z] = mapping[own[t, z]]
    assert linked.dtype == np.uint16 and np.array_equal(linked, expected)
    assert [[int(own[t, z].max()) for z in range(3)] for t in range(2)] == [[3, 3, 3]] * 2
    assert [[sorted(set(np.unique(linked[t, z])) - {0}) for z in range(3)] for t in range(2)] == \
        [[[1, 2, 3], [1, 2, 4], [1, 4, 5]]] * 2
    objects = pd.read_csv(tmp_path / "linked" / "objects.csv").query("image == 'tz'")
    assert [(p // 3, p % 3) for p in objects["plane"]] == list(zip(objects["t"], objects["z"]))
    for row in objects.itertuples():
        assert row.area == int((linked[row.t, row.z] == row.label).sum())
    assert len(objects) == sum(len(np.unique(plane)) - 1 for plane in linked.reshape(6, 40, 36))
    rois = roiread(tmp_path / "linked" / "tz_rois.zip")
    assert [roi.name for roi in rois] == [f"{p:04d}-{k:04d}" for p, k in zip(objects["plane"], objects["label"])]
    for roi, row in zip(rois, objects.itertuples()):
        assert np.array_equal(enclosed_pixels(roi, (40, 36)), linked[row.t, row.z] == row.label), roi.name
    for name in ("movie_instances.tif", "movie_rois.zip", "flat_instances.png", "flat_rois.zip"):
        assert (tmp_path / "linked" / name).read_bytes() == (tmp_path / "own" / name).read_bytes(), name
    assert printed.count("note: --stitch_z") == 1 and "flat.png, " in printed and "movie.tif have none" in printed
    count = int(linked[0].max()) + int(linked[1].max())
    assert f"--stitch_z 0.5: {count} nuclei in 3D in 1 z-stack (tz: {count})" in printed
    assert read_record(tmp_path / "linked")["settings"]["stitch_z"] == 0.5
    assert read_record(tmp_path / "own")["settings"]["stitch_z"] is None

    class FinishingBackwards(utils.BatchedThreads):
        def flush(self):
            self.waiting.reverse()
            super().flush()

    monkeypatch.setattr(predict, "BatchedThreads", FinishingBackwards)
    predict.main([*flags, "--output", str(tmp_path / "backwards"), "--stitch_z", "0.5"])
    for name in ("tz_instances.tif", "tz_rois.zip"):
        assert (tmp_path / "backwards" / name).read_bytes() == (tmp_path / "linked" / name).read_bytes(), name
    backwards = pd.read_csv(tmp_path / "backwards" / "objects.csv").query("image == 'tz'")
    pd.testing.assert_frame_equal(backwards.sort_values(["plane", "label"]).reset_index(drop=True),
                                  objects.reset_index(drop=True))


def test_track_keeps_each_nucleus_s_label_through_a_time_lapse(in_runs, tmp_path, capsys, monkeypatch):
    """--track: in a 2D time-lapse of drawn nuclei (two moving, one that leaves after the second frame, one that
    comes at the third), every nucleus keeps one label through all its time points in <id>_instances.tif,
    objects.csv and the ROIs' names, a nucleus that comes takes a label no earlier one had, and the summary counts
    the four tracks; a z-stack and a 2D image beside it are predicted as without it, with a note each."""
    frames = np.full((4, 40, 48), 200, np.uint16)
    nuclei = {"right": lambda t: (8 + 2 * t, 10, 5), "left": lambda t: (38 - 2 * t, 28, 5),  # (x, y, radius)
              "leaves": lambda t: (10, 30, 4) if t < 2 else None, "comes": lambda t: (38, 10, 4) if t >= 2 else None}
    for t in range(4):
        for where in nuclei.values():
            if where(t):
                x, y, radius = where(t)
                cv2.circle(frames[t], (x, y), radius, 3000, -1)
    os.makedirs(tmp_path / "in")
    tifffile.imwrite(tmp_path / "in" / "lapse.tif", frames, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "in" / "zs.tif", frames[:2], imagej=True, metadata={"axes": "ZYX"})
    write(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
    flags = ["--input", str(tmp_path / "in"), "--name", "pc", "--rois", "--min_confidence", "0", "--separation",
             "cc", "--device", "cpu", "--amp", "fp32"]
    printed = predicted_as_they_are_and_linked(tmp_path, capsys, monkeypatch, flags, ["--track", "0.3"])
    tracked = tifffile.imread(tmp_path / "linked" / "lapse_instances.tif")
    labels = {}  # each nucleus's label at each time point it is in, read at its centre
    for name, where in nuclei.items():
        labels[name] = {int(tracked[t, where(t)[1], where(t)[0]]) for t in range(4) if where(t)}
    assert all(len(held) == 1 and 0 not in held for held in labels.values()), labels
    assert len(set.union(*labels.values())) == 4  # four tracks, one label each
    assert labels["comes"].pop() > max(labels["right"] | labels["left"] | labels["leaves"])
    own = tifffile.imread(tmp_path / "own" / "lapse_instances.tif")
    assert [int(plane.max()) for plane in own] == [3, 3, 3, 3] and not np.array_equal(own, tracked)
    assert np.array_equal(own > 0, tracked > 0)
    objects = pd.read_csv(tmp_path / "linked" / "objects.csv").query("image == 'lapse'")
    for row in objects.itertuples():
        assert row.area == int((tracked[row.t] == row.label).sum())
    rois = roiread(tmp_path / "linked" / "lapse_rois.zip")
    assert [roi.name for roi in rois] == [f"{p:04d}-{k:04d}" for p, k in zip(objects["plane"], objects["label"])]
    for name in ("zs_instances.tif", "flat_instances.png"):
        assert (tmp_path / "linked" / name).read_bytes() == (tmp_path / "own" / name).read_bytes(), name
    assert "note: --track links nuclei through the time points of a time-lapse, and " in printed
    assert "flat.png has none (a 2D image)" in printed and "zs.tif has z planes" in printed
    assert "--track 0.3: 4 tracks in 1 time-lapse (lapse: 4); objects.csv's image and label name each one" in printed
    assert read_record(tmp_path / "linked")["settings"]["track"] == 0.3


@pytest.mark.parametrize("axes, linking, message", [
    ("ZYX", {"stitch_z": 0.5}, "image zs: --stitch_z: 6 nuclei by z plane 2 of time point 0 do not fit a 16-bit label "
                               "image; predict it in parts (crop it into smaller images, or fewer z planes) or without "
                               "--stitch_z"),
    ("TYX", {"track": 0.3}, "image zs: --track: 6 tracks by time point 2 do not fit a 16-bit label image; predict it "
                            "in parts (crop it into smaller images, or fewer time points) or without --track")])
def test_linked_labels_beyond_a_16_bit_label_image_leave_the_stack_out(tmp_path, monkeypatch, axes, linking, message):
    """A z-stack's time point (--stitch_z) or a time-lapse (--track) whose linked nuclei outnumber what
    <id>_instances.tif holds leaves its stack out with one line naming the flag, as a plane with as many nuclei does
    (rather than labels that wrap around); the other files are predicted."""
    class Moving:  # stands in for inference.Predictor: two nuclei, moved past their place of the plane before
        scale = 1.0

        def __init__(self):
            self.calls = 0

        def as_input(self, image):
            return image_to_float(image, 3)

        def predict(self, image):
            prob = np.zeros((1, 16, 16), np.float32)
            prob[0, 2:4, 3 * self.calls:3 * self.calls + 2] = prob[0, 8:10, 3 * self.calls:3 * self.calls + 2] = 1
            self.calls += 1
            return prob

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "zs.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": axes})
    files = [str(tmp_path / "in" / "zs.tif"), write(tmp_path / "in" / "after.png", np.zeros((16, 16), np.uint8))]
    options = dict(separation="cc", filters=dict(min_size=0, min_confidence=0), **linking)
    monkeypatch.setattr(plane_outputs, "MOST_LABELS", 6)
    os.makedirs(tmp_path / "fits")
    rows, table, left_out = predict.predict_all(Moving(), files, ["zs", "after"], predict.tiff_headers(files),
                                                str(tmp_path / "fits"), 1, 0.5, **options)
    assert not left_out and table.query("image == 'zs'")["label"].tolist() == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(plane_outputs, "MOST_LABELS", 5)
    os.makedirs(tmp_path / "out")
    rows, table, left_out = predict.predict_all(Moving(), files, ["zs", "after"], predict.tiff_headers(files),
                                                str(tmp_path / "out"), 1, 0.5, **options)
    assert left_out == [message]
    assert [row.image for row in rows] == ["after"] and set(table["image"]) == {"after"}
    assert sorted(os.listdir(tmp_path / "out")) == ["after.png", "after_instances.png"]


@pytest.mark.parametrize("flags, message", [
    (["--track", "0.3"], "--track links the nuclei of --instances through the time points: add --instances"),
    (["--instances", "--track", "1.5"], "--track 1.5 must be an intersection over union above 0 and at most 1"),
    (["--stitch_z", "0.5"], "--stitch_z links the nuclei of --instances through the z planes: add --instances"),
    (["--instances", "--stitch_z", "0"], "--stitch_z 0 must be an intersection over union above 0 and at most 1"),
    (["--rois", "--stitch_z", "1.01"], "--stitch_z 1.01 must be an intersection over union above 0 and at most 1")])
def test_linking_flags_need_instances_and_an_iou(tmp_path, flags, message):
    image = write(tmp_path / "in" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(UsageError, match=re.escape(message)):
        predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "out"), *flags])


def channel_means(planes, labels):
    """{(plane, label): [the mean of each channel over the label's pixels]} of planes [N, H, W, C] and their labels
    [N, H, W], computed with numpy alone."""
    return {(p, k): [planes[p][labels[p] == k][:, c].mean() for c in range(planes.shape[3])]
            for p in range(len(labels)) for k in np.unique(labels[p]) if k}


def assert_channel_columns(rows, planes, labels, channels):
    """objects.csv's ``rows`` of one image hold mean_intensity_c<c> and integrated_intensity_c<c> of each of its
    ``channels`` channels, as numpy measures them over the planes [N, H, W, C] and the labels [N, H, W] written."""
    expected = channel_means(planes, labels)
    assert len(rows) == len(expected) > 0
    for _, row in rows.iterrows():
        area = int((labels[row["plane"]] == row["label"]).sum())
        assert row["area"] == area
        means = expected[row["plane"], row["label"]]
        assert len(means) == channels
        for c, mean in enumerate(means):
            np.testing.assert_allclose(row[f"mean_intensity_c{c}"], mean, rtol=1e-5)
            np.testing.assert_allclose(row[f"integrated_intensity_c{c}"], mean * area, rtol=1e-5)


def test_objects_csv_measures_every_channel_of_a_multi_channel_image(in_runs, tmp_path, monkeypatch):
    """With --channel, objects.csv measures each nucleus in every channel of a multi-channel image (a 2D CYX TIFF, a
    TCYX stack read whole, an RGB time-lapse read page by page): mean_intensity_c<c> and integrated_intensity_c<c>
    are numpy's over the pixels of the labels written, and mean_intensity is that of the --channel, as before. The
    images of one run share the union of their columns, empty where an image lacks the channel; without --channel no
    _c column is written. Each plane is measured from a copy of its own, which holds no stack."""
    # the probability is the nucleus channel's own value: nuclei where the discs are
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    yy, xx = np.mgrid[:40, :36]

    def discs(*centres):
        return np.any([(yy - y) ** 2 + (xx - x) ** 2 <= 16 for y, x in centres], axis=0).astype(np.uint8) * 255

    rng = np.random.default_rng(0)
    marker = rng.integers(0, 60000, (40, 36), dtype=np.uint16)
    three = np.stack([discs((8, 8), (8, 28), (30, 18)).astype(np.uint16) * 200, marker, marker[::-1]])  # C, Y, X
    os.makedirs(tmp_path / "in")
    tifffile.imwrite(tmp_path / "in" / "three.tif", three, imagej=True, metadata={"axes": "CYX"})
    movie = np.stack([np.stack([discs((10, 10), (30, 25)).astype(np.uint16) * 100, marker]),
                      np.stack([discs((20, 20)).astype(np.uint16) * 100, marker // 3])])  # T, C, Y, X
    tifffile.imwrite(tmp_path / "in" / "tc.tif", movie, imagej=True, metadata={"axes": "TCYX"})
    grey = write(tmp_path / "in" / "grey.png", discs((20, 10)))
    noise = rng.integers(0, 256, (2, 40, 36, 3), dtype=np.uint8)
    rgb = np.stack([np.dstack([noise[t, :, :, 0], discs(*centres), noise[t, :, :, 2]])
                    for t, centres in enumerate([((10, 10), (25, 25)), ((30, 8),)])])  # T, Y, X, S: green nuclei
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, imagej=True, photometric="rgb", metadata={"axes": "TYXS"})
    measured, object_rows = [], measurements.object_rows
    monkeypatch.setattr(predict, "object_rows", lambda *args: measured.append(args[3]) or object_rows(*args))
    flags = ["--name", "pc", "--instances", "--separation", "cc", "--min_confidence", "0", "--device", "cpu"]
    predict.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--channel", "0", *flags])
    objects = pd.read_csv(tmp_path / "out" / "objects.csv")
    columns = measurements.OBJECT_COLUMNS  # each channel's beside the --channel's mean_intensity, integrated_intensity
    at = columns.index("integrated_intensity") + 1
    assert list(objects.columns) == [*columns[:at], *(f"{kind}_intensity_c{c}" for kind in ("mean", "integrated")
                                                      for c in range(3)), *columns[at:]]
    assert objects.groupby("image").size().to_dict() == {"grey": 1, "tc": 3, "three": 3}
    assert_channel_columns(objects.query("image == 'three'"), three.transpose(1, 2, 0)[None],
                           read(tmp_path / "out" / "three_instances.png")[None], 3)
    two = objects.query("image == 'tc'")
    assert_channel_columns(two, movie.transpose(0, 2, 3, 1), tifffile.imread(tmp_path / "out" / "tc_instances.tif"), 2)
    assert two["mean_intensity_c2"].isna().all() and two["integrated_intensity_c2"].isna().all()
    assert objects.query("image == 'grey'").filter(like="_intensity_c").isna().all().all()
    multi = objects.query("image != 'grey'")
    np.testing.assert_array_equal(multi["mean_intensity"], multi["mean_intensity_c0"])
    assert sorted(m.shape[2] for m in measured) == [1, 2, 2, 3] and all(m.base is None for m in measured)

    predict.main(["--input", str(tmp_path / "rgb.tif"), "--output", str(tmp_path / "rgb_out"), "--channel", "1",
                  *flags])
    objects = pd.read_csv(tmp_path / "rgb_out" / "objects.csv")
    assert list(objects.columns) == measurements.object_columns(3) and len(objects) == 3
    assert_channel_columns(objects, rgb, tifffile.imread(tmp_path / "rgb_out" / "rgb_instances.tif"), 3)
    np.testing.assert_array_equal(objects["mean_intensity"], objects["mean_intensity_c1"])

    predict.main(["--input", str(tmp_path / "in" / "three.tif"), str(tmp_path / "rgb.tif"), grey, "--output",
                  str(tmp_path / "no_channel"), *flags])
    assert list(pd.read_csv(tmp_path / "no_channel" / "objects.csv").columns) == measurements.OBJECT_COLUMNS


def test_masks_that_mark_most_of_their_images_get_a_note(in_runs, tmp_path, capsys):
    """A prediction that marks most of an image as nuclei (dark nuclei on a light background, an inverted image)
    is no error, and was said nowhere: predict.py notes how many images' masks mark more than 60 % of their pixels
    and names the fullest, counted here from the masks it wrote; masks that mark less get no note."""
    folder = tmp_path / "images"
    image = sample_bgr(40, 48)
    write(folder / "a.png", image)
    write(folder / "b.png", 255 - image)
    write(folder / "c.png", np.zeros_like(image))
    for threshold, out in (("0.02", "low"), ("0.98", "high")):
        capsys.readouterr()
        predict.main(["--name", "p", "--input", str(folder), "--output", str(tmp_path / out), "--device", "cpu",
                      "--threshold", threshold])
        printed = capsys.readouterr().out
        shares = {i: (read(tmp_path / out / f"{i}.png") > 0).mean() for i in "abc"}
        over = [i for i, share in shares.items() if share > 0.6]
        if threshold == "0.02":
            assert len(over) >= 2, shares  # the case looked for
        if over:
            fullest = max(shares, key=shares.get)
            assert (f"note: the predicted masks mark more than 60% of their pixels as nuclei in {len(over)} of 3 "
                    f"images ({folder / fullest}.png: {shares[fullest]:.0%}); the network marks nuclei") in printed
        else:
            assert "note: the predicted masks" not in printed, printed


def test_nan_output_is_a_data_error(in_runs):
    """Probabilities of NaN (the network's arithmetic overflowed) are a DataError, which predict.py reports for the
    file; every threshold read them as background, and --instances ended in a traceback."""
    cfg, model = checkpoints.load_run("pc", torch.device("cpu"))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    predictor = inference.Predictor(model, cfg, torch.device("cpu"), amp="fp32")
    with pytest.raises(DataError, match="the network put out NaN"):
        predictor.predict(sample_bgr(40, 40).astype(np.float32) / 255)


def test_micrometres_keep_their_digits_at_a_small_pixel_size(tmp_path):
    """objects.csv's _um columns keep 6 significant digits: at 0.01 um per pixel, 2 decimals wrote nuclei of 99 and
    90 px alike as 0.01 um2."""
    labels = np.zeros((40, 40), np.int32)
    labels[2:11, 2:13], labels[20:30, 20:29] = 1, 2
    table = measurements.object_rows("a", 0, labels, np.ones((40, 40, 1), np.uint8), np.full((40, 40), 0.9), 0.01)
    measurements.write_tables(str(tmp_path), [], table)
    written = pd.read_csv(tmp_path / "objects.csv")
    assert list(written["area"]) == [99, 90]
    np.testing.assert_allclose(written["area_um2"], written["area"] * 1e-4, rtol=1e-6)
    for column in ("perimeter", "major_axis_length", "minor_axis_length"):
        np.testing.assert_allclose(written[f"{column}_um"], table[column] * 0.01, rtol=1e-5)


def test_scale_predicts_the_resized_image(in_runs, tmp_path):
    """--scale S (a crop-trained run): the probabilities of the image resized by S, resized back to its size."""
    cfg, model = checkpoints.load_run("pc", torch.device("cpu"))
    image = sample_bgr(50, 38).astype(np.float32) / 255
    plain = inference.Predictor(model, cfg, torch.device("cpu"), amp="fp32")
    for scale, size, interpolation in ((0.5, (19, 25), cv2.INTER_AREA), (0.3, (16, 16), cv2.INTER_AREA),
                                       (2.5, (95, 125), cv2.INTER_LINEAR)):  # 0.3: area differs from linear
        prob = inference.Predictor(model, cfg, torch.device("cpu"), amp="fp32", scale=scale).predict(image)
        expected = plain.predict(cv2.resize(image, size, interpolation=interpolation))
        expected = np.stack([cv2.resize(p, (38, 50), interpolation=cv2.INTER_LINEAR) for p in expected])
        assert prob.shape == (expected.shape[0], 50, 38)
        np.testing.assert_allclose(prob, expected, atol=1e-6)
    image_path = write(tmp_path / "a.png", sample_bgr(50, 38))
    predict.main(["--name", "pc", "--input", image_path, "--output", str(tmp_path / "out"), "--scale", "0.5",
                  "--device", "cpu"])
    assert read(tmp_path / "out" / "a.png").shape == (50, 38)
    with pytest.raises(UsageError, match="--scale is for runs trained on crops"):
        predict.main(["--name", "p", "--input", image_path, "--output", str(tmp_path / "out"), "--scale", "0.5"])
    with pytest.raises(UsageError, match="--tile is for runs trained on crops"):  # was ignored without a word
        predict.main(["--name", "p", "--input", image_path, "--output", str(tmp_path / "out"), "--tile", "128"])
    with pytest.raises(UsageError, match="--overlap is for runs trained on crops"):  # was ignored without a word
        predict.main(["--name", "p", "--input", image_path, "--output", str(tmp_path / "out"), "--overlap", "16"])
    with pytest.raises(UsageError, match="--scale 0.0 must be between"):
        predict.main(["--name", "pc", "--input", image_path, "--output", str(tmp_path / "out"), "--scale", "0"])


def test_auto_scaled_predicts_again_only_images_with_nuclei_far_from_the_training_size():
    """--scale auto for one image: its nuclei measured in the first prediction; predicted again, resized, only when
    they are far from the training size."""
    yy, xx = np.mgrid[:200, :200]

    class Resizing:  # stands in for inference.Predictor: records the scales asked for
        cfg = Namespace(num_classes=1)
        asked = []

        def predict(self, image, scale=None):
            self.asked.append(scale)
            return np.zeros((1, 200, 200), np.float32)

    for radius, scale in ((30, 1 / 3), (12, 1.0), (0, 1.0)):
        prob = ((yy - 100) ** 2 + (xx - 100) ** 2 <= radius * radius).astype(np.float32)[None]
        Resizing.asked = []
        out, used, nuclei = predict.auto_scaled(Resizing(), None, prob, 20.0, 0.5, "cc",
                                                dict(min_size=3, min_confidence=0))
        assert used == pytest.approx(scale, rel=0.02)
        assert Resizing.asked == ([] if scale == 1 else [used])
        assert (out is prob) == (scale == 1)
        if scale == 1:  # the nuclei it measured are those of the probabilities it returns: reused for the outputs
            np.testing.assert_array_equal(nuclei, split_instances(prob[0], "cc", min_size=3, min_confidence=0))
        else:
            assert nuclei is None
    assert predict_notes.sizing("auto", [1.0, 1.53, 1.5]) == "--scale auto: 2 of 3 rescaled by 1.5"
    assert predict_notes.sizing("auto", [0.25, 1.0, 2.5]) == "--scale auto: 2 of 3 rescaled by 0.25-2.5"
    assert (predict_notes.sizing(1.0, [1.0]), predict_notes.sizing(0.5, [0.5])) == ("full size", "scaled by 0.5")
    assert predict_notes.diameter_note(40.0, 19.4, 1.0) == ", median diameter 40 px (the run learned 19 px: try " \
        "--scale 0.48, or --scale auto for mixed magnifications)"
    assert predict_notes.diameter_note(22.0, 19.4, 1.0) == ", median diameter 22 px"  # within the band
    # already --scale auto or a given scale, or a run that records no diameter: no hint
    assert {predict_notes.diameter_note(40.0, 19.4, "auto"), predict_notes.diameter_note(40.0, 19.4, 0.5),
            predict_notes.diameter_note(40.0, 0.0, 1.0)} == {", median diameter 40 px"}


def test_scale_auto_is_the_fixed_scale_it_chose_and_needs_a_recorded_diameter(in_runs, tmp_path, capsys,
                                                                              monkeypatch):
    folder = tmp_path / "images"
    for k, (h, w) in enumerate(((50, 38), (96, 80), (40, 64))):
        write(folder / f"i{k}.png", sample_bgr(h, w))
    flags = ["--name", "pa", "--input", str(folder), "--instances", "--min_confidence", "0", "--device", "cpu"]
    auto = predict.main([*flags, "--output", str(tmp_path / "auto"), "--scale", "auto"])
    assert "--scale auto:" in capsys.readouterr().out and len(auto["scales"]) == 3
    settings = read_record(tmp_path / "auto")["settings"]
    assert (settings["scale"], settings["training_diameter"]) == ("auto", 3.0)  # run pa's config.yml
    assert any(s != 1 for s in auto["scales"])  # so that the comparison below covers a rescaled image
    for k, scale in enumerate(auto["scales"]):
        fixed = tmp_path / f"fixed{k}"
        predict.main([*flags[:3], str(folder / f"i{k}.png"), *flags[4:], "--output", str(fixed), "--scale", str(scale)])
        np.testing.assert_array_equal(read(tmp_path / "auto" / f"i{k}.png"), read(fixed / f"i{k}.png"))
    # images --scale auto leaves as they are keep the nuclei it measured: the same outputs as --scale 1
    monkeypatch.setattr(predict, "auto_scale", lambda found, trained: 1.0)
    predict.main([*flags, "--output", str(tmp_path / "kept"), "--scale", "auto", "--overlay"])
    predict.main([*flags, "--output", str(tmp_path / "plain"), "--overlay"])
    for k in range(3):
        for suffix in ("_instances", "_overlay"):
            np.testing.assert_array_equal(read(tmp_path / "kept" / f"i{k}{suffix}.png"),
                                          read(tmp_path / "plain" / f"i{k}{suffix}.png"))
    # a crop run trained before train.py recorded the diameter: measured from its training images while they are
    # there (as train.py measures it), else refused
    capsys.readouterr()
    predict.main(["--name", "pc", "--input", str(folder), "--output", str(tmp_path / "o"), "--scale", "auto"])
    cfg = yaml.safe_load(open(os.path.join("models", "pc", "config.yml")))
    train_ids = split_ids(read_split(os.path.join("models", "pc", "split.csv")), "train")
    expected = nucleus_diameter(os.path.join("inputs", cfg["dataset"]), train_ids)
    assert f"note: run pc records no training nucleus diameter; measured now from its training images: " \
           f"{expected:.1f} px" in capsys.readouterr().out
    assert read_record(tmp_path / "o")["settings"]["training_diameter"] == pytest.approx(expected, abs=0.005)
    shutil.copytree(os.path.join("models", "pc"), os.path.join("models", "pc_gone"))
    try:
        with open(os.path.join("models", "pc_gone", "config.yml"), "w") as f:
            yaml.safe_dump({**cfg, "name": "pc_gone", "dataset": "gone"}, f)
        with pytest.raises(UsageError, match="run pc_gone records no training nucleus diameter .* and its training "
                                             "images are not there to measure it"):
            predict.main(["--name", "pc_gone", "--input", str(folder), "--output", str(tmp_path / "o"), "--scale",
                          "auto"])
        for diameter in ("nan", -19.4):  # a config.yml edited by hand: was auto leaving every image as it is
            with open(os.path.join("models", "pc_gone", "config.yml"), "w") as f:
                yaml.safe_dump({**cfg, "name": "pc_gone", "nucleus_diameter": diameter}, f)
            with pytest.raises(UsageError, match=rf"run pc_gone's config.yml holds nucleus_diameter {diameter}, not a "
                                                 "diameter in pixels"):
                predict.main(["--name", "pc_gone", "--input", str(folder), "--output", str(tmp_path / "o"),
                              "--scale", "auto"])
    finally:
        shutil.rmtree(os.path.join("models", "pc_gone"))
    with pytest.raises(UsageError, match="--scale is for runs trained on crops"):
        predict.main(["--name", "p", "--input", str(folder), "--output", str(tmp_path / "o"), "--scale", "auto"])
    with pytest.raises(SystemExit):
        run_cli(predict.main, ["--name", "pa", "--input", str(folder), "--output", str(tmp_path / "o"), "--scale", "x"])
    assert "--scale: expected a number or auto, got 'x'" in capsys.readouterr().err


def test_percentile_run_predicts_a_dimmed_image_as_the_original(in_runs, tmp_path):
    """predict.py reads images as the run was trained (--normalization from its config.yml): with 'percentile' an
    image at half the gain gives the same probabilities; with 'fixed' (run p, same weights) it does not."""
    bright = sample_bgr(48, 40) // 2 * 2  # even values, so halving is exact
    write(tmp_path / "in" / "bright.png", bright)
    write(tmp_path / "in" / "dim.png", bright // 2)
    probs = {}
    for run in ("pp", "p"):
        cfg, model = checkpoints.load_run(run, torch.device("cpu"))
        predictor = inference.Predictor(model, cfg, torch.device("cpu"), amp="fp32")  # no bf16 rounding
        probs[run] = [predictor.predict(predictor.as_input(decode_image(str(tmp_path / "in" / f"{n}.png"))))
                      for n in ("bright", "dim")]
    np.testing.assert_allclose(*probs["pp"], atol=1e-4)
    assert np.abs(probs["p"][0] - probs["p"][1]).max() > 1e-3
    predict.main(["--name", "pp", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                  "--device", "cpu", "--amp", "fp32"])
    np.testing.assert_array_equal(read(tmp_path / "out" / "bright.png"), read(tmp_path / "out" / "dim.png"))


def test_percentile_dark_run_inverts_bright_background_images(in_runs, tmp_path):
    """predict.py reads images as a 'percentile_dark' run was trained: a fluorescence-like image (dark background)
    as a 'percentile' run reads it (run pp, same weights: the same mask), its negative (a bright background, as a
    stained image has) inverted, so that its nuclei are bright again."""
    dark = sample_bgr(48, 40)
    write(tmp_path / "in" / "dark.png", dark)
    for run in ("pd", "pp"):
        predict.main(["--name", run, "--input", str(tmp_path / "in"), "--output", str(tmp_path / run),
                      "--device", "cpu", "--amp", "fp32"])
    np.testing.assert_array_equal(read(tmp_path / "pd" / "dark.png"), read(tmp_path / "pp" / "dark.png"))
    cfg, model = checkpoints.load_run("pd", torch.device("cpu"))
    predictor = inference.Predictor(model, cfg, torch.device("cpu"), amp="fp32")
    negative = 255 - dark[:, :, ::-1]  # RGB, as decode_image gives it
    seen = predictor.as_input(negative)
    np.testing.assert_allclose(seen, 1 - image_to_float(negative, 3, "percentile"), atol=1e-6)
    assert seen.mean() < 0.5 and image_to_float(negative, 3, "percentile").mean() > 0.5


def test_crop_trained_run_tiles_large_images(in_runs, tmp_path, capsys):
    """A crop-trained run predicts at full size; --tile 64 on a 96x160 image gives the same size and nearly the
    whole-image probabilities (this barely trained network is smooth, so within 2/255). An image of 8 batches of
    windows or more has a progress bar of its own."""
    image = write(tmp_path / "big.png", sample_bgr(96, 160))
    outs = {}
    for tile in ("64", "512"):
        out = tmp_path / f"out{tile}"
        predict.main(["--name", "pc", "--input", image, "--output", str(out), "--tile", tile, "--overlap", "32",
                      "--save_prob", "--batch_size", "3", "--device", "cpu"])
        outs[tile] = read(out / "big_prob.png").astype(int)
        assert outs[tile].shape == (96, 160) and read(out / "big.png").shape == (96, 160)
    assert np.abs(outs["64"] - outs["512"]).max() <= 2
    assert "windows" not in capsys.readouterr().err  # 5 batches of 3
    predict.main(["--name", "pc", "--input", image, "--output", str(tmp_path / "one"), "--tile", "64", "--overlap",
                  "32", "--batch_size", "1", "--device", "cpu"])
    assert "windows:" in capsys.readouterr().err


def test_loading_a_run_leaves_torch_s_random_numbers_alone():
    """A notebook that loads the bundled model between its own seeded draws gets the numbers it would without it
    (building the network draws its random initial weights, which the saved ones then replace)."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    checkpoints.load_run("nuclei", torch.device("cpu"))
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_an_image_too_large_for_the_memory_available_is_left_out_and_the_others_predicted(in_runs, tmp_path,
                                                                                          monkeypatch):
    """predict.py's promise for a file it cannot use: a slide whose whole-image sums and smallest windows exceed the
    memory available is named at the end (exit code 1), and the images that fit are predicted (the run stopped)."""
    write(tmp_path / "in" / "small.png", sample_bgr(48, 48))
    write(tmp_path / "in" / "slide.png", sample_bgr(400, 400))
    monkeypatch.setattr(inference, "memory_budget", lambda device: 1)  # windows of 64 x 64, the smallest
    monkeypatch.setattr(inference, "memory_available", lambda device: 1_000_000)  # less than the slide's sums
    with pytest.raises(DataError, match=r"1 of 2 files were left out .*slide\.png: a 400x400 image needs"):
        predict.main(["--name", "pc", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "--device", "cpu"])
    assert read(tmp_path / "out" / "small.png").shape == (48, 48) and not (tmp_path / "out" / "slide.png").exists()


def test_an_image_with_more_nuclei_than_16_bits_hold_is_left_out_and_the_others_predicted(in_runs, tmp_path,
                                                                                           monkeypatch):
    """More than 65535 nuclei in an image, or in a later plane of a stack whose first pages are written, do not fit
    its 16-bit labels: that file is left out (its stack's pages removed, no rows) and the others are predicted, as
    for a file that cannot be read, named at the end with the fix."""
    real, stack_planes = predict.split_instances, []

    def crowded(prob, *args, **kwargs):
        labels = real(prob, *args, **kwargs)
        if prob.shape == (48, 44):  # the stack's planes, in order (jobs run one by one): the second one is crowded
            stack_planes.append(1)
        crowded = prob.shape == (52, 40) or len(stack_planes) > 1 and prob.shape == (48, 44)
        return np.full_like(labels, 70000) if crowded else labels
    monkeypatch.setattr(predict, "split_instances", crowded)
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    write(tmp_path / "in" / "big.png", sample_bgr(52, 40))
    write(tmp_path / "in" / "small.png", sample_bgr(40, 36))
    tifffile.imwrite(tmp_path / "in" / "movie.tif", np.stack([sample_bgr(48, 44)[:, :, 0]] * 3), imagej=True,
                     metadata={"axes": "TYX"})
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"2 of 3 files were left out .*image big: 70000 nuclei do not fit a 16-bit "
                                        r"label image; predict it in parts"):
        predict.main(["--input", str(tmp_path / "in"), "--output", str(out), *stack_flags()])
    assert sorted(n for n in os.listdir(out) if not n.startswith("small")) == ["images.csv", "objects.csv",
                                                                               "prediction.yml"]
    assert set(pd.read_csv(out / "images.csv")["image"]) == {"small"}
    assert set(pd.read_csv(out / "objects.csv")["image"]) <= {"small"}
    assert len(stack_planes) == 2  # its third plane is not predicted once the second left it out


def test_a_stack_left_out_at_a_later_plane_leaves_no_rows(tmp_path):
    """A stack whose second plane does not fit the memory available (--scale auto may enlarge one plane 4 times and
    not the others) is left out whole: its first plane is no row of images.csv or objects.csv, and no stack of it is
    written; the image after it is predicted. Left out alone, it is the error that names it."""
    class SecondTooLarge:  # stands in for inference.Predictor: a square nucleus; the second image predicted too large
        scale = 1.0

        def __init__(self):
            self.calls = 0

        def as_input(self, image):
            return image_to_float(image, 3)

        def predict(self, image):
            self.calls += 1
            if self.calls == 2:
                raise DataError("a 64x64 image needs 9.00 GiB in windows")
            prob = np.zeros((1, 16, 16), np.float32)
            prob[0, 2:6, 2:6] = 1
            return prob

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "movie.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": "TYX"})
    files = [str(tmp_path / "in" / "movie.tif"), write(tmp_path / "in" / "after.png", np.zeros((16, 16), np.uint8))]
    os.makedirs(tmp_path / "out")
    options = dict(separation="cc", filters=dict(min_size=0, min_confidence=0))
    rows, table, left_out = predict.predict_all(SecondTooLarge(), files, ["movie", "after"],
                                                predict.tiff_headers(files), str(tmp_path / "out"), 1, 0.5, **options)
    assert [(row.image, row.nuclei) for row in rows] == [("after", 1)] and table["image"].tolist() == ["after"]
    assert left_out == [f"{files[0]}: a 64x64 image needs 9.00 GiB in windows"]
    assert sorted(os.listdir(tmp_path / "out")) == ["after.png", "after_instances.png"]
    rows, table, left_out = predict.predict_all(SecondTooLarge(), files[:1], ["movie"], predict.tiff_headers(files[:1]),
                                                str(tmp_path / "out"), 1, 0.5, **options)
    assert (rows, table, left_out) == ([], None, [f"{files[0]}: a 64x64 image needs 9.00 GiB in windows"])


def stack_layouts(folder):
    """TIFF stacks of 4 planes of 40x36 with the synthetic nuclei, in ``folder``: (those whose every plane is one page,
    which image_files.read_planes reads page by page; [(path, --channel)] of those it reads whole)."""
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    planes = np.stack([np.roll(grey, 3 * t, axis=1) * (100 + 30 * t) for t in range(4)])
    rgb = np.stack([cv2.cvtColor(sample_bgr(40, 36), cv2.COLOR_BGR2RGB)] * 4)
    rgb[1:] //= 2
    os.makedirs(folder, exist_ok=True)
    stacks = {"tyx.tif": (planes, dict(imagej=True, metadata={"axes": "TYX"})),
              "tzyx.tif": (planes.reshape(2, 2, 40, 36), dict(imagej=True, metadata={"axes": "TZYX"})),
              "rgb.tif": (rgb, dict(imagej=True, photometric="rgb", metadata={"axes": "TYXS"})),
              "planar.tif": (rgb.transpose(0, 3, 1, 2), dict(photometric="rgb", planarconfig="separate",
                                                             metadata={"axes": "TSYX"})),
              "float.tif": ((planes / 7).astype(np.float32), dict(imagej=True, metadata={"axes": "TYX"})),
              "ome.ome.tif": (planes.reshape(2, 2, 40, 36), dict(ome=True, metadata={"axes": "TZYX"})),
              "zlib.tif": (planes, dict(imagej=True, compression="zlib", metadata={"axes": "TYX"})),
              "lzw.tif": (planes, dict(photometric="minisblack", compression="lzw", predictor=True,
                                        metadata={"axes": "TYX"})),
              # read whole: a channel axis across pages, 3 pages taken as colours, an ImageJ stack stored after its
              # first page alone, a 2D image
              "tzc.tif": (np.stack([planes, planes[..., ::-1]], 1).reshape(2, 2, 2, 40, 36),
                          dict(imagej=True, metadata={"axes": "TZCYX"})),
              "three.tif": (planes[:3], dict(photometric="minisblack")),
              "truncated.tif": (planes, dict(imagej=True, truncate=True, metadata={"axes": "TYX"})),
              "flat.tif": (planes[0], {})}
    for name, (array, options) in stacks.items():
        tifffile.imwrite(folder / name, array, **options)
    paths = [str(folder / name) for name in stacks]
    return paths[:8], [(path, 0 if path.endswith("tzc.tif") else None) for path in paths[8:]]


def open_count(path):
    """How many files this process holds open on ``path``."""
    return sum(f.path == os.path.realpath(path) for f in psutil.Process().open_files())


def test_a_stack_of_one_page_per_plane_is_read_page_by_page(in_runs, tmp_path, monkeypatch):
    """image_files.read_planes reads a stack whose every plane is one page (T, Z, TZ of grey or RGB pages, ImageJ,
    OME or plain, compressed or not) a page at a time, never decoding it whole, and gives the planes of the whole
    read (values and dtype); every other layout is read whole. The file is open while the planes are read, and
    closed after."""
    lazy, whole = stack_layouts(tmp_path)
    decoded, decode_planes = [], image_files.decode_planes
    monkeypatch.setattr(image_files, "decode_planes", lambda path: decoded.append(path) or decode_planes(path))
    for path in lazy:
        expected = image_files.select_channel(decode_planes(path)[0], None, path)
        with image_files.read_planes(path, None) as planes:
            assert open_count(path) == 1
            read = [planes[i] for i in range(len(planes))]
        assert not decoded and open_count(path) == 0, path
        assert len(read) == len(expected) == 4, path
        for got, plane in zip(read, expected):
            assert got.dtype == plane.dtype and np.array_equal(got, plane), path
    for path, channel in whole:
        with image_files.read_planes(path, channel) as planes:
            assert len(planes) in (1, 3, 4)
        assert decoded == [path] and open_count(path) == 0
        decoded.clear()


def test_stacks_read_page_by_page_give_the_outputs_of_the_whole_read(in_runs, tmp_path, monkeypatch):
    """predict.py's outputs (the TIFF stacks, ROIs, objects.csv, images.csv) of stacks read page by page are, byte for
    byte, those of the same stacks read whole."""
    lazy, _ = stack_layouts(tmp_path / "in")
    predict.main(["--input", *lazy, "--output", str(tmp_path / "pages"), *stack_flags()])
    monkeypatch.setattr(image_files, "_page_per_plane", lambda path: None)
    predict.main(["--input", *lazy, "--output", str(tmp_path / "whole"), *stack_flags()])
    names = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "pages")) == names and len(names) == len(STACK_OUTPUTS) * len(lazy) + 3
    for name in set(names) - {"prediction.yml"}:  # the record names its own --output and time
        assert (tmp_path / "pages" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


class SquareNuclei:
    """Stands in for inference.Predictor: a square nucleus in every plane; counts its calls and whether ``path`` is
    open at each; raises ``error`` at call ``at``."""
    scale = 1.0

    def __init__(self, path, error=None, at=0):
        self.path, self.error, self.at, self.open = path, error, at, []

    def as_input(self, image):
        return image_to_float(image, 3)

    def predict(self, image):
        self.open.append(open_count(self.path))
        if self.error is not None and len(self.open) == self.at:
            raise self.error
        prob = np.zeros((1,) + image.shape[:2], np.float32)
        prob[0, 2:6, 2:6] = 1
        return prob


def test_a_stack_a_job_left_out_is_read_no_further_and_left_out_once(tmp_path, monkeypatch):
    """A stack whose first plane holds more nuclei than 16 bits hold is left out by its job as the prediction goes
    on (the jobs run after each plane here, as after 256 MB of planes): its later planes are not predicted for
    nothing, and its third plane, which holds NaN, does not count it as a second file left out."""
    real = predict.split_instances
    monkeypatch.setattr(predict, "split_instances", lambda prob, *args, **kwargs: np.full_like(
        real(prob, *args, **kwargs), 70000) if prob.shape == (16, 16) else real(prob, *args, **kwargs))
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    stack = np.zeros((4, 16, 16), np.float32)
    stack[:, 4:9, 4:9], stack[2, 0, 0] = 1, np.nan
    (tmp_path / "in").mkdir()
    path = str(tmp_path / "in" / "movie.tif")
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX"})
    files = [path, write(tmp_path / "in" / "after.png", np.zeros((16, 20), np.uint8))]
    os.makedirs(tmp_path / "out")
    predictor = SquareNuclei(path)
    rows, table, left_out = predict.predict_all(predictor, files, ["movie", "after"], predict.tiff_headers(files),
                                                str(tmp_path / "out"), 1, 0.5, separation="cc",
                                                filters=dict(min_size=0, min_confidence=0))
    assert len(left_out) == 1 and "image movie: 70000 nuclei do not fit" in left_out[0]
    assert predictor.open == [1, 0]  # movie's plane 0, then after.png
    assert [(row.image, row.nuclei) for row in rows] == [("after", 1)] and table["image"].tolist() == ["after"]
    assert sorted(os.listdir(tmp_path / "out")) == ["after.png", "after_instances.png"]


def test_a_nan_in_a_later_plane_leaves_the_stack_out_as_the_whole_read_did(tmp_path):
    """A float stack read page by page whose third plane holds NaN is left out with the message of the whole read,
    once its first two planes are predicted: their rows and files go too, its file is closed, and the image after it
    is predicted."""
    stack = np.zeros((4, 16, 16), np.float32)
    stack[:, 4:9, 4:9], stack[2, 0, 0] = 1, np.nan
    (tmp_path / "in").mkdir()
    path = str(tmp_path / "in" / "movie.tif")
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(DataError) as whole:
        image_files.select_channel(image_files.decode_planes(path)[0], None, path)
    files = [path, write(tmp_path / "in" / "after.png", np.zeros((16, 16), np.uint8))]
    os.makedirs(tmp_path / "out")
    predictor = SquareNuclei(path)
    rows, table, left_out = predict.predict_all(predictor, files, ["movie", "after"], predict.tiff_headers(files),
                                                str(tmp_path / "out"), 1, 0.5, separation="cc",
                                                filters=dict(min_size=0, min_confidence=0))
    assert predictor.open == [1, 1, 0]  # movie's planes 0 and 1, its file open; then after.png
    assert left_out == [str(whole.value)] and "holds NaN" in left_out[0]
    assert [(row.image, row.nuclei) for row in rows] == [("after", 1)] and table["image"].tolist() == ["after"]
    assert sorted(os.listdir(tmp_path / "out")) == ["after.png", "after_instances.png"]
    assert open_count(path) == 0


@pytest.mark.parametrize("error", [None, KeyboardInterrupt(), RuntimeError("a bug"), DataError("too large")])
def test_a_stack_read_page_by_page_is_closed_on_every_exit(tmp_path, error):
    """The file of a stack read page by page is closed at its end, after Ctrl-C or an error at one of its planes,
    and after a plane left out."""
    (tmp_path / "in").mkdir()
    path = str(tmp_path / "in" / "movie.tif")
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint16), imagej=True, metadata={"axes": "TYX"})
    predictor = SquareNuclei(path, error, at=2)
    run = functools.partial(predict.predict_all, predictor, [path], ["movie"], predict.tiff_headers([path]),
                            str(tmp_path / "out"), 1, 0.5)
    os.makedirs(tmp_path / "out")
    stops = error is not None and not isinstance(error, DataError)  # a DataError leaves the file out
    with pytest.raises(type(error)) if stops else contextlib.nullcontext():
        rows, table, left_out = run()
    if isinstance(error, DataError):
        assert (rows, table, len(left_out)) == ([], None, 1) and "too large" in left_out[0]
    assert predictor.open == [1] * (4 if error is None else 2) and open_count(path) == 0
    assert os.listdir(tmp_path / "out") == ([] if error else ["movie.tif"])


def test_a_stack_read_page_by_page_needs_the_memory_of_one_page(in_runs, tmp_path, monkeypatch):
    """A stack read page by page holds one page at a time: it is read when the memory available holds a page (the
    whole read's check, on the whole stack, would refuse it), and refused, with the whole read's message on that
    page, when not; a stack read whole still needs memory for all of it."""
    lazy, whole = stack_layouts(tmp_path)
    tyx, tzc = lazy[0], whole[0][0]
    page = 40 * 36 * 2
    monkeypatch.setattr(image_files, "ram", lambda: (2**40, page))
    with image_files.read_planes(tyx, None) as planes:
        assert [planes[i].shape for i in range(len(planes))] == [(40, 36, 1)] * 4
    with pytest.raises(DataError, match=r"tzc.tif: its header claims 0.0 GiB of pixels \(2, 2, 2, 40, 36\), more "
                                        "than"):
        image_files.read_planes(tzc, 0).__enter__()
    monkeypatch.setattr(image_files, "ram", lambda: (2**40, page - 1))
    with pytest.raises(DataError, match=r"tyx.tif: its header claims 0.0 GiB of pixels \(40, 36\), more than the "
                                        r"0.0 GiB of memory available \(a damaged file"):
        image_files.read_planes(tyx, None).__enter__()
    assert open_count(tyx) == 0


def test_tiling_blends_the_seams_of_a_real_network(in_runs):
    """The trained UNet++ with its logits standardised (so that probabilities span 0..1): windows that overlap
    by 32 pixels with linear-ramp blending stay close to the whole-image prediction, far closer than hard seams."""
    cfg, net = checkpoints.load_run("pc", torch.device("cpu"))
    image = cv2.cvtColor(sample_bgr(96, 160), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    x = torch.from_numpy(inference.network_input(image))[None]
    with torch.no_grad():
        logits = net(x)[-1]
    centre, scale = logits.mean().item(), 1 / logits.std().item()

    class Standardised(torch.nn.Module):
        def forward(self, x):
            return [(o - centre) * scale for o in net(x)]

    model = Standardised().eval()
    whole = inference.Predictor(model, cfg, torch.device("cpu"), tile=512).predict(image)
    assert whole.std() > 0.1
    errors = {}
    for overlap in (0, 32):
        predictor = inference.Predictor(model, cfg, torch.device("cpu"), tile=64, overlap=overlap, batch_size=8)
        tiled = predictor.predict(image)
        errors[overlap] = np.abs(tiled - whole).mean()
    assert errors[32] < 0.02
    assert errors[32] < errors[0] / 3


def test_prune_and_tta(in_runs, tmp_path):
    image = write(tmp_path / "a.png", sample_bgr(40, 52))
    predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "o3"), "--prune", "3", "--tta",
                  "--device", "cpu"])
    assert read(tmp_path / "o3" / "a.png").shape == (40, 52)
    with pytest.raises(UsageError, match="--prune needs a NestedUNet trained with deep supervision"):
        predict.main(["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--prune", "2"])
    with pytest.raises(SystemExit) as e:
        run_cli(predict.main, ["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--prune", "2"])
    assert e.value.code == 2
    # a UNet run predicts fine without --prune
    predict.main(["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--device", "cpu"])
    assert read(tmp_path / "ou" / "a.png").shape == (40, 52)


def test_files_of_an_earlier_prediction_are_named(in_runs, tmp_path, capsys):
    """Predicting again into the same folder with fewer outputs: the earlier run's instances, overlays,
    objects.csv and images.csv stay, named in a note so that they do not pass for this run's."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(40, 40))
    out = str(tmp_path / "out")
    predict.main(["--name", "pc", "--input", image, "--output", out, "--instances", "--overlay", "--device", "cpu"])
    assert "earlier prediction" not in capsys.readouterr().out
    predict.main(["--name", "pc", "--input", image, "--output", out, "--device", "cpu"])
    assert ("also holds 4 files of an earlier prediction that this one did not write: a_instances.png, "
            "a_overlay.png, images.csv ...") in capsys.readouterr().out
    predict.main(["--name", "pc", "--input", image, "--output", out, "--instances", "--overlay", "--device", "cpu",
                  "--min_confidence", "0"])
    assert "earlier prediction" not in capsys.readouterr().out
    assert "a" in set(pd.read_csv(os.path.join(out, "objects.csv"), dtype={"image": str})["image"])
    # score.py's scores.csv beside them scored the earlier prediction
    open(os.path.join(out, "scores.csv"), "w").close()
    predict.main(["--name", "pc", "--input", image, "--output", out, "--instances", "--overlay", "--device", "cpu",
                  "--min_confidence", "0"])
    assert "also holds 1 file of an earlier prediction that this one did not write: scores.csv;" in \
        capsys.readouterr().out
    os.remove(os.path.join(out, "scores.csv"))
    # another image into the same folder: objects.csv is replaced, and the image whose rows it loses is named
    other = write(tmp_path / "in2" / "b.png", sample_bgr(40, 40))
    predict.main(["--name", "pc", "--input", other, "--output", out, "--instances", "--device", "cpu"])
    assert (f"note: {os.path.join(out, '')}objects.csv and images.csv held the rows of 1 other image of an earlier "
            "prediction (a); they now hold this prediction's only") in capsys.readouterr().out
    assert set(pd.read_csv(os.path.join(out, "objects.csv"), dtype={"image": str})["image"]) <= {"b"}


def test_only_a_zip_is_taken_for_an_image_s_rois(tmp_path):
    """<id>_rois.zip is the only output ending in _rois: image a_rois's mask a_rois.png was named as a file of an
    earlier prediction of image a (to remove), and image a's a_rois.zip as one of image a_rois."""
    assert predict_notes.output_stems("a_rois.zip") == {"a"} and predict_notes.output_stems("a_rois.png") == {"a_rois"}
    for held, img_id, rois in (("a_rois.png", "a", True), ("a_rois.zip", "a_rois", True), ("a_rois.zip", "a", False)):
        out = tmp_path / f"{img_id}_{rois}"
        out.mkdir()
        (out / held).write_bytes(b"")
        written = predict.output_files([str(tmp_path / f"{img_id}.png")], [img_id], [""],
                                       predict.output_suffixes(1, False, True, False, rois))
        note = predict_notes.earlier_outputs_note(Namespace(output=str(out), instances=True),
                                            [str(tmp_path / f"{img_id}.png")], [img_id], written)
        assert (held in note) == (not rois), (held, img_id, note)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_toolkit_version_is_the_checkout_s_commit_and_says_when_files_changed(tmp_path):
    """prediction.yml's toolkit: the commit of the checkout the code runs from, '-dirty' once a tracked file changed
    since, and 'unknown' outside a git checkout."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "one"]):
        (tmp_path / "predict.py").write_text("one")
        subprocess.run(["git", "-C", str(tmp_path), *command], check=True, env=env)
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert utils.code_version(str(tmp_path)) == commit
    (tmp_path / "predict.py").write_text("two")
    assert utils.code_version(str(tmp_path)) == commit + "-dirty"
    (tmp_path / "elsewhere").mkdir()
    assert utils.code_version(str(tmp_path / "elsewhere")) == commit + "-dirty"  # a folder of the checkout
    outside = tmp_path.parent / (tmp_path.name + "_no_git")
    outside.mkdir()
    assert utils.code_version(str(outside)) == "unknown"


def test_the_earlier_outputs_of_an_image_left_out_now_are_named(in_runs, tmp_path, capsys):
    """An image predicted before and left out now (unreadable) keeps its earlier mask, which would pass for this
    prediction's: the note names it, beside the error that names the file."""
    a, b = write(tmp_path / "in" / "a.png", sample_bgr(40, 40)), write(tmp_path / "in" / "b.png", sample_bgr(40, 40))
    out = str(tmp_path / "out")
    predict.main(["--name", "pc", "--input", a, b, "--output", out, "--device", "cpu"])
    capsys.readouterr()
    with open(b, "wb") as f:
        f.write(b"not an image any more")
    with pytest.raises(DataError, match=r"1 of 2 files were left out .*b\.png"):
        predict.main(["--name", "pc", "--input", a, b, "--output", out, "--device", "cpu"])
    assert ("also holds 1 file of an earlier prediction that this one did not write: b.png;"
            in capsys.readouterr().out)


def read_record(out):
    """The prediction.yml in folder ``out``, as yaml.safe_load reads it."""
    with open(os.path.join(out, "prediction.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def printed_precision(printed):
    """The precision that predict.py's summary line names: '... in 0.4s on cpu (fp32, channels_last); mean ...'."""
    return re.search(r" on \S+ \((.*?)\); mean foreground", printed).group(1)


def test_prediction_yml_records_what_made_the_outputs(in_runs, tmp_path, capsys):
    """prediction.yml says which run, weights, command and settings made a folder of outputs: the weights' SHA-256
    is that of the file loaded, the flags those given, the precision the one printed, the settings named as in
    val.py's evaluation.yml of the same run and flags; it counts the images and planes predicted and names the file
    left out; the command, on one line, gives the flags back after python and predict.py's path."""
    folder = tmp_path / "in"
    write(folder / "a.png", sample_bgr(40, 36))
    tifffile.imwrite(folder / "movie.tif", np.stack([sample_bgr(32, 32)[:, :, 0]] * 3), imagej=True,
                     metadata={"axes": "TYX"})
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    shaping = ["--tta", "--separation", "watershed", "--min_size", "5", "--min_confidence", "0.2", "--device", "cpu"]
    argv = ["--name", "p", "--input", str(folder), "--output", str(out), "--instances", "--threshold", "0.3",
            "--pixel_size", "0.5", *shaping]
    started = datetime.now(timezone.utc).replace(microsecond=0)
    with pytest.raises(DataError, match="1 of 3 files were left out"):
        predict.main(argv)
    ended = datetime.now(timezone.utc)
    printed = capsys.readouterr().out
    record = read_record(out)
    with open(os.path.join("models", "p", "model.pth"), "rb") as f:
        assert record["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (record["run"], record["run_folder"]) == ("p", os.path.realpath(os.path.join("models", "p")))
    command = [line for line in (out / "prediction.yml").read_text().splitlines() if line.startswith("command:")]
    python, script, *flags = shlex.split(yaml.safe_load(command[0])["command"])
    assert (python, flags) == ("python", argv)
    assert record["input"] == [str(folder)] and record["working_directory"] == os.path.realpath(in_runs)
    # pasted in the working directory, which holds models/ but not predict.py, the command finds predict.py
    assert os.path.samefile(os.path.join(record["working_directory"], script), predict.__file__)
    assert started <= datetime.strptime(record["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) <= ended
    assert (record["torch"], record["device"]) == (torch.__version__, "cpu")
    settings = record["settings"]
    assert settings["precision"] == printed_precision(printed)
    assert settings["model"] == "epoch 1 of 1"  # the fixture's run trained one epoch
    assert {k: settings[k] for k in ("threshold", "separation", "min_size", "min_confidence", "tta", "prune", "scale",
                                     "pixel_size", "channel", "amp", "input_size", "tile", "instances")} == {
        "threshold": 0.3, "separation": "watershed", "min_size": 5, "min_confidence": 0.2, "tta": True,
        "prune": None, "scale": 1.0, "pixel_size": 0.5, "channel": None, "amp": "auto", "input_size": [32, 32],
        "tile": None, "instances": True}  # run p predicts each image resized to 32x32, in no windows
    assert record["predicted"] == {"images": 2, "planes": 4}
    assert record["left_out"]["files"] == 1 and "broken.png" in record["left_out"]["errors"][0]
    val.main(["--name", "p", "--output", str(tmp_path / "val"), "--no_overlays", *shaping])
    evaluated = yaml.safe_load(open(tmp_path / "val" / "evaluation.yml"))
    assert {k: settings[k] for k in evaluated["settings"]} == evaluated["settings"]
    made = ("weights_sha256", "config_sha256", "toolkit")  # the same run and code made both folders
    assert {k: evaluated[k] for k in made} == {k: record[k] for k in made}
    assert evaluated["config_sha256"] == hashlib.sha256(open(os.path.join("models", "p", "config.yml"), "rb")
                                                        .read()).hexdigest()


def test_prediction_yml_tells_runs_apart_by_their_config_yml_too(in_runs, tmp_path):
    """Runs p and pp hold the same weights, pp's config.yml another normalization, as a config.yml edited since a
    prediction would (other outputs: test_percentile_run_predicts_a_dimmed_image_as_the_original): the record hashes
    config.yml beside the weights, so that the two are told apart."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    records = {}
    for name in ("p", "pp"):
        predict.main(["--name", name, "--input", image, "--output", str(tmp_path / name), "--device", "cpu"])
        records[name] = read_record(tmp_path / name)
        with open(os.path.join("models", name, "config.yml"), "rb") as f:
            assert records[name]["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert records["p"]["config_sha256"] != records["pp"]["config_sha256"]


def test_prediction_yml_names_the_windows_used_and_no_nuclei_settings_without_nuclei(in_runs, tmp_path, capsys):
    """A crop-trained run's record gives the windows used (--tile 0: those the summary line names, from the memory
    budget) and the model as model.pth where its run has no log; without --instances no nuclei are made, and the
    separation and filters are null rather than settings that shaped nothing; the pixel size comes from each
    TIFF without --pixel_size."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(96, 160))
    predict.main(["--name", "pc", "--input", image, "--output", str(tmp_path / "tiled"), "--tile", "64",
                  "--overlap", "32", "--device", "cpu"])
    settings = read_record(tmp_path / "tiled")["settings"]
    assert (settings["tile"], settings["overlap"], settings["input_size"]) == (64, 32, None)
    assert (settings["separation"], settings["min_size"], settings["min_confidence"]) == (None, None, None)
    assert (settings["model"], settings["pixel_size"], settings["instances"]) == ("model.pth",
                                                                                predict.PIXEL_SIZE_READ, False)
    capsys.readouterr()
    predict.main(["--name", "pc", "--input", image, "--output", str(tmp_path / "budget"), "--device", "cpu"])
    tile = int(re.search(r"windows up to (\d+)x\1", capsys.readouterr().out).group(1))
    assert read_record(tmp_path / "budget")["settings"]["tile"] == tile


def test_a_prediction_that_stops_before_its_end_leaves_no_prediction_yml(in_runs, tmp_path, monkeypatch):
    """An earlier prediction's prediction.yml would pass for the mixed files of one that stopped before its end: it
    is gone before the first output is written (so also when killed outright), and only a prediction that ends
    writes one; Ctrl-C, an error, or every file left out leaves none."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    out = tmp_path / "out"
    argv = ["--name", "p", "--input", image, "--output", str(out), "--device", "cpu"]
    predict.main(argv)
    assert read_record(out)["predicted"] == {"images": 1, "planes": 1}
    predict_all, held = predict.predict_all, []

    def stopped(*args, **kwargs):
        held.append(os.path.exists(out / "prediction.yml"))
        predict_all(*args, **kwargs)  # a.png written again
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(predict, "predict_all", stopped)
        with pytest.raises(KeyboardInterrupt):
            predict.main(argv)
    assert held == [False] and not (out / "prediction.yml").exists()
    predict.main(argv)
    broken = tmp_path / "broken" / "b.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="b.png"):
        predict.main([*argv[:2], "--input", str(broken), *argv[4:]])
    assert sorted(os.listdir(out)) == ["a.png"]


def test_every_file_left_out_with_instances_is_one_error(in_runs, tmp_path):
    """predict.py --instances (or --rois) whose every file was left out ended in pandas' traceback "No objects to
    concatenate": it is the error that names the file, as without --instances."""
    broken = tmp_path / "in" / "b.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    grey = write(tmp_path / "in" / "grey.png", sample_bgr(32, 32))
    argv = ["--name", "p", "--output", str(tmp_path / "out"), "--device", "cpu", "--instances"]
    with pytest.raises(DataError, match="b.png"):
        predict.main([*argv, "--input", str(broken)])
    with pytest.raises(DataError, match=r"^none of the 2 files could be predicted: .*b\.png"):
        predict.main([*argv, "--rois", "--channel", "5", "--input", str(broken), grey])
    assert not (tmp_path / "out" / "objects.csv").exists()


def test_one_predict_at_a_time_writes_a_folder(in_runs, tmp_path):
    """Two predict.py --instances into one --output both went on, and objects.csv held the nuclei of the one that
    ended last: while one writes the folder (out/.predict.lock) a second is refused before it writes there; one
    into another folder goes on, and so does one without --instances (the shards of an array job write their own
    images' files); the folder is free again once the first ends, killed or not."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    out = tmp_path / "out"
    argv = ["--name", "p", "--input", image, "--instances", "--device", "cpu"]
    with held_by_another_process(out / ".predict.lock") as pid:
        with pytest.raises(UsageError, match=rf"^{re.escape(str(out))} is being written by another process \(pid "
                                             rf"{pid}\); wait for it to end, or choose another --output$"):
            predict.main([*argv, "--output", str(out)])
        assert os.listdir(out) == [".predict.lock"]
        predict.main([*argv, "--output", str(tmp_path / "other")])
        predict.main([*argv[:-3], "--device", "cpu", "--output", str(out)])
        assert sorted(os.listdir(out)) == [".predict.lock", "a.png", "prediction.yml"]
    predict.main([*argv, "--output", str(out)])
    assert sorted(os.listdir(out)) == ["a.png", "a_instances.png", "images.csv", "objects.csv", "prediction.yml"]


def test_files_of_a_run_with_other_classes_and_of_a_killed_prediction(in_runs, tmp_path, capsys, monkeypatch):
    """A two-class run's files for these images are named too (not only a one-class run's); the temporary files of
    a killed prediction are removed; a prediction stopped midway into a folder that held files says it mixes."""
    image = write(tmp_path / "in" / "a.png", sample_bgr(40, 40))
    out = tmp_path / "out"
    for name in ("a_class0.png", "a_class1_prob.png", "b_class1.png"):
        write(out / name, np.zeros((40, 40), np.uint8))
    (out / ".a.png.4999999.x1y2z3ab.tmp").write_bytes(b"\x89PNG half")  # pid above Linux's highest: killed
    (out / ".notes.tmp").write_text("the user's")
    predict.main(["--name", "pc", "--input", image, "--output", str(out), "--device", "cpu"])
    assert "also holds 2 files of an earlier prediction that this one did not write: a_class0.png, " \
           "a_class1_prob.png;" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [".notes.tmp", "a.png", "a_class0.png", "a_class1_prob.png", "b_class1.png",
                                       "prediction.yml"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_all", stopped)
    with pytest.raises(KeyboardInterrupt):
        predict.main(["--name", "pc", "--input", image, "--output", str(out), "--device", "cpu"])
    assert "held outputs of an earlier prediction of these images, and this one stopped" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        predict.main(["--name", "pc", "--input", image, "--output", str(tmp_path / "new"), "--device", "cpu"])
    assert "held outputs" not in capsys.readouterr().err


def test_images_csv_counts_the_nuclei_of_every_image_and_plane(in_runs, tmp_path, monkeypatch):
    """images.csv has a row per image and per plane of a stack, also for one without nuclei (0 nuclei, where
    objects.csv has no row); its counts and areas are those of the distinct labels of <id>_instances.png / .tif, its
    foreground that of the mask. Without --instances there is none."""
    # the probability is the image's own grey value: nuclei where the discs are, none in a black image or plane
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    yy, xx = np.mgrid[:48, :48]

    def discs(*centres):
        return np.any([(yy - y) ** 2 + (xx - x) ** 2 <= 16 for y, x in centres], axis=0).astype(np.uint8) * 255

    black = np.zeros((48, 48), np.uint8)
    write(tmp_path / "in" / "cells.png", discs((8, 8), (8, 30), (30, 20), (40, 40)))
    write(tmp_path / "in" / "empty.png", black)
    tifffile.imwrite(tmp_path / "in" / "movie.tif", np.stack([discs((10, 10)), black, discs((20, 20), (35, 8))]),
                     imagej=True, metadata={"axes": "TYX"})
    out = tmp_path / "out"
    argv = ["--name", "pc", "--input", str(tmp_path / "in"), "--device", "cpu"]
    predict.main([*argv, "--output", str(out), "--instances", "--separation", "cc", "--min_confidence", "0"])
    table = pd.read_csv(out / "images.csv")
    assert list(table.columns) == [*measurements.IMAGE_COLUMNS, "mean_area_um2", "median_area_um2"]
    assert table[["image", "plane"]].values.tolist() == [["cells", 0], ["empty", 0], ["movie", 0], ["movie", 1],
                                                         ["movie", 2]]
    assert table["nuclei"].tolist() == [4, 0, 1, 0, 2]  # the discs drawn
    planes = {(img_id, 0): (read(out / f"{img_id}_instances.png"), read(out / f"{img_id}.png"))
              for img_id in ("cells", "empty")}
    planes.update(((("movie", t), pair) for t, pair in enumerate(zip(tifffile.imread(out / "movie_instances.tif"),
                                                                     tifffile.imread(out / "movie.tif")))))
    for row in table.itertuples():
        labels, mask = planes[row.image, row.plane]
        areas = np.unique(labels[labels > 0], return_counts=True)[1]
        assert (row.nuclei, row.height, row.width, row.scale) == (len(areas), 48, 48, 1)
        assert row.foreground == pytest.approx((mask == 255).mean(), abs=5e-5)
        if len(areas):
            assert (row.mean_area, row.median_area) == pytest.approx((areas.mean(), np.median(areas)), abs=5e-3)
        else:
            assert np.isnan(row.mean_area) and np.isnan(row.median_area)
    assert set(pd.read_csv(out / "objects.csv")["image"]) == {"cells", "movie"}
    predict.main([*argv, "--output", str(tmp_path / "plain")])
    assert "images.csv" not in os.listdir(tmp_path / "plain")


def test_image_ids_that_pandas_reads_as_numbers_or_missing_get_a_note_with_the_call_that_keeps_them(
        in_runs, tmp_path, monkeypatch, capsys):
    """Ids like 0001 (read back by pandas' defaults as 1.0: the leading zeros lost, 1 and 0001 merged) or NA (read
    as missing): a note gives the read_csv arguments that read both tables back as written, areas still numbers;
    ordinary ids get no note."""
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    disc = np.zeros((32, 32), np.uint8)
    disc[8:16, 8:16] = 255
    for name in ("0001", "NA", "0002"):
        write(tmp_path / "in" / f"{name}.png", disc if name != "0002" else np.zeros_like(disc))
    out = tmp_path / "out"
    argv = ["--name", "pc", "--input", str(tmp_path / "in"), "--device", "cpu", "--instances", "--separation", "cc",
            "--min_confidence", "0"]
    predict.main([*argv, "--output", str(out)])
    printed = capsys.readouterr().out
    assert pd.read_csv(out / "images.csv")["image"].isna().any()  # what the note is for
    assert ("note: pandas.read_csv with its defaults reads these image ids as other values (0001 as 1.0, 0002 as 2.0, "
            "NA as missing); read objects.csv and images.csv with dtype={'image': str}, keep_default_na=False, "
            "na_values=['']") in printed
    kept = dict(dtype={"image": str}, keep_default_na=False, na_values=[""])
    images, objects = (pd.read_csv(out / name, **kept) for name in ("images.csv", "objects.csv"))
    assert images["image"].tolist() == ["0001", "0002", "NA"] and objects["image"].tolist() == ["0001", "NA"]
    assert images["mean_area"].dtype == float and np.isnan(images["mean_area"][1])
    write(tmp_path / "plain" / "cells.png", disc)
    predict.main([*argv[:2], "--input", str(tmp_path / "plain"), *argv[4:], "--output", str(tmp_path / "out2")])
    assert "note: pandas" not in capsys.readouterr().out


def test_images_csv_is_replaced_whole_and_an_earlier_one_that_stays_is_named(in_runs, tmp_path, capsys, monkeypatch):
    """images.csv is this prediction's only: the images whose rows an earlier one held are named; a prediction
    stopped before its end leaves the earlier one as it was, and its note names it; a Ctrl-C while the tables are
    written takes effect once both are this prediction's (neither half-written, nor one old beside one new)."""
    a = write(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    b = write(tmp_path / "in2" / "b.png", sample_bgr(32, 32))
    out = tmp_path / "out"
    argv = ["--name", "pc", "--output", str(out), "--device", "cpu", "--instances", "--min_confidence", "0"]
    predict.main([*argv, "--input", a])
    assert "held the rows" not in capsys.readouterr().out
    predict.main([*argv, "--input", b])
    assert (f"note: {os.path.join(out, '')}objects.csv and images.csv held the rows of 1 other image of an earlier "
            "prediction (a); they now hold this prediction's only") in capsys.readouterr().out
    assert pd.read_csv(out / "images.csv")["image"].tolist() == ["b"]
    earlier = (out / "images.csv").read_bytes()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(predict, "predict_all", stopped)
        with pytest.raises(KeyboardInterrupt):
            predict.main([*argv, "--input", b])
    assert "it may now mix the two (objects.csv and images.csv are the earlier one's)" in capsys.readouterr().err
    assert (out / "images.csv").read_bytes() == earlier
    to_csv = pd.DataFrame.to_csv

    def interrupted(self, *args, **kwargs):  # Ctrl-C as objects.csv, the first table, is written
        os.kill(os.getpid(), signal.SIGINT)
        return to_csv(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_csv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict.main([*argv, "--input", a])
    assert pd.read_csv(out / "images.csv")["image"].tolist() == ["a"]
    assert set(pd.read_csv(out / "objects.csv", dtype={"image": str})["image"]) == {"a"}
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_images_named_like_missing_values_are_named_when_their_rows_are_replaced(in_runs, tmp_path, capsys):
    """The earlier tables' image column was read with pandas' missing-value words: images NA.png and None.png (a
    missing value from pandas 2.0) came back as NaN, so predicting them again into their folder stopped with a
    TypeError before the new tables were written, and a note named NaN for images that were still there."""
    for name in ("NA", "None", "null"):
        write(tmp_path / "in" / f"{name}.png", sample_bgr(32, 32))
    argv = ["--name", "pc", "--output", str(tmp_path / "out"), "--device", "cpu", "--instances"]
    predict.main([*argv, "--input", str(tmp_path / "in")])
    predict.main([*argv, "--input", str(tmp_path / "in")])
    assert "held the rows" not in capsys.readouterr().out
    predict.main([*argv, "--input", write(tmp_path / "in2" / "b.png", sample_bgr(32, 32))])
    assert ("held the rows of 3 other images of an earlier prediction (NA, None, null)"
            in capsys.readouterr().out)


def test_subfolders_of_an_input_folder_are_named(tmp_path, capsys):
    write(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "plate" / "well_B2").mkdir()
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / "a.png")]
    assert f"note: the subfolders of {tmp_path / 'plate'} are not searched (well_B2)" in capsys.readouterr().out


def test_a_folder_s_other_files_are_named_and_a_broken_link_kept_to_be_named(tmp_path, capsys):
    write(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
    for other in ("b.webp", os.fsdecode(b"notiz_\xe4.txt")):  # a name that is not UTF-8 is printed escaped
        (tmp_path / "plate" / other).write_bytes(b"")
    (tmp_path / "plate" / "broken.png").symlink_to(tmp_path / "gone.png")
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / n) for n in ("a.png",
                                                                                                 "broken.png")]
    assert "2 files not named like png/" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-c", f"import predict; predict.list_images([{str(tmp_path / 'plate')!r}])"],
                          cwd=ROOT, env=dict(os.environ, PYTHONIOENCODING="utf-8:strict", NO_ALBUMENTATIONS_UPDATE="1"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "b.webp, notiz_\\xe4.txt" in done.stdout, done.stderr[-500:]


def test_cellpose_label_images_beside_their_images_are_left_out(tmp_path, capsys):
    """A Cellpose folder given as --input: its <id>_masks label images and <id>_flows files are not segmented as
    images (their outputs would take a label image's name); an image that is only named like one stays."""
    for name in ("a_img.png", "a_masks.png", "b.tif", "b_masks.png", "b_flows.tif", "c_masks.png"):
        write(tmp_path / "plate" / name, np.zeros((8, 8), np.uint8))
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / n) for n in ("a_img.png",
                                                                                                 "b.tif",
                                                                                                 "c_masks.png")]
    assert "3 Cellpose label, flow or output files beside their images left out (a_masks.png, b_flows.tif, " \
        "b_masks.png)" in capsys.readouterr().out
    assert predict.list_images([str(tmp_path / "plate" / "a_masks.png")]) == [str(tmp_path / "plate" / "a_masks.png")]


def test_what_cellpose_wrote_beside_an_image_is_left_out(tmp_path, capsys):
    """Cellpose's --save_png/--save_outlines/--save_flows outputs beside d.png: its label image d_cp_masks.png (the
    _masks ending alone would take it for the label image of an image d_cp), the picture d_cp_output.png, ..."""
    for name in ("d.png", "d_cp_masks.png", "d_cp_masks.tif", "d_cp_output.png", "d_outlines.png", "d_flows.tif",
                 "d_dP.tif", "e_outlines.png"):
        write(tmp_path / "plate" / name, np.zeros((8, 8), np.uint8))
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / n) for n in ("d.png",
                                                                                                 "e_outlines.png")]
    assert "6 Cellpose label, flow or output files beside their images left out" in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_refused_before_any_output(tmp_path):
    write(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
    shutil.copy(tmp_path / "plate" / "a.png", os.fsdecode(os.fsencode(tmp_path / "plate") + b"/Zellkern_\xe4.png"))
    with pytest.raises(DataError, match=r"plate/Zellkern_\\xe4.png is not valid UTF-8; rename it"):
        predict.list_images([str(tmp_path / "plate")])


def test_errors_name_the_problem(in_runs, tmp_path, monkeypatch):
    image = write(tmp_path / "a.png", sample_bgr(32, 32))
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="missing.png"):
        predict.main(["--name", "p", "--input", image, str(tmp_path / "missing.png"), "--output", out])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no"):
        predict.main(["--name", "p", "--input", str(tmp_path / "empty"), "--output", out])
    with pytest.raises(UsageError, match="model.pth"):
        predict.main(["--name", "nomodel", "--input", image, "--output", out])
    with pytest.raises(UsageError, match="no run named"):
        predict.main(["--name", "absent", "--input", image, "--output", out])
    with pytest.raises(UsageError, match="--tile"):
        predict.main(["--name", "p", "--input", image, "--output", out, "--tile", "50"])
    with pytest.raises(UsageError, match="--tile: run p was trained on images resized"):  # not --overlap's limit
        predict.main(["--name", "p", "--input", image, "--output", out, "--tile", "32"])
    with pytest.raises(UsageError, match=r"--overlap 64 must be less than --tile \(32\)"):
        predict.main(["--name", "pc", "--input", image, "--output", out, "--tile", "32"])
    with pytest.raises(UsageError, match="--separation and --min_size shape the nuclei of --instances .*: add "):
        predict.main(["--name", "p", "--input", image, "--output", out, "--separation", "cc", "--min_size", "9"])
    # --scale auto measures the nuclei it finds with them
    predict.check_args(predict.build_parser().parse_args(["--name", "pa", "--input", image, "--output", out,
                                                          "--scale", "auto", "--min_confidence", "0"]))
    with pytest.raises(UsageError, match="--overlap -20 must be at least 0$"):  # windows sized from the budget
        predict.main(["--name", "p", "--input", image, "--output", out, "--overlap", "-20"])
    with pytest.raises(UsageError, match="--min_confidence"):
        predict.main(["--name", "p", "--input", image, "--output", out, "--min_confidence", "1"])
    other = write(tmp_path / "sub" / "a.jpg", sample_bgr(32, 32))
    with pytest.raises(UsageError, match="a.png"):
        predict.main(["--name", "p", "--input", image, other, "--output", out])
    with pytest.raises(UsageError, match="overwrite the input"):
        predict.main(["--name", "p", "--input", image, "--output", str(tmp_path)])
    with monkeypatch.context() as m:  # as a user without write permission there (the tests may run as root)
        m.setattr(os, "access", lambda p, mode: p != str(tmp_path))
        with pytest.raises(UsageError, match=f"--output {out}: no permission to write in {tmp_path}; give a folder"):
            predict.main(["--name", "p", "--input", image, "--output", out])
    with pytest.raises(UsageError, match=f"--output {image}/out: {image} is a file; give a folder"):
        predict.main(["--name", "p", "--input", image, "--output", f"{image}/out"])
    with pytest.raises(UsageError, match=r"--output .*sub/ is the --input folder .*sub; write the outputs to a "):
        predict.main(["--name", "p", "--input", str(tmp_path / "sub"), "--output", str(tmp_path / "sub") + "/"])
    named_like_an_output = write(tmp_path / "a_prob.png", sample_bgr(32, 32))  # a's --save_prob file
    with pytest.raises(UsageError, match=r"a\.png and .*a_prob\.png would both write a_prob\.png; rename one"):
        predict.main(["--name", "p", "--input", image, named_like_an_output, "--output", out, "--save_prob"])
    assert not os.path.exists(out)
    broken = tmp_path / "broken" / "b.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="b.png"):
        predict.main(["--name", "p", "--input", str(broken), "--output", out, "--device", "cpu"])
    assert not os.path.exists(os.path.join(out, "b.png"))
    # among readable images, an unreadable one is left out and named at the end; the others are all predicted
    write(tmp_path / "broken" / "a.png", sample_bgr(32, 32))
    write(tmp_path / "broken" / "c.png", sample_bgr(40, 24))
    with pytest.raises(DataError, match=r"1 of 3 files were left out .*b\.png"):
        predict.main(["--name", "p", "--input", str(broken.parent), "--output", out, "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["a.png", "c.png", "prediction.yml"]


def test_val_reports_the_dsb_score(in_runs, tmp_path, capsys):
    """val.py adds the DSB2018 instance score when inputs/<dataset>/labels/ exists, also at another evaluation
    size (p16 evaluates at 16x16: the 32x32 labels are resized with nearest)."""
    for name in ("p", "p16"):
        if name == "p16" and not os.path.isdir(os.path.join("models", "p16")):
            shutil.copytree(os.path.join("models", "p"), os.path.join("models", "p16"))
            with open(os.path.join("models", "p16", "config.yml")) as f:
                config = yaml.safe_load(f)
            with open(os.path.join("models", "p16", "config.yml"), "w") as f:
                yaml.safe_dump({**config, "name": "p16", "input_h": 16, "input_w": 16}, f, sort_keys=False)
        out = tmp_path / name
        scores = val.main(["--name", name, "--output", str(out), "--no_overlays", "--device", "cpu"])
        printed = capsys.readouterr().out
        assert "DSB2018 score" in printed and "(watershed)" in printed and "(connected components)" in printed
        table = pd.read_csv(out / "scores.csv")
        assert "dsb" in table.columns and table["dsb"].between(0, 1).all()
        assert 0 <= scores["dsb"] <= 1 and 0 <= scores["dsb_cc"] <= 1
        # and of the nuclei split by the run's separation, F1 and PQ
        assert f"  at IoU 0.5 (watershed): F1 {table['f1'].mean():.4f}, precision" in printed
        assert f"  PQ {table['pq'].mean():.4f} (panoptic quality" in printed and scores["pq"] == table["pq"].mean()


def test_ids_that_differ_in_case_and_an_input_under_another_case_are_refused(tmp_path):
    """On a Mac's or Windows' disk Cell and cell are one file: their outputs would overwrite each other, and the mask
    Cell.png would overwrite the input Cell.PNG (a hard link stands in for such a disk here)."""
    with pytest.raises(UsageError, match="a/Cell.png and .*b/cell.png have one id, Cell / cell, for their outputs"):
        predict.image_ids([str(tmp_path / "a" / "Cell.png"), str(tmp_path / "b" / "cell.png")], str(tmp_path / "o"),
                          [False, False])
    image = write(tmp_path / "out" / "Cell.PNG", np.zeros((8, 8), np.uint8))
    assert predict.image_ids([image], str(tmp_path / "out"), [False]) == ["Cell"]  # another file on this disk
    os.link(image, tmp_path / "out" / "Cell.png")
    with pytest.raises(UsageError, match=f"--output {tmp_path / 'out'} would overwrite the input {image}"):
        predict.image_ids([image], str(tmp_path / "out"), [False])


def test_val_keeps_another_evaluation_s_default_folder(in_runs, tmp_path, capsys):
    """Two datasets whose folders end in the same name give one default output folder: the second evaluation is
    refused, not written over the first; the same evaluation again replaces its own. An image with another
    extension is named as left out."""
    for parent in ("a", "b"):
        shutil.copytree(os.path.join("inputs", "synthetic"), tmp_path / parent / "test")
    quiet = ["--no_overlays", "--device", "cpu"]
    try:
        shutil.copy(tmp_path / "a" / "test" / "images" / "syn_0000.png", tmp_path / "a" / "test" / "images" / "e.PNG")
        val.main(["--name", "p", "--dataset", str(tmp_path / "a" / "test"), *quiet])
        assert "note: 1 file is in" in capsys.readouterr().out  # e.PNG, left out as train.py says
        with open(os.path.join("outputs", "p_on_test", "evaluation.yml")) as f:
            held = yaml.safe_load(f)
        assert held.pop("settings")["tta"] is False
        assert {k: held[k] for k in ("run", "dataset", "split")} == {
            "run": "p", "dataset": os.path.realpath(tmp_path / "a" / "test"), "split": "every image"}
        with pytest.raises(UsageError, match=r"outputs/p_on_test holds the evaluation of run p \(every image of "
                                             r".*a/test\), not of run p \(every image of .*b/test\); give --output"):
            val.main(["--name", "p", "--dataset", str(tmp_path / "b" / "test"), *quiet])
        val.main(["--name", "p", "--dataset", str(tmp_path / "a" / "test"), "--tta", "--min_size", "3", *quiet])
        with open(os.path.join("outputs", "p_on_test", "evaluation.yml")) as f:  # replaced, with its new settings
            settings = yaml.safe_load(f)["settings"]
        assert settings["tta"] is True and settings["min_size"] == 3 and settings["prune"] is None
        assert settings["separation"] == "watershed" and settings["model"].startswith("epoch ")
        val.main(["--name", "p", "--dataset", str(tmp_path / "b" / "test"), "--output", str(tmp_path / "b_out"),
                  *quiet])
    finally:
        shutil.rmtree(os.path.join("outputs", "p_on_test"), ignore_errors=True)


def test_a_run_s_split_is_one_evaluation_wherever_its_dataset_lies(tmp_path):
    """A run's own split is identified by run and split (its dataset folder may move); run r's test split and the
    validation split of a run named r_test are two evaluations."""
    evaluation.write_evaluation_record(str(tmp_path), evaluation.evaluation_record("r", None, None, "/old/place"),
                                       {"tta": False}, {})
    evaluation.check_same_evaluation(str(tmp_path), evaluation.evaluation_record("r", "val", None, "/new/place"))
    evaluation.write_evaluation_record(str(tmp_path), evaluation.evaluation_record("r", "test", None, "/data"),
                                       {"tta": True}, {})
    with pytest.raises(UsageError, match=r"holds the evaluation of run r \(test split\), not of run r_test \(val "
                                         r"split\); give --output"):
        evaluation.check_same_evaluation(str(tmp_path), evaluation.evaluation_record("r_test", None, None, "/data"))


def test_an_evaluation_of_a_dataset_in_the_checkout_stays_one_when_the_checkout_moves(tmp_path, monkeypatch):
    """A checkout moved or copied elsewhere (inputs/ and outputs/ with it) that scores inputs/test again replaces its
    own evaluation, not refused as another dataset's; so does one whose evaluation.yml an older version wrote with
    the absolute path; a dataset of that name outside the checkout is still another evaluation."""
    for checkout in ("old", "new"):
        os.makedirs(tmp_path / checkout / "inputs" / "test")
    os.makedirs(tmp_path / "elsewhere" / "test")
    os.makedirs(tmp_path / "out")
    in_checkout = os.path.join("inputs", "test")
    monkeypatch.chdir(tmp_path / "old")
    evaluation.write_evaluation_record(str(tmp_path / "out"), evaluation.evaluation_record("r", None, "test",
                                                                                           in_checkout), {}, {})
    monkeypatch.chdir(tmp_path / "new")
    evaluation.check_same_evaluation(str(tmp_path / "out"), evaluation.evaluation_record("r", None, "test",
                                                                                         in_checkout))
    with pytest.raises(UsageError, match=r"holds the evaluation of run r \(every image of inputs/test\), not of run r "
                                         r"\(every image of .*elsewhere/test\)"):
        evaluation.check_same_evaluation(str(tmp_path / "out"), evaluation.evaluation_record(
            "r", None, "test", str(tmp_path / "elsewhere" / "test")))
    with open(tmp_path / "out" / "evaluation.yml", "w") as f:
        yaml.safe_dump({"run": "r", "split": "every image", "dataset": str(tmp_path / "new" / "inputs" / "test")}, f)
    evaluation.check_same_evaluation(str(tmp_path / "out"), evaluation.evaluation_record("r", None, "test",
                                                                                         in_checkout))


def test_val_names_the_scale_when_the_nuclei_are_far_from_the_training_size(in_runs, tmp_path, capsys):
    """pa learned (so its config.yml says) nuclei 3 px across: val.py prints the median diameter of the labelled
    nuclei it scored and the --scale that sizes them as in training; pc records no diameter and says nothing."""

    ids = split_ids(read_split(os.path.join("models", "pa", "split.csv")), "val")
    found = nucleus_diameter(os.path.join("inputs", "synthetic"), ids)
    assert found > 4.5  # far enough from 3 px for the hint
    val.main(["--name", "pa", "--output", str(tmp_path / "pa"), "--no_overlays", "--device", "cpu"])
    assert (f"nuclei here are {found:.0f} px across (median), the run learned 3 px: predict.py --scale "
            f"{3 / found:.2g} (or --scale auto)") in capsys.readouterr().out
    val.main(["--name", "pc", "--output", str(tmp_path / "pc"), "--no_overlays", "--device", "cpu"])
    assert "nuclei here are" not in capsys.readouterr().out


def load_bench(name):
    """bench/<name>.py as a module (its file name may clash with other modules on the path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(predict.__file__)), "bench", name + ".py")
    spec = importlib.util.spec_from_file_location("bench_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scale_scores_resized_images(in_runs, capsys):
    """bench/scale.py on the tiny crop-trained runs: every score in [0, 1]; --scale auto's column counts the images
    it rescaled; --dataset scores every image of another dataset."""
    result = load_bench("scale").main(["--name", "pc", "--factors", "1,2", "--limit", "2", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert [r["factor"] for r in result["rows"]] == [1.0, 2.0] and result["images"] == 2
    assert [r["scaled"]["scale"] for r in result["rows"]] == [1.0, 0.5] and result["trained_diameter"] > 0
    assert all(0 <= r[how][k] <= 1 for r in result["rows"] for how in ("as_is", "scaled", "read_off", "auto")
               for k in ("iou", "iou_mean", "dsb"))
    assert all(0 <= r["auto"]["rescaled"] <= 2 for r in result["rows"])
    assert sum(k["images"] for k in result["rows"][0]["auto"]["by_kind"].values()) == 2
    every = load_bench("scale").main(["--name", "pa", "--factors", "1", "--limit", "0", "--dataset", "synthetic",
                                      "--device", "cpu"])
    assert every["images"] == 8 and every["trained_diameter"] == 3.0
    with pytest.raises(UsageError, match="crop-trained"):
        load_bench("scale").main(["--name", "p"])


def test_bench_prune_runs_on_a_tiny_run(in_runs, capsys, tmp_path, monkeypatch):
    """Every L's figures, and its scores are val.py --prune L's."""
    bench_prune = load_bench("prune")
    bench_prune.main(["--name", "p", "--repeats", "1", "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = json.loads(last)["rows"]
    assert [r["prune"] for r in rows] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and 0 <= r["iou"] <= 1 for r in rows)
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"] < rows[3]["params"]
    assert rows[3]["params"] == 9_163_329  # the whole trained network, BatchNorm included (as docs/results.md)
    scored = val.main(["--name", "p", "--prune", "2", "--output", str(tmp_path / "p2"), "--no_overlays",
                       "--device", "cpu"])
    assert rows[1]["iou"] == round(scored["iou"], 4) and rows[1]["dice"] == round(scored["dice"], 4)
    autocast = []  # the timed passes run in the precision the table names

    def recording_forward(*args, **kwargs):
        # torch 2.4 took the device here; torch.is_autocast_cpu_enabled() before (deprecated since)
        autocast.append(torch.is_autocast_enabled("cpu") if torch.__version__ >= "2.4" else
                        torch.is_autocast_cpu_enabled())
        return predict_forward(*args, **kwargs)

    predict_forward = bench_prune.forward
    monkeypatch.setattr(bench_prune, "forward", recording_forward)
    bench_prune.main(["--name", "p", "--repeats", "1", "--device", "cpu", "--amp", "bf16"])
    assert "bf16 autocast" in capsys.readouterr().out and autocast and all(autocast)
    with pytest.raises(UsageError, match="deep supervision"):
        bench_prune.main(["--name", "u"])


def test_a_broken_link_among_the_inputs_is_no_crash_of_the_overwrite_check(tmp_path):
    """os.path.samefile raised FileNotFoundError for a broken link whose output name already existed."""
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "x.png").write_bytes(b"an earlier mask")
    os.symlink(tmp_path / "gone.png", tmp_path / "x.png")
    assert predict.image_ids([str(tmp_path / "x.png")], str(tmp_path / "out"), [False]) == ["x"]


def test_a_two_class_run_names_the_class_of_its_foreground_line(in_runs, tmp_path, capsys):
    """The summary's foreground share is class 0's (the nuclei): with several classes the line says so."""
    cfg = yaml.safe_load(open(os.path.join("models", "p", "config.yml")))
    os.makedirs(os.path.join("models", "two"), exist_ok=True)
    with open(os.path.join("models", "two", "config.yml"), "w") as f:
        yaml.safe_dump({**cfg, "name": "two", "num_classes": 2}, f)
    torch.save(build_model(cfg["arch"], 2, 3, cfg["deep_supervision"]).state_dict(),
               os.path.join("models", "two", "model.pth"))
    image = write(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    try:
        predict.main(["--name", "two", "--input", image, "--output", str(tmp_path / "out"), "--device", "cpu"])
        assert "mean foreground of class 0 " in capsys.readouterr().out
        assert sorted(os.listdir(tmp_path / "out")) == ["a_class0.png", "a_class1.png", "prediction.yml"]
        predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "one"), "--device", "cpu"])
        out = capsys.readouterr().out
        assert "mean foreground " in out and "of class 0" not in out
    finally:
        shutil.rmtree(os.path.join("models", "two"))


def test_objects_tables_of_many_images_are_merged_as_they_come(tmp_path, monkeypatch):
    """--instances over tens of thousands of images: the objects table of each image, a DataFrame ten times the bytes
    of its rows, is merged with the others every MERGED_TABLES images instead of all being held until the end; the
    rows of objects.csv stay those of every image, in order."""
    class TwoNuclei:  # stands in for inference.Predictor: two square nuclei in every image
        scale = 1.0

        def as_input(self, image):
            return image_to_float(image, 3)

        def predict(self, image):
            prob = np.zeros((1, 16, 16), np.float32)
            prob[0, 2:6, 2:6] = prob[0, 9:14, 9:14] = 1
            return prob

    files = [write(tmp_path / "in" / f"i{k:02d}.png", np.zeros((16, 16, 3), np.uint8)) for k in range(12)]
    ids = [f"i{k:02d}" for k in range(12)]
    held, most = [], [0]

    def object_rows(*args):
        most[0] = max(most[0], sum(table() is not None for table in held))
        table = rows(*args)
        held.append(weakref.ref(table))
        return table

    rows = measurements.object_rows
    monkeypatch.setattr(predict, "object_rows", object_rows)
    monkeypatch.setattr(plane_outputs, "MERGED_TABLES", 4, raising=False)
    # the jobs of each image run at once, so that a table is held only when predict_all keeps it
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    os.makedirs(tmp_path / "out")
    _, table, *_ = predict.predict_all(TwoNuclei(), files, ids, predict.tiff_headers(files), str(tmp_path / "out"), 1,
                                       0.5, separation="cc", filters=dict(min_size=0, min_confidence=0))
    assert table["image"].tolist() == [i for i in ids for _ in range(2)]
    assert table["area"].tolist() == [16, 25] * 12
    assert most[0] < 4


@pytest.mark.parametrize("unit", [1 / 255, 1e-6 / 255])
def test_a_float_image_s_intensities_keep_their_digits_in_objects_csv(in_runs, tmp_path, unit):
    """A float TIFF in [0, 1], or in far smaller units (4 decimals would write 0 for every nucleus): its nuclei's
    mean and integrated intensity to 6 significant digits, from the image as read over each nucleus of
    <id>_instances.png."""
    image = (sample_bgr(48, 40)[:, :, 0] * unit).astype(np.float32)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "f.tif", image)
    predict.main(["--name", "p", "--input", str(tmp_path / "in" / "f.tif"), "--output", str(tmp_path / "out"),
                  "--instances", "--min_confidence", "0", "--device", "cpu"])
    table = pd.read_csv(tmp_path / "out" / "objects.csv")
    labels = read(tmp_path / "out" / "f_instances.png")
    assert len(table) > 0
    for row in table.itertuples():
        pixels = image[labels == row.label].astype(np.float64)
        assert row.mean_intensity == pytest.approx(pixels.mean(), rel=1e-5), row
        assert row.integrated_intensity == pytest.approx(pixels.sum(), rel=1e-5), row


def test_objects_csv_measures_each_nucleus_in_the_image_as_read(tmp_path):
    """objects.csv's intensity (of the file as read: 16-bit values, a colour image's grey value as OpenCV converts
    it, a stack's own plane), shape and confidence (the mean probability) of each nucleus, against numpy computed
    on each one's pixels; the grey and colour images of one run get the same columns, none empty but
    the micrometres (no pixel size)."""
    yy, xx = np.mgrid[:64, :64]
    shapes = np.zeros((64, 64), np.int32)
    shapes[(yy - 16) ** 2 + (xx - 16) ** 2 <= 64] = 1  # a disc (numbered in raster order, as --separation cc does)
    shapes[30:40, 40:50] = 2
    shapes[30:32, 44:46] = 0  # a notch in the 10 x 10 square, whose convex hull stays the square: solidity 0.96
    shapes[50:55, 5:25] = 3  # a 5 x 20 rectangle: perimeter 2 * (4 + 19) through the outer pixels' centres
    rng = np.random.default_rng(0)
    prob = np.where(shapes > 0, rng.uniform(0.55, 1.0, shapes.shape), 0).astype(np.float32)

    class Known:  # stands in for inference.Predictor: these nuclei, with these probabilities, in every image
        scale = 1.0

        def as_input(self, image):
            return image_to_float(image, 3)

        def predict(self, image):
            return prob[None]

    grey = rng.integers(0, 65536, (64, 64)).astype(np.uint16)
    grey[shapes == 1] = 1000
    rgb = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    files = [write(tmp_path / "in" / "grey.png", grey), write(tmp_path / "in" / "rgb.png", rgb[..., ::-1])]
    tifffile.imwrite(tmp_path / "in" / "stack.tif", np.stack([grey // 2, grey]), imagej=True, metadata={"axes": "TYX"})
    files.append(str(tmp_path / "in" / "stack.tif"))
    os.makedirs(tmp_path / "out")
    _, table, *_ = predict.predict_all(Known(), files, ["grey", "rgb", "stack"], predict.tiff_headers(files),
                                       str(tmp_path / "out"), 1, 0.5, separation="cc",
                                       filters=dict(min_size=0, min_confidence=0))
    in_micrometres = table.filter(like="_um")  # no pixel size: PNGs and an uncalibrated stack
    assert list(table.columns) == measurements.OBJECT_COLUMNS and in_micrometres.isna().all().all()
    assert not table.drop(columns=in_micrometres.columns).isna().any().any()
    assert table[["image", "plane"]].drop_duplicates().values.tolist() == [["grey", 0], ["rgb", 0], ["stack", 0],
                                                                           ["stack", 1]]
    values = {("grey", 0): grey, ("rgb", 0): cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2GRAY),
              ("stack", 0): grey // 2, ("stack", 1): grey}
    for row in table.itertuples():
        nucleus = shapes == row.label
        ys, xs = np.nonzero(nucleus)
        small, large = np.linalg.eigvalsh(np.cov([ys, xs], bias=True))
        pixels = values[row.image, row.plane][nucleus].astype(np.float64)
        assert row.area == nucleus.sum()
        assert row.mean_intensity == pytest.approx(pixels.mean(), rel=1e-5)
        assert row.integrated_intensity == pytest.approx(pixels.sum(), rel=1e-5)
        assert row.confidence == pytest.approx(prob[nucleus].mean(), rel=1e-5)
        assert row.major_axis_length == pytest.approx(4 * np.sqrt(large), rel=1e-6)
        assert row.minor_axis_length == pytest.approx(4 * np.sqrt(small), rel=1e-6)
        assert row.eccentricity == pytest.approx(np.sqrt(1 - small / large), abs=1e-6)
    disc, notched, rectangle = (table[(table["image"] == "grey") & (table["label"] == k)].iloc[0] for k in (1, 2, 3))
    assert (disc["mean_intensity"], disc["integrated_intensity"]) == (1000, 1000 * disc["area"])
    assert disc["eccentricity"] < 1e-6 and disc["perimeter"] == pytest.approx(2 * np.pi * 8, rel=0.1)
    assert (rectangle["perimeter"], rectangle["solidity"]) == (46, 1)
    assert notched["solidity"] == pytest.approx(96 / 100)


def calibrated_tiffs(folder, plane):
    """TIFFs of the 2D ``plane`` (uint8 [H, W]) in ``folder``, each with a calibration as a microscope's software
    writes it. Returns {file name: the pixel size in micrometres that it gives, None for none}."""
    stack = np.stack([plane, plane[::-1]])
    tifffile.imwrite(folder / "imagej.tif", stack, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"axes": "TYX", "unit": "micron"})
    tifffile.imwrite(folder / "fiji_um.tif", plane, imagej=True, resolution=(1 / 0.4, 1 / 0.4),
                     metadata={"unit": "\\u00B5m"})  # Fiji's micrometre, escaped as ImageJ writes it
    tifffile.imwrite(folder / "imagej_cm.tif", plane, imagej=True, resolution=(2e4, 2e4),  # 20000 px per cm
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(folder / "ome.tif", plane, ome=True, metadata={  # in nm; PhysicalSizeY in the default um
        "axes": "YX", "PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.65})
    tifffile.imwrite(folder / "non_square.tif", stack, imagej=True, resolution=(1 / 0.3, 1 / 0.4),
                     metadata={"axes": "TYX", "unit": "um"})
    tifffile.imwrite(folder / "ome_pixels.tif", plane, ome=True, metadata={  # an unknown unit of length
        "axes": "YX", "PhysicalSizeX": 1, "PhysicalSizeXUnit": "pc", "PhysicalSizeY": 1, "PhysicalSizeYUnit": "pc"})
    tifffile.imwrite(folder / "print.tif", plane, resolution=(72, 72), resolutionunit="INCH")  # no ImageJ or OME
    tifffile.imwrite(folder / "imagej_print.tif", plane, imagej=True, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(folder / "uncalibrated.tif", stack, imagej=True, metadata={"axes": "TYX"})
    return {"imagej.tif": 0.325, "fiji_um.tif": 0.4, "imagej_cm.tif": 0.5, "ome.tif": 0.65, "non_square.tif": None,
            "ome_pixels.tif": None, "print.tif": None, "imagej_print.tif": None, "uncalibrated.tif": None}


def test_a_tiff_s_pixel_size_is_read_from_its_imagej_or_ome_calibration_and_never_guessed(tmp_path):
    """ImageJ's unit (or its ResolutionUnit) and OME's PhysicalSizeX/Y with their units give the pixel size in
    micrometres; non-square pixels or an unknown unit give none and a problem to name; a plain TIFF's resolution (a
    print resolution, 72 dpi; also in an ImageJ TIFF without ImageJ's unit, 353 um pixels before) and an
    uncalibrated ImageJ TIFF give none and no problem."""
    expected = calibrated_tiffs(tmp_path, np.zeros((16, 16), np.uint8))
    headers = {name: image_files.tiff_header(str(tmp_path / name)) for name in expected}
    assert {name: header.pixel_size and round(header.pixel_size, 9) for name, header in headers.items()} == expected
    assert headers["imagej.tif"].plane_axes == "T"  # the rest of the header as it was
    assert headers["non_square.tif"].pixel_size_problem == "non-square pixels (0.3 x 0.4 um)"
    assert headers["ome_pixels.tif"].pixel_size_problem == "unknown unit of length 'pc'"
    assert [name for name, header in headers.items() if header.pixel_size_problem] == ["non_square.tif",
                                                                                      "ome_pixels.tif"]
    # sizes that are no size leave the rest of the header as it was: without its axes a stack's planes would each
    # write <id>.png over the one before
    for name, size in (("tiny.tif", 1e-9), ("listed.tif", "1,5")):
        tifffile.imwrite(tmp_path / name, np.zeros((2, 16, 16), np.uint8), ome=True,
                         metadata={"axes": "TYX", "PhysicalSizeX": size, "PhysicalSizeY": size})
        header = image_files.tiff_header(str(tmp_path / name))
        assert (header.plane_axes, header.pixel_size) == ("T", None) and header.pixel_size_problem.startswith(
            "pixel size"), header


def test_objects_and_images_csv_give_micrometres_from_the_pixel_size_and_the_stacks_carry_it(tmp_path, monkeypatch,
                                                                                              capsys):
    """objects.csv's _um columns are its pixel columns times the pixel size (squared for the area), measured here
    again on <id>_instances; images.csv gives the pixel size too; both are empty without one (a PNG, non-square
    pixels, which get a warning naming the file). The TIFF stacks written carry the calibration, so Fiji measures in
    micrometres. --pixel_size replaces every image's own."""
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    yy, xx = np.mgrid[:48, :48]
    plane = np.zeros((48, 48), np.uint8)
    for y, x, r in ((10, 10, 4), (12, 32, 6), (34, 18, 3), (36, 38, 5)):
        plane[(yy - y) ** 2 + ((xx - x) / 1.5) ** 2 <= r * r] = 255  # ellipses: the two axes differ
    (tmp_path / "in").mkdir()
    expected = calibrated_tiffs(tmp_path / "in", plane)
    write(tmp_path / "in" / "plain.png", plane)
    expected = {os.path.splitext(name)[0]: size for name, size in {**expected, "plain.png": None}.items()}
    argv = ["--name", "nuclei", "--input", str(tmp_path / "in"), "--device", "cpu", "--instances", "--separation",
            "cc", "--min_confidence", "0"]
    kept = dict(dtype={"image": str}, keep_default_na=False, na_values=[""])
    for flag, out in (([], tmp_path / "out"), (["--pixel_size", "0.25"], tmp_path / "flag")):
        predict.main([*argv, "--output", str(out), *flag])
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
        objects, images = (pd.read_csv(out / name, **kept) for name in ("objects.csv", "images.csv"))
        assert list(objects.columns) == measurements.OBJECT_COLUMNS
        assert list(images.columns) == [*measurements.IMAGE_COLUMNS, "mean_area_um2", "median_area_um2"]
        assert set(objects["image"]) == set(expected) and (objects.groupby("image").size() >= 4).all()
        sizes = expected if not flag else dict.fromkeys(expected, 0.25)
        for row in images.itertuples():
            assert row.pixel_size_um == pytest.approx(sizes[row.image]) if sizes[row.image] else \
                np.isnan(row.pixel_size_um), row
            areas = objects.loc[(objects["image"] == row.image) & (objects["plane"] == row.plane), "area_um2"]
            for column, value in (("mean_area_um2", areas.mean()), ("median_area_um2", areas.median())):
                assert getattr(row, column) == pytest.approx(value, rel=1e-5) if sizes[row.image] else \
                    np.isnan(getattr(row, column)), (column, row)
        for row in objects.itertuples():
            size = sizes[row.image]
            stack = out / f"{row.image}_instances.tif"
            labels = tifffile.imread(stack)[row.plane] if stack.exists() else read(out / f"{row.image}_instances.png")
            nucleus = labels == row.label
            ys, xs = np.nonzero(nucleus)
            small, large = np.linalg.eigvalsh(np.cov([ys, xs], bias=True))
            in_pixels = dict(area_um2=nucleus.sum(), perimeter_um=perimeter(nucleus),
                             major_axis_length_um=4 * np.sqrt(large), minor_axis_length_um=4 * np.sqrt(small))
            for column, value in in_pixels.items():
                if size is None:
                    assert np.isnan(getattr(row, column)) and np.isnan(row.pixel_size_um), row
                else:
                    power = 2 if column == "area_um2" else 1
                    assert getattr(row, column) == pytest.approx(value * size ** power, abs=0.005), (column, row)
                    assert row.pixel_size_um == pytest.approx(size)
        for name in ("imagej", "non_square", "uncalibrated"):
            with tifffile.TiffFile(out / f"{name}_instances.tif") as tif:
                resolution, unit = tif.pages.first.resolution, tif.imagej_metadata.get("unit")
            if sizes[name]:
                assert (unit, resolution) == ("um", pytest.approx((1 / sizes[name],) * 2)), name
                assert image_files.tiff_header(str(out / f"{name}_instances.tif")).pixel_size == \
                    pytest.approx(sizes[name])
            else:
                assert unit is None and resolution == (1, 1), name
        if flag:
            assert warnings == []
        else:
            # one line for every such file: a folder of a thousand of them gives one line, not a thousand
            assert warnings == [f"warning: {tmp_path / 'in' / 'non_square.tif'}: non-square pixels (0.3 x 0.4 um): no "
                                f"pixel size read (also 1 more file: {tmp_path / 'in' / 'ome_pixels.tif'}), their _um "
                                "columns are left empty; give --pixel_size UM"]


def test_a_pixel_size_that_nothing_written_uses_gets_a_note(in_runs, tmp_path, monkeypatch, capsys):
    """--pixel_size reaches --instances' tables and the TIFF stacks written: for 2D images without --instances it
    changes no file, which predict.py says (it said nothing); with --instances, or a stack to calibrate, no note."""
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    image = write(tmp_path / "in" / "a.png", sample_bgr(32, 32)[..., 0])
    stack = str(tmp_path / "stacks" / "s.tif")
    os.makedirs(os.path.dirname(stack))
    tifffile.imwrite(stack, np.stack([sample_bgr(32, 32)[..., 0]] * 2), imagej=True, metadata={"axes": "TYX"})
    note = "note: --pixel_size 0.5: for --instances' objects.csv and images.csv and the calibration of the TIFF " \
        "stacks written, and none of these inputs is a stack; no effect here (add --instances)"
    for key, inputs, extra in (("plain", [image], []), ("flag", [image], ["--pixel_size", "0.5"]),
                               ("instances", [image], ["--pixel_size", "0.5", "--instances", "--separation", "cc"]),
                               ("stack", [image, stack], ["--pixel_size", "0.5"])):
        predict.main(["--name", "nuclei", "--input", *inputs, "--output", str(tmp_path / key), "--device", "cpu",
                      *extra])
        assert (note in capsys.readouterr().out) == (key == "flag"), key
    assert read(tmp_path / "flag" / "a.png").tobytes() == read(tmp_path / "plain" / "a.png").tobytes()
    with tifffile.TiffFile(tmp_path / "stack" / "s.tif") as tif:  # the mask stack
        assert tif.pages.first.resolution == pytest.approx((2, 2))  # the stack written carries it


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "inf", "1e-9", "1e9"])
def test_a_pixel_size_that_is_no_size_is_refused_naming_the_flag(tmp_path, value, capsys):
    image = write(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(SystemExit) as stop:
        run_cli(predict.main, ["--name", "nuclei", "--input", image, "--output", str(tmp_path / "out"),
                               f"--pixel_size={value}"])
    message = capsys.readouterr().err
    assert stop.value.code != 0 and len(message.splitlines()) == 1 and "Traceback" not in message
    assert f"error: --pixel_size {float(value):g} must be micrometres per pixel between 1e-06 and 1e+06" in message
    assert not (tmp_path / "out").exists()


def test_stitch_z_says_how_to_mark_the_z_planes_of_pages_without_axes(tmp_path):
    # a z-stack saved from numpy without ImageJ or OME metadata (5 pages: 3 or 4 are read as colours): tifffile's
    # axes QYX (shaped) or IYX (none)
    tifffile.imwrite(tmp_path / "shaped.tif", np.zeros((5, 16, 16), np.uint8))
    tifffile.imwrite(tmp_path / "bare.tif", np.zeros((5, 16, 16), np.uint8), metadata=None)
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((2, 16, 16), np.uint8), imagej=True, metadata={"axes": "TYX"})
    files = [str(tmp_path / name) for name in ("shaped.tif", "bare.tif", "movie.tif")]
    flat, unmarked = predict_notes.stitch_notes(files, [image_files.tiff_header(f) for f in files], 0.5)
    assert "movie.tif has none" in flat and "shaped.tif" not in flat and "bare.tif" not in flat
    assert f"the pages of {files[1]}, {files[0]} have no axes" in unmarked
    assert "metadata={'axes': 'ZYX'}" in unmarked


def test_stitch_z_says_a_stack_of_z_planes_in_another_order_has_them(tmp_path):
    # an OME-TIFF of DimensionOrder XYTZC: tifffile's axes ZTYX, its z planes apart; predicted as one T axis, unlinked
    tifffile.imwrite(tmp_path / "zt.ome.tif", np.zeros((3, 2, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "ZTYX"})
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((2, 16, 16), np.uint8), imagej=True, metadata={"axes": "TYX"})
    files = [str(tmp_path / "zt.ome.tif"), str(tmp_path / "movie.tif")]
    flat, shuffled = predict_notes.stitch_notes(files, [image_files.tiff_header(f) for f in files], 0.5)
    assert "movie.tif has none" in flat and "zt.ome.tif" not in flat
    assert "zt.ome.tif (axes ZT) has them in another order" in shuffled
    assert predict_notes.stitch_notes(files, [image_files.tiff_header(f) for f in files], None) == []
