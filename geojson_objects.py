"""Nuclei as GeoJSON objects for QuPath: ``predict.py --geojson`` writes each image's nuclei as ``<id>.geojson``, a
FeatureCollection that QuPath imports as one detection per nucleus (File > Import objects, or drag the file onto the
open image), to measure, classify or edit them there; other GeoJSON readers (napari, shapely) take it too.

Each nucleus is a Polygon (its outline, then the outlines of its holes), or a MultiPolygon of those for a nucleus in
several parts: the outlines of its ImageJ ROI (rois.outlines), in pixels with (0, 0) the top-left corner of the
top-left pixel, as QuPath and ImageJ place them, so that the pixels whose centres it encloses are exactly the
nucleus's. Every ring is closed, exteriors counter-clockwise and holes clockwise in the coordinates' own axes (RFC
7946; QuPath reads either way). A stack's nuclei carry their plane as QuPath writes it: the geometry's
``"plane": {"c": -1, "z": z, "t": t}`` (0-based; c -1 for every channel).
"""
import json
from contextlib import contextmanager

import numpy as np
from scipy import ndimage as ndi

from files import atomic_write
from rois import nucleus_name, outlines


def signed_area(ring):
    """The area enclosed by a closed ring (x, y) [N, 2], positive when it turns counter-clockwise in x, y axes."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def polygons(mask):
    """The polygons of the True pixels of a bool mask [h, w], one per 8-connected part, in label order of the parts:
    [[exterior, hole, ...], ...], each ring one of :func:`rois.outlines` (x, y) float [N, 2], each hole in the
    polygon of the part around it (a part inside another part's hole is a polygon of its own)."""
    parts = np.pad(ndi.label(mask, np.ones((3, 3)))[0], 1)
    exteriors, holes = {}, {}
    for ring in outlines(mask):
        x, y = ring[0]
        # a ring's points lie midway between two neighbouring pixel centres, one in the part it bounds (inside an
        # exterior, outside a hole): the 2 x 1 or 1 x 2 pixels around its first point (+1 for the pad)
        part = parts[int(np.floor(y - 0.5)) + 1:int(np.floor(y)) + 2, int(np.floor(x - 0.5)) + 1:int(np.floor(x)) + 2]
        # find_contours winds every ring one way round its True pixels: counter-clockwise in x, y round a part
        if signed_area(ring) > 0:
            exteriors[part.max()] = ring
        else:
            holes.setdefault(part.max(), []).append(ring)
    return [[exteriors[part], *holes.get(part, [])] for part in sorted(exteriors)]


def nucleus_features(labels, plane=0, planes=(1, 1)):
    """The GeoJSON Feature (a dict) of each nucleus of a label image int [H, W] (0 background, nuclei 1..N,
    objects.csv's ``label``), in label order: a QuPath detection named by rois.nucleus_name, its geometry a Polygon,
    or a MultiPolygon for a nucleus in several parts (:func:`polygons`); in a stack of ``planes`` (T, Z) sizes, at
    the time point and z plane of ``plane``."""
    features = []
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        shapes = [[(ring + (box[1].start, box[0].start)).tolist() for ring in polygon]
                  for polygon in polygons(labels[box] == label)]
        geometry = {"type": "Polygon", "coordinates": shapes[0]} if len(shapes) == 1 else \
            {"type": "MultiPolygon", "coordinates": shapes}
        if planes != (1, 1):
            geometry["plane"] = {"c": -1, "z": plane % planes[1], "t": plane // planes[1]}
        features.append({"type": "Feature", "geometry": geometry,
                         "properties": {"objectType": "detection", "name": nucleus_name(label, plane, planes)}})
    return features


def relabelled_features(features, mapping):
    """A stack plane's Features of :func:`nucleus_features` (named ``<plane>-<label>``) named by ``mapping[label]``
    instead (mapping int [N + 1], instances.link_planes'), in the order of their new labels."""
    for feature in features:
        plane, label = feature["properties"]["name"].split("-")
        feature["properties"]["name"] = f"{plane}-{mapping[int(label)]:04d}"
    return sorted(features, key=lambda feature: int(feature["properties"]["name"].split("-")[1]))


@contextmanager
def features_file(path):
    """The GeoJSON FeatureCollection file ``path``: yields add(features), which appends Features (a stack's plane by
    plane, so that they are never all in memory), one a line; the file replaces ``path`` when the block completes,
    and nothing of it is left after an error or Ctrl-C."""
    with atomic_write(path) as f:
        f.write('{"type": "FeatureCollection", "features": [')
        separator = "\n"

        def add(features):
            nonlocal separator
            for feature in features:
                f.write(separator + json.dumps(feature, separators=(",", ":")))
                separator = ",\n"
        yield add
        f.write("\n]}\n")
