"""Tests for rois.py: each nucleus's ImageJ ROI encloses exactly its pixels, checked by an independent polygon test
(matplotlib's Path at ImageJ's pixel centres), after a round trip through the zip file as roifile reads it."""
import numpy as np
import pytest
from matplotlib.path import Path
from roifile import roiread
from scipy import ndimage as ndi
from skimage.measure import label as connected
from skimage.segmentation import relabel_sequential

from rois import nucleus_rois, rois_archive


def enclosed_pixels(coordinates, shape):
    """bool [H, W]: the pixels whose centres (c + 0.5, r + 0.5 in ImageJ's coordinates) lie inside the polygon
    ``coordinates`` (x, y) [N, 2], as ImageJ fills a polygon ROI."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]
    return Path(coordinates).contains_points(centres).reshape(shape)


def blobs(seed, shape=(24, 30)):
    """Random 8-connected nuclei int32 [H, W] without holes, touching the edges and each other (the blobs cut in
    two halves), with parts joined only diagonally."""
    rng = np.random.default_rng(seed)
    right = np.arange(shape[1]) >= shape[1] // 2
    labels = connected(np.where(rng.random(shape) < 0.4, 1 + right, 0), connectivity=2)
    for label in range(1, labels.max() + 1):  # fill each one's holes (and nuclei in them): a polygon has no holes
        labels[ndi.binary_fill_holes(labels == label)] = label
    return relabel_sequential(labels)[0]


@pytest.mark.parametrize("seed", range(8))
def test_each_roi_encloses_exactly_its_nucleus_after_the_zip(tmp_path, seed):
    labels = blobs(seed)
    assert labels.max() > 3
    with rois_archive(tmp_path / "a_rois.zip") as add:
        add(nucleus_rois(labels))
    back = roiread(tmp_path / "a_rois.zip")
    assert [int(roi.name) for roi in back] == list(range(1, labels.max() + 1))
    for roi in back:
        assert np.array_equal(enclosed_pixels(roi.coordinates(), labels.shape), labels == int(roi.name)), roi.name


def test_single_pixels_lines_and_a_whole_image():
    labels = np.zeros((9, 9), np.int32)
    labels[0, 0] = 1
    labels[4, 1:8] = 2
    labels[6:9, 8] = 3
    for roi in nucleus_rois(labels):
        assert np.array_equal(enclosed_pixels(roi.coordinates(), labels.shape), labels == int(roi.name))
    whole = nucleus_rois(np.ones((5, 7), np.int32))[0].coordinates()
    assert (whole.min(axis=0) >= -0.5).all() and (whole.max(axis=0) <= (7.5, 5.5)).all()
    assert np.array_equal(enclosed_pixels(whole, (5, 7)), np.ones((5, 7), bool))


def test_a_ragged_hole_or_a_long_thin_part_does_not_take_the_nucleus_s_place():
    """The longest contour was taken: a thin-walled nucleus around a comb-shaped hole got the hole's outline (the
    hole's pixels, none of its own), and a nucleus in two parts the thin part's, not the largest part's."""
    ring = np.zeros((16, 16), np.int32)
    ring[1:15, 1:15] = 1
    ring[3:13, 3:12:2] = 0  # the comb's teeth
    ring[3, 3:12] = 0
    assert np.array_equal(enclosed_pixels(nucleus_rois(ring)[0].coordinates(), ring.shape),
                          ndi.binary_fill_holes(ring))
    parts = np.zeros((20, 40), np.int32)
    parts[1:9, 1:9] = 1  # 64 pixels
    parts[15, 2:38] = 1  # 36 pixels in a line, its contour the longer
    blob = parts.copy()
    blob[15] = 0
    assert np.array_equal(enclosed_pixels(nucleus_rois(parts)[0].coordinates(), parts.shape), blob == 1)


def test_labels_missing_from_the_image_are_skipped_and_names_follow_the_labels():
    labels = np.zeros((10, 10), np.int32)
    labels[1:3, 1:3], labels[6:9, 6:9] = 2, 12345
    assert [roi.name for roi in nucleus_rois(labels)] == ["0002", "12345"]


def imagej_plane(roi, planes):
    """The 0-based plane of a stack of ``planes`` (T, Z) that Fiji's ROI Manager shows and measures ``roi`` in, or
    None for the plane on show: ImageJ's RoiDecoder keeps a frame, slice or channel when one is set and then drops
    the position, and RoiManager.restore reads those only in a hyperstack (T and Z both above 1; a stack of one
    axis opens as a plain stack), the position elsewhere."""
    if roi.c_position or roi.z_position or roi.t_position:
        return (roi.t_position - 1) * planes[1] + roi.z_position - 1 if min(planes) > 1 else None
    return roi.position - 1 if roi.position else None


@pytest.mark.parametrize("planes", [(3, 2), (7, 1), (1, 4)])
def test_stack_planes_are_where_imagej_reads_them_with_a_name_with_the_plane(tmp_path, planes):
    """A T x Z hyperstack's ROIs at their frame and slice, a time-lapse's or z-stack's (a plain stack in ImageJ) at
    their stack position: a frame or slice there would leave each ROI in the plane on show."""
    labels = np.zeros((6, 6), np.int32)
    labels[2:4, 2:4] = 1
    count = planes[0] * planes[1]
    with rois_archive(tmp_path / "s_rois.zip") as add:
        for plane in range(count):
            add(nucleus_rois(labels, plane, planes))
    back = roiread(tmp_path / "s_rois.zip")
    assert [roi.name for roi in back] == [f"{plane:04d}-0001" for plane in range(count)]
    assert [imagej_plane(roi, planes) for roi in back] == list(range(count))
    roi, = nucleus_rois(labels, plane=5, planes=(3, 2))  # time points of 2 z planes: plane 5 is t 3, z 2
    assert (roi.t_position, roi.z_position) == (3, 2)
    roi, = nucleus_rois(labels)
    assert (roi.name, roi.position, roi.t_position, roi.z_position) == ("0001", 0, 0, 0)


def test_planes_added_one_by_one_and_no_nuclei(tmp_path):
    labels = np.zeros((8, 8), np.int32)
    labels[1:4, 1:4], labels[5:7, 5:7] = 1, 2
    with rois_archive(tmp_path / "s_rois.zip") as add:
        for plane, kept in enumerate((labels, labels * (labels == 1), labels * 0)):  # the last holds no nucleus
            add(nucleus_rois(kept, plane, (3, 1)))
    assert [roi.name for roi in roiread(tmp_path / "s_rois.zip")] == ["0000-0001", "0000-0002", "0001-0001"]
    with rois_archive(tmp_path / "e_rois.zip") as add:
        add([])
    assert roiread(tmp_path / "e_rois.zip") == []


def test_an_error_or_ctrl_c_while_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "a_rois.zip"
    labels = np.pad(np.ones((2, 2), np.int32), 2)
    with rois_archive(path) as add:
        add(nucleus_rois(labels))
    before = path.read_bytes()
    for stop in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(stop)), rois_archive(path) as add:
            add(nucleus_rois(labels * 2))
            raise stop
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_rois.zip"]
