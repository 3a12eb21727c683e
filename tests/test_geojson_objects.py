"""Tests for geojson_objects.py: each nucleus's GeoJSON Feature encloses exactly its pixels, checked by an independent
polygon test (matplotlib's Path at the pixel centres, each polygon its exterior less its holes, as GeoJSON and
QuPath's JTS read them), after a round trip through the file as json reads it; and predict.py --geojson."""
import json
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from matplotlib.path import Path
from scipy import ndimage as ndi

import layouts
import predict
import predict_notes
import synthetic
from conftest import TINY_NAME, TINY_SIZE, assert_same_targets, make_synthetic
from geojson_objects import features_file, geojson_labels, nucleus_features, signed_area
from image_files import read_label_image
from test_rois import blobs
from utils import DataError


def polygons_of(geometry):
    """The polygons [[exterior, hole, ...], ...] of a Polygon or MultiPolygon geometry, rings float [N, 2]."""
    shapes = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [[np.array(ring, float) for ring in polygon] for polygon in shapes]


def centres_inside(ring, shape):
    """bool [H, W]: the pixels whose centres (c + 0.5, r + 0.5) lie inside the closed ring (x, y) [N, 2]."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return Path(ring).contains_points(np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]).reshape(shape)


def feature_pixels(feature, shape):
    """int [H, W]: how many of the Feature's polygons hold each pixel's centre, each polygon its exterior less its
    holes; checks RFC 7946's rings on the way: closed, 4 points or more, exteriors counter-clockwise in x, y and
    holes clockwise, each hole inside its exterior."""
    count = np.zeros(shape, int)
    for exterior, *holes in polygons_of(feature["geometry"]):
        for ring in (exterior, *holes):
            assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
        assert signed_area(exterior) > 0 and all(signed_area(hole) < 0 for hole in holes)
        inside = centres_inside(exterior, shape)
        for hole in holes:
            out = centres_inside(hole, shape)
            assert out.any() and not (out & ~inside).any()  # a hole in its exterior
            inside &= ~out
        count += inside
    return count


def round_trip(path, *planes):
    """The FeatureCollection of ``planes`` (lists of Features) written by features_file and read back by json."""
    with features_file(path) as add:
        for features in planes:
            add(features)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("seed,holes", [(seed, seed % 2 == 1) for seed in range(8)])
def test_each_feature_encloses_exactly_its_nucleus(tmp_path, seed, holes):
    labels = blobs(seed, holes=holes)
    collection = round_trip(tmp_path / "a.geojson", nucleus_features(labels))
    assert set(collection) == {"type", "features"} and collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [int(f["properties"]["name"]) for f in features] == list(range(1, labels.max() + 1))
    kinds = []
    for feature in features:
        label = int(feature["properties"]["name"])
        assert feature["type"] == "Feature" and feature["properties"] == {"objectType": "detection",
                                                                          "name": f"{label:04d}"}
        assert set(feature["geometry"]) == {"type", "coordinates"}  # no plane in a 2D image
        assert np.array_equal(feature_pixels(feature, labels.shape), (labels == label).astype(int)), label
        parts = ndi.label(labels == label, np.ones((3, 3)))[1]
        assert feature["geometry"]["type"] == ("Polygon" if parts == 1 else "MultiPolygon")
        kinds.append((feature["geometry"]["type"], max(len(p) for p in polygons_of(feature["geometry"])) > 1))
        coordinates = np.concatenate([np.concatenate(p) for p in polygons_of(feature["geometry"])])
        assert (coordinates >= 0).all() and (coordinates <= labels.shape[::-1]).all()
    assert not holes or ("MultiPolygon", True) in kinds  # nuclei in several parts, one with holes among them


def test_a_part_in_the_hole_of_its_own_nucleus_is_a_polygon_of_its_own():
    """A ring-shaped nucleus with a part of itself in its hole, around another nucleus with a hole of its own: each
    hole goes with the exterior around it, not the nucleus's first or largest."""
    labels = np.zeros((20, 20), np.int32)
    labels[1:19, 1:19] = 1
    labels[3:17, 3:17] = 0
    labels[5:15, 5:15] = 2
    labels[7:13, 7:13] = 0
    labels[9:11, 9:11] = 1
    first, second = nucleus_features(labels)
    assert first["geometry"]["type"] == "MultiPolygon" and second["geometry"]["type"] == "Polygon"
    assert [len(polygon) for polygon in polygons_of(first["geometry"])] == [2, 1]
    for label, feature in enumerate((first, second), start=1):
        assert np.array_equal(feature_pixels(feature, labels.shape), (labels == label).astype(int))


