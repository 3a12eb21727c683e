"""Tests for geojson_objects.py: each nucleus's GeoJSON Feature encloses exactly its pixels, checked by an independent
polygon test (matplotlib's Path at the pixel centres, each polygon its exterior less its holes, as GeoJSON and
QuPath's JTS read them), after a round trip through the file as json reads it; and predict.py --geojson."""
import json
import os

import cv2
import numpy as np
import pytest
import tifffile
import yaml
from matplotlib.path import Path
from scipy import ndimage as ndi

import predict
import synthetic
from geojson_objects import features_file, nucleus_features, signed_area
from test_rois import blobs


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


def test_an_error_or_ctrl_c_while_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.geojson"
    labels = np.pad(np.ones((2, 2), np.int32), 2)
    round_trip(path, nucleus_features(labels))
    before = path.read_bytes()
    for stop in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(stop)), features_file(path) as add:
            add(nucleus_features(labels * 2))
            raise stop
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]


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
    objects = predict.pd.read_csv(out / "objects.csv", dtype={"image": str})
    with open(out / "flat.geojson", encoding="utf-8") as f:
        flat = json.load(f)["features"]
    labels = cv2.imread(str(out / "flat_instances.png"), cv2.IMREAD_UNCHANGED)
    assert [f["properties"]["name"] for f in flat] == [f"{k:04d}" for k in objects.query("image == 'flat'")["label"]]
    assert len(flat) > 3 and all(labelled_pixels(f, labels) for f in flat)
    with open(out / "tz.geojson", encoding="utf-8") as f:
        stack = json.load(f)["features"]
    rows = objects.query("image == 'tz'")
    assert [f["properties"]["name"] for f in stack] == [f"{p:04d}-{k:04d}" for p, k in zip(rows["plane"], rows["label"])]
    assert [f["geometry"]["plane"] for f in stack] == [{"c": -1, "z": z, "t": t} for t, z in zip(rows["t"], rows["z"])]
    linked = tifffile.imread(out / "tz_instances.tif")
    assert rows["plane"].nunique() == 6 and any(linked[t, z].max() > len(rows.query(f"plane == {3 * t + z}"))
                                                for t in range(2) for z in range(3))  # some labels linked
    assert all(labelled_pixels(f, linked[g["t"], g["z"]]) for f, g in ((f, f["geometry"]["plane"]) for f in stack))
    with open(out / "prediction.yml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["settings"]["geojson"] is True
    capsys.readouterr()
    predict.main(["--name", "nuclei", "--input", images[0], "--output", str(out), "--instances", "--device", "cpu"])
    assert "earlier prediction that this one did not write: flat.geojson" in capsys.readouterr().out
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "tz.geojson").write_text("")
    assert predict.holds_outputs(str(tmp_path / "alone"), ["tz"]) and not predict.holds_outputs(str(tmp_path / "alone"),
                                                                                                ["flat"])
