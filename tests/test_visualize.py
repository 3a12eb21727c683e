"""Tests for visualize.py's outlines: an object's outline from its label is the outline OpenCV traces around its
mask, also where the object is cut by the image's edge."""
import numpy as np
import pytest

from visualize import OUTLINE, draw_outlines


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