def test_stack_planes_carry_their_time_point_and_z_plane_as_qupath_writes_them(tmp_path):
    """A stack's nuclei sit in the plane QuPath reads from the geometry's "plane" member (c -1: every channel),
    named <plane>-<label> as the ROIs; planes added one by one, and one without nuclei, make one collection."""
    labels = np.zeros((6, 6), np.int32)
    labels[2:4, 2:4] = 1
    collection = round_trip(tmp_path / "s.geojson", *(nucleus_features(labels * (p != 1), p, (3, 2)) for p in range(6)))
    features = collection["features"]
    assert [f["properties"]["name"] for f in features] == [f"{p:04d}-0001" for p in (0, 2, 3, 4, 5)]
    assert [f["geometry"]["plane"] for f in features] == [{"c": -1, "z": p % 2, "t": p // 2} for p in (0, 2, 3, 4, 5)]
    assert nucleus_features(labels, 2, (1, 4))[0]["geometry"]["plane"] == {"c": -1, "z": 2, "t": 0}
    assert nucleus_features(labels, 2, (4, 1))[0]["geometry"]["plane"] == {"c": -1, "z": 0, "t": 2}
    assert round_trip(tmp_path / "e.geojson", []) == {"type": "FeatureCollection", "features": []}


# ------------------------------------------------------------------------------------------- predict.py --geojson

def labelled_pixels(feature, labels):
    """Whether ``feature`` (named <label> or <plane>-<label>) encloses exactly its nucleus's pixels of ``labels``."""
    label = int(feature["properties"]["name"].split("-")[-1])
    return np.array_equal(feature_pixels(feature, labels.shape), (labels == label).astype(int))


@pytest.fixture
def images(tmp_path):
    """A 2D image and a 2 x 3 TZ stack of synthetic nuclei (96 x 96, which the bundled model finds): their paths."""
    synthetic.generate_synthetic(str(tmp_path / "syn"), num_images=6, size=96)
    grey = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((tmp_path / "syn" / "images").iterdir())]
    os.makedirs(tmp_path / "in")
    cv2.imwrite(str(tmp_path / "in" / "flat.png"), grey[0])
    tifffile.imwrite(tmp_path / "in" / "tz.tif", np.stack(grey).reshape(2, 3, 96, 96), imagej=True,
                     metadata={"axes": "TZYX"})
    return [str(tmp_path / "in" / "flat.png"), str(tmp_path / "in" / "tz.tif")]


def test_predict_geojson_writes_the_nuclei_of_objects_csv_beside_the_other_outputs(tmp_path, images, capsys):
    """--geojson (implying --instances) writes <id>.geojson: one detection per row of objects.csv, named by its label
    (and plane), enclosing exactly that nucleus's pixels of <id>_instances; a T x Z stack's in their planes, with the
    labels --stitch_z links. A later prediction without it names the file as an earlier one's."""
    out = tmp_path / "out"
    predict.main(["--name", "nuclei", "--input", *images, "--output", str(out), "--geojson", "--stitch_z", "0.5",
                  "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["flat.geojson", "flat.png", "flat_instances.png", "images.csv", "objects.csv",
                                       "prediction.yml", "tz.geojson", "tz.tif", "tz_instances.tif"]
    objects = pd.read_csv(out / "objects.csv", dtype={"image": str})
    with open(out / "flat.geojson", encoding="utf-8") as f:
        flat = json.load(f)["features"]
    labels = cv2.imread(str(out / "flat_instances.png"), cv2.IMREAD_UNCHANGED)
    assert [f["properties"]["name"] for f in flat] == [f"{k:04d}" for k in objects.query("image == 'flat'")["label"]]
    assert len(flat) > 3 and all(labelled_pixels(f, labels) for f in flat)
    with open(out / "tz.geojson", encoding="utf-8") as f:
        stack = json.load(f)["features"]
    rows = objects.query("image == 'tz'")
    names = [f"{p:04d}-{k:04d}" for p, k in zip(rows["plane"], rows["label"])]
    assert [f["properties"]["name"] for f in stack] == names
    assert [f["geometry"]["plane"] for f in stack] == [{"c": -1, "z": z, "t": t} for t, z in zip(rows["t"], rows["z"])]
    linked = tifffile.imread(out / "tz_instances.tif")
    assert rows["plane"].nunique() == 6 and any(linked[t, z].max() > len(rows.query(f"plane == {3 * t + z}"))
                                                for t in range(2) for z in range(3))  # some labels linked
    assert all(labelled_pixels(f, linked[g["t"], g["z"]]) for f, g in ((f, f["geometry"]["plane"]) for f in stack))
    back, notes = geojson_labels(str(out / "flat.geojson"), labels.shape)
    assert np.array_equal(back, labels) and notes == []  # reads back as the labels it was written from
    with open(out / "prediction.yml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["settings"]["geojson"] is True
    capsys.readouterr()
    predict.main(["--name", "nuclei", "--input", images[0], "--output", str(out), "--instances", "--device", "cpu"])
    assert "earlier prediction that this one did not write: flat.geojson" in capsys.readouterr().out
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "tz.geojson").write_text("")
    alone = str(tmp_path / "alone")
    assert predict_notes.holds_outputs(alone, ["tz"]) and not predict_notes.holds_outputs(alone, ["flat"])


# ------------------------------------------------------------------------------- GeoJSON objects as training labels

@pytest.mark.parametrize("seed", range(6))
def test_features_read_back_as_the_labels_they_were_written_from(tmp_path, seed):
    labels = blobs(seed, holes=seed % 2 == 1)
    round_trip(tmp_path / "a.geojson", nucleus_features(labels))
    back, notes = geojson_labels(str(tmp_path / "a.geojson"), labels.shape)
    assert back.dtype == np.uint16 and np.array_equal(back, labels) and notes == []


def polygon(x0, y0, x1, y1, kind=None, name=None, **members):
    """A Feature of the rectangle (x0, y0)-(x1, y1) as QuPath exports it (closed ring), of objectType ``kind``."""
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    properties = {k: v for k, v in (("objectType", kind), ("name", name)) if v is not None}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties,
            **members}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_qupath_exports_of_each_shape_read_as_their_nuclei(tmp_path):
    """A FeatureCollection, a bare list (QuPath 0.2) and a single Feature; a cell's nucleus is its nucleusGeometry;
    detections are the nuclei beside their parent annotation, annotations alone are; points, lines, objects
    enclosing no pixel centre and pixels claimed twice are noted."""
    square = polygon(2, 2, 6, 6, "detection")
    cell = polygon(0, 0, 12, 12, "cell", nucleusGeometry={"type": "Polygon", "coordinates": [
        [[8.2, 8.3], [11.7, 8.3], [11.7, 11.6], [8.2, 11.6], [8.2, 8.3]]]})
    region = polygon(0, 0, 12, 12, "annotation", "Tumor")
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties":
             {"objectType": "detection"}}
    overlapping = polygon(5, 5, 7, 7, "detection")  # over the square's corner pixel (5, 5)
    sliver = polygon(3.6, 3.6, 4.4, 4.4, "detection")  # between four pixel centres
    path = write_json(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": [
        region, square, point, cell, overlapping, sliver]})
    labels, notes = geojson_labels(path, (12, 12))
    expected = np.zeros((12, 12), np.uint16)
    expected[2:6, 2:6] = 1
    expected[8:12, 8:12] = 2  # centres 8.5 .. 11.5 within 8.2 .. 11.7
    expected[5:7, 5:7] = 3
    assert np.array_equal(labels, expected)
    assert notes == [f"note: {path}: 1 object of another kind than the nuclei (detections and cells) left out: "
                     "annotation",
                     f"note: {path}: 1 object is no area (a point or a line) and left out",
                     f"note: {path}: 1 object encloses no pixel's centre and left out",
                     f"note: {path}: 1 pixel lies in two objects or more; each goes to the later object in the file"]
    drawn = [polygon(1, 1, 4, 3), polygon(5, 5, 8, 9, "annotation", "Nucleus")]  # no objectType: an annotation
    listed = write_json(tmp_path / "list.geojson", drawn)
    one = write_json(tmp_path / "one.geojson", drawn[1])
    labels, notes = geojson_labels(listed, (10, 10))
    assert notes == [] and (labels == 1).sum() == 6 and (labels == 2).sum() == 12 and labels.max() == 2
    assert np.array_equal(geojson_labels(one, (10, 10))[0], (labels == 2).astype(np.uint16))
    # QuPath 0.2's list: the kind in the "id", no objectType; cells beside their parent annotation
    legacy = [{**polygon(0, 0, 10, 10), "id": "PathAnnotationObject"},
              {**polygon(1, 1, 4, 3), "id": "PathCellObject", "nucleusGeometry": polygon(1, 1, 3, 3)["geometry"]},
              {**polygon(5, 5, 8, 9), "id": "PathDetectionObject"}]
    labels, notes = geojson_labels(write_json(tmp_path / "legacy.geojson", legacy), (10, 10))
    assert (labels == 1).sum() == 4 and (labels == 2).sum() == 12 and labels.max() == 2
    assert len(notes) == 1 and notes[0].endswith("left out: annotation")
    empty = write_json(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})
    assert geojson_labels(empty, (4, 5))[0].shape == (4, 5) and not geojson_labels(empty, (4, 5))[0].any()


