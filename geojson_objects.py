"""Nuclei as GeoJSON objects for QuPath: ``predict.py --geojson`` writes each image's nuclei as ``<id>.geojson``, a
FeatureCollection that QuPath imports as one detection per nucleus (File > Import objects, or drag the file onto the
open image), to measure, classify or edit them there; it is plain GeoJSON (RFC 7946), for other tools too.

Each nucleus is a Polygon (its outline, then the outlines of its holes), or a MultiPolygon of those for a nucleus in
several parts: the outlines of its ImageJ ROI (rois.outlines), in pixels with (0, 0) the top-left corner of the
top-left pixel, as QuPath and ImageJ place them, so that the pixels whose centres it encloses are exactly the
nucleus's. Every ring is closed, exteriors counter-clockwise and holes clockwise in the coordinates' own axes (RFC
7946; QuPath reads either way). A stack's nuclei carry their plane as QuPath writes it: the geometry's
``"plane": {"c": -1, "z": z, "t": t}`` (0-based; c -1 for every channel).

The way back: objects exported from QuPath (File > Export objects as GeoJSON: corrected, or drawn from scratch) are
read as a label image (:func:`geojson_labels`), each nucleus on the pixels whose centres it encloses, for the
dataset's ``geojson/`` layout.
"""
import json
from contextlib import contextmanager

import numpy as np
from scipy import ndimage as ndi

from files import atomic_write
from rois import MAX_ROIS, fill_rings, found_pixels, nucleus_name, outlines, window_of
from utils import DataError

GEOJSON_FILE = ".geojson"  # an image's objects: <id>.geojson, as predict.py writes them and QuPath exports them


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


# ------------------------------------------------------------------------------ GeoJSON objects as training labels

EXPORT_AGAIN = "export them again from QuPath (File > Export objects as GeoJSON)"
NUCLEI = ("detection", "cell")  # QuPath's objectType of nuclei it detected: a cell's nucleus is its nucleusGeometry


