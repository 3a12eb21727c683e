"""Tests for visualize.py's outlines: an object's outline from its label is the outline OpenCV traces around its
mask, also where the object is cut by the image's edge; outlines that can be seen, in overlays and the summary; a
training batch's picture outlines each mask where its image shows the nucleus."""
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

import visualize
from image_files import normalize
from visualize import (BORDER, CLASS_OUTLINES, FALSE_POSITIVE, GAP, OUTLINE, TRUE_POSITIVE, batch_picture,
                       draw_outlines, overlay_panel, write_summary)


def outline_pixels(shape, mask=None, labels=None):
    """bool [H, W]: where draw_outlines coloured a black image."""
    drawn = draw_outlines(np.zeros((*shape, 3), np.uint8), mask, labels=labels)
    return (drawn == OUTLINE).all(axis=2)


@pytest.mark.parametrize("where", ["inside", "cut_by_the_left_and_top_edges", "the_whole_image"])
def test_a_label_outline_is_the_mask_contour(where):
    yy, xx = np.mgrid[:24, :30]
    centre = {"inside": (12, 14), "cut_by_the_left_and_top_edges": (2, 1), "the_whole_image": (12, 14)}[where]
    radius = 40 if where == "the_whole_image" else 8
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    by_labels = outline_pixels(mask.shape, labels=mask.astype(np.int32))
    by_contour = outline_pixels(mask.shape, mask=mask)
    assert by_labels.any() and (by_labels == by_contour).all()


def test_touching_nuclei_keep_an_outline_each():
    labels = np.zeros((10, 20), np.int32)
    labels[2:8, 2:10], labels[2:8, 10:18] = 1, 2
    drawn = outline_pixels(labels.shape, labels=labels)
    assert drawn[4, 9] and drawn[4, 10]  # both sides of the line where they touch


def test_outlines_stand_out_on_a_stained_image():
    """Both outlines of an overlay panel differ clearly (CIEDE2000 >= 25) from the nucleus pixels beside them, also on
    an H&E-like stain whose purple is close to the prediction's magenta."""
    from skimage.color import deltaE_ciede2000, rgb2lab
    yy, xx = np.mgrid[:40, :40]
    nucleus = (yy - 20) ** 2 + (xx - 20) ** 2 <= 10 ** 2
    image = np.full((40, 40, 3), 245, np.uint8)
    image[nucleus] = (200, 90, 150)  # BGR of DSB2018's stained nuclei, RGB (150, 90, 200)
    panel = overlay_panel(image, nucleus, nucleus.astype(np.float32))
    inside = nucleus & ~find_boundaries(np.pad(nucleus, 1), mode="inner")[1:-1, 1:-1]
    beside = inside & ~cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for i, colour in ((1, TRUE_POSITIVE), (2, FALSE_POSITIVE)):
        drawn = panel[:, i * (40 + GAP):i * (40 + GAP) + 40]
        outline = (drawn == colour).all(axis=2)
        assert outline.any()
        lab = rgb2lab(drawn[:, :, ::-1].astype(np.float32) / 255)
        assert deltaE_ciede2000(lab[beside], rgb2lab(np.float32(colour[::-1])[None] / 255)).min() >= 25


def test_summary_keeps_the_outlines_of_a_large_image(tmp_path):
    """summary.png shows a 1024 x 1024 image 128 pixels high: the truth's outlines are still drawn there, in their
    colour, around each nucleus (not blended into the image by shrinking the 1 pixel lines 8 times)."""
    yy, xx = np.mgrid[:1024, :1024]
    truth = np.zeros((1024, 1024), bool)
    for y, x in ((200, 200), (200, 800), (800, 500)):
        truth |= (yy - y) ** 2 + (xx - x) ** 2 <= 80 ** 2
    image = np.full((1024, 1024, 3), 128, np.uint8)
    (tmp_path / "overlays").mkdir()
    cv2.imwrite(str(tmp_path / "overlays" / "a.png"), overlay_panel(image, truth, np.zeros(truth.shape)))
    write_summary(str(tmp_path / "overlays"), pd.DataFrame({"img_id": ["a"], "iou": [0.0]}), str(tmp_path / "s.png"),
                  "run r")
    summary = cv2.imread(str(tmp_path / "s.png")).astype(int)
    green = np.abs(summary - TRUE_POSITIVE).sum(axis=2) <= 30
    assert green.sum() >= 3 * 2 * np.pi * 10 * 0.8  # three circles 10 pixels in radius at 128 / 1024
    labelled, count = ndimage.label(green, np.ones((3, 3)))
    assert count == 3