def test_qupath_0_3_exports_name_the_kind_object_type(tmp_path):
    """QuPath 0.3 (and tools writing for QuPath, HoVer-Net's export) named the kind "object_type": its detections
    are the nuclei, not the region annotation they were detected in (which would lie under them as one nucleus)."""
    def qupath_0_3(x0, y0, x1, y1, kind):
        feature = polygon(x0, y0, x1, y1)
        feature["properties"] = {"object_type": kind, "isLocked": False}
        return feature

    path = write_json(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": [
        qupath_0_3(0, 0, 10, 10, "annotation"), qupath_0_3(1, 1, 4, 4, "detection"), qupath_0_3(5, 5, 8, 8, "cell")]})
    labels, notes = geojson_labels(path, (10, 10))
    expected = np.zeros((10, 10), np.uint16)
    expected[1:4, 1:4], expected[5:8, 5:8] = 1, 2
    assert np.array_equal(labels, expected)
    assert len(notes) == 1 and notes[0].endswith("left out: annotation")


def test_detections_nested_in_their_annotation_are_the_nuclei(tmp_path):
    """QuPath writes an object's children inside it ("childObjects") when asked to include them: the detections
    nested in a region annotation (two levels deep here) are the nuclei, not the region read as one nucleus."""
    inner = polygon(5, 5, 8, 8, "annotation", childObjects=[polygon(6, 6, 7, 7, "detection")])
    region = polygon(0, 0, 10, 10, "annotation", "Tumor", childObjects=[polygon(1, 1, 4, 4, "detection"), inner])
    labels, notes = geojson_labels(write_json(tmp_path / "nested.geojson", [region]), (10, 10))
    expected = np.zeros((10, 10), np.uint16)
    expected[1:4, 1:4], expected[6:7, 6:7] = 1, 2
    assert np.array_equal(labels, expected)
    assert len(notes) == 1 and "2 objects of another kind" in notes[0] and notes[0].endswith("left out: annotation")


