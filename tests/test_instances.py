"""Tests for instances.py: watershed splits touching nuclei that connected components merge."""
import tracemalloc

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.morphology import h_maxima

from config import SEPARATIONS, check_object_filters, object_filters
from image_files import read_labels
from instances import (MIN_CONFIDENCE, auto_scale, connected_components, link_planes, median_diameter,
                       nucleus_areas, smoothed_distance, split_instances, touching_borders, watershed_instances,
                       watershed_markers)
from metrics import dsb_score, separation_scores
from utils import UsageError


def two_touching_discs(shape=(48, 64), radius=10, gap=17):
    """True labels (two overlapping discs, 1 and 2) and a soft probability map of their union (0.01 outside,
    0.99 inside, blurred edges: each object's mean probability is about 0.93)."""
    labels = np.zeros(shape, np.int32)
    cy, cx = shape[0] // 2, shape[1] // 2 - gap // 2
    for k, x in enumerate((cx, cx + gap), start=1):
        disc = np.zeros(shape, np.uint8)
        cv2.circle(disc, (x, cy), radius, 1, -1)
        labels[(disc > 0) & (labels == 0)] = k
    prob = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), 1.0) * 0.98 + 0.01
    return labels, prob


def test_watershed_splits_touching_discs_and_cc_does_not():
    truth, prob = two_touching_discs()
    cc = connected_components(prob)
    ws = watershed_instances(prob)
    assert cc.dtype == np.int32 and ws.dtype == np.int32 and ws.shape == prob.shape
    assert cc.max() == 1
    assert ws.max() == 2 and sorted(np.unique(ws).tolist()) == [0, 1, 2]
    # the watershed covers exactly the thresholded mask, and each object sits on one disc
    assert np.array_equal(ws > 0, prob > 0.5)
    for k in (1, 2):
        assert np.unique(truth[ws == k]).size <= 2
    assert dsb_score(truth, ws) > dsb_score(truth, cc)
    scores = separation_scores(prob, truth)
    assert scores["watershed"]["dsb"] > scores["cc"]["dsb"] and scores["watershed"]["dsb"] > 0.5


def two_bumps(apart):
    """A distance-like map [40, 80] with two peaks of exactly the same height, ``apart`` pixels apart."""
    y, x = np.mgrid[:40, :80].astype(np.float64)
    return sum(8 * np.exp(-((x - cx) ** 2 + (y - 20) ** 2) / 60) for cx in (40 - apart / 2, 40 + apart / 2))


def saddle_depth(bumps):
    """How far the saddle (the centre) lies below the tops, in log(1 + distance)."""
    return np.log1p(bumps.max()) - np.log1p(bumps[20, 40])


def test_equal_tops_joined_by_a_shallow_saddle_are_one_marker():
    close = two_bumps(12)  # tops 8 pixels apart, the saddle about 2 % lower: one nucleus
    assert np.argwhere(close == close.max()).tolist() == [[20, 36], [20, 44]]
    assert 0 < saddle_depth(close) < 0.05
    assert watershed_markers(close, min_distance=2, h=0.05).max() == 1
    apart = two_bumps(14)  # a saddle about 15 % lower: two nuclei unless h asks for a deeper one
    assert 0.05 < saddle_depth(apart) < 0.2
    assert watershed_markers(apart, min_distance=2, h=0.05).max() == 2
    assert watershed_markers(apart, min_distance=2, h=0.2).max() == 1


def test_separate_discs_stay_whole():
    """One object per disc, not more: a lone disc must not be over-split."""
    prob = np.zeros((40, 80), np.float32)
    cv2.circle(prob, (20, 20), 9, 1.0, -1)
    cv2.ellipse(prob, (58, 20), (14, 7), 30, 0, 360, 1.0, -1)
    assert watershed_instances(prob).max() == 2
    assert connected_components(prob).max() == 2


def test_empty_and_full_probability():
    empty = np.zeros((32, 32), np.float32)
    for method in ("watershed", "cc"):
        labels = split_instances(empty, method)
        assert labels.shape == (32, 32) and labels.dtype == np.int32 and labels.max() == 0
    assert split_instances(np.ones((16, 16)), "watershed").max() == 1