def test_summary_names_the_evaluation_in_full(tmp_path):
    """summary.png's first line says which run and images it shows, all of it within the picture, also when the
    title is longer than the grid of a 96 x 96 run is wide; the colours' key follows."""
    (tmp_path / "overlays").mkdir()
    truth = np.zeros((96, 96), bool)
    truth[30:60, 30:60] = True
    cv2.imwrite(str(tmp_path / "overlays" / "a.png"), overlay_panel(np.zeros((96, 96, 3), np.uint8), truth, truth))
    title = "dsb2018_96_NestedUNet_wDS_bcedice (epoch 87 of 100, all of /data/dsb2018_test_96 (not trained on), " \
            "65 images at 96x96, flip TTA)"
    write_summary(str(tmp_path / "overlays"), pd.DataFrame({"img_id": ["a"], "iou": [0.5]}), str(tmp_path / "s.png"),
                  title)
    dark = cv2.imread(str(tmp_path / "s.png")).min(axis=2) < 128
    title_row, key_row = dark[:22], dark[22:44]
    assert title_row.any() and key_row.any()
    assert not title_row[:, -4:].any()  # the title ends inside the picture


def test_summary_of_several_classes_says_which_class_its_panels_show(tmp_path, monkeypatch):
    """The overlays show class 0; with two classes the rows' IoU is the mean of both, so each row also gives class
    0's and a line says what the panels and the IoU are. One class: no such line or figure."""
    (tmp_path / "overlays").mkdir()
    truth = np.zeros((32, 32), bool)
    truth[8:20, 8:20] = True
    cv2.imwrite(str(tmp_path / "overlays" / "a.png"), overlay_panel(np.zeros((32, 32, 3), np.uint8), truth, truth))
    written, text_row = [], visualize.text_row

    def recorded(text, width):
        written.append(text)
        return text_row(text, width)

    monkeypatch.setattr(visualize, "text_row", recorded)
    table = pd.DataFrame({"img_id": ["a"], "iou": [0.6], "iou_class0": [1.0], "iou_class1": [0.2]})
    write_summary(str(tmp_path / "overlays"), table, str(tmp_path / "s.png"), "run r", classes=2)
    assert "worst: a  IoU 0.600 (class 0 1.000)" in written
    assert "panels of class 0; IoU: the mean of the 2 classes (class 0's)" in written
    written.clear()
    write_summary(str(tmp_path / "overlays"), table[["img_id", "iou"]], str(tmp_path / "s.png"), "run r")
    assert written == ["worst: a  IoU 0.600", "run r",
                       "image | truth | prediction | errors (TP green, FP magenta, FN cyan)"]


def square(shape, top, left, side):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def black_panels(picture):
    """The bounding boxes (slices) of the black regions of ``picture`` at least 100 pixels high and wide, in
    reading order: the panels of images with a black background (not the black letters of the labels)."""
    labels, _ = ndimage.label((picture == 0).all(axis=2))
    boxes = [box for box in ndimage.find_objects(labels) if min(s.stop - s.start for s in box) >= 100]
    return sorted(boxes, key=lambda box: (box[0].start, box[1].start))


def ring(mask):
    """The pixels of ``mask`` with a 4-neighbour outside it: its 1 pixel outline, computed without OpenCV."""
    return mask & ~ndimage.binary_erosion(mask)