@pytest.mark.parametrize("region_last", [False, True])
def test_an_annotation_around_other_annotations_is_a_region_left_out_with_a_note(tmp_path, region_last):
    """Nuclei drawn by hand in QuPath are annotations, and so is a region drawn around them (a tumour, the area
    annotated): read as one more nucleus, it covered the background between them (or, later in the file, them
    too). An annotation that encloses another wholly is left out with a note naming it; nuclei alike or overlapping
    in part stay nuclei."""
    nuclei = [polygon(2, 2, 6, 6), polygon(8, 3, 12, 7, "annotation"), polygon(8, 3, 12, 7, "annotation"),
              polygon(4, 9, 9, 13, "annotation"), polygon(7, 11, 10, 14, "annotation")]  # a twin; an overlap
    region = polygon(1, 1, 15, 15, "annotation", "Tumor")
    features = nuclei + [region] if region_last else [region] + nuclei
    path = write_json(tmp_path / "drawn.geojson", {"type": "FeatureCollection", "features": features})
    labels, notes = geojson_labels(path, (16, 16))
    expected = np.zeros((16, 16), np.uint16)
    expected[2:6, 2:6], expected[3:7, 8:12], expected[9:13, 4:9], expected[11:14, 7:10] = 1, 3, 4, 5  # twin: 2 under 3
    assert np.array_equal(labels, expected)
    assert notes[0] == (f"note: {path}: 1 annotation encloses other annotations wholly (e.g. 'Tumor'): read as a "
                        "region drawn around nuclei, not as nuclei, and left out")
    assert len(notes) == 2 and "pixels lie in two objects or more" in notes[1]


