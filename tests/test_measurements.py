"""Tests for predict.py's tables (measurements.py): objects.csv measures each nucleus in the image as read (every
channel, intensities and sizes with their digits, micrometres from the pixel size a TIFF records or --pixel_size
gives), and images.csv counts the nuclei of every image and plane; both merged as images finish and replaced whole.

They use conftest's tiny runs (the ``runs`` fixture: one NestedUNet trained once, and copies of it).
"""
import functools
import os
import signal
import weakref

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.measure import perimeter

import image_files
import inference
import measurements
import plane_outputs
import predict
import utils
from conftest import read_image, sample_bgr, write_image
from image_files import image_to_float


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
    grey = write_image(tmp_path / "in" / "grey.png", discs((20, 10)))
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
                           read_image(tmp_path / "out" / "three_instances.png")[None], 3)
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
    write_image(tmp_path / "in" / "cells.png", discs((8, 8), (8, 30), (30, 20), (40, 40)))
    write_image(tmp_path / "in" / "empty.png", black)
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
    planes = {(img_id, 0): (read_image(out / f"{img_id}_instances.png"), read_image(out / f"{img_id}.png"))
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
        write_image(tmp_path / "in" / f"{name}.png", disc if name != "0002" else np.zeros_like(disc))
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
    write_image(tmp_path / "plain" / "cells.png", disc)
    predict.main([*argv[:2], "--input", str(tmp_path / "plain"), *argv[4:], "--output", str(tmp_path / "out2")])
    assert "note: pandas" not in capsys.readouterr().out


def test_images_csv_is_replaced_whole_and_an_earlier_one_that_stays_is_named(in_runs, tmp_path, capsys, monkeypatch):
    """images.csv is this prediction's only: the images whose rows an earlier one held are named; a prediction
    stopped before its end leaves the earlier one as it was, and its note names it; a Ctrl-C while the tables are
    written takes effect once both are this prediction's (neither half-written, nor one old beside one new)."""
    a = write_image(tmp_path / "in" / "a.png", sample_bgr(32, 32))
    b = write_image(tmp_path / "in2" / "b.png", sample_bgr(32, 32))
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
        write_image(tmp_path / "in" / f"{name}.png", sample_bgr(32, 32))
    argv = ["--name", "pc", "--output", str(tmp_path / "out"), "--device", "cpu", "--instances"]
    predict.main([*argv, "--input", str(tmp_path / "in")])
    predict.main([*argv, "--input", str(tmp_path / "in")])
    assert "held the rows" not in capsys.readouterr().out
    predict.main([*argv, "--input", write_image(tmp_path / "in2" / "b.png", sample_bgr(32, 32))])
    assert ("held the rows of 3 other images of an earlier prediction (NA, None, null)"
            in capsys.readouterr().out)


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

    files = [write_image(tmp_path / "in" / f"i{k:02d}.png", np.zeros((16, 16, 3), np.uint8)) for k in range(12)]
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
    labels = read_image(tmp_path / "out" / "f_instances.png")
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
    files = [write_image(tmp_path / "in" / "grey.png", grey), write_image(tmp_path / "in" / "rgb.png", rgb[..., ::-1])]
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
    write_image(tmp_path / "in" / "plain.png", plane)
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
            labels = tifffile.imread(stack)[row.plane] if stack.exists() else \
                read_image(out / f"{row.image}_instances.png")
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
