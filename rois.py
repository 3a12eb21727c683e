"""Nuclei as ImageJ regions of interest: ``predict.py --rois`` writes each image's nuclei as ``<id>_rois.zip``, which
Fiji's ROI Manager opens (drag it onto Fiji, or File > Open), to measure, edit or count them there.

Each nucleus is one polygon (roifile's ImagejRoi, sub-pixel coordinates) through the midpoints between its edge
pixels and their outside neighbours, so that the pixels whose centres it encloses, as ImageJ fills a polygon, are
exactly the nucleus's; a nucleus with a hole, or in several parts, is a composite ROI of all its outlines, which
ImageJ fills even-odd (ShapeRoi), so that it too encloses exactly the nucleus's pixels.

The way back: a ROI set saved from Fiji's ROI Manager (corrected, or drawn from scratch) is read as a label image
(:func:`roi_labels`), each area ROI on the pixels whose centres it encloses, for the dataset's ``rois/`` layout.
"""
import os
import zipfile
from contextlib import contextmanager
from math import comb

import numpy as np
from roifile import ROI_OPTIONS, ROI_SUBTYPE, ROI_TYPE, ImagejRoi
from scipy import ndimage as ndi
from skimage.measure import find_contours

from files import atomic_write
from utils import DataError

# the time stamp of every entry: the same nuclei give the same bytes (two predictions' outputs compare byte for byte)
ENTRY_TIME = (1980, 1, 1, 0, 0, 0)


def outlines(mask):
    """The outlines of the True pixels of a bool mask [h, w]: closed rings (x, y) float [N, 2] in ImageJ's
    coordinates, where pixel (row r, column c) covers [c, c + 1) x [r, r + 1): the contours at 0.5 (marching squares,
    the True pixels 8-connected), around each part and each hole. A pixel's centre lies inside an odd number of them
    exactly when it is True: each ring separates True centres from False ones."""
    # padded so that a region touching the edge closes; contour (row, col) in the padded array's pixel-centre units
    contours = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")
    return [corners(ring[:, ::-1] - 0.5) for ring in contours]  # -1 for the pad, +0.5 from centres to corners


def corners(ring):
    """A closed ring (x, y) [N, 2] (last point = first) without the points inside its straight runs: the same
    polygon in fewer points (a nucleus's outline has one between every two edge pixels, on straight and 45-degree
    runs alike). The first point stays."""
    step = np.diff(ring, axis=0)
    turns = step[:-1, 0] * step[1:, 1] - step[:-1, 1] * step[1:, 0]  # exact: the coordinates are halves
    onward = (step[:-1] * step[1:]).sum(axis=1) > 0
    return ring[np.r_[True, (turns != 0) | ~onward, True]]


def composite_roi(rings, name):
    """An ImageJ composite (shape) ROI named ``name`` of the closed ``rings`` (x, y) [N, 2], filled even-odd by
    ImageJ: a move to each ring's first point, lines to the others, a close (java.awt.geom.PathIterator's codes)."""
    path = np.concatenate([np.r_[0, ring[0], np.c_[np.ones(len(ring) - 1), ring[1:]].ravel(), 4] for ring in rings])
    low, high = np.concatenate(rings).min(axis=0), np.concatenate(rings).max(axis=0)
    return ImagejRoi(roitype=ROI_TYPE.RECT, name=name, multi_coordinates=path.astype(np.float32),
                     shape_roi_size=len(path), left=int(np.floor(low[0])), top=int(np.floor(low[1])),
                     right=int(np.ceil(high[0])), bottom=int(np.ceil(high[1])))


def nucleus_name(label, plane=0, planes=(1, 1)):
    """A nucleus's name in its image's ROIs and GeoJSON objects: ``<label>`` (2D) or ``<plane>-<label>`` (a stack's
    plane, 0-based as in objects.csv), zero-padded to 4 digits so that lists sorted by name keep the label order."""
    return f"{plane:04d}-{label:04d}" if planes != (1, 1) else f"{label:04d}"