def test_objects_nested_in_a_nucleus_are_parts_of_it(tmp_path):
    """QuPath's subcellular spots are detections nested in their cell (or nucleus detection): parts of that nucleus,
    not more nuclei drawn over it; "childObjects" that are no list are a one-line error naming the file."""
    spot = polygon(2, 2, 3, 3, "detection", "spot", childObjects=[polygon(3, 3, 4, 4, "detection")])
    cell = polygon(0, 0, 8, 8, "cell", childObjects=[spot], nucleusGeometry={"type": "Polygon", "coordinates": [
        [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]]]})
    region = polygon(0, 0, 10, 10, "annotation", childObjects=[cell, polygon(6, 6, 9, 9, "detection",
                                                                             childObjects=[spot])])
    labels, notes = geojson_labels(write_json(tmp_path / "spots.geojson", [region]), (10, 10))
    expected = np.zeros((10, 10), np.uint16)
    expected[1:5, 1:5], expected[6:9, 6:9] = 1, 2
    assert np.array_equal(labels, expected)
    assert notes == [f"note: {tmp_path / 'spots.geojson'}: 1 object of another kind than the nuclei (detections and "
                     "cells) left out: annotation"]
    region["childObjects"] = cell  # a Feature, not a list of them: once read as no children, the region a nucleus
    with pytest.raises(DataError, match=r"spots.geojson: an object's \"childObjects\" are a JSON dict, not a list "):
        geojson_labels(write_json(tmp_path / "spots.geojson", [region]), (10, 10))


def test_a_qupath_0_2_tma_core_is_no_nucleus(tmp_path):
    """QuPath 0.2 named a TMA core's kind "TMACoreObject" (its Java class): left out beside the nuclei drawn in it as
    annotations, not read as one more nucleus under them."""
    legacy = [{**polygon(0, 0, 10, 10), "id": "TMACoreObject"}, {**polygon(1, 1, 4, 4), "id": "PathAnnotationObject"}]
    labels, notes = geojson_labels(write_json(tmp_path / "tma.geojson", legacy), (10, 10))
    assert (labels == 1).sum() == 9 and labels.max() == 1
    assert len(notes) == 1 and notes[0].endswith("left out: tma_core")


