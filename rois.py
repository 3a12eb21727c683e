"""Nuclei as ImageJ regions of interest: ``predict.py --rois`` writes each image's nuclei as ``<id>_rois.zip``, which
Fiji's ROI Manager opens (drag it onto Fiji, or File > Open), to measure, edit or count them there.

Each nucleus is one polygon (roifile's ImagejRoi, sub-pixel coordinates) through the midpoints between its edge
pixels and their outside neighbours, so that the pixels whose centres it encloses, as ImageJ fills a polygon, are
exactly the nucleus's (its largest 8-connected part; a hole inside it is not outlined).
"""
import zipfile
from contextlib import contextmanager

import numpy as np
from roifile import ImagejRoi
from scipy import ndimage as ndi
from skimage.measure import find_contours

from files import atomic_write

# the time stamp of every entry: the same nuclei give the same bytes (two predictions' outputs compare byte for byte)
ENTRY_TIME = (1980, 1, 1, 0, 0, 0)


def outline(mask):
    """The outline of the True pixels of a bool mask [h, w] as (x, y) float [N, 2] in ImageJ's coordinates, where
    pixel (row r, column c) covers [c, c + 1) x [r, r + 1): the outer closed contour at 0.5 (marching squares, the
    True pixels 8-connected) of its largest 8-connected part (the most pixels) when the mask has several."""
    parts, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    if count > 1:
        mask = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
    # padded so that a region touching the edge closes; contour (row, col) in the padded array's pixel-centre units
    contours = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")
    # the outer contour encloses its holes' contours, though a ragged hole's can be the longer
    ring = max(contours, key=enclosed_area)
    return ring[:, ::-1] - 0.5  # -1 for the pad, +0.5 from pixel centres to ImageJ's pixel corners


def enclosed_area(ring):
    """The area inside a closed polygon float [N, 2] (the shoelace formula), >= 0."""
    y, x = ring[:, 0], ring[:, 1]
    return abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2


def nucleus_rois(labels, plane=0, planes=(1, 1)):
    """The ImagejRoi of each nucleus of a label image int [H, W] (0 background, nuclei 1..N, objects.csv's
    ``label``), in label order, named ``<label>`` (2D) or ``<plane>-<label>`` (a stack's plane, 0-based as in
    objects.csv), zero-padded to 4 digits. ``planes``: the stack's (T, Z) sizes, for the plane's position in it
    (1-based, as ImageJ counts: the stack position, and with both T and Z the frame and slice of the hyperstack)."""
    prefix = f"{plane:04d}-" if planes != (1, 1) else ""
    rois = []
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        xy = outline(labels[box] == label) + (box[1].start, box[0].start)
        roi = ImagejRoi.frompoints(xy, name=f"{prefix}{label:04d}")
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