def nucleus_rois(labels, plane=0, planes=(1, 1)):
    """The ImagejRoi of each nucleus of a label image int [H, W] (0 background, nuclei 1..N, objects.csv's
    ``label``), in label order, named by :func:`nucleus_name` (at ``plane`` of a stack). ``planes``: the stack's
    (T, Z) sizes, for the plane's position in it (1-based, as ImageJ counts: the stack position, and with both T and Z
    the frame and slice of the hyperstack)."""
    rois = []
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        rings = [ring + (box[1].start, box[0].start) for ring in outlines(labels[box] == label)]
        name = nucleus_name(label, plane, planes)
        roi = ImagejRoi.frompoints(rings[0], name=name) if len(rings) == 1 else composite_roi(rings, name)
        if planes != (1, 1):
            roi.position = plane + 1
        # ImageJ drops the position of a ROI that has a frame or slice, and reads those in a hyperstack alone: a stack
        # of one axis (a time-lapse, a z-stack) opens as a plain stack, where the ROI Manager would measure each
        # nucleus in the plane on show
        if min(planes) > 1:
            roi.t_position, roi.z_position = plane // planes[1] + 1, plane % planes[1] + 1
        rois.append(roi)
    return rois


@contextmanager
def rois_archive(path):
    """The zip file of ImageJ ROIs that ImageJ's ROI Manager saves and opens, one ``<name>.roi`` each: yields
    add(rois), which appends ImagejRois (a stack's plane by plane, so that they are never all in memory); the file
    replaces ``path`` when the block completes, and nothing of it is left after an error or Ctrl-C."""
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w") as archive:
        def add(rois):
            for roi in rois:
                archive.writestr(zipfile.ZipInfo(f"{roi.name}.roi", ENTRY_TIME), roi.tobytes(),
                                 compress_type=zipfile.ZIP_DEFLATED)
        yield add


def relabelled(rois, mapping):
    """A stack plane's ROIs of :func:`nucleus_rois` (named ``<plane>-<label>``) named by ``mapping[label]`` instead
    (mapping int [N + 1], instances.link_planes'), in the order of their new labels."""
    for roi in rois:
        plane, label = roi.name.split("-")
        roi.name = f"{plane}-{mapping[int(label)]:04d}"
    return sorted(rois, key=lambda roi: int(roi.name.split("-")[1]))


# ---------------------------------------------------------------------------------- ImageJ ROIs as training labels

ROI_FILES = ("_rois.zip", ".zip", ".roi")  # predict.py's <id>_rois.zip first: its stem also ends in .zip's <id>
AREAS = (ROI_TYPE.POLYGON, ROI_TYPE.FREEHAND, ROI_TYPE.TRACED, ROI_TYPE.RECT, ROI_TYPE.OVAL)
MAX_ROIS = np.iinfo(np.uint16).max  # one uint16 value per ROI
SAVE_AGAIN = "save the set again from Fiji's ROI Manager (More > Save...)"


def read_rois(path):
    """The ImagejRois of a ROI Manager zip file (its ``.roi`` entries, as Fiji opens it) or of one ``.roi`` file, in
    the file's order ([] for an empty zip); a damaged file is a DataError naming it (and the zip's entry)."""
    zipped = path.lower().endswith(".zip")  # Windows tools save .ZIP
    if zipped and os.path.getsize(path) == 0:  # Fiji saves no empty set: a hand-made "empty zip"
        raise DataError(f"ImageJ ROIs {path} is an empty file, not a zip file: save the set again from Fiji, or for "
                        "an image without nuclei (a set Fiji cannot save) write an empty one: python -c \"import "
                        f"zipfile; zipfile.ZipFile('{path}', 'w').close()\"")
    entry = None
    try:
        if not zipped:
            return [ImagejRoi.fromfile(path)]
        with zipfile.ZipFile(path) as archive:
            rois = []
            # Fiji's ROI Manager reads the .roi entries alone: folders, notes or a README zipped with them are no ROIs
            for entry in (name for name in archive.namelist() if name.lower().endswith(".roi")):
                rois.append(ImagejRoi.frombytes(archive.read(entry)))
            return rois
    except Exception as e:  # zipfile.BadZipFile, ValueError, struct.error, ... for damaged files
        where = f" (entry {entry})" if entry else ""
        raise DataError(f"cannot read ImageJ ROIs {path}{where}: not a readable ROI file "
                        f"({str(e).splitlines()[0][:80]}); {SAVE_AGAIN}") from None