def read_features(path):
    """The Features (dicts) of a GeoJSON file, in its order: a FeatureCollection's, a JSON list of Features (as
    QuPath 0.2 exports them) or a single Feature, with the children nested in them (:func:`with_children`); a file
    that is not JSON, or holds none of these, is a DataError naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as Windows editors save, read too
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read GeoJSON objects {path}: not JSON ({str(e).splitlines()[0][:80]}); "
                        f"{EXPORT_AGAIN}") from None
    except RecursionError:  # Python's json reader nests one call per level: a few hundred levels end it
        raise DataError(f"cannot read GeoJSON objects {path}: nested deeper than Python's JSON reader goes (objects "
                        f"inside objects, hundreds of levels); {EXPORT_AGAIN}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    features = data if isinstance(data, list) else [data] if kind == "Feature" else \
        data.get("features") if kind == "FeatureCollection" else None
    if not isinstance(features, list):
        held = "a FeatureCollection whose \"features\" are no list" if kind == "FeatureCollection" else \
            f"a JSON {type(data).__name__}{f' of type {kind!r}' if kind else ''}"
        raise DataError(f"GeoJSON objects {path}: holds {held}, not a FeatureCollection, a list of Features or a "
                        f"Feature; {EXPORT_AGAIN}")
    try:
        features = with_children(features)
    except ValueError as e:
        raise DataError(f"GeoJSON objects {path}: {e}; {EXPORT_AGAIN}") from None
    others = [n for n, feature in enumerate(features) if not (isinstance(feature, dict) and
                                                               feature.get("type") == "Feature")]
    if others:
        raise DataError(f"GeoJSON objects {path}: {len(others)} of its {len(features)} features are no GeoJSON "
                        f"Feature (the first: number {others[0] + 1}, no \"type\": \"Feature\"); {EXPORT_AGAIN}")
    return features


def with_children(features):
    """``features`` with the Features nested in their "childObjects" lists (as QuPath writes an object's hierarchy
    when asked to include child objects) each after its parent, depth first: the detections inside an annotation
    are the nuclei, not the annotation they were found in. The children of a detection or a cell are left out: parts
    of that nucleus (QuPath's subcellular spots, detections too), not more nuclei drawn over it. Raises ValueError
    for "childObjects" that are not a list."""
    flat = []
    for feature in features:
        flat.append(feature)
        children = feature.get("childObjects") if isinstance(feature, dict) else None
        if children is None or feature_kind(feature) in NUCLEI:
            continue
        if not isinstance(children, list):  # else silently no children, and their region read as one nucleus
            raise ValueError(f'an object\'s "childObjects" are a JSON {type(children).__name__}, not a list of '
                             "Features")
        flat.extend(with_children(children))
    return flat


# QuPath 0.2 named a Feature's kind by its "id" (QuPath 0.3 by properties.object_type, 0.4 on by
# properties.objectType, and the id is a UUID); QuPath still reads all three, and tools that write for QuPath
# (HoVer-Net, scripts) still write object_type
LEGACY_KINDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
                "PathTileObject": "tile", "TMACoreObject": "tma_core"}


def feature_kind(feature):
    """A Feature's QuPath objectType (or QuPath 0.3's object_type), else the kind its QuPath 0.2 "id" names;
    'annotation' where it has neither, as QuPath imports it."""
    properties = feature.get("properties")
    kind = properties.get("objectType", properties.get("object_type")) if isinstance(properties, dict) else None
    return str(kind) if kind is not None else LEGACY_KINDS.get(str(feature.get("id")), "annotation")


def feature_name(feature, number):
    """How a note or error names a Feature: its QuPath name, else its number in the file (1-based)."""
    properties = feature.get("properties")
    name = properties.get("name") if isinstance(properties, dict) else None
    return f"'{name}'" if name is not None else f"number {number}"


def area_rings(geometry):
    """The rings of the polygons of a GeoJSON geometry (x, y) float [N, 2] (a Polygon's, a MultiPolygon's, a
    GeometryCollection's polygons'): [] for no area (a Point, a LineString, their Multi kinds, null). Raises
    ValueError for coordinates that are not lists of (x, y) finite numbers."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "GeometryCollection":
        return [ring for member in geometry.get("geometries") or [] for ring in area_rings(member)]
    if kind not in ("Polygon", "MultiPolygon"):
        return []
    polygons = [geometry.get("coordinates")] if kind == "Polygon" else geometry.get("coordinates")
    rings = [np.asarray(ring, np.float64) for polygon in polygons for ring in polygon]
    if any(ring.ndim != 2 or ring.shape[1] < 2 for ring in rings):
        raise ValueError("a ring is no list of (x, y) points")
    if not all(np.isfinite(ring[:, :2]).all() for ring in rings):  # Python's json reads NaN and Infinity as numbers
        raise ValueError("NaN or Infinity among them")
    return [ring[:, :2] for ring in rings]


def geometry_of(feature):
    """The geometry of a Feature's nucleus: a QuPath cell's nucleusGeometry where it has one, else its geometry."""
    return feature.get("nucleusGeometry") or feature.get("geometry")


def plane_of(geometry):
    """(z, t) of a geometry's QuPath "plane" member; (0, 0) without one."""
    plane = geometry.get("plane") if isinstance(geometry, dict) else None
    return (plane.get("z", 0), plane.get("t", 0)) if isinstance(plane, dict) else (0, 0)


