"""Tests for predict.py on TIFF stacks: each plane predicted and written into its page as it comes (also out of
order), a stack stopped or left out midway leaving no file of it, stacks read page by page in the memory of one page,
the axes read from ImageJ and OME metadata (and the notes where there are none), and the nuclei linked through z
planes (--stitch_z) and time points (--track).

They use conftest's tiny runs (the ``runs`` fixture: one NestedUNet trained once, and copies of it).
"""
import contextlib
import errno
import functools
import os
import re
import subprocess
import sys
import weakref

import cv2
import numpy as np
import pandas as pd
import psutil
import pytest
import tifffile
from matplotlib.path import Path
from roifile import roiread

import checkpoints
import ensemble
import files
import image_files
import inference
import plane_outputs
import predict
import predict_notes
import utils
from conftest import (ROOT, STACK_OUTPUTS, Pointwise, interrupted, movie, read_image, read_record, sample_bgr,
                      stack_flags, write_image)
from image_files import image_to_float
from instances import link_planes
from utils import DataError, UsageError


class StandIn:
    """Stands in for inference.Predictor in predict.predict_all: counts its calls, and gives each call's
    probabilities [1, H, W] from :meth:`plane` (``call`` from 1)."""
    scale = 1.0

    def __init__(self):
        self.calls = 0

    def as_input(self, image):
        return image_to_float(image, 3)

    def predict(self, image):
        self.calls += 1
        return self.plane(image, self.calls)

    def plane(self, image, call):
        raise NotImplementedError


def square_nucleus(image):
    """Probabilities [1, H, W] of the size of ``image`` [H, W, C]: one 4x4 nucleus at rows and columns 2-5."""
    prob = np.zeros((1,) + image.shape[:2], np.float32)
    prob[0, 2:6, 2:6] = 1
    return prob


def test_stacks_are_predicted_plane_by_plane(in_runs, tmp_path, capsys, monkeypatch):
    """A TIFF stack (16-bit, three time points) gives TIFF stacks whose pages are what each plane, saved as an image
    of its own, gives; objects.csv numbers the planes. Two stacks written with a flush of the threads after every
    plane give the same."""

    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    stack = np.stack([grey * 180, grey[::-1] * 90 + 7, grey[:, ::-1] * 250])  # each plane scaled on its own
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "movie.tif", stack, imagej=True, metadata={"axes": "TYX"})
    for t, plane in enumerate(stack):
        write_image(tmp_path / "single" / f"t{t}.png", plane)
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
            expected = read_image(tmp_path / "one_by_one" / f"t{t}{suffix}.png")
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
    other = write_image(tmp_path / "in" / "other.png", sample_bgr(40, 36))
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
    image = write_image(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    planes = np.stack([np.roll(grey, 4 * k, axis=0) * (60 + 20 * k) for k in range(6)]).reshape(2, 3, 40, 36)
    tifffile.imwrite(tmp_path / "in" / "tz.tif", planes, imagej=True, metadata={"axes": "TZYX"})
    out = tmp_path / "out"
    predict.main(["--input", image, str(tmp_path / "in" / "tz.tif"), "--output", str(out), "--name", "pc", "--rois",
                  "--min_confidence", "0", "--device", "cpu", "--amp", "fp32"])
    objects = pd.read_csv(out / "objects.csv")
    flat = roiread(out / "flat_rois.zip")
    labels = read_image(out / "flat_instances.png")
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


def predicted_as_they_are_and_linked(tmp_path, capsys, monkeypatch, flags, linking):
    """predict.py with ``flags`` and the Pointwise network (the barely trained one's nucleus fills a plane: a pixel's
    own is no better), into tmp_path/own as it is and into tmp_path/linked with ``linking`` (--stitch_z or --track
    and an IoU); returns what the second printed."""
    load_run = checkpoints.load_run  # as predict.py loads its runs (ensemble.load_models)
    monkeypatch.setattr(ensemble, "load_run", lambda *args: (load_run(*args)[0], Pointwise()))
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
    write_image(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
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
    write_image(tmp_path / "in" / "flat.png", sample_bgr(40, 36))
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
    class Moving(StandIn):  # two nuclei, moved past their place of the plane before
        def plane(self, image, call):
            x = 3 * (call - 1)
            prob = np.zeros((1, 16, 16), np.float32)
            prob[0, 2:4, x:x + 2] = prob[0, 8:10, x:x + 2] = 1
            return prob

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "zs.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": axes})
    files = [str(tmp_path / "in" / "zs.tif"), write_image(tmp_path / "in" / "after.png", np.zeros((16, 16), np.uint8))]
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
    image = write_image(tmp_path / "in" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(UsageError, match=re.escape(message)):
        predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "out"), *flags])


def test_a_stack_left_out_at_a_later_plane_leaves_no_rows(tmp_path):
    """A stack whose second plane does not fit the memory available (--scale auto may enlarge one plane 4 times and
    not the others) is left out whole: its first plane is no row of images.csv or objects.csv, and no stack of it is
    written; the image after it is predicted. Left out alone, it is the error that names it."""
    class SecondTooLarge(StandIn):  # a square nucleus; the second image predicted too large
        def plane(self, image, call):
            if call == 2:
                raise DataError("a 64x64 image needs 9.00 GiB in windows")
            return square_nucleus(image)

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "movie.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": "TYX"})
    files = [str(tmp_path / "in" / "movie.tif"),
             write_image(tmp_path / "in" / "after.png", np.zeros((16, 16), np.uint8))]
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


class SquareNuclei(StandIn):
    """A square nucleus in every plane; notes whether ``path`` is open at each call; raises ``error`` at call ``at``."""

    def __init__(self, path, error=None, at=0):
        super().__init__()
        self.path, self.error, self.at, self.open = path, error, at, []

    def plane(self, image, call):
        self.open.append(open_count(self.path))
        if self.error is not None and call == self.at:
            raise self.error
        return square_nucleus(image)


def nan_movie_and_after(folder, after_shape):
    """In ``folder``/in: movie.tif, a float time-lapse of 4 planes of 16x16 (a 5x5 nucleus each) whose third plane
    holds a NaN, and after.png, a black image of ``after_shape``; makes ``folder``/out. Returns their two paths."""
    stack = np.zeros((4, 16, 16), np.float32)
    stack[:, 4:9, 4:9], stack[2, 0, 0] = 1, np.nan
    (folder / "in").mkdir()
    path = str(folder / "in" / "movie.tif")
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX"})
    os.makedirs(folder / "out")
    return [path, write_image(folder / "in" / "after.png", np.zeros(after_shape, np.uint8))]


def test_a_stack_a_job_left_out_is_read_no_further_and_left_out_once(tmp_path, monkeypatch):
    """A stack whose first plane holds more nuclei than 16 bits hold is left out by its job as the prediction goes
    on (the jobs run after each plane here, as after 256 MB of planes): its later planes are not predicted for
    nothing, and its third plane, which holds NaN, does not count it as a second file left out."""
    real = predict.split_instances
    monkeypatch.setattr(predict, "split_instances", lambda prob, *args, **kwargs: np.full_like(
        real(prob, *args, **kwargs), 70000) if prob.shape == (16, 16) else real(prob, *args, **kwargs))
    monkeypatch.setattr(predict, "BatchedThreads", functools.partial(utils.BatchedThreads, buffer_mb=0))
    files = nan_movie_and_after(tmp_path, (16, 20))
    path = files[0]
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
    files = nan_movie_and_after(tmp_path, (16, 16))
    path = files[0]
    with pytest.raises(DataError) as whole:
        image_files.select_channel(image_files.decode_planes(path)[0], None, path)
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