def is_area(roi):
    """Whether an ImagejRoi encloses pixels: polygon, freehand, traced, rectangle, oval or composite; not a line,
    point, angle, text or image ROI."""
    return roi.roitype in AREAS and roi.subtype not in (ROI_SUBTYPE.TEXT, ROI_SUBTYPE.IMAGE)


def box_of(roi):
    """(left, top, right, bottom) of a rectangle or oval ROI in ImageJ's coordinates (pixel corners). ImageJ reads a
    sub-pixel rectangle (Roi(double x, y, w, h)) on the whole pixels from (int) x, (int) y, ceil(w) by ceil(h) wide, so
    that its mask and measurements take those (a rectangle from x = 2.7 covers pixels 2, 3 and 4 for w = 3); a
    sub-pixel oval keeps its float box (:func:`fill_oval`)."""
    if not roi.subpixelrect:
        return roi.left, roi.top, roi.right, roi.bottom
    if roi.roitype == ROI_TYPE.RECT:
        left, top = int(roi.xd), int(roi.yd)  # Java's (int): towards 0, as Python's int()
        return left, top, left + int(np.ceil(roi.widthd)), top + int(np.ceil(roi.heightd))
    return roi.xd, roi.yd, roi.xd + roi.widthd, roi.yd + roi.heightd


CURVE_STEPS = 64  # lines per Bezier curve: a quarter circle of radius 100 px flattened to within 0.01 px of it
KAPPA = 4 / 3 * (np.sqrt(2) - 1)  # a quarter circle as a cubic Bezier, as java.awt.geom draws RoundRectangle2D


def bezier(controls):
    """The points (x, y) float [CURVE_STEPS + 1, 2] along the Bezier curve of ``controls`` [k + 1, 2] (degree k: 2
    quadratic, 3 cubic), from its first control point to its last."""
    t = np.linspace(0, 1, CURVE_STEPS + 1)[:, None]
    k = len(controls) - 1
    return sum(comb(k, i) * (1 - t) ** (k - i) * t ** i * controls[i] for i in range(k + 1))


def path_rings(path):
    """The closed rings (x, y) float [N, 2] of a java.awt.geom path as ImageJ saves a composite (ShapeRoi) ROI: floats
    0 x y (move), 1 x y (line), 2 x1 y1 x y (quadratic curve), 3 x1 y1 x2 y2 x y (cubic curve), 4 (close), its curves
    flattened into CURVE_STEPS lines each (roifile refuses curves, which a composite made with a rounded rectangle
    holds). A ring left open is closed, as a fill closes it; a ValueError for an unknown segment."""
    path = np.asarray(path, np.float64)
    rings, ring, i = [], [], 0
    while i < len(path):
        op = int(path[i])
        if op == 0:
            rings.append(ring)
            ring = [path[i + 1:i + 3]]
            i += 3
        elif op == 1:
            ring.append(path[i + 1:i + 3])
            i += 3
        elif op in (2, 3):
            if not ring:
                raise ValueError("a curve before any point")
            ring.extend(bezier(np.r_[[ring[-1]], path[i + 1:i + 1 + 2 * op].reshape(op, 2)])[1:])
            i += 1 + 2 * op
        elif op == 4:
            rings.append(ring)
            ring = ring[:1]  # a line after a close, with no move, starts from the ring's first point (Path2D)
            i += 1
        else:
            raise ValueError(f"unknown path segment type {path[i]:g}")
    rings.append(ring)
    return [np.array(ring) for ring in rings if len(ring) >= 3]