def test_min_size_removes_specks_and_renumbers():
    prob = np.zeros((32, 32), np.float32)
    prob[2, 2] = 1  # a 1-pixel speck
    prob[10:20, 10:20] = 1
    labels = split_instances(prob, "cc", min_size=4)
    assert labels.max() == 1 and labels[2, 2] == 0 and labels[15, 15] == 1
    assert split_instances(prob, "cc", min_size=0).max() == 2


def test_min_confidence_drops_unsure_objects_and_renumbers():
    """An object whose mean probability is below min_confidence goes, whatever the separation; 0 keeps all."""
    prob = np.zeros((32, 48), np.float32)
    prob[4:12, 4:12] = 0.7  # a faint blob, mean 0.7
    prob[16:28, 20:40] = 0.97
    for method in ("watershed", "cc"):
        labels = split_instances(prob, method)
        assert labels.max() == 1 and labels[8, 8] == 0 and labels[20, 30] == 1
        assert split_instances(prob, method, min_confidence=0).max() == 2
        assert split_instances(prob, method, min_confidence=0.65).max() == 2
        assert split_instances(prob, method, min_confidence=0.98).max() == 0
    truth = np.zeros(prob.shape, np.int32)
    truth[16:28, 20:40] = 1
    assert separation_scores(prob, truth)["cc"]["dsb"] == 1.0
    assert separation_scores(prob, truth, min_confidence=0)["cc"]["dsb"] == 0.5  # the faint blob is a false positive


def test_object_filters_defaults_and_flag_errors():
    assert object_filters() == {"min_size": 3, "min_confidence": MIN_CONFIDENCE}
    assert object_filters(10, 0) == {"min_size": 10, "min_confidence": 0}
    # a Lovasz-trained network's nuclei sit at sigmoid(1) = 0.73: the filter would drop them all, so it is off
    assert object_filters(loss="LovaszHingeLoss")["min_confidence"] == 0
    assert object_filters(loss="BCEDiceLoss")["min_confidence"] == MIN_CONFIDENCE
    assert object_filters(3, 0.5, loss="LovaszHingeLoss")["min_confidence"] == 0.5  # a given value wins
    with pytest.raises(UsageError, match="--min_confidence"):
        check_object_filters(3, 1.0)
    with pytest.raises(UsageError, match="--min_size"):
        check_object_filters(-1, None)
    check_object_filters(0, None)


def test_bad_method_and_shape():
    with pytest.raises(ValueError, match="method 'magic'"):
        split_instances(np.zeros((8, 8)), "magic")
    with pytest.raises(ValueError, match="2-D"):
        connected_components(np.zeros((1, 8, 8)))


@pytest.mark.parametrize("method", SEPARATIONS)
def test_a_probability_map_of_0_to_255_is_refused(method):
    """predict.py's <id>_prob.png read back (255 x the probability): every pixel above 0.5 / 255 would be
    foreground and every object would pass min_confidence; the nuclei, the mask and the scores would be wrong."""
    truth, prob = two_touching_discs()
    stored = np.round(prob * 255).astype(np.uint8)
    border = touching_borders(truth).astype(np.float32)
    with pytest.raises(ValueError, match=r"prob: .*\[0, 1\], not 3 to 252 .*divide it by 255"):
        split_instances(stored, method, border=border)
    if method == "borders":
        with pytest.raises(ValueError, match=r"border: .*\[0, 1\], not 0 to 255"):
            split_instances(prob, method, border=border * 255)
    found = split_instances(prob, method, border=border).max()
    assert split_instances(stored / 255, method, border=border).max() == found >= 1


def test_read_labels_resizes_with_nearest(tmp_path):
    labels = np.zeros((20, 30), np.uint16)
    labels[2:10, 3:12] = 1
    labels[12:18, 15:28] = 300
    path = str(tmp_path / "l.png")
    cv2.imwrite(path, labels)
    same = read_labels(path)
    assert same.dtype == np.int32 and np.array_equal(same, labels)
    small = read_labels(path, (10, 15))
    assert small.shape == (10, 15) and set(np.unique(small).tolist()) == {0, 1, 300}
    big_ids = np.where(labels == 1, 2**24 + 1, np.where(labels > 0, 2**24, 0)).astype(np.int32)  # not floats
    tifffile.imwrite(tmp_path / "big.tif", big_ids)
    assert set(np.unique(read_labels(str(tmp_path / "big.tif"), (10, 15))).tolist()) == {0, 2**24, 2**24 + 1}


