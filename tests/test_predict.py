"""Tests for predict.py: odd sizes and formats, instances, --scale, --resume, prediction.yml, the notes on its inputs,
--prune and the error messages (its TIFF stacks: test_predict_stacks.py; its tables: test_measurements.py).

Most use conftest's tiny runs (the ``runs`` fixture: one NestedUNet + deep supervision trained once, and copies).
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from argparse import Namespace
from datetime import datetime, timezone

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from PIL import Image

import checkpoints
import evaluation
import finished_images
import inference
import measurements
import predict
import predict_notes
import utils
import val
from archs import build_model
from conftest import (ROOT, held_by_another_process, interrupted, movie, read_image, read_record, sample_bgr,
                      stack_flags, write_image)
from layouts import nucleus_diameter
from splits import read_split, split_ids
from image_files import decode_image, image_to_float
from instances import split_instances
from utils import DataError, UsageError, run_cli


def test_odd_sizes_and_formats_keep_their_size(in_runs, tmp_path, capsys):
    folder = tmp_path / "images"
    write_image(folder / "grey.png", sample_bgr(519, 161)[:, :, 0])
    rgba = np.dstack([sample_bgr(64, 48), np.full((64, 48), 200, np.uint8)])
    write_image(folder / "rgba.PNG", rgba)
    write_image(folder / "deep.tif", sample_bgr(50, 70)[:, :, 0].astype(np.uint16) * 180)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image extension
    extra = write_image(tmp_path / "other" / "photo.JPG", sample_bgr(40, 36))
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
    # nothing found: nothing dropped
    blank = write_image(tmp_path / "blank" / "blank.png", np.zeros((40, 36), np.uint8))
    predict.main(["--name", "p", "--input", blank, "--output", str(tmp_path / "none"), "--instances", "--device",
                  "cpu", "--threshold", "0.99"])
    summary = capsys.readouterr().out
    assert ("mean foreground 0.0%, 0 objects (watershed) in objects.csv; a row per image in images.csv (1 with no "
            "nuclei); files") in summary, summary
    sizes = {"grey": (519, 161), "rgba": (64, 48), "deep": (50, 70), "photo": (40, 36)}
    table = pd.read_csv(out / "objects.csv")
    assert list(table.columns) == measurements.OBJECT_COLUMNS
    for img_id, shape in sizes.items():
        mask = read_image(out / f"{img_id}.png")
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        prob = read_image(out / f"{img_id}_prob.png")
        assert prob.shape == shape and prob.dtype == np.uint8
        assert np.all(mask[prob >= 129] == 255) and np.all(mask[prob <= 127] == 0)
        labels = read_image(out / f"{img_id}_instances.png")
        assert labels.shape == shape and labels.dtype == np.uint16
        assert np.all(mask[labels > 0] == 255)  # objects lie in the mask (those below min_size are dropped)
        assert read_image(out / f"{img_id}_overlay.png").shape == shape + (3,)
        rows = table[table["image"] == img_id]
        assert sorted(rows["label"].tolist()) == list(range(1, int(labels.max()) + 1))
        for row in rows.itertuples():
            assert row.area == int((labels == row.label).sum())
            assert 0 <= row.bbox_min_y < row.bbox_max_y <= shape[0] and 0 <= row.bbox_min_x < row.bbox_max_x <= shape[1]
    assert not (out / "notes.png").exists()


def resume_inputs(folder):
    """Three 2D images and a 4-plane time-lapse between them (list_images' order: a, b, movie, z); their paths."""
    paths = [write_image(folder / f"{n}.png", np.roll(sample_bgr(40, 36), 5 * i, axis=0)) for i, n in enumerate("ab")]
    return [*paths, movie(folder, planes=4), write_image(folder / "z.png", sample_bgr(36, 40))]


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
    source = write_image(tmp_path / "NA.png", np.zeros((30, 30), np.uint8))
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
    sources = {n: write_image(tmp_path / f"{n}.png", np.zeros((30, 30), np.uint8)) for n in "ab"}
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
    write_image(paths[0], sample_bgr(40, 36)[::-1])  # a is another image now
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
    write_image(paths[0], sample_bgr(40, 36)[::-1])  # a is another image now
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


def test_channel_picks_the_nucleus_channel(in_runs, tmp_path):
    """--channel K predicts channel K of a multi-channel TIFF stack or of an RGB image as the grey image alone."""

    nuclei = sample_bgr(40, 36)[:, :, 0].astype(np.uint16) * 200
    noise = np.random.default_rng(0).integers(0, 60000, nuclei.shape, dtype=np.uint16)
    stack = np.stack([np.stack([noise, nuclei]), np.stack([noise[::-1], nuclei[::-1]])])  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "two.tif", stack, ome=True, metadata={"axes": "ZCYX"})
    rgb_nuclei = sample_bgr(40, 36)[:, :, 0]
    write_image(tmp_path / "rgb.png", np.dstack([rgb_nuclei, rgb_nuclei // 3, rgb_nuclei // 2]))  # BGR: nuclei in blue
    write_image(tmp_path / "alone" / "z0.png", nuclei)
    write_image(tmp_path / "alone" / "z1.png", nuclei[::-1])
    write_image(tmp_path / "alone" / "blue.png", rgb_nuclei)
    flags = ["--name", "pc", "--device", "cpu", "--amp", "fp32"]
    predict.main(["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "out"), "--channel", "1", *flags])
    predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "2", *flags])
    predict.main(["--input", str(tmp_path / "alone" / "z0.png"), "--output", str(tmp_path / "grey_out"), "--channel",
                  "1", *flags])  # a grey image is its own nucleus channel
    predict.main(["--input", str(tmp_path / "alone"), "--output", str(tmp_path / "alone_out"), *flags])
    pages = tifffile.imread(tmp_path / "out" / "two.tif")
    np.testing.assert_array_equal(pages[0], read_image(tmp_path / "alone_out" / "z0.png"))
    np.testing.assert_array_equal(pages[1], read_image(tmp_path / "alone_out" / "z1.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "rgb.png"),
                                  read_image(tmp_path / "alone_out" / "blue.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "grey_out" / "z0.png"),
                                  read_image(tmp_path / "alone_out" / "z0.png"))
    with pytest.raises(DataError, match="two.tif has 2 channels.*--channel"):
        predict.main(["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "out"), *flags])
    with pytest.raises(DataError, match="--channel 3: image .*rgb.png has 3 channels"):
        predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "3",
                      *flags])
    with pytest.raises(UsageError, match="--channel -1"):
        predict.main(["--input", str(tmp_path / "rgb.png"), "--output", str(tmp_path / "out"), "--channel", "-1",
                      *flags])


def test_channel_on_grey_images_gets_a_note(in_runs, tmp_path, capsys):
    """--channel K on inputs that are all grey (a 16-bit PNG, an 8-bit JPEG, a grey TIFF, an indexed PNG with a LUT)
    picks nothing: a note says so, and neither the summary line nor prediction.yml names a channel; one colour image
    among them: no note, and both name it."""
    grey = sample_bgr(40, 36)[:, :, 0]
    write_image(tmp_path / "grey" / "a.png", grey.astype(np.uint16) * 200)
    write_image(tmp_path / "grey" / "b.jpg", grey)
    tifffile.imwrite(tmp_path / "grey" / "c.tif", grey)
    lut = Image.fromarray(grey, "P")  # Fiji's 8-bit image saved with its Green LUT: read as its indices, grey
    lut.putpalette(np.outer(np.arange(256), [0, 1, 0]).astype(np.uint8).ravel().tolist())
    lut.save(tmp_path / "grey" / "d.png")
    write_image(tmp_path / "mixed" / "a.png", grey)
    write_image(tmp_path / "mixed" / "rgb.png", sample_bgr(40, 36))
    flags = ["--name", "pc", "--device", "cpu", "--amp", "fp32", "--channel", "1"]
    for folder, noted in (("grey", True), ("mixed", False)):
        predict.main(["--input", str(tmp_path / folder), "--output", str(tmp_path / f"{folder}_out"), *flags])
        printed = capsys.readouterr().out
        assert ("note: --channel 1: every input is a grey image (one channel), read as it is; no effect here" in
                printed) == noted
        assert (", channel 1," in printed) != noted
        with open(tmp_path / f"{folder}_out" / "prediction.yml") as f:
            assert yaml.safe_load(f)["settings"]["channel"] == (None if noted else 1)


def test_masks_that_mark_most_of_their_images_get_a_note(in_runs, tmp_path, capsys):
    """A prediction that marks most of an image as nuclei (dark nuclei on a light background, an inverted image)
    is no error, and was said nowhere: predict.py notes how many images' masks mark more than 60 % of their pixels
    and names the fullest, counted here from the masks it wrote; masks that mark less get no note."""
    folder = tmp_path / "images"
    image = sample_bgr(40, 48)
    write_image(folder / "a.png", image)
    write_image(folder / "b.png", 255 - image)
    write_image(folder / "c.png", np.zeros_like(image))
    for threshold, out in (("0.02", "low"), ("0.98", "high")):
        capsys.readouterr()
        predict.main(["--name", "p", "--input", str(folder), "--output", str(tmp_path / out), "--device", "cpu",
                      "--threshold", threshold])
        printed = capsys.readouterr().out
        shares = {i: (read_image(tmp_path / out / f"{i}.png") > 0).mean() for i in "abc"}
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
    image_path = write_image(tmp_path / "a.png", sample_bgr(50, 38))
    predict.main(["--name", "pc", "--input", image_path, "--output", str(tmp_path / "out"), "--scale", "0.5",
                  "--device", "cpu"])
    assert read_image(tmp_path / "out" / "a.png").shape == (50, 38)
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
        write_image(folder / f"i{k}.png", sample_bgr(h, w))
    flags = ["--name", "pa", "--input", str(folder), "--instances", "--min_confidence", "0", "--device", "cpu"]
    auto = predict.main([*flags, "--output", str(tmp_path / "auto"), "--scale", "auto"])
    assert "--scale auto:" in capsys.readouterr().out and len(auto["scales"]) == 3
    settings = read_record(tmp_path / "auto")["settings"]
    assert (settings["scale"], settings["training_diameter"]) == ("auto", 3.0)  # run pa's config.yml
    assert any(s != 1 for s in auto["scales"])  # so that the comparison below covers a rescaled image
    for k, scale in enumerate(auto["scales"]):
        fixed = tmp_path / f"fixed{k}"
        predict.main([*flags[:3], str(folder / f"i{k}.png"), *flags[4:], "--output", str(fixed), "--scale", str(scale)])
        np.testing.assert_array_equal(read_image(tmp_path / "auto" / f"i{k}.png"), read_image(fixed / f"i{k}.png"))
    # images --scale auto leaves as they are keep the nuclei it measured: the same outputs as --scale 1
    monkeypatch.setattr(predict, "auto_scale", lambda found, trained: 1.0)
    predict.main([*flags, "--output", str(tmp_path / "kept"), "--scale", "auto", "--overlay"])
    predict.main([*flags, "--output", str(tmp_path / "plain"), "--overlay"])
    for k in range(3):
        for suffix in ("_instances", "_overlay"):
            np.testing.assert_array_equal(read_image(tmp_path / "kept" / f"i{k}{suffix}.png"),
                                          read_image(tmp_path / "plain" / f"i{k}{suffix}.png"))
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
    write_image(tmp_path / "in" / "bright.png", bright)
    write_image(tmp_path / "in" / "dim.png", bright // 2)
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
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "bright.png"), read_image(tmp_path / "out" / "dim.png"))


def test_percentile_dark_run_inverts_bright_background_images(in_runs, tmp_path):
    """predict.py reads images as a 'percentile_dark' run was trained: a fluorescence-like image (dark background)
    as a 'percentile' run reads it (run pp, same weights: the same mask), its negative (a bright background, as a
    stained image has) inverted, so that its nuclei are bright again."""
    dark = sample_bgr(48, 40)
    write_image(tmp_path / "in" / "dark.png", dark)
    for run in ("pd", "pp"):
        predict.main(["--name", run, "--input", str(tmp_path / "in"), "--output", str(tmp_path / run),
                      "--device", "cpu", "--amp", "fp32"])
    np.testing.assert_array_equal(read_image(tmp_path / "pd" / "dark.png"), read_image(tmp_path / "pp" / "dark.png"))
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
    image = write_image(tmp_path / "big.png", sample_bgr(96, 160))
    outs = {}
    for tile in ("64", "512"):
        out = tmp_path / f"out{tile}"
        predict.main(["--name", "pc", "--input", image, "--output", str(out), "--tile", tile, "--overlap", "32",
                      "--save_prob", "--batch_size", "3", "--device", "cpu"])
        outs[tile] = read_image(out / "big_prob.png").astype(int)
        assert outs[tile].shape == (96, 160) and read_image(out / "big.png").shape == (96, 160)
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
    write_image(tmp_path / "in" / "small.png", sample_bgr(48, 48))
    write_image(tmp_path / "in" / "slide.png", sample_bgr(400, 400))
    monkeypatch.setattr(inference, "memory_budget", lambda device: 1)  # windows of 64 x 64, the smallest
    monkeypatch.setattr(inference, "memory_available", lambda device: 1_000_000)  # less than the slide's sums
    with pytest.raises(DataError, match=r"1 of 2 files were left out .*slide\.png: a 400x400 image needs"):
        predict.main(["--name", "pc", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "--device", "cpu"])
    assert read_image(tmp_path / "out" / "small.png").shape == (48, 48)
    assert not (tmp_path / "out" / "slide.png").exists()


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
    write_image(tmp_path / "in" / "big.png", sample_bgr(52, 40))
    write_image(tmp_path / "in" / "small.png", sample_bgr(40, 36))
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
    image = write_image(tmp_path / "a.png", sample_bgr(40, 52))
    predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "o3"), "--prune", "3", "--tta",
                  "--device", "cpu"])
    assert read_image(tmp_path / "o3" / "a.png").shape == (40, 52)
    with pytest.raises(UsageError, match="--prune needs a NestedUNet trained with deep supervision"):
        predict.main(["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--prune", "2"])
    with pytest.raises(SystemExit) as e:
        run_cli(predict.main, ["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--prune", "2"])
    assert e.value.code == 2
    # a UNet run predicts fine without --prune
    predict.main(["--name", "u", "--input", image, "--output", str(tmp_path / "ou"), "--device", "cpu"])
    assert read_image(tmp_path / "ou" / "a.png").shape == (40, 52)


def test_files_of_an_earlier_prediction_are_named(in_runs, tmp_path, capsys):
    """Predicting again into the same folder with fewer outputs: the earlier run's instances, overlays,
    objects.csv and images.csv stay, named in a note so that they do not pass for this run's."""
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(40, 40))
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
    other = write_image(tmp_path / "in2" / "b.png", sample_bgr(40, 40))
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
    a, b = (write_image(tmp_path / "in" / f"{n}.png", sample_bgr(40, 40)) for n in "ab")
    out = str(tmp_path / "out")
    predict.main(["--name", "pc", "--input", a, b, "--output", out, "--device", "cpu"])
    capsys.readouterr()
    with open(b, "wb") as f:
        f.write(b"not an image any more")
    with pytest.raises(DataError, match=r"1 of 2 files were left out .*b\.png"):
        predict.main(["--name", "pc", "--input", a, b, "--output", out, "--device", "cpu"])
    assert ("also holds 1 file of an earlier prediction that this one did not write: b.png;"
            in capsys.readouterr().out)