def rounded_rect_path(box, diameter):
    """The path (:func:`path_rings`) of the rectangle ``box`` (left, top, right, bottom) with corners rounded to
    ``diameter`` pixels, as ImageJ fills it (Roi.getMask: java.awt.geom.RoundRectangle2D): each corner a quarter
    ellipse of axes min(diameter, width) and min(diameter, height) (a diameter past a side is clamped to it: past
    both, the rectangle is its inscribed ellipse), drawn as java.awt.geom does, a cubic Bezier."""
    left, top, right, bottom = box
    rx, ry = min(diameter, right - left) / 2, min(diameter, bottom - top) / 2
    path = [0, left, top + ry]
    for corner, start, end in (((left, bottom), (left, bottom - ry), (left + rx, bottom)),
                               ((right, bottom), (right - rx, bottom), (right, bottom - ry)),
                               ((right, top), (right, top + ry), (right - rx, top)),
                               ((left, top), (left + rx, top), (left, top + ry))):
        corner, start, end = np.array(corner), np.array(start), np.array(end)
        path += [1, *start, 3, *(start + KAPPA * (corner - start)), *(end + KAPPA * (corner - end)), *end]
    return path + [4]


def rings_of(roi):
    """The closed outlines (x, y) float [N, 2] of a polygon, freehand (ellipse and rotated rectangle too: ImageJ saves
    their polygon), traced, composite or rectangle ROI, in ImageJ's coordinates: roifile's absolute ones (sub-pixel,
    or integer with left/top added), a composite's path (:func:`path_rings`, several rings), a rectangle's corners
    (rounded to its "rounded rect arc size", Fiji's corner diameter: :func:`rounded_rect_path`)."""
    if roi.roitype == ROI_TYPE.RECT and roi.composite:
        return path_rings(roi.multi_coordinates)
    if roi.roitype == ROI_TYPE.RECT:
        left, top, right, bottom = box_of(roi)
        if roi.rounded_rect_arc_size > 0:
            return path_rings(rounded_rect_path((left, top, right, bottom), roi.rounded_rect_arc_size))
        return [np.array([[left, top], [right, top], [right, bottom], [left, bottom]], np.float64)]
    return [np.asarray(ring, np.float64) for ring in roi.coordinates(multi=True) if len(ring) >= 3]


def fill_rings(rings, window):
    """bool [h, w]: the pixels of ``window`` (top, left, h, w) whose centres lie inside the closed ``rings`` (x, y)
    [N, 2], as ImageJ's PolygonFiller decides: even-odd (a composite's holes are out), a row's centres at y + 0.5
    crossed by the edges with y0 <= y + 0.5 < y1, a centre exactly on an edge inside on a ring's right side only."""
    top, left, h, w = window
    start = np.concatenate(rings)
    end = np.concatenate([np.roll(ring, -1, axis=0) for ring in rings])
    low, high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    # each edge crosses the rows whose centre row + 0.5 is in [low, high): horizontal edges cross none
    first = np.clip(np.ceil(low - top - 0.5), 0, h).astype(np.int64)
    stop = np.clip(np.ceil(high - top - 0.5), 0, h).astype(np.int64)
    edge = np.repeat(np.arange(len(start)), stop - first)
    row = np.arange(len(edge)) - np.repeat(np.cumsum(stop - first) - (stop - first), stop - first) + first[edge]
    y = top + row + 0.5
    (x0, y0), (x1, y1) = start[edge].T, end[edge].T
    x = x0 + (y - y0) * (x1 - x0) / (y1 - y0) - left
    # crossings sorted row by row (rows span + 1 apart, the crossings clipped into their row's span): the crossings
    # left of a centre are the ones before it, and an odd count puts it inside
    span = w + 3
    keys = np.sort(row * span + np.clip(x, -1, w + 1) + 1)
    centres = np.arange(h)[:, None] * span + np.arange(w)[None, :] + 1.5
    left_of = np.searchsorted(keys, centres, "left") - np.searchsorted(keys, np.arange(h)[:, None] * span, "left")
    return left_of % 2 == 1