def test_touching_borders_marks_both_sides_of_a_contact_only():
    labels = np.zeros((8, 12), np.int32)
    labels[2:6, 1:5] = 1  # alone
    labels[2:6, 6:9] = 2  # touches 3 along one column boundary
    labels[2:6, 9:11] = 3
    border = touching_borders(labels)
    assert border.dtype == np.uint8 and border.shape == labels.shape
    expected = np.zeros_like(border)
    expected[2:6, 8:10] = 1  # the last column of 2 and the first of 3
    assert np.array_equal(border, expected)
    assert touching_borders(labels, width=2)[2:6, 7:11].all()
    assert touching_borders(np.zeros((5, 5), np.uint16)).max() == 0
    for dtype in (np.uint8, np.uint16, np.int64, np.uint64):  # int64: numpy's default, skimage.measure.label's
        assert np.array_equal(touching_borders(labels.astype(dtype)), expected), dtype


def test_border_separation_splits_touching_discs_along_the_predicted_border():
    truth, prob = two_touching_discs()
    border = touching_borders(truth).astype(np.float32)
    labels = split_instances(prob, "borders", border=border)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert np.array_equal(labels > 0, prob > 0.5)  # border pixels go back to their nuclei
    for k in (1, 2):
        assert np.unique(truth[labels == k]).size <= 2
    assert connected_components(prob).max() == 1
    scores = separation_scores(prob, truth, methods=("borders", "cc"), border=border)
    assert scores["borders"]["dsb"] > scores["cc"]["dsb"]
    # with no border predicted the touching discs stay one object: the cores' h is strict, the borders split
    assert split_instances(prob, "borders", border=np.zeros_like(prob)).max() == 1
    with pytest.raises(ValueError, match="--borders True"):
        split_instances(prob, "borders")
    with pytest.raises(ValueError, match="differ in shape"):
        split_instances(prob, "borders", border=border[1:])


def test_border_separation_joins_a_sliver_cut_off_by_a_spurious_border():
    """A border predicted just inside a nucleus' edge cuts off a core 1-2 pixels thin: too flat to be a marker of
    its own, it goes back to the nucleus instead of becoming a second object."""
    truth = np.zeros((40, 60), np.uint8)
    cv2.ellipse(truth, (30, 20), (18, 10), 0, 0, 360, 1, -1)
    prob = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 1.0) * 0.98 + 0.01
    for row in (11, 12):  # the ellipse's top edge is row 10
        border = np.zeros_like(prob)
        border[row] = truth[row]
        sliver = (prob > 0.5) & (border <= 0.5) & (np.arange(40)[:, None] < row)
        assert sliver.sum() >= 10
        labels = split_instances(prob, "borders", border=border)
        assert labels.max() == 1 and np.array_equal(labels > 0, prob > 0.5)