def test_unusable_geojson_files_are_one_line_errors_naming_them(tmp_path):
    again = r"; export them again from QuPath \(File > Export objects as GeoJSON\)"
    cases = [
        ("broken.geojson", '{"type": "FeatureCollection", "features": [', rf"cannot read GeoJSON objects {{}}: not "
         rf"JSON \(Expecting value: line 1 column 44 \(char 43\)\){again}"),
        ("table.geojson", '{"cells": 3}', rf"GeoJSON objects {{}}: holds a JSON dict, not a FeatureCollection, a list "
         rf"of Features or a Feature{again}"),
        ("shape.geojson", '{"type": "Polygon", "coordinates": []}', r"GeoJSON objects {}: holds a JSON dict of type "
         r"'Polygon', not a FeatureCollection"),
        ("null.geojson", '{"type": "FeatureCollection", "features": null}', r"GeoJSON objects {}: holds a "
         r"FeatureCollection whose \"features\" are no list, not a FeatureCollection, a list"),
        ("mixed.geojson", json.dumps([polygon(1, 1, 3, 3), {"geometry": None}]), r"GeoJSON objects {}: 1 of its 2 "
         r"features are no GeoJSON Feature \(the first: number 2, no \"type\": \"Feature\"\)"),
        ("text.geojson", json.dumps([{**polygon(1, 1, 3, 3, name="7"), "geometry": {"type": "Polygon", "coordinates":
                                                                                    [["a", "b"]]}}]),
         rf"GeoJSON objects {{}}: object '7' has coordinates that are not \(x, y\) numbers \(.*\){again}"),
        ("nan.geojson", json.dumps([polygon(1, 1, float("nan"), 3)]), rf"GeoJSON objects {{}}: object number 1 has "
         rf"coordinates that are not \(x, y\) numbers \(NaN or Infinity among them\){again}"),
        ("big.geojson", json.dumps([polygon(1, 1, 3, 3), polygon(10, 2, 30.5, 6)]), r"GeoJSON objects {}: object "
         r"number 2 reaches outside the 20x10 image \(x 10 to 30.5, y 2 to 6\): objects of another image, or of a "
         r"crop or a downsampled copy; export them from this image"),
        ("stack.geojson", json.dumps(nucleus_features(np.pad(np.ones((2, 2), np.int32), 2), 4, (2, 3))),
         r"GeoJSON objects {}: 1 of 1 nuclei are on a stack plane past the first \(e.g. '0004-0001': z 1, t 1\); "
         r"training reads 2D images"),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        path = str(tmp_path / name)
        with pytest.raises(DataError, match="^" + message.format(path)) as error:
            geojson_labels(path, (10, 20))
        assert "\n" not in str(error.value)
    bom = tmp_path / "bom.geojson"  # as a Windows editor saves it
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([polygon(1, 1, 3, 3)]).encode())
    assert geojson_labels(str(bom), (10, 20))[0].sum() == 4
    deep = tmp_path / "deep.geojson"  # json.load recurses once a level: past the interpreter's limit, a traceback
    deep.write_text('{"type": "Feature", "childObjects": ' * 5000 + "[]" + "}" * 5000)
    with pytest.raises(DataError, match=f"cannot read GeoJSON objects {deep}: nested deeper than Python's JSON"):
        geojson_labels(str(deep), (10, 20))
    (tmp_path / "latin.geojson").write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(DataError, match=f"cannot read GeoJSON objects {tmp_path / 'latin.geojson'}: not JSON"):
        geojson_labels(str(tmp_path / "latin.geojson"), (10, 20))


def geojson_dataset(root):
    """inputs/tiny of synthetic images with their labels/ turned into geojson/<id>.geojson (no masks/ nor labels/
    left), and the same dataset with its label images: (folder, the labelled one, ids)."""
    ids = make_synthetic(root / "labelled", num_images=4, size=TINY_SIZE)
    labelled = os.path.join(root, "labelled", "inputs", TINY_NAME)
    folder = os.path.join(root, "inputs", TINY_NAME)
    shutil.copytree(os.path.join(labelled, "images"), os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "geojson"))
    for img_id in ids:
        labels = read_label_image(os.path.join(labelled, "labels", img_id + ".png"))
        with features_file(os.path.join(folder, "geojson", img_id + ".geojson")) as add:
            add(nucleus_features(labels))
    return folder, labelled, ids