def printed_precision(printed):
    """The precision that predict.py's summary line names: '... in 0.4s on cpu (fp32, channels_last); mean ...'."""
    return re.search(r" on \S+ \((.*?)\); mean foreground", printed).group(1)


def test_prediction_yml_records_what_made_the_outputs(in_runs, tmp_path, capsys):
    """prediction.yml says which run, weights, command and settings made a folder of outputs: the weights' SHA-256
    is that of the file loaded, the flags those given, the precision the one printed, the settings named as in
    val.py's evaluation.yml of the same run and flags; it counts the images and planes predicted and names the file
    left out; the command, on one line, gives the flags back after python and predict.py's path."""
    folder = tmp_path / "in"
    write_image(folder / "a.png", sample_bgr(40, 36))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(96, 160))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32))
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
    grey = write_image(tmp_path / "in" / "grey.png", sample_bgr(32, 32))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(40, 40))
    out = tmp_path / "out"
    for name in ("a_class0.png", "a_class1_prob.png", "b_class1.png"):
        write_image(out / name, np.zeros((40, 40), np.uint8))
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


def test_subfolders_of_an_input_folder_are_named(tmp_path, capsys):
    write_image(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "plate" / "well_B2").mkdir()
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / "a.png")]
    assert f"note: the subfolders of {tmp_path / 'plate'} are not searched (well_B2)" in capsys.readouterr().out