def disc_labels(radii, shape=(200, 200)):
    """Non-touching discs of these radii in a row: int32 labels 1..N."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels, x = np.zeros(shape, np.int32), 0
    for k, r in enumerate(radii, 1):
        x += r + 2
        labels[(yy - shape[0] // 2) ** 2 + (xx - x) ** 2 <= r * r] = k
        x += r + 1
    return labels


def test_median_diameter_is_that_of_discs_of_the_areas():
    areas = np.pi * np.array([5.0, 10.0, 20.0]) ** 2
    assert median_diameter(areas) == pytest.approx(20.0)
    assert median_diameter([]) == 0.0
    labels = disc_labels([6, 10, 14])
    np.testing.assert_array_equal(nucleus_areas(labels), [(labels == k).sum() for k in (1, 2, 3)])
    assert median_diameter(nucleus_areas(labels)) == pytest.approx(20.0, abs=0.3)


def test_nucleus_areas_of_large_label_values_take_no_memory_of_their_size():
    """Labels need not be consecutive: one of 150,000,000 made np.bincount allocate 1.2 GB for a 64x64 image."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (64, 64))
    expected = np.bincount(labels.ravel())[1:]
    np.testing.assert_array_equal(nucleus_areas(labels), expected[expected > 0])
    labels[labels == 5] = 150_000_000
    tracemalloc.start()
    areas = nucleus_areas(labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(areas, expected[expected > 0])  # the same objects, in label order
    assert peak < 10 * 2**20


def test_auto_scale_resizes_only_nuclei_far_from_the_training_size():
    assert auto_scale(0.0, 19.4) == 1.0  # nothing found: nothing to size by
    assert auto_scale(19.4 * 1.4, 19.4) == 1.0 and auto_scale(19.4 / 1.4, 19.4) == 1.0  # within the band
    assert auto_scale(60.0, 20.0) == pytest.approx(1 / 3)
    assert auto_scale(8.0, 20.0) == pytest.approx(2.5)
    assert auto_scale(400.0, 20.0) == pytest.approx(0.25) and auto_scale(1.0, 20.0) == pytest.approx(4.0)


def test_cc_joins_pixels_that_touch_diagonally():
    """'cc' uses 8-connectivity: two squares that touch only at a corner are one object, as scipy's labelling
    with a full 3x3 structure says."""
    prob = np.zeros((12, 12), np.float32)
    prob[2:5, 2:5] = 0.9
    prob[5:8, 5:8] = 0.9  # its corner (5, 5) touches (4, 4) diagonally
    expected, count = ndi.label(prob > 0.5, structure=np.ones((3, 3), bool))
    assert count == 1
    labels = connected_components(prob, min_size=0)
    assert np.array_equal(labels, expected)
    assert split_instances(prob, "cc", min_size=0, min_confidence=0).max() == 1


def test_threshold_is_strict_and_reaches_every_separation():
    """``threshold`` decides what is foreground for every separation (predict.py --threshold): a blob of
    probability 0.4 is one object at threshold 0.3 and nothing at 0.5; a pixel exactly at the threshold is
    background (``prob > threshold``)."""
    prob = np.zeros((24, 24), np.float32)
    prob[6:18, 6:18] = 0.4
    mask = prob > 0.3
    for method in ("watershed", "cc", "borders"):
        border = np.zeros_like(prob) if method == "borders" else None
        low = split_instances(prob, method, threshold=0.3, min_confidence=0, border=border)
        assert low.max() == 1 and np.array_equal(low > 0, mask), method
        assert split_instances(prob, method, threshold=0.5, min_confidence=0, border=border).max() == 0, method
        assert split_instances(prob, method, threshold=0.4, min_confidence=0, border=border).max() == 0, method


def test_min_confidence_compares_the_mean_probability():
    """An object is kept when its mean probability reaches ``min_confidence`` (a mean exactly at it is kept); a
    few confident pixels do not save an unsure object. Half 0.875 / half 0.625: mean 0.75."""
    prob = np.zeros((16, 24), np.float32)
    prob[4:12, 4:10] = 0.875
    prob[4:12, 10:16] = 0.625
    mean = prob[prob > 0.5].mean()
    assert mean == 0.75
    for method in ("cc", "watershed"):
        assert split_instances(prob, method, min_confidence=0.8).max() == 0, method
        kept = split_instances(prob, method, min_confidence=0.7)
        assert kept.max() == 1 and np.array_equal(kept > 0, prob > 0.5), method
        assert split_instances(prob, method, min_confidence=0.75).max() == 1, method


def test_smoothed_distance_is_zero_outside_the_mask():
    """The smoothed distance map stays inside the mask: 0 on every background pixel, positive on the mask; with
    sigma 0 it is the plain Euclidean distance transform."""
    mask = np.zeros((20, 20), bool)
    mask[5:15, 4:12] = True
    for sigma in (0, 1.0, 2.0):
        distance = smoothed_distance(mask, sigma)
        assert distance.shape == mask.shape and (distance[~mask] == 0).all(), sigma
        assert (distance[mask] > 0).all(), sigma
    assert np.array_equal(smoothed_distance(mask, 0), ndi.distance_transform_edt(mask))


def test_h_sets_how_deep_a_saddle_splits_two_peaks():
    """Two equal peaks get a marker each exactly when the saddle between them is at least ``h`` deep (in
    log(1 + distance)): a saddle a little deeper than h splits them, one a little shallower does not."""
    deeper = two_bumps(13)  # saddle about 0.073 below the tops
    assert 0.06 < saddle_depth(deeper) < 0.08
    assert watershed_markers(deeper, min_distance=2, h=0.05).max() == 2
    assert watershed_markers(deeper, min_distance=2, h=0.07).max() == 2
    assert watershed_markers(deeper, min_distance=2, h=0.08).max() == 1
    shallower = two_bumps(12.5)  # saddle about 0.044 below the tops
    assert 0.04 < saddle_depth(shallower) < 0.05
    assert watershed_markers(shallower, min_distance=2, h=0.05).max() == 1
    assert watershed_markers(shallower, min_distance=2, h=0.04).max() == 2


def test_a_lower_peak_on_a_shallow_saddle_gets_no_marker():
    """A lower peak whose saddle towards the higher one is less than ``h`` deep is a bump of the same nucleus:
    no marker of its own; deeper than h, it gets one (as skimage.morphology.h_maxima says)."""
    y, x = np.mgrid[:40, :80].astype(np.float64)
    high, bump = 8 * np.exp(-((x - 30) ** 2 + (y - 20) ** 2) / 60), np.exp(-((x - 40) ** 2 + (y - 20) ** 2) / 20)
    for low, expected in ((5.0, 1), (6.0, 2)):  # the lower peak's saddle: about 0.03 deep, then about 0.09
        bumps = high + low * bump
        assert (bumps == ndi.maximum_filter(bumps, size=3)).sum() == 2  # two peaks either way
        _, count = ndi.label(h_maxima(np.log1p(bumps), 0.05), structure=np.ones((3, 3), bool))
        assert count == expected
        assert watershed_markers(bumps, min_distance=2, h=0.05).max() == expected, low


def test_border_separation_cuts_along_the_ridge_of_the_predicted_border():
    """The mask is flooded along rising border probability, so two touching nuclei are cut at the border's most
    probable line, even off-centre and with a lopsided band above the threshold: every pixel left of the ridge
    (column 10) is one object, every pixel right of it the other."""
    prob = np.zeros((16, 40), np.float32)
    prob[2:14, 2:38] = 0.99
    border = np.zeros_like(prob)
    border[2:14, 9:17] = [0.6, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6]  # ridge at column 10
    labels = split_instances(prob, "borders", border=border)
    assert labels.max() == 2 and np.array_equal(labels > 0, prob > 0.5)
    left, right = labels[2:14, 2:10], labels[2:14, 11:38]
    assert np.unique(left).size == 1 and np.unique(right).size == 1 and left[0, 0] != right[0, 0]


def test_border_separation_keeps_a_nucleus_covered_by_predicted_border():
    """A nucleus whose border probability is high everywhere has no core and so no marker; it is still an object
    of its own (not dropped, not merged with another), so the union of the objects is the mask."""
    prob = np.full((24, 40), 0.01, np.float32)
    cv2.circle(prob, (12, 12), 8, 0.99, -1)
    cv2.circle(prob, (31, 12), 3, 0.99, -1)
    border = np.zeros_like(prob)
    cv2.circle(border, (31, 12), 3, 0.9, -1)  # the small disc is all border
    mask = prob > 0.5
    expected, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    assert count == 2
    labels = split_instances(prob, "borders", border=border)
    assert labels.max() == 2 and np.array_equal(labels > 0, mask)
    for k in (1, 2):  # each object is exactly one disc
        disc = np.unique(expected[labels == k])
        assert disc.size == 1 and np.array_equal(labels == k, expected == disc[0])


def test_auto_scale_band_edges_keep_the_scale():
    """Nuclei exactly ``band`` times wider or narrower than the training set's are within the band: no rescale;
    just outside it they are rescaled."""
    assert auto_scale(20.0 * 1.5, 20.0) == 1.0 and auto_scale(20.0 / 1.5, 20.0) == 1.0
    assert auto_scale(30.5, 20.0) == pytest.approx(20.0 / 30.5)
    assert auto_scale(13.0, 20.0) == pytest.approx(20.0 / 13.0)


def stitched(planes, min_iou):
    """A z-stack's own labels int [Z, H, W] linked plane by plane with link_planes, as predict.py --stitch_z does."""
    out, largest = [], 0
    for z, labels in enumerate(planes):
        mapping = link_planes(out[-1] if z else np.zeros_like(labels), labels, min_iou, largest + 1)
        largest = max(largest, int(mapping.max()))
        out.append(mapping[labels])
    return np.stack(out)


def boxes(shape, *placed):
    """A label image int32 ``shape`` with label k + 1 on the rectangle placed[k] = (y0, y1, x0, x1)."""
    labels = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(placed, start=1):
        labels[y0:y1, x0:x1] = k
    return labels


def test_a_nucleus_through_three_planes_keeps_one_label_and_a_new_one_gets_the_next():
    planes = np.stack([boxes((12, 20), (2, 8, 2, 8)),
                       boxes((12, 20), (10, 12, 16, 20), (2, 8, 3, 9)),  # a new one numbered before the continued one
                       boxes((12, 20), (3, 9, 3, 9), (10, 12, 16, 20))])
    out = stitched(planes, 0.5)
    assert np.array_equal(out > 0, planes > 0) and out.max() == 2
    assert (out[0][planes[0] == 1] == 1).all() and (out[1][planes[1] == 2] == 1).all() and \
        (out[2][planes[2] == 1] == 1).all()
    assert (out[1][planes[1] == 1] == 2).all() and (out[2][planes[2] == 2] == 2).all()


def test_two_nuclei_that_touch_in_one_plane_keep_their_own_labels():
    apart = boxes((10, 20), (2, 8, 2, 8), (2, 8, 11, 17))
    touching = boxes((10, 20), (2, 8, 3, 10), (2, 8, 10, 16))
    out = stitched(np.stack([apart, touching, apart]), 0.3)
    assert out.max() == 2 and (out[:, 5, 4] == 1).all() and (out[:, 5, 14] == 2).all()


def test_a_nucleus_that_splits_continues_in_its_larger_part_and_the_other_is_new():
    whole = boxes((10, 20), (2, 8, 2, 18))
    split = boxes((10, 20), (2, 8, 2, 8), (2, 8, 9, 18))  # 36 and 54 of the 96 pixels: IoU 0.375 and 0.5625
    out = stitched(np.stack([whole, split]), 0.3)
    assert out[1, 5, 12] == 1 and out[1, 5, 4] == 2


def test_the_iou_threshold_is_inclusive_and_a_hair_above_it_breaks_the_link():
    before = boxes((10, 30), (0, 10, 0, 10))
    after = boxes((10, 30), (0, 10, 5, 15))  # 50 of 150 pixels: IoU 1/3
    assert link_planes(before, after, 1 / 3, 2).tolist() == [0, 1]
    assert link_planes(before, after, 1 / 3 + 1e-9, 2).tolist() == [0, 2]
    assert link_planes(before, before, 1.0, 2).tolist() == [0, 1]


def test_an_empty_plane_in_the_middle_breaks_the_chain():
    nucleus = boxes((10, 10), (2, 8, 2, 8))
    out = stitched(np.stack([nucleus, np.zeros_like(nucleus), nucleus]), 0.5)
    assert out[0].max() == 1 and out[1].max() == 0 and out[2].max() == 2


def slow_links(previous, labels, min_iou, first_new):
    """link_planes computed another way: every pair's IoU from its masks, the pairs taken highest first."""
    scored = []
    for b in range(1, int(previous.max()) + 1):
        for a in range(1, int(labels.max()) + 1):
            inter = np.sum((previous == b) & (labels == a))
            union = np.sum((previous == b) | (labels == a))
            if inter and inter / union >= min_iou:
                scored.append((-inter / union, b, a))
    mapping = {}
    for _, b, a in sorted(scored):
        if a not in mapping and b not in mapping.values():
            mapping[a] = b
    for a in range(1, int(labels.max()) + 1):
        if a not in mapping and (labels == a).any():
            mapping[a] = first_new
            first_new += 1
    return [0] + [mapping.get(a, 0) for a in range(1, int(labels.max()) + 1)]


@pytest.mark.parametrize("min_iou", [0.1, 0.25, 0.5, 0.8])
def test_links_agree_with_a_slow_loop_over_every_pair(min_iou):
    rng = np.random.default_rng(int(min_iou * 100))
    for _ in range(20):
        blobs = [ndi.label(ndi.gaussian_filter(rng.random((24, 24)), 2) > 0.52)[0] for _ in range(2)]
        previous = np.where(blobs[0] > 0, blobs[0] + 3, 0)  # linked labels need not start at 1
        mapping = link_planes(previous, blobs[1], min_iou, 50)
        assert mapping.tolist() == slow_links(previous, blobs[1], min_iou, 50)
        assert len(set(mapping[1:].tolist())) == blobs[1].max()  # one to one
