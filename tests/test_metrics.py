"""Tests for metrics.py: pixel IoU/Dice against scikit-learn, the device meter, and the DSB 2018 score."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score

from metrics import (NUCLEUS_SCORES, SegmentationMeter, consecutive_labels, dsb_score, nucleus_scores, object_iou,
                     per_image_scores)
from utils import DataError


def random_batch(seed, shape=(4, 2, 8, 8)):
    """Random logits and masks; image 0 class 0 has an empty prediction and an empty truth."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen)
    target = (torch.rand(shape, generator=gen) > 0.5).float()
    logits[0, 0] = -1.0
    target[0, 0] = 0.0
    return logits, target


def sklearn_per_image(logits, target, score):
    """Mean over classes of score(truth, prediction, zero_division=1) for each image -> [B]."""
    pred = (logits > 0).numpy().astype(int)
    truth = target.numpy().astype(int)
    return np.array([
        np.mean([score(truth[b, k].ravel(), pred[b, k].ravel(), zero_division=1) for k in range(pred.shape[1])])
        for b in range(pred.shape[0])
    ])


@pytest.mark.parametrize("seed", [0, 1])
def test_per_image_scores_match_sklearn(seed):
    logits, target = random_batch(seed)
    iou, dice = per_image_scores(logits, target)
    assert iou.shape == (4,) and dice.shape == (4,)
    np.testing.assert_allclose(iou.numpy(), sklearn_per_image(logits, target, jaccard_score), rtol=1e-12)
    np.testing.assert_allclose(dice.numpy(), sklearn_per_image(logits, target, f1_score), rtol=1e-12)


def test_empty_prediction_and_truth_score_one_and_empty_prediction_alone_scores_zero():
    logits = torch.full((2, 1, 4, 4), -3.0)
    target = torch.zeros(2, 1, 4, 4)
    target[1, 0, 1, 1] = 1.0
    iou, dice = per_image_scores(logits, target)
    assert iou.tolist() == [1.0, 0.0] and dice.tolist() == [1.0, 0.0]
    meter = SegmentationMeter("cpu")
    meter.update(logits[:1], target[:1])
    assert meter.compute() == {"iou": 1.0, "dice": 1.0, "iou_mean": 1.0, "dice_mean": 1.0}