def test_a_folder_s_other_files_are_named_and_a_broken_link_kept_to_be_named(tmp_path, capsys):
    write_image(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
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
        write_image(tmp_path / "plate" / name, np.zeros((8, 8), np.uint8))
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
        write_image(tmp_path / "plate" / name, np.zeros((8, 8), np.uint8))
    assert predict.list_images([str(tmp_path / "plate")]) == [str(tmp_path / "plate" / n) for n in ("d.png",
                                                                                                 "e_outlines.png")]
    assert "6 Cellpose label, flow or output files beside their images left out" in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_refused_before_any_output(tmp_path):
    write_image(tmp_path / "plate" / "a.png", np.zeros((8, 8), np.uint8))
    shutil.copy(tmp_path / "plate" / "a.png", os.fsdecode(os.fsencode(tmp_path / "plate") + b"/Zellkern_\xe4.png"))
    with pytest.raises(DataError, match=r"plate/Zellkern_\\xe4.png is not valid UTF-8; rename it"):
        predict.list_images([str(tmp_path / "plate")])


def test_errors_name_the_problem(in_runs, tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.png", sample_bgr(32, 32))
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
    other = write_image(tmp_path / "sub" / "a.jpg", sample_bgr(32, 32))
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
    named_like_an_output = write_image(tmp_path / "a_prob.png", sample_bgr(32, 32))  # a's --save_prob file
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
    write_image(tmp_path / "broken" / "a.png", sample_bgr(32, 32))
    write_image(tmp_path / "broken" / "c.png", sample_bgr(40, 24))
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
    image = write_image(tmp_path / "out" / "Cell.PNG", np.zeros((8, 8), np.uint8))
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
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    try:
        predict.main(["--name", "two", "--input", image, "--output", str(tmp_path / "out"), "--device", "cpu"])
        assert "mean foreground of class 0 " in capsys.readouterr().out
        assert sorted(os.listdir(tmp_path / "out")) == ["a_class0.png", "a_class1.png", "prediction.yml"]
        predict.main(["--name", "p", "--input", image, "--output", str(tmp_path / "one"), "--device", "cpu"])
        out = capsys.readouterr().out
        assert "mean foreground " in out and "of class 0" not in out
    finally:
        shutil.rmtree(os.path.join("models", "two"))


def test_a_pixel_size_that_nothing_written_uses_gets_a_note(in_runs, tmp_path, monkeypatch, capsys):
    """--pixel_size reaches --instances' tables and the TIFF stacks written: for 2D images without --instances it
    changes no file, which predict.py says (it said nothing); with --instances, or a stack to calibrate, no note."""
    monkeypatch.setattr(inference.Predictor, "predict", lambda self, image, scale=None: image.mean(axis=2)[None])
    image = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32)[..., 0])
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
    assert read_image(tmp_path / "flag" / "a.png").tobytes() == read_image(tmp_path / "plain" / "a.png").tobytes()
    with tifffile.TiffFile(tmp_path / "stack" / "s.tif") as tif:  # the mask stack
        assert tif.pages.first.resolution == pytest.approx((2, 2))  # the stack written carries it


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "inf", "1e-9", "1e9"])
def test_a_pixel_size_that_is_no_size_is_refused_naming_the_flag(tmp_path, value, capsys):
    image = write_image(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(SystemExit) as stop:
        run_cli(predict.main, ["--name", "nuclei", "--input", image, "--output", str(tmp_path / "out"),
                               f"--pixel_size={value}"])
    message = capsys.readouterr().err
    assert stop.value.code != 0 and len(message.splitlines()) == 1 and "Traceback" not in message
    assert f"error: --pixel_size {float(value):g} must be micrometres per pixel between 1e-06 and 1e+06" in message
    assert not (tmp_path / "out").exists()


def test_the_output_subfolder_of_an_input_folder_is_not_named_among_its_subfolders(in_runs, tmp_path, capsys):
    """--output plate/predictions/ (the 'a subfolder is fine' of the error for --output = --input): a second run
    must not note that subfolder as unsearched and tell the user to give its masks as --input; others it names."""
    write_image(tmp_path / "plate" / "a.png", sample_bgr(40, 40))
    argv = ["--name", "pc", "--input", str(tmp_path / "plate"), "--output", str(tmp_path / "plate" / "predictions"),
            "--device", "cpu"]
    for _ in range(2):
        predict.main(argv)
        assert "are not searched" not in capsys.readouterr().out
    (tmp_path / "plate" / "well_B2").mkdir()
    predict.main(argv)
    assert f"note: the subfolders of {tmp_path / 'plate'} are not searched (well_B2); " in capsys.readouterr().out


def test_channel_note_on_an_image_above_pils_pixel_limit(tmp_path, monkeypatch):
    """PIL refuses to open an image of more than twice its MAX_IMAGE_PIXELS (179 million: a 15000x12000 slide scan)
    with DecompressionBombError, which is no OSError; OpenCV reads it (up to 2^30 pixels). The --channel note reads
    only PIL's header: such an image gets no note, not a traceback before anything is predicted (the limit lowered
    here so that a small PNG is above it)."""
    write_image(tmp_path / "big.png", np.arange(40 * 36).reshape(40, 36).astype(np.uint8))  # grey, any values
    monkeypatch.setattr(predict_notes.Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_image(str(tmp_path / "big.png")).shape == (40, 36, 1)
    assert predict_notes.grey_channel_note([str(tmp_path / "big.png")], [None], 1) == ""