def enclosing(pieces):
    """The indices (sorted) of the ``pieces`` = [(pixels bool [h, w], (rows, cols) slices of the image they cover)]
    that hold every pixel of another piece, and more: a region drawn around others. Two alike hold each other and
    neither is one."""
    boxes = np.array([[rows.start, rows.stop, cols.start, cols.stop] for _, (rows, cols) in pieces]).reshape(-1, 4)
    sizes = [int(pixels.sum()) for pixels, _ in pieces]
    order = np.argsort(boxes[:, 0], kind="stable")
    tops = boxes[order, 0]
    found = []
    for i, (outer, (rows, cols)) in enumerate(pieces):
        # the pieces whose box lies within this one's, the only ones it can hold: among those whose top row is in
        # its rows (a band of the image, not every piece: a file of many thousand nuclei stays quick)
        band = order[np.searchsorted(tops, rows.start): np.searchsorted(tops, rows.stop)]
        within = band[(boxes[band, 1] <= rows.stop) & (boxes[band, 2] >= cols.start) & (boxes[band, 3] <= cols.stop)]
        for j in within:
            inner, (inner_rows, inner_cols) = pieces[j]
            if sizes[j] < sizes[i] and outer[inner_rows.start - rows.start: inner_rows.stop - rows.start,
                                             inner_cols.start - cols.start: inner_cols.stop - cols.start][inner].all():
                found.append(i)
                break
    return found


def geojson_labels(path, shape):
    """The GeoJSON objects of ``path`` (:func:`read_features`) as instance labels uint16 [H, W] of ``shape`` (H, W):
    0 the background, the nuclei 1..N in the file's order, each on the pixels whose centres its polygons enclose
    (even-odd: holes out), a later one over an earlier one where they overlap. The nuclei are its detections and
    cells (a cell's nucleusGeometry) where it has any, else its annotations, less those that enclose others wholly
    (:func:`enclosing`: regions drawn around nuclei). Also returns the notes (one-line strings) on the objects left
    out: other kinds (annotations beside detections: the regions QuPath detected them in; tiles, TMA cores), regions
    among annotations, no areas (points, lines), enclosing no pixel centre; and on pixels claimed twice.
    Coordinates outside the image, a stack plane past the first (training reads 2D images) or more than 65,535
    nuclei are a DataError naming the file."""
    features = read_features(path)
    kinds = [feature_kind(feature) for feature in features]
    detected = bool(set(kinds) & set(NUCLEI))
    wanted = NUCLEI if detected else ("annotation",)
    nuclei = [(n, f) for n, (f, kind) in enumerate(zip(features, kinds), start=1) if kind in wanted]
    check_first_plane(path, nuclei)
    drawn, not_areas, empty = nucleus_pixels(path, nuclei, shape)
    # annotations read as nuclei: one around others is a region drawn around them (QuPath's regions and nuclei are
    # both annotations), read as one nucleus it would cover them or their background
    regions = [] if detected else enclosing([(pixels, box) for _, _, pixels, box in drawn])
    labels, twice = numbered_nuclei(path, drawn, regions, shape)
    return labels, left_out_notes(path, detected, [drawn[index][:2] for index in regions],
                                  [kind for kind in kinds if kind not in wanted], not_areas, empty, twice)


def check_first_plane(path, nuclei):
    """A DataError naming ``path`` when any of its ``nuclei`` = [(number in the file, Feature)] lies on a stack plane
    past the first (QuPath's "plane" member): training reads 2D images."""
    stacked = [(n, f) for n, f in nuclei if plane_of(geometry_of(f)) != (0, 0)]
    if stacked:
        (number, feature), (z, t) = stacked[0], plane_of(geometry_of(stacked[0][1]))
        raise DataError(f"GeoJSON objects {path}: {len(stacked)} of {len(nuclei)} nuclei are on a stack plane past "
                        f"the first (e.g. {feature_name(feature, number)}: z {z}, t {t}); training reads 2D images: "
                        "export the objects of a 2D image")