def test_a_training_batch_is_outlined_where_its_images_show_the_nuclei():
    """Two 32x32 RGB samples on black, each with one square nucleus (red, then grey) and its mask: each panel is
    the sample enlarged 4x with the mask's outline green exactly around the enlarged square, which keeps its own
    colour inside (RGB read as RGB, written as BGR)."""
    nuclei = [square((32, 32), 8, 20, 8), square((32, 32), 18, 4, 10)]
    images = np.zeros((2, 3, 32, 32), np.float32)
    images[0, 0][nuclei[0]] = 1.0  # red
    images[1][:, nuclei[1]] = 0.6  # grey
    masks = torch.from_numpy(np.stack(nuclei)[:, None].astype(np.float32))
    picture = batch_picture(normalize(torch.from_numpy(images)), masks, ["a", "b"], classes=1, title="t")
    boxes = black_panels(picture)
    assert len(boxes) == 2 and all(picture[box].shape[:2] == (128, 128) for box in boxes)
    for box, nucleus, colour in zip(boxes, nuclei, [(0, 0, 255), (153, 153, 153)]):
        big = np.kron(nucleus, np.ones((4, 4), bool))
        panel = picture[box]
        assert ((panel == TRUE_POSITIVE).all(axis=2) == ring(big)).all()
        assert (panel[big & ~ring(big)] == colour).all()


def test_a_training_batch_shows_each_class_and_the_border_channel():
    """Two classes and a --borders channel: class 0 outlined green, class 1 in the second colour, the border
    pixels red (under the outlines); the legend names them."""
    first, second = square((32, 32), 2, 2, 10), square((32, 32), 16, 16, 12)
    border = np.zeros((32, 32), bool)
    border[28:30, 2:12] = True
    masks = torch.from_numpy(np.stack([first, second, border])[None].astype(np.float32))
    picture = batch_picture(normalize(torch.zeros(1, 1, 32, 32)), masks, ["x"], classes=2, title="t")
    (box,) = black_panels(picture)
    panel = picture[box]
    assert panel.shape[:2] == (128, 128)
    for mask, colour in ((first, CLASS_OUTLINES[0]), (second, CLASS_OUTLINES[1]), (border, BORDER)):
        big = np.kron(mask, np.ones((4, 4), bool))
        shown = ring(big) if colour != BORDER else big
        assert ((panel == colour).all(axis=2) == shown).all()


def test_a_large_batch_of_large_crops_shows_sixteen_panels_shrunk():
    """20 samples of 300x300: the first 16, each 256 pixels high (a GPU batch stays a picture one can look at)."""
    picture = batch_picture(normalize(torch.zeros(20, 1, 300, 300)), torch.zeros(20, 1, 300, 300),
                            [str(i) for i in range(20)], classes=1, title="t")
    boxes = black_panels(picture)
    assert len(boxes) == visualize.BATCH_SHOWN == 16
    assert all(picture[box].shape[:2] == (256, 256) for box in boxes)


def test_a_batch_of_long_thin_crops_is_scaled_by_their_longer_side():
    """5x600 samples (--input_h 5 --input_w 600): sized by the longer side, shrunk to 256 wide, not enlarged 26x
    into a picture 31,000 pixels wide; 20x40 ones enlarged 4x (the longer side to 128 or more)."""
    for (h, w), panel in (((5, 600), (2, 256)), ((20, 40), (80, 160))):
        picture = batch_picture(normalize(torch.zeros(2, 1, h, w)), torch.zeros(2, 1, h, w), ["a", "b"], classes=1,
                                title="t")
        labels, _ = ndimage.label((picture == 0).all(axis=2))
        sizes = sorted(((box[0].stop - box[0].start, box[1].stop - box[1].start) for box in
                        ndimage.find_objects(labels)), key=lambda size: size[0] * size[1])
        assert sizes[-2:] == [panel, panel]  # the two panels, the largest black regions (not the labels' letters)
