"""Tests for rois.py: each nucleus's ImageJ ROI encloses exactly its pixels, checked by an independent polygon test
(matplotlib's Path at ImageJ's pixel centres, even-odd over a composite ROI's rings), after a round trip through the
zip file as roifile reads it."""
import os
import re
import shutil
import zipfile

import numpy as np
import pytest
from matplotlib.path import Path
from roifile import ROI_OPTIONS, ROI_SUBTYPE, ROI_TYPE, ImagejRoi, roiread
from scipy import ndimage as ndi
from skimage.measure import label as connected
from skimage.segmentation import relabel_sequential

import layouts
import rois
from conftest import TINY_NAME, TINY_NUM, TINY_SIZE, assert_same_targets, make_synthetic, train_argv, write_image
from geojson_objects import features_file, nucleus_features
from image_files import read_label_image
from rois import nucleus_rois, roi_labels, rois_archive
from utils import DataError


def enclosed_pixels(coordinates, shape):
    """bool [H, W]: the pixels whose centres (c + 0.5, r + 0.5 in ImageJ's coordinates) lie inside the polygon
    ``coordinates`` (x, y) [N, 2], as ImageJ fills a polygon ROI."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]
    return Path(coordinates).contains_points(centres).reshape(shape)


def blobs(seed, shape=(24, 30), holes=False):
    """Random 8-connected nuclei int32 [H, W], touching the edges and each other (the blobs cut in two halves), with
    parts joined only diagonally; with ``holes``, some with holes (and nuclei in them) and some in several parts."""
    rng = np.random.default_rng(seed)
    right = np.arange(shape[1]) >= shape[1] // 2
    labels = connected(np.where(rng.random(shape) < 0.4, 1 + right, 0), connectivity=2)
    for label in range(1, labels.max() + 1):
        labels[ndi.binary_fill_holes(labels == label)] = label
    if holes:  # a ring of pixels knocked out of each nucleus's inside, and every third nucleus merged into the next
        labels[ndi.binary_erosion(labels > 0) & (rng.random(shape) < 0.3)] = 0
        labels[labels % 3 == 0] += 1
    return relabel_sequential(labels)[0]


def roi_pixels(roi, shape):
    """bool [H, W]: the pixels whose centres lie inside an odd number of ``roi``'s rings, as ImageJ fills a polygon
    and a composite (ShapeRoi, even-odd)."""
    inside = np.zeros(shape, bool)
    for ring in roi.coordinates(multi=True):
        inside ^= enclosed_pixels(ring, shape)
    return inside


@pytest.mark.parametrize("seed,holes", [(seed, seed % 2 == 1) for seed in range(8)])
def test_each_roi_encloses_exactly_its_nucleus_after_the_zip(tmp_path, seed, holes):
    labels = blobs(seed, holes=holes)
    assert labels.max() > 3
    parts = [ndi.label(labels == label, np.ones((3, 3)))[1] for label in range(1, labels.max() + 1)]
    holed = [(ndi.binary_fill_holes(labels == label) & (labels != label)).any() for label in range(1, labels.max() + 1)]
    assert not holes or max(parts) > 1 and any(holed)
    with rois_archive(tmp_path / "a_rois.zip") as add:
        add(nucleus_rois(labels))
    back = roiread(tmp_path / "a_rois.zip")
    assert [int(roi.name) for roi in back] == list(range(1, labels.max() + 1))
    for roi in back:
        assert np.array_equal(roi_pixels(roi, labels.shape), labels == int(roi.name)), roi.name
        assert (roi.shape_roi_size > 0) == (len(roi.coordinates(multi=True)) > 1)  # a composite only where needed


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


def test_outlines_keep_only_their_corners():
    """A straight or 45-degree run of edge pixels is one segment (the ROIs and GeoJSON files about half as large): a
    5 x 9 block is an octagon (its corners cut at the pixel-centre midpoints), a diagonal line a quadrilateral; on
    random masks no ring point lies inside a straight run (the pixels each ring encloses: the tests above)."""
    assert len(rois.outlines(np.ones((5, 9), bool))[0]) == 9  # closed: the first point again
    assert [len(ring) for ring in rois.outlines(np.eye(8, dtype=bool))] == [5]
    rng = np.random.default_rng(0)
    for _ in range(20):
        for ring in rois.outlines(rng.random((12, 12)) < 0.5):
            step = np.diff(np.r_[ring, ring[1:2]], axis=0)  # around the closing point too, but for the first point
            straight = (step[:-1, 0] * step[1:, 1] == step[:-1, 1] * step[1:, 0]) & ((step[:-1] * step[1:]).sum(1) > 0)
            assert not straight[:-1].any()


def test_a_ragged_hole_and_a_thin_second_part_are_outlined_too():
    """A thin-walled nucleus around a comb-shaped hole, and a nucleus in two parts: a composite ROI of all their
    outlines encloses exactly their pixels (the outer contour alone took in the hole; the longest contour once took
    the hole's outline, and a nucleus in two parts the thin part's)."""
    ring = np.zeros((16, 16), np.int32)
    ring[1:15, 1:15] = 1
    ring[3:13, 3:12:2] = 0  # the comb's teeth
    ring[3, 3:12] = 0
    parts = np.zeros((20, 40), np.int32)
    parts[1:9, 1:9] = 1  # 64 pixels
    parts[15, 2:38] = 1  # 36 pixels in a line, its contour the longer
    for labels in ring, parts:
        roi = nucleus_rois(labels)[0]
        assert roi.roitype == ROI_TYPE.RECT and roi.shape_roi_size > 0  # ImageJ's composite
        back = ImagejRoi.frombytes(roi.tobytes())
        assert np.array_equal(roi_pixels(back, labels.shape), labels == 1)


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


@pytest.mark.parametrize("name, writer, nuclei", [("a_rois.zip", rois_archive, nucleus_rois),
                                                  ("a.geojson", features_file, nucleus_features)])
def test_an_error_or_ctrl_c_while_writing_leaves_the_old_file(tmp_path, name, writer, nuclei):
    """The ROI set's and the GeoJSON objects' writers alike."""
    path = tmp_path / name
    labels = np.pad(np.ones((2, 2), np.int32), 2)
    with writer(path) as add:
        add(nuclei(labels))
    before = path.read_bytes()
    for stop in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(stop)), writer(path) as add:
            add(nuclei(labels * 2))
            raise stop
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ------------------------------------------------------------------------------ ImageJ ROI sets as training labels

def save_rois(path, rois):
    """A ROI Manager zip file of ``rois`` at ``path`` (rois_archive, predict.py's writer), folders created."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rois_archive(path) as add:
        add(rois)
    return path


def roi_dataset(root, name="<id>_rois.zip"):
    """inputs/tiny of synthetic images with their labels/ turned into ImageJ ROI sets rois/``name`` (no masks/ nor
    labels/ left): (folder, ids)."""
    ids = make_synthetic(root, num_images=TINY_NUM, size=TINY_SIZE)
    folder = os.path.join(root, "inputs", TINY_NAME)
    for img_id in ids:
        labels = read_label_image(os.path.join(folder, "labels", img_id + ".png"))
        save_rois(os.path.join(folder, "rois", name.replace("<id>", img_id)), nucleus_rois(labels))
    shutil.rmtree(os.path.join(folder, "labels"))
    shutil.rmtree(os.path.join(folder, "masks"))
    return folder, ids


@pytest.mark.parametrize("seed", range(6))
def test_roi_sets_read_back_as_the_labels_they_were_written_from(tmp_path, seed):
    labels = blobs(seed, holes=seed % 2 == 1)
    path = save_rois(str(tmp_path / "a_rois.zip"), nucleus_rois(labels))
    back, notes = roi_labels(path, labels.shape)
    assert back.dtype == np.uint16 and np.array_equal(back, labels) and notes == []


def independent(roi, shape):
    """bool [H, W] of a hand-made ROI by another route: matplotlib's Path at the pixel centres (each ring's inside
    XORed, the even-odd rule), or the ellipse's equation for an oval."""
    if roi.roitype == ROI_TYPE.OVAL:
        rows, cols = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
        a, b = (roi.right - roi.left) / 2, (roi.bottom - roi.top) / 2
        return ((cols - roi.left - a) / a) ** 2 + ((rows - roi.top - b) / b) ** 2 <= 1
    return roi_pixels(roi, shape)


def hand_made_rois():
    """One ROI of each area type, as Fiji saves them: sub-pixel and integer polygons, freehand, traced, ellipse,
    rotated rectangle, rectangle, ovals and a composite with a hole."""
    subpixel = ImagejRoi.frompoints(np.array([[2.3, 1.7], [17.6, 4.2], [12.1, 15.8], [6.4, 9.9], [1.2, 13.4]]))
    integer = ImagejRoi.frompoints(np.array([[3, 2], [19, 7], [8, 17], [2, 12]]))  # no edge through a centre
    integer.roitype = ROI_TYPE.POLYGON
    traced = ImagejRoi.frompoints(np.array([[4, 3], [9, 3], [9, 6], [14, 6], [14, 12], [4, 12]]))
    traced.roitype = ROI_TYPE.TRACED
    outer = [0, 2.2, 2.3, 1, 18.6, 2.1, 1, 17.8, 16.2, 1, 3.1, 17.4, 4]  # roifile's path codes: 0 move, 1 line, 4 close
    hole = [0, 7.3, 6.2, 1, 12.4, 7.6, 1, 9.7, 12.3, 4]
    composite = ImagejRoi(roitype=ROI_TYPE.RECT, multi_coordinates=np.array(outer + hole, np.float32),
                          shape_roi_size=len(outer + hole), left=2, top=2, right=19, bottom=18)
    # Fiji's ellipse and rotated rectangle tools: a freehand ROI of their polygon (EllipseRoi.makeEllipse's 72 points,
    # RotatedRectRoi's 4 corners, sub-pixel), with the tool's parameters beside it, which ImageJ rebuilds the same
    # polygon from
    (x1, y1, x2, y2), ratio = (3.3, 14.2, 18.6, 5.1), 0.55
    turn, major, step = np.arctan2(y2 - y1, x2 - x1), np.hypot(x2 - x1, y2 - y1), np.arange(72) * np.pi / 36
    along, across = np.cos(step) * major / 2, np.sin(step) * major * ratio / 2
    ellipse = ImagejRoi.frompoints(np.float32(np.c_[(x1 + x2) / 2 + along * np.cos(turn) - across * np.sin(turn),
                                                    (y1 + y2) / 2 + along * np.sin(turn) + across * np.cos(turn)]))
    ellipse.subtype, ellipse.x1, ellipse.y1, ellipse.x2, ellipse.y2 = ROI_SUBTYPE.ELLIPSE, x1, y1, x2, y2
    half = np.array([y2 - y1, x1 - x2]) / np.hypot(x2 - x1, y2 - y1) * 3.5  # a 7-pixel-wide rectangle along the line
    rotated = ImagejRoi.frompoints(np.array([[x1, y1] + half, [x2, y2] + half, [x2, y2] - half, [x1, y1] - half]))
    rotated.subtype, rotated.x1, rotated.y1, rotated.x2, rotated.y2 = ROI_SUBTYPE.ROTATED_RECT, x1, y1, x2, y2
    return {"subpixel polygon": subpixel, "integer polygon": integer, "traced": traced, "ellipse": ellipse,
            "rotated rectangle": rotated,
            "rectangle": ImagejRoi(roitype=ROI_TYPE.RECT, left=3, top=5, right=16, bottom=11),
            "oval": ImagejRoi(roitype=ROI_TYPE.OVAL, left=2, top=4, right=19, bottom=15),
            "round oval": ImagejRoi(roitype=ROI_TYPE.OVAL, left=5, top=3, right=16, bottom=14),
            "composite with a hole": composite}


@pytest.mark.parametrize("kind", list(hand_made_rois()))
def test_each_area_type_fills_the_pixels_whose_centres_it_encloses(tmp_path, kind):
    roi = hand_made_rois()[kind]
    path = save_rois(str(tmp_path / "a.zip"), [roi])
    labels, notes = roi_labels(path, (20, 22))
    expected = independent(ImagejRoi.frombytes(roi.tobytes()), (20, 22))
    assert expected.sum() > 20 and notes == []
    assert np.array_equal(labels == 1, expected) and set(np.unique(labels)) == {0, 1}
    if kind == "rectangle":
        assert np.array_equal(np.argwhere(labels).min(axis=0), [5, 3]) and (labels == 1).sum() == 6 * 13
    if kind == "composite with a hole":
        assert not labels[9, 9]  # in the hole


def test_a_single_roi_file_an_empty_set_and_the_notes(tmp_path):
    one = tmp_path / "one.roi"
    hand_made_rois()["oval"].tofile(str(one))
    assert (roi_labels(str(one), (20, 22))[0] == 1).sum() > 100
    empty = save_rois(str(tmp_path / "empty.zip"), [])
    labels, notes = roi_labels(empty, (8, 9))
    assert labels.shape == (8, 9) and not labels.any() and notes == []
    touched = tmp_path / "touched.zip"  # Fiji saves no empty ROI Manager: the "empty zip file" made by hand
    touched.write_bytes(b"")
    with pytest.raises(DataError, match=f"ImageJ ROIs {touched} is an empty file, not a zip file: .* write an empty "
                                        "one: python -c") as error:
        roi_labels(str(touched), (8, 9))
    exec(str(error.value).split("python -c ")[1].strip('"'))  # the command it gives makes a set of no nuclei
    assert not roi_labels(str(touched), (8, 9))[0].any()
    square = ImagejRoi(roitype=ROI_TYPE.RECT, left=2, top=2, right=8, bottom=8)
    later = ImagejRoi(roitype=ROI_TYPE.RECT, left=6, top=6, right=14, bottom=9)  # 2 x 2 over the square
    line = ImagejRoi(roitype=ROI_TYPE.LINE, x1=1, y1=1, x2=5, y2=5)
    text = ImagejRoi(roitype=ROI_TYPE.RECT, subtype=ROI_SUBTYPE.TEXT, left=1, top=1, right=4, bottom=3, text="a")
    far = ImagejRoi(roitype=ROI_TYPE.RECT, left=40, top=40, right=50, bottom=50)
    tiny = ImagejRoi.frompoints(np.array([[3.1, 3.1], [3.4, 3.1], [3.2, 3.4]]))
    edge = ImagejRoi(roitype=ROI_TYPE.RECT, left=9, top=-3, right=30, bottom=4)  # partly outside: clipped
    mixed = [square, line, later, text, far, tiny, edge]
    for n, roi in enumerate(mixed):
        roi.name = f"{n:04d}"  # the names of a zip's entries, unique as the ROI Manager keeps them
    path = save_rois(str(tmp_path / "mixed.zip"), mixed)
    labels, notes = roi_labels(path, (12, 12))
    assert np.count_nonzero(labels == 1) == 36 - 4 and np.count_nonzero(labels == 2) == 6 * 3
    assert labels[6:8, 6:8].tolist() == [[2, 2], [2, 2]] and not (labels == 3).any() and not (labels == 4).any()
    assert np.array_equal(np.argwhere(labels == 5).max(axis=0), [3, 11]) and (labels == 5).sum() == 4 * 3
    assert notes == [f"note: {path}: 2 ROIs are no area (a line, point, angle or text) and left out",
                     f"note: {path}: 2 ROIs cover no pixel of the 12x12 image (outside it, or too small to enclose "
                     "a pixel's centre)",
                     # edge (y from -3) and later (x to 14)
                     f"note: {path}: 2 ROIs reach over the edge of the 12x12 image and are clipped to it (nuclei cut "
                     "by the edge; if they should lie wholly inside, the ROIs belong to another image, a crop or a "
                     "resized copy)",
                     f"note: {path}: 4 pixels lie in two ROIs or more; each goes to the later ROI in the file"]


def test_rois_over_the_image_s_edge_are_clipped_with_a_note(tmp_path):
    """A ROI that reaches over the image's edge keeps its pixels inside it (the ellipse's equation at the pixel
    centres, independently), and the note counts it: it was clipped silently. Outlines along the edge (a wand
    traced to it, a rectangle of the whole image) hold no pixel beyond it and get no note."""
    shape = (16, 20)
    over = [ImagejRoi(roitype=ROI_TYPE.OVAL, left=-5, top=3, right=7, bottom=13, name="0001"),
            ImagejRoi(roitype=ROI_TYPE.OVAL, left=12, top=9, right=24, bottom=21, name="0002")]
    path = save_rois(str(tmp_path / "over.zip"), over)
    labels, notes = roi_labels(path, shape)
    for value, roi in enumerate(over, start=1):
        assert np.array_equal(labels == value, independent(roi, shape)) and (labels == value).any()
    assert notes == [f"note: {path}: 2 ROIs reach over the edge of the 20x16 image and are clipped to it (nuclei cut "
                     "by the edge; if they should lie wholly inside, the ROIs belong to another image, a crop or a "
                     "resized copy)"]
    along = [ImagejRoi(roitype=ROI_TYPE.RECT, left=0, top=0, right=20, bottom=16, name="0001"),
             ImagejRoi.frompoints(np.array([[0, 0], [5.4, 0], [5.4, 16], [0, 16]]), name="0002")]
    path = save_rois(str(tmp_path / "along.zip"), along)
    labels, notes = roi_labels(path, shape)
    assert notes == [f"note: {path}: 80 pixels lie in two ROIs or more; each goes to the later ROI in the file"]
    assert (labels == 1).sum() == 20 * 16 - 80
    for edge, (top, bottom) in (("top", (-4, 6)), ("bottom", (10, 20))):  # over one edge each, inside the sides
        path = save_rois(str(tmp_path / f"{edge}.zip"), [ImagejRoi(roitype=ROI_TYPE.OVAL, left=5, top=top, right=15,
                                                                   bottom=bottom, name="0001")])
        assert roi_labels(path, shape)[1] == [f"note: {path}: 1 ROI reaches over the edge of the 20x16 image and is "
                                              "clipped to it (nuclei cut by the edge; if they should lie wholly "
                                              "inside, the ROIs belong to another image, a crop or a resized copy)"]


def test_a_zip_with_other_files_than_rois_reads_its_rois_as_fiji_does(tmp_path):
    """Fiji's ROI Manager opens the .roi entries of a zip and passes over the rest (a folder, a notes file zipped
    with the set)."""
    path = save_rois(str(tmp_path / "set.zip"), [ImagejRoi(roitype=ROI_TYPE.RECT, left=1, top=2, right=4, bottom=5,
                                                           name="0001")])
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes/", b"")
        z.writestr("notes/counted by AB.txt", b"42 nuclei")
    labels, notes = roi_labels(path, (8, 8))
    assert (labels == 1).sum() == 9 and labels.max() == 1 and notes == []


def test_unusable_roi_files_are_one_line_errors_naming_them(tmp_path, monkeypatch):
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04 not a zip")
    with zipfile.ZipFile(tmp_path / "bad_entry.zip", "w") as z:
        z.writestr("0001.roi", b"Iout")
    for path, entry in ((damaged, ""), (tmp_path / "bad_entry.zip", r" \(entry 0001.roi\)")):
        with pytest.raises(DataError, match=f"cannot read ImageJ ROIs {path}{entry}: not a readable ROI file .*; save "
                                            r"the set again from Fiji's ROI Manager \(More > Save...\)"):
            roi_labels(str(path), (8, 8))
    plane = ImagejRoi(roitype=ROI_TYPE.RECT, left=1, top=1, right=3, bottom=3, name="0002", position=3)
    staged = save_rois(str(tmp_path / "stack.zip"), [ImagejRoi(roitype=ROI_TYPE.RECT, right=2, bottom=2, name="0001"),
                                                     plane])
    with pytest.raises(DataError, match=f"ImageJ ROIs {staged}: 1 of 2 ROIs are on a stack plane past the first "
                                        r"\(e.g. '0002': position 3.*Remove Slice Info"):
        roi_labels(staged, (8, 8))
    monkeypatch.setattr(rois, "MAX_ROIS", 2)
    many = save_rois(str(tmp_path / "many.zip"), [ImagejRoi(roitype=ROI_TYPE.RECT, right=2, bottom=2, name=str(n))
                                                  for n in range(3)])
    with pytest.raises(DataError, match=f"ImageJ ROIs {many}: 3 area ROIs, more than the 2 that a 16-bit label "):
        roi_labels(many, (8, 8))


@pytest.mark.parametrize("upper", [False, True])
def test_a_dataset_of_roi_sets_reads_as_its_label_images(tmp_path, capsys, upper):
    """Masks, --borders targets, instance labels and the nucleus size of images + rois/ are those of the same
    dataset with label images, for each of the three names a ROI set may have; their endings in upper case too
    (.ZIP, _ROIS.ZIP, .ROI, as Windows tools save them: they were taken for no ROI set, every image lacking its)."""
    ids = make_synthetic(tmp_path / "labelled", num_images=4, size=TINY_SIZE)
    labelled = os.path.join(tmp_path, "labelled", "inputs", TINY_NAME)
    shutil.rmtree(os.path.join(labelled, "masks"))  # StarDist's layout: the masks come from the label images
    names = ["<id>_rois.zip", "<id>.zip", "<id>.roi"]
    for img_id, name in zip(ids, names + names[:1]):
        labels = read_label_image(os.path.join(labelled, "labels", img_id + ".png"))
        folder = os.path.join(tmp_path, "inputs", TINY_NAME)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        shutil.copy(os.path.join(labelled, "images", img_id + ".png"), os.path.join(folder, "images"))
        if name.endswith(".roi"):  # one nucleus alone in a .roi file
            labels = (labels == 1).astype(np.int32)
            write_image(os.path.join(labelled, "labels", img_id + ".png"), labels.astype(np.uint16))
            os.makedirs(os.path.join(folder, "rois"), exist_ok=True)
            nucleus_rois(labels)[0].tofile(os.path.join(folder, "rois", img_id + ".roi"))
        else:
            save_rois(os.path.join(folder, "rois", name.replace("<id>", img_id)), nucleus_rois(labels))
    if upper:
        for name in os.listdir(os.path.join(folder, "rois")):
            img_id = next(i for i in ids if name.startswith(i))
            os.rename(os.path.join(folder, "rois", name),
                      os.path.join(folder, "rois", img_id + name[len(img_id):].upper()))
    assert layouts.find_layout(folder).kind == "rois" and layouts.list_ids(folder) == ids
    assert capsys.readouterr().out == ""
    assert_same_targets(folder, labelled, ids)


def test_a_dataset_of_roi_sets_names_what_is_wrong(tmp_path, capsys):
    folder, ids = roi_dataset(tmp_path)
    rois_dir = os.path.join(folder, "rois")
    save_rois(os.path.join(rois_dir, ids[0] + ".zip"), [ImagejRoi(roitype=ROI_TYPE.LINE, x2=3, y2=3)])
    with pytest.raises(DataError, match=f"image {ids[0]} has 2 ROI files in {rois_dir}: {ids[0]}.zip, "
                                        f"{ids[0]}_rois.zip; keep one"):
        layouts.list_ids(folder)
    os.remove(os.path.join(rois_dir, ids[0] + "_rois.zip"))
    layouts.list_ids(folder)  # a ROI set of no area ROI is an image without nuclei, with a note
    assert capsys.readouterr().out == (f"note: {rois_dir}/{ids[0]}.zip: 1 ROI is no area (a line, point, angle or "
                                       "text) and left out\n")
    os.remove(os.path.join(rois_dir, ids[0] + ".zip"))
    with pytest.raises(DataError, match=f"1 image without ImageJ ROIs in {rois_dir}: {ids[0]}; give each image its "
                                        "ROI set, saved from Fiji's ROI Manager as <id>.zip"):
        layouts.list_ids(folder)
    save_rois(os.path.join(rois_dir, ids[0] + ".zip"), [])
    save_rois(os.path.join(rois_dir, "stray_rois.zip"), [])
    with pytest.raises(DataError, match=f"1 ROI file without an image in {rois_dir}: stray_rois.zip; name each"):
        layouts.list_ids(folder)
    os.remove(os.path.join(rois_dir, "stray_rois.zip"))
    (tmp_path / "damaged.zip").write_bytes(b"no zip")
    shutil.copy(tmp_path / "damaged.zip", os.path.join(rois_dir, ids[1] + "_rois.zip"))
    with pytest.raises(DataError, match=f"cannot read ImageJ ROIs {rois_dir}/{ids[1]}_rois.zip: not a readable"):
        layouts.list_ids(folder)
    os.makedirs(os.path.join(folder, "labels"))
    with pytest.raises(DataError, match=f"{folder} holds both ImageJ ROIs \\(rois/\\) and labels/: give each image "
                                        "one kind of annotation"):
        layouts.list_ids(folder)


def test_a_roi_set_saved_under_another_name_is_named_with_the_image_it_lacks(tmp_path):
    """Fiji's ROI Manager offers RoiSet.zip, and a second download is "<id> (1).zip": the image without ROIs and the
    set without an image are one mistake, named together."""
    folder, ids = roi_dataset(tmp_path, name="<id>.zip")
    rois_dir = os.path.join(folder, "rois")
    current = ids[0] + ".zip"
    for stray in ("RoiSet.zip", f"{ids[0]} (1).zip"):
        os.rename(os.path.join(rois_dir, current), os.path.join(rois_dir, stray))
        current = stray
        with pytest.raises(DataError, match=f"1 image without ImageJ ROIs in {rois_dir}: {ids[0]}; .*; found "
                                            rf"{re.escape(stray)}, named as no image"):
            layouts.list_ids(folder)


def test_train_and_val_on_roi_sets_with_borders_score_the_dsb2018_score(tmp_path, monkeypatch):
    """A 1-epoch --borders run on images + rois/ and val.py's DSB2018 score of its split, as for label images."""
    import train
    import val
    roi_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    train.main(train_argv("rois", "--borders", "True", epochs=1))
    scores = val.main(["--name", "rois", "--device", "cpu", "--no_overlays"])
    assert 0 <= scores["dsb"] <= 1 and "dsb_borders" in scores


# ----------------------------------------------- ROI shapes as ImageJ fills them: rounded rectangles, curves, splines

def rounded_rect_inside(box, diameter, shape):
    """bool [H, W]: the pixels whose centres lie inside the rectangle ``box`` (left, top, right, bottom) with its
    corners rounded as java.awt.geom.RoundRectangle2D rounds them (each corner a quarter ellipse of axes min(diameter,
    width) and min(diameter, height)): the ellipse's equation at the centres' distances past the straight sides. Also
    returns the least distance of a centre from the outline in the ellipse's units (|value - 1|), for the callers to
    keep off centres so close that flattening the arc (ImageJ's and rois.py's) could move them."""
    left, top, right, bottom = box
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    in_box = (cols >= left) & (cols < right) & (rows >= top) & (rows < bottom)
    if diameter == 0:
        return in_box, np.inf
    rx, ry = min(diameter, right - left) / 2, min(diameter, bottom - top) / 2
    dx = np.maximum.reduce([left + rx - cols, cols - (right - rx), np.zeros(shape)])
    dy = np.maximum.reduce([top + ry - rows, rows - (bottom - ry), np.zeros(shape)])
    value = (dx / rx) ** 2 + (dy / ry) ** 2
    rounded = dx * dy > 0  # the centres in a corner's square, where the arc decides
    return in_box & (value <= 1), np.abs(value[in_box & rounded] - 1).min(initial=np.inf)


@pytest.mark.parametrize("diameter", [0, 4, 7, 10, 13, 40])
def test_a_rounded_rectangle_fills_as_imagej_rounds_its_corners(tmp_path, diameter):
    """Fiji's rectangle tool with a corner diameter saves it as the "rounded rect arc size": ImageJ's mask leaves out
    the corners' pixels (Roi.getMask: a RoundRectangle2D), which were read as nucleus pixels. A diameter past the
    height (13: half-ellipses at the ends) or both sides (40: the inscribed ellipse) is clamped to them. The stroke
    width ImageJ draws the outline with (saved with the ROI) changes no pixel of its mask."""
    box, shape = (3, 2, 17, 14), (17, 22)  # 14 x 12
    roi = ImagejRoi(roitype=ROI_TYPE.RECT, left=3, top=2, right=17, bottom=14, rounded_rect_arc_size=diameter,
                    name="0001")
    labels, notes = roi_labels(save_rois(str(tmp_path / "r.zip"), [roi]), shape)
    expected, margin = rounded_rect_inside(box, diameter, shape)
    assert margin > 0.01 and notes == []
    assert np.array_equal(labels == 1, expected), (labels.astype(int), expected.astype(int))
    if diameter:
        assert (labels == 1).sum() < 14 * 12
    if diameter == 40:
        assert np.array_equal(expected, independent(ImagejRoi(roitype=ROI_TYPE.OVAL, left=3, top=2, right=17,
                                                              bottom=14), shape))
    roi.stroke_width, roi.float_stroke_width = 5, 5.0
    assert np.array_equal(roi_labels(save_rois(str(tmp_path / "s.zip"), [roi]), shape)[0], labels)


def test_a_sub_pixel_rectangle_covers_the_pixels_imagej_measures(tmp_path):
    """ImageJ reads a sub-pixel rectangle (x, y, w, h floats) as Roi(double...), on the whole pixels from (int) x and
    (int) y, ceil(w) and ceil(h) of them: x 2.7, w 3 covers columns 2-4 (its pixel centres would have given 3-5), y
    3.2, h 4.5 rows 3-7; rounded, its corners are cut from that box."""
    roi = ImagejRoi(roitype=ROI_TYPE.RECT, left=2, top=3, right=5, bottom=8, name="0001", version=228)
    roi.options |= ROI_OPTIONS.SUB_PIXEL_RESOLUTION
    roi.xd, roi.yd, roi.widthd, roi.heightd = 2.7, 3.2, 3.0, 4.5
    labels, notes = roi_labels(save_rois(str(tmp_path / "r.zip"), [roi]), (12, 12))
    assert ImagejRoi.frombytes(roi.tobytes()).subpixelrect and notes == []
    assert np.array_equal(np.argwhere(labels == 1), np.argwhere(np.pad(np.ones((5, 3)), ((3, 4), (2, 7))) == 1))
    roi.rounded_rect_arc_size = 2
    labels = roi_labels(save_rois(str(tmp_path / "s.zip"), [roi]), (12, 12))[0]
    assert np.array_equal(labels == 1, rounded_rect_inside((2, 3, 5, 8), 2, (12, 12))[0])


def java_round_rect_path(x, y, w, h, arc):
    """The path floats of java.awt.geom.RoundRectangle2D(x, y, w, h, arc, arc) as ImageJ saves it in a composite ROI,
    from RoundRectIterator's table of points (x + v0 w + v1 aw, y + v2 h + v3 ah), aw = ah = arc here."""
    cv = 4 / 3 * (1 - np.cos(np.pi / 4)) * np.tan(np.pi / 4) / (np.sqrt(2) - 1 + 1 - np.cos(np.pi / 4))
    acv = (1 - cv) / 2
    table = [(0, [0, 0, 0, .5]), (1, [0, 0, 1, -.5]), (3, [0, 0, 1, -acv, 0, acv, 1, 0, 0, .5, 1, 0]),
             (1, [1, -.5, 1, 0]), (3, [1, -acv, 1, 0, 1, 0, 1, -acv, 1, 0, 1, -.5]), (1, [1, 0, 0, .5]),
             (3, [1, 0, 0, acv, 1, -acv, 0, 0, 1, -.5, 0, 0]), (1, [0, .5, 0, 0]),
             (3, [0, acv, 0, 0, 0, 0, 0, acv, 0, 0, 0, .5])]
    path = []
    for op, v in table:
        path += [op] + [c for i in range(0, len(v), 4)
                        for c in (x + v[i] * w + v[i + 1] * arc, y + v[i + 2] * h + v[i + 3] * arc)]
    return path + [4]


def test_a_composite_with_curved_outlines_fills_as_its_curves(tmp_path):
    """A composite ROI built with a rounded rectangle (Fiji: its outline combined with another by shift-drag, or
    in the ROI Manager by OR or XOR) holds cubic curves, and a shape from other tools quadratic ones: roifile refuses
    them (NotImplementedError, a traceback out of training). They fill as matplotlib's Path fills the same curves at
    the pixel centres, even-odd with the polygon cut out of them; a damaged path is a one-line error."""
    curved = java_round_rect_path(2, 3, 15, 11, 8)
    hole = [0, 7.2, 6.3, 1, 11.6, 7.1, 1, 9.3, 10.8, 4]
    quad = [0, 18.2, 2.1, 1, 21.4, 2.1, 2, 26.8, 8.3, 21.4, 14.6, 1, 18.2, 14.6, 4]
    path = np.array(curved + hole + quad, np.float32)
    roi = ImagejRoi(roitype=ROI_TYPE.RECT, multi_coordinates=path, shape_roi_size=len(path), left=2, top=2,
                    right=27, bottom=15, name="0001")
    shape = (18, 30)
    labels, notes = roi_labels(save_rois(str(tmp_path / "c.zip"), [roi]), shape)
    codes = {0: [Path.MOVETO], 1: [Path.LINETO], 2: [Path.CURVE3] * 2, 3: [Path.CURVE4] * 3, 4: [Path.CLOSEPOLY]}
    centres = np.c_[np.mgrid[0:shape[1], 0:shape[0]].reshape(2, -1).T + 0.5]
    expected = np.zeros(shape[1] * shape[0], bool)
    for part in (curved, hole, quad):
        vertices, kinds, i = [], [], 0
        while i < len(part):
            op = int(part[i])
            n = {0: 1, 1: 1, 2: 2, 3: 3, 4: 0}[op]
            vertices += np.reshape(part[i + 1:i + 1 + 2 * n], (-1, 2)).tolist() or [vertices[-1]]
            kinds += codes[op]
            i += 1 + 2 * n
        # matplotlib's own Bezier evaluation, 500 points a curve (its contains_points flattens curves coarsely, 0.05 px
        # off them)
        outline = np.concatenate([segment(np.linspace(0, 1, 500))
                                  for segment, _ in Path(np.float32(vertices), kinds).iter_bezier()])
        expected ^= Path(outline).contains_points(centres)
    expected = expected.reshape(shape[1], shape[0]).T
    assert notes == [] and expected.sum() > 150 and not expected[8, 9] and expected[8, 23]
    assert np.array_equal(labels == 1, expected)
    damaged = ImagejRoi(roitype=ROI_TYPE.RECT, multi_coordinates=np.array([0, 1, 1, 1, 5, 1, 7, 5, 5, 4], np.float32),
                        shape_roi_size=10, left=1, top=1, right=5, bottom=5, name="0002")
    path = save_rois(str(tmp_path / "d.zip"), [damaged])
    with pytest.raises(DataError, match=f"ImageJ ROIs {path}: ROI '0002' has a damaged outline \\(unknown path "
                                        r"segment type 7\); save the set again from Fiji's ROI Manager"):
        roi_labels(path, shape)


def test_a_spline_fitted_polygon_is_refused_naming_the_way_to_a_polygon(tmp_path):
    """Edit > Selection > Fit Spline: ImageJ saves the polygon's vertices with the spline-fit option and fills the
    spline through them; filling the vertices' polygon would be silently wrong along every side."""
    plain = ImagejRoi.frompoints(np.array([[3.2, 2.1], [15.3, 4.4], [12.6, 15.2], [4.1, 12.3]]), name="0001")
    splined = ImagejRoi.frompoints(np.array([[3.2, 2.1], [15.3, 4.4], [12.6, 15.2], [4.1, 12.3]]), name="0002")
    splined.options |= ROI_OPTIONS.SPLINE_FIT
    path = save_rois(str(tmp_path / "s.zip"), [plain, splined])
    with pytest.raises(DataError, match=f"ImageJ ROIs {path}: 1 of 2 area ROIs are spline-fitted \\(e.g. '0002'\\), "
                                        r"whose spline is not read; in Fiji, .*Edit > Selection > Interpolate"):
        roi_labels(path, (20, 20))
    assert roi_labels(save_rois(str(tmp_path / "p.zip"), [plain]), (20, 20))[0].sum() > 50


def test_path_rings_follow_java_s_path_rules():
    """rois.path_rings on the corner cases of a java.awt.geom path: a line after a close with no move starts from the
    closed ring's first point (Path2D's rule), a ring left open is closed as a fill closes it, rings of fewer than 3
    points enclose nothing, and a curve before any point is a ValueError (a damaged outline)."""
    rings = rois.path_rings([0, 1, 1, 1, 5, 1, 1, 5, 5, 4, 1, 1, 9, 1, 5, 9, 0, 7, 7, 1, 8, 7])
    assert [ring.tolist() for ring in rings] == [[[1, 1], [5, 1], [5, 5]], [[1, 1], [1, 9], [5, 9]]]
    assert [ring.tolist() for ring in rois.path_rings([0, 2, 2, 1, 6, 2, 1, 6, 6])] == [[[2, 2], [6, 2], [6, 6]]]
    with pytest.raises(ValueError, match="a curve before any point"):
        rois.path_rings([2, 1, 1, 2, 2])