@pytest.mark.parametrize("upper", [False, True])
def test_a_dataset_of_geojson_files_reads_as_its_label_images(tmp_path, capsys, upper):
    """Masks, --borders targets and the nucleus size of images + geojson/ are those of the same dataset with label
    images; named <id>.GEOJSON too (a Windows tool's upper case: every image was said to lack its objects)."""
    folder, labelled, ids = geojson_dataset(tmp_path)
    for img_id in ids if upper else []:
        os.rename(os.path.join(folder, "geojson", img_id + ".geojson"),
                  os.path.join(folder, "geojson", img_id + ".GEOJSON"))
    assert layouts.find_layout(folder).kind == "geojson" and layouts.list_ids(folder) == ids
    assert capsys.readouterr().out == ""
    assert_same_targets(folder, labelled, ids)


def test_a_dataset_of_geojson_files_names_what_is_wrong(tmp_path, capsys):
    folder, _, ids = geojson_dataset(tmp_path)
    objects = os.path.join(folder, "geojson")
    write_json(tmp_path / "x", [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 1], [3, 3]]},
                                 "properties": {}}])
    shutil.copy(tmp_path / "x", os.path.join(objects, ids[0] + ".geojson"))
    layouts.list_ids(folder)  # objects of no area: an image without nuclei, with a note
    assert capsys.readouterr().out == (f"note: {objects}/{ids[0]}.geojson: 1 object is no area (a point or a line) "
                                       "and left out\n")
    os.rename(os.path.join(objects, ids[0] + ".geojson"), os.path.join(objects, ids[0] + ".png.geojson"))
    with pytest.raises(DataError, match=rf"1 image without GeoJSON objects in {objects}: {ids[0]}; give each image its "
                                        r".geojson file, exported from QuPath as <id>.geojson \(File > Export"):
        layouts.list_ids(folder)
    shutil.copy(tmp_path / "x", os.path.join(objects, ids[0] + ".geojson"))
    with pytest.raises(DataError, match=f"1 GeoJSON file without an image in {objects}: {ids[0]}.png.geojson; name "
                                        "each as its image, <id>.geojson"):
        layouts.list_ids(folder)
    os.remove(os.path.join(objects, ids[0] + ".png.geojson"))
    (tmp_path / "x").write_text("not json")
    shutil.copy(tmp_path / "x", os.path.join(objects, ids[1] + ".geojson"))
    with pytest.raises(DataError, match=f"cannot read GeoJSON objects {objects}/{ids[1]}.geojson: not JSON"):
        layouts.list_ids(folder)
    os.makedirs(os.path.join(folder, "rois"))
    with pytest.raises(DataError, match=f"{folder} holds both ImageJ ROIs \\(rois/\\) and geojson/: give each image "
                                        "one kind of annotation"):
        layouts.list_ids(folder)
    os.rmdir(os.path.join(folder, "rois"))
    os.makedirs(os.path.join(folder, "labels"))
    with pytest.raises(DataError, match=f"{folder} holds both GeoJSON objects \\(geojson/\\) and labels/"):
        layouts.list_ids(folder)
    os.rename(os.path.join(folder, "labels"), os.path.join(folder, "masks"))
    cv2.imwrite(os.path.join(folder, "masks", ids[0] + ".png"), np.zeros((4, 4), np.uint8))
    for annotations in ("geojson", "rois"):  # label images directly in masks/: once read in place of the objects
        os.rename(os.path.join(folder, "geojson"), os.path.join(folder, annotations))
        with pytest.raises(DataError, match=f"{folder} holds both .* \\({annotations}/\\) and masks/: give each "):
            layouts.list_ids(folder)
        os.rename(os.path.join(folder, annotations), os.path.join(folder, "geojson"))