def nucleus_pixels(path, nuclei, shape):
    """The pixels of an image of ``shape`` (H, W) whose centres each of the ``nuclei`` = [(number in the file,
    Feature)] of ``path`` encloses (rois.fill_rings, even-odd). Returns (drawn, not_areas, empty): drawn [(number,
    Feature, pixels bool [h, w], box: the (rows, cols) slices of the image they cover)] of each nucleus that encloses
    a pixel centre, in the order of ``nuclei``; how many are no area (points, lines) and how many enclose no pixel
    centre. Coordinates that are not (x, y) numbers, or that reach outside the image, are a DataError naming the
    file and the object."""
    drawn, not_areas, empty = [], 0, 0
    for number, feature in nuclei:
        try:
            rings = area_rings(geometry_of(feature))
        except (TypeError, ValueError) as e:
            raise DataError(f"GeoJSON objects {path}: object {feature_name(feature, number)} has coordinates that "
                            f"are not (x, y) numbers ({str(e)[:80]}); {EXPORT_AGAIN}") from None
        if not rings:
            not_areas += 1
            continue
        (x0, y0), (x1, y1) = np.concatenate(rings).min(axis=0), np.concatenate(rings).max(axis=0)
        if x0 < 0 or y0 < 0 or x1 > shape[1] or y1 > shape[0]:
            raise DataError(f"GeoJSON objects {path}: object {feature_name(feature, number)} reaches outside the "
                            f"{shape[1]}x{shape[0]} image (x {x0:g} to {x1:g}, y {y0:g} to {y1:g}): objects of "
                            "another image, or of a crop or a downsampled copy; export them from this image")
        window = window_of((x0, y0, x1, y1), shape)
        found = found_pixels(fill_rings(rings, window), window) if window else None
        if found is None:
            empty += 1
            continue
        drawn.append((number, feature, *found))
    return drawn, not_areas, empty


def numbered_nuclei(path, drawn, regions, shape):
    """The instance labels uint16 [H, W] of ``shape``: the nuclei ``drawn`` (:func:`nucleus_pixels`) numbered 1..N in
    their order, less those at the indices ``regions``, a later one over an earlier one where they overlap; and how
    many pixels lie in two of them or more. More than 65,535 nuclei are a DataError naming ``path``."""
    labels, twice = np.zeros(shape, np.uint16), np.zeros(shape, bool)
    value = 0
    left_out = set(regions)  # a set: thousands of cells drawn around their nuclei made the list test quadratic
    for index, (number, feature, pixels, box) in enumerate(drawn):
        if index in left_out:
            continue
        if value == MAX_ROIS:
            raise DataError(f"GeoJSON objects {path}: more than the {MAX_ROIS} nuclei that a 16-bit label image "
                            "numbers; split the image (and its objects) into tiles")
        value += 1
        twice[box] |= pixels & (labels[box] > 0)
        labels[box][pixels] = value
    return labels, int(twice.sum())


def left_out_notes(path, detected, regions, others, not_areas, empty, twice):
    """The notes of :func:`geojson_labels` on ``path`` (one-line strings, [] for none): the ``regions`` [(number in
    the file, Feature)] of annotations that enclose others wholly, left out; the kinds ``others`` of each object of
    another kind than the nuclei (its detections and cells when ``detected``, else its annotations); how many
    objects are ``not_areas`` (points, lines) or ``empty`` (enclosing no pixel centre); how many pixels lie in
    ``twice`` two objects or more."""
    notes = []
    if regions:
        number, feature = regions[0]
        notes.append(f"note: {path}: {len(regions)} annotation{'s enclose' if len(regions) > 1 else ' encloses'} "
                     f"other annotations wholly (e.g. {feature_name(feature, number)}): read as "
                     f"{'regions' if len(regions) > 1 else 'a region'} drawn around nuclei, not as nuclei, and left "
                     "out")
    if others:
        n, kind = len(others), "another kind" if len(set(others)) == 1 else "other kinds"
        notes.append(f"note: {path}: {n} object{'s' * (n > 1)} of {kind} "
                     f"than the nuclei ({'detections and cells' if detected else 'annotations'}) left out: "
                     f"{', '.join(sorted(set(others)))}")
    if not_areas:
        notes.append(f"note: {path}: {not_areas} object{'s are' if not_areas > 1 else ' is'} no area (a point or a "
                     "line) and left out")
    if empty:
        notes.append(f"note: {path}: {empty} object{'s enclose' if empty > 1 else ' encloses'} no pixel's centre and "
                     "left out")
    if twice:
        notes.append(f"note: {path}: {twice} pixel{'s lie' if twice > 1 else ' lies'} in two objects or more; each "
                     "goes to the later object in the file")
    return notes