def fill_oval(box, window):
    """bool [h, w]: the pixels of ``window`` (top, left, h, w) whose centres lie inside or on the ellipse inscribed in
    ``box`` (left, top, right, bottom), ImageJ's OvalRoi.contains rule. ImageJ's own oval mask (OvalRoi.getMask,
    1.52 on) is an integer polygon traced around the same pixel centres, so the two can differ only at a pixel whose
    centre lies on the ellipse within rounding (none in tests/test_rois.py's ovals)."""
    top, left, h, w = window
    a, b = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    dx = (left + np.arange(w) + 0.5 - (box[0] + a)) / a
    dy = (top + np.arange(h) + 0.5 - (box[1] + b)) / b
    return dy[:, None] ** 2 + dx[None, :] ** 2 <= 1


def roi_pixels(roi, shape):
    """The pixels of an area ROI (:func:`is_area`) in an image of ``shape`` (H, W): ((bool [h, w], (rows, cols)
    slices of the image they cover), clipped to the image, or None when it covers none of its pixels; whether it
    reaches over the image's edge (:func:`reaches_over`). A ValueError for a composite ROI's damaged path."""
    oval = roi.roitype == ROI_TYPE.OVAL and not roi.composite
    if oval:
        x0, y0, x1, y1 = box = box_of(roi)
    else:
        rings = rings_of(roi)
        if not rings:  # a composite or polygon of fewer than 3 points encloses nothing
            return None, False
        (x0, y0), (x1, y1) = np.concatenate(rings).min(axis=0), np.concatenate(rings).max(axis=0)
    window = window_of((x0, y0, x1, y1), shape)
    if window is None:
        return None, False
    pixels = fill_oval(box, window) if oval else fill_rings(rings, window)
    return found_pixels(pixels, window), reaches_over((x0, y0, x1, y1), shape)


def reaches_over(box, shape):
    """Whether ``box`` (left, top, right, bottom) in ImageJ's coordinates holds the centre of a pixel beyond the
    edge of an image of ``shape`` (H, W), so that clipping may leave out pixels of its nucleus (an outline drawn
    along the edge, at 0 or W, holds none)."""
    return bool(min(box[0], box[1]) <= -0.5 or box[2] >= shape[1] + 0.5 or box[3] >= shape[0] + 0.5)


def window_of(box, shape):
    """The window (top, left, h, w) of the pixels of an image of ``shape`` (H, W) that ``box`` (left, top, right,
    bottom) in ImageJ's coordinates overlaps, clipped to the image; None when it overlaps none."""
    top, left = max(int(np.floor(box[1])), 0), max(int(np.floor(box[0])), 0)
    bottom, right = min(int(np.ceil(box[3])), shape[0]), min(int(np.ceil(box[2])), shape[1])
    return (top, left, bottom - top, right - left) if bottom > top and right > left else None


def found_pixels(pixels, window):
    """(``pixels`` bool [h, w], the (rows, cols) slices of the image that their ``window`` (top, left, h, w) covers),
    or None when no pixel is set."""
    if not pixels.any():
        return None
    top, left, h, w = window
    return pixels, (slice(top, top + h), slice(left, left + w))


def check_plane(rois, path):
    """A DataError naming the file when any of ``rois`` sits on a stack plane past the first (its position, slice
    or frame above 1): training reads 2D images."""
    planes = [roi for roi in rois if max(roi.position, roi.z_position, roi.t_position) > 1]
    if planes:
        roi = planes[0]
        raise DataError(f"ImageJ ROIs {path}: {len(planes)} of {len(rois)} ROIs are on a stack plane past the first "
                        f"(e.g. '{roi.name}': position {roi.position}, slice {roi.z_position}, frame "
                        f"{roi.t_position}); training reads 2D images: draw them on a 2D image, or in Fiji's ROI "
                        "Manager use More > Remove Slice Info, then save the set again")