def test_logit_zero_is_background():
    # sigmoid(0) = 0.5 is not > 0.5: the prediction is empty, the truth is not.
    iou, dice = per_image_scores(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert iou.item() == 0.0 and dice.item() == 0.0


def scored_batches(batches):
    """A meter's scores over ``batches`` of (logits, target), and the batches concatenated: (scores, logits, target)."""
    meter = SegmentationMeter("cpu")
    for logits, target in batches:
        meter.update(logits, target)
    return meter.compute(), torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_meter_pooled_and_mean_scores_match_sklearn():
    scores, logits, target = scored_batches([random_batch(seed) for seed in range(3)])
    truth, pred = target.numpy().ravel().astype(int), (logits > 0).numpy().ravel().astype(int)
    assert scores["iou"] == pytest.approx(jaccard_score(truth, pred), rel=1e-12)
    assert scores["dice"] == pytest.approx(f1_score(truth, pred), rel=1e-12)
    assert scores["iou_mean"] == pytest.approx(sklearn_per_image(logits, target, jaccard_score).mean(), rel=1e-12)
    assert scores["dice_mean"] == pytest.approx(sklearn_per_image(logits, target, f1_score).mean(), rel=1e-12)
    assert scores["iou"] != pytest.approx(scores["iou_mean"])  # pooled and per-image mean really differ here


def test_meter_scores_each_class_as_sklearn_does_and_keeps_the_log_columns():
    """With several classes, each class's pooled IoU / Dice over its own pixels of every image (sklearn on that
    class's pixels alone); one class adds no keys, and the first four keys keep log.csv's column order."""
    scores, logits, target = scored_batches([random_batch(seed, shape=(3, 3, 8, 8)) for seed in range(2)])
    assert list(scores)[:4] == ["iou", "dice", "iou_mean", "dice_mean"]
    for c in range(3):
        truth, pred = target[:, c].numpy().ravel().astype(int), (logits[:, c] > 0).numpy().ravel().astype(int)
        assert scores[f"iou_class{c}"] == pytest.approx(jaccard_score(truth, pred), rel=1e-12)
        assert scores[f"dice_class{c}"] == pytest.approx(f1_score(truth, pred), rel=1e-12)
    assert len({scores[f"iou_class{c}"] for c in range(3)}) == 3
    # what update returns per image and class: sklearn on that image's class alone, with per_image_scores the mean
    iou, dice = SegmentationMeter("cpu").update(logits, target)
    assert iou.shape == dice.shape == (6, 3)
    for c in range(3):
        np.testing.assert_allclose(iou[:, c].numpy(), sklearn_per_image(logits[:, c:c + 1], target[:, c:c + 1],
                                                                         jaccard_score), rtol=1e-12)
        np.testing.assert_allclose(dice[:, c].numpy(), sklearn_per_image(logits[:, c:c + 1], target[:, c:c + 1],
                                                                          f1_score), rtol=1e-12)
    torch.testing.assert_close((iou.mean(1), dice.mean(1)), per_image_scores(logits, target), rtol=0, atol=0)
    one = SegmentationMeter("cpu")
    one.update(logits[:, :1], target[:, :1])
    assert list(one.compute()) == ["iou", "dice", "iou_mean", "dice_mean"]


def test_meter_over_batches_equals_one_shot():
    batches = [random_batch(seed, shape=(b, 1, 8, 8)) for seed, b in zip(range(3), (4, 2, 3))]
    several = SegmentationMeter("cpu")
    for logits, target in batches:
        several.update(logits, target)
    once = SegmentationMeter("cpu")
    once.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert several.state.dtype == torch.float64 and several.state.shape == (7,)
    assert several.state[6].item() == 9
    torch.testing.assert_close(several.state, once.state, rtol=1e-12, atol=1e-12)
    assert several.compute() == pytest.approx(once.compute(), rel=1e-12)


def test_meter_update_never_copies_to_the_host(monkeypatch):
    logits, target = random_batch(0)
    meter = SegmentationMeter("cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("update synchronised with the host")

    for method in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    meter.update(logits, target)
    monkeypatch.undo()
    assert meter.state[6].item() == 4


def test_all_reduce_without_a_process_group_keeps_the_state():
    logits, target = random_batch(1)
    meter = SegmentationMeter("cpu")
    meter.update(logits, target)
    before = meter.state.clone()
    meter.all_reduce()
    assert torch.equal(meter.state, before)


def test_compute_on_an_empty_meter_is_a_data_error():
    with pytest.raises(DataError, match="no images were scored"):
        SegmentationMeter("cpu").compute()


def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="--num_classes"):
        per_image_scores(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


def test_a_batch_without_its_class_axis_is_refused():
    """[B, H, W] logits and masks would be scored as B images of H classes, each row a class: the mean of the rows'
    IoUs, not the image's."""
    logits, target = random_batch(2, shape=(2, 1, 8, 8))
    with pytest.raises(DataError, match=r"\[B, K, H, W\].*x\[:, None\]"):
        per_image_scores(logits[:, 0], target[:, 0])
    with pytest.raises(DataError, match=r"\[B, K, H, W\]"):
        SegmentationMeter("cpu").update(logits[:, 0], target[:, 0])


# ---- 2018 Data Science Bowl score ----

def square(shape, top, left, height, width, label=1, into=None):
    image = np.zeros(shape, dtype=np.int32) if into is None else into
    image[top:top + height, left:left + width] = label
    return image


def test_dsb_identical_and_relabelled_predictions_score_one():
    truth = square((20, 20), 1, 1, 5, 5, 1)
    square((20, 20), 10, 10, 6, 4, 2, into=truth)
    assert dsb_score(truth, truth.copy()) == 1.0
    relabelled = np.where(truth == 1, 42, np.where(truth == 2, 7, 0))
    assert dsb_score(truth, relabelled) == 1.0


def test_dsb_empty_cases():
    empty = np.zeros((8, 8), dtype=np.int64)
    one = square((8, 8), 2, 2, 3, 3)
    assert dsb_score(empty, empty) == 1.0
    assert dsb_score(one, empty) == 0.0
    assert dsb_score(empty, one) == 0.0


def test_dsb_one_object_with_iou_0_7():
    # Truth 10x10 = 100 px; prediction 10x7 = 70 px inside it: IoU = 70 / 100 = 0.7 > t for
    # t = 0.50, 0.55, 0.60, 0.65 (precision 1) and not for 0.70..0.95 (precision 0): 4 / 10 = 0.4.
    truth = square((12, 12), 1, 1, 10, 10)
    pred = square((12, 12), 1, 1, 10, 7)
    assert dsb_score(truth, pred) == pytest.approx(0.4)


def test_dsb_two_touching_nuclei_predicted_merged():
    # Truth: A = 10x8 = 80 px and B = 10x2 = 20 px side by side; prediction: one 10x10 object.
    # IoU(A, merged) = 0.8, IoU(B, merged) = 0.2. For t = 0.50..0.75 (6 thresholds): TP 1, FP 0, FN 1 -> 1/2;
    # for t = 0.80..0.95: TP 0, FP 1, FN 2 -> 0. Score = 6 * 0.5 / 10 = 0.3.
    truth = square((12, 12), 1, 1, 10, 8, 1)
    square((12, 12), 1, 9, 10, 2, 2, into=truth)
    pred = square((12, 12), 1, 1, 10, 10)
    assert dsb_score(truth, pred) == pytest.approx(0.3)


def test_dsb_split_object():
    # Truth: one 10x10 object; prediction: split into 10x6 (IoU 0.6) and 10x4 (IoU 0.4).
    # For t = 0.50, 0.55: TP 1, FP 1, FN 0 -> 1/2; for t >= 0.60: TP 0, FP 2, FN 1 -> 0. Score = 2 * 0.5 / 10.
    truth = square((12, 12), 1, 1, 10, 10)
    pred = square((12, 12), 1, 1, 10, 6, 1)
    square((12, 12), 1, 7, 10, 4, 2, into=pred)
    assert dsb_score(truth, pred) == pytest.approx(0.1)


def dsb_reference(truth, pred):
    """A plain double loop over object pairs (not pixels), as in the Kaggle kernels."""
    true_ids = [v for v in np.unique(truth) if v != 0]
    pred_ids = [v for v in np.unique(pred) if v != 0]
    if not true_ids and not pred_ids:
        return 1.0
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for a, t in enumerate(true_ids):
        for b, p in enumerate(pred_ids):
            iou[a, b] = np.sum((truth == t) & (pred == p)) / np.sum((truth == t) | (pred == p))
    precisions = []
    for threshold in [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]:
        tp = np.sum(iou > threshold)
        precisions.append(tp / (len(true_ids) + len(pred_ids) - tp))
    return float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(4))
def test_dsb_matches_a_pairwise_reference_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    truth = np.zeros((24, 24), dtype=np.int32)
    for label in range(1, 5):
        top, left = rng.integers(0, 18, size=2)
        square(truth.shape, top, left, 6, 6, label, into=truth)
    pred = np.zeros_like(truth)
    for label in range(1, 5):
        shift = rng.integers(-1, 2, size=2)
        pred[np.roll(truth == label, shift, axis=(0, 1))] = label * 3
    assert dsb_score(truth, pred) == pytest.approx(dsb_reference(truth, pred), abs=1e-12)


def test_dsb_rejects_bad_label_images():
    with pytest.raises(DataError, match="differ in shape"):
        dsb_score(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(DataError, match="expected integer object labels"):
        dsb_score(np.zeros((4, 4), int), np.zeros((4, 4), float))


@pytest.mark.parametrize("low,high,scale", [(0, 50, 1), (3, 9, 1), (0, 1, 1), (0, 3, 1_000_000), (1, 4, 1_000_000)])
def test_consecutive_labels_match_the_sorted_unique_values(low, high, scale):
    labels = np.random.default_rng(low + high).integers(low, high, (30, 40)) * scale
    values, inverse = np.unique(labels.ravel(), return_inverse=True)
    want = inverse if values[0] == 0 else inverse + 1  # background 0, objects 1..N in the order of their values
    got, count = consecutive_labels(labels)
    np.testing.assert_array_equal(got, want)
    assert count == np.count_nonzero(values)


def test_nucleus_scores_are_the_columns_named_and_pq_is_the_matched_ious_over_tp_fp_and_fn_halves():
    """Truth: nuclei 1 (4x4) and 2 (2x2); prediction: nucleus 1 less a column (IoU 12/16) and a stray one. At IoU
    0.5 one match, one false positive, one miss: F1 1/2, SQ 0.75, PQ 0.75 / (1 + 1/2 + 1/2)."""
    truth, pred = np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32)
    truth[0:4, 0:4], truth[6:8, 6:8] = 1, 2
    pred[0:4, 0:3], pred[6:8, 0:2] = 5, 9
    scores = nucleus_scores(object_iou(truth, pred))
    assert tuple(scores) == NUCLEUS_SCORES
    assert (scores["tp"], scores["fp"], scores["fn"], scores["true_nuclei"], scores["pred_nuclei"]) == (1, 1, 1, 2, 2)
    assert scores["f1"] == 0.5 and scores["sq"] == 0.75 and scores["pq"] == pytest.approx(0.75 / 2)
    assert scores["dsb"] == pytest.approx(dsb_score(truth, pred))