def check_spline(rois, path):
    """A DataError naming the file when any of the area ``rois`` is spline-fitted (Edit > Selection > Fit Spline):
    ImageJ saves its polygon's vertices and fills the spline it fits through them (RoiDecoder: fitSpline), which
    this reader does not compute; the polygon alone would miss or add pixels along every side."""
    splined = [roi for roi in rois if roi.options & ROI_OPTIONS.SPLINE_FIT and not roi.composite
               and roi.roitype in (ROI_TYPE.POLYGON, ROI_TYPE.FREEHAND, ROI_TYPE.TRACED)]
    if splined:
        raise DataError(f"ImageJ ROIs {path}: {len(splined)} of {len(rois)} area ROIs are spline-fitted (e.g. "
                        f"'{splined[0].name}'), whose spline is not read; in Fiji, select each in the ROI Manager, "
                        "run Edit > Selection > Interpolate (interval 1) and click Update, then save the set again")


def roi_labels(path, shape):
    """The ImageJ ROIs of ``path`` (:func:`read_rois`) as instance labels uint16 [H, W] of ``shape`` (H, W): 0 the
    background, the area ROIs 1..N in the file's order, each on the pixels whose centres it encloses as ImageJ's
    Measure and Fill take them (:func:`roi_pixels`), a later ROI over an earlier one where they overlap (as ImageJ
    draws them), clipped to the image. Also returns the notes (a list of one-line strings) on ROIs left out (not
    areas, covering no pixel of the image), ROIs clipped at the image's edge and pixels claimed twice. A stack plane
    past the first (:func:`check_plane`), a spline-fitted ROI (:func:`check_spline`), a composite ROI's damaged path
    or more than 65,535 areas is a DataError naming the file."""
    rois = read_rois(path)
    check_plane(rois, path)
    areas = [roi for roi in rois if is_area(roi)]
    check_spline(areas, path)
    if len(areas) > MAX_ROIS:
        raise DataError(f"ImageJ ROIs {path}: {len(areas)} area ROIs, more than the {MAX_ROIS} that a 16-bit label "
                        "image numbers; split the image (and its ROIs) into tiles")
    labels, twice = np.zeros(shape, np.uint16), np.zeros(shape, bool)
    outside = clipped = 0
    for value, roi in enumerate(areas, start=1):
        try:
            found, over = roi_pixels(roi, shape)
        except ValueError as e:  # path_rings': a composite's path that Fiji cannot have written
            raise DataError(f"ImageJ ROIs {path}: ROI '{roi.name}' has a damaged outline ({e}); {SAVE_AGAIN}") from None
        if found is None:
            outside += 1
            continue
        clipped += over
        pixels, box = found
        twice[box] |= pixels & (labels[box] > 0)
        labels[box][pixels] = value
    notes = []
    if len(rois) > len(areas):
        n = len(rois) - len(areas)
        notes.append(f"note: {path}: {n} ROI{'s are' if n > 1 else ' is'} no area (a line, point, angle or text) "
                     "and left out")
    if outside:
        notes.append(f"note: {path}: {outside} ROI{'s cover' if outside > 1 else ' covers'} no pixel of the "
                     f"{shape[1]}x{shape[0]} image (outside it, or too small to enclose a pixel's centre)")
    if clipped:
        notes.append(f"note: {path}: {clipped} ROI{'s reach' if clipped > 1 else ' reaches'} over the edge of the "
                     f"{shape[1]}x{shape[0]} image and {'are' if clipped > 1 else 'is'} clipped to it (nuclei cut by "
                     "the edge; if they should lie wholly inside, the ROIs belong to another image, a crop or a "
                     "resized copy)")
    if twice.any():
        notes.append(f"note: {path}: {int(twice.sum())} pixels lie in two ROIs or more; each goes to the later ROI "
                     "in the file")
    return labels, notes
