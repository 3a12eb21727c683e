"""Segmentation scores: pixel IoU / Dice on logits, and the instance scores of nuclei (the 2018 Data Science Bowl
score, F1 at IoU 0.5, panoptic quality).

Pixel scores threshold the sigmoid at 0.5, i.e. a pixel is predicted foreground when its logit is > 0;
the target is foreground where it is > 0.5. A class of an image whose prediction and truth are both empty
scores 1 (IoU and Dice), matching scikit-learn's ``zero_division=1``; likewise a pooled score with an
empty union is 1.
"""
import numpy as np
import torch

from distributed import reduce_sum
from instances import split_instances
from losses import check_same_shape
from utils import DataError

DSB_THRESHOLDS = np.round(0.5 + 0.05 * np.arange(10), 2)  # 0.50, 0.55, ..., 0.95
# the instance scores of an image, the keys of nucleus_scores in their order, as scores.csv's columns have them
NUCLEUS_SCORES = ("dsb", "tp", "fp", "fn", "precision", "recall", "f1", "pq", "sq", "true_nuclei", "pred_nuclei")


def pixel_counts(logits, target):
    """Per image and class counts, each float64 [B, K]: intersection, union, predicted and true pixels."""
    check_same_shape(logits, target)
    pred = (logits > 0).flatten(2)
    truth = (target > 0.5).flatten(2)
    intersection = (pred & truth).sum(2, dtype=torch.float64)
    union = (pred | truth).sum(2, dtype=torch.float64)
    return intersection, union, pred.sum(2, dtype=torch.float64), truth.sum(2, dtype=torch.float64)


def ratio_or_one(numerator, denominator):
    """numerator / denominator elementwise, 1 where the denominator is 0 (both masks empty)."""
    ones = torch.ones_like(numerator)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), ones)


def class_scores(intersection, union, pred_sum, target_sum):
    """Per image and class (iou [B, K], dice [B, K]) from the [B, K] counts of :func:`pixel_counts`."""
    return ratio_or_one(intersection, union), ratio_or_one(2 * intersection, pred_sum + target_sum)


def per_image_scores(logits, target):
    """logits [B, K, H, W], target [B, K, H, W] in {0, 1} -> (iou [B], dice [B]) float64 in [0, 1].

    Each image's score is the mean over its classes; an empty prediction on an empty truth scores 1.
    """
    return tuple(s.mean(1) for s in class_scores(*pixel_counts(logits, target)))


class SegmentationMeter:
    """Accumulates pixel scores over batches on ``device`` without synchronising with the host.

    ``state`` is one float64 tensor [7]: sums of intersection, union, predicted pixels, true pixels,
    per-image IoU, per-image Dice, and the number of images; ``by_class`` float64 [K, 4] the first four per class.
    With deep supervision pass the last head.
    """

    def __init__(self, device):
        self.state = torch.zeros(7, dtype=torch.float64, device=device)
        self.by_class = None  # [K, 4], once the first batch says K

    def update(self, logits, target):
        """Add a batch: logits [B, K, H, W], target [B, K, H, W] in {0, 1}. Returns its scores per image and class
        (iou [B, K], dice [B, K]) on the device; their means over classes are :func:`per_image_scores`."""
        counts = pixel_counts(logits, target)
        per_class = class_scores(*counts)
        per_image = tuple(s.mean(1) for s in per_class)
        self.state[:6] += torch.stack([values.sum() for values in counts + per_image])
        self.state[6] += logits.shape[0]
        by_class = torch.stack([values.sum(0) for values in counts], 1)
        self.by_class = by_class if self.by_class is None else self.by_class + by_class
        return per_class

    def all_reduce(self):
        """Sum ``state`` and ``by_class`` over torch.distributed ranks when a process group is initialised."""
        reduce_sum(self.state)
        if self.by_class is not None:
            reduce_sum(self.by_class)

    def compute(self):
        """dict(iou, dice: pooled over all pixels of every class; iou_mean, dice_mean: mean of per-image scores),
        floats; with several classes also iou_class<c>, dice_class<c>: class c's pooled over its pixels."""
        intersection, union, pred_sum, target_sum, iou_sum, dice_sum, num_images = self.state.tolist()
        if num_images == 0:
            raise DataError("no images were scored: the evaluation set is empty; check the image folder and split")
        scores = {**pooled_scores(intersection, union, pred_sum, target_sum), "iou_mean": iou_sum / num_images,
                  "dice_mean": dice_sum / num_images}
        classes = self.by_class.tolist() if self.by_class is not None and len(self.by_class) > 1 else []
        for c, counts in enumerate(classes):
            scores.update({f"{k}_class{c}": v for k, v in pooled_scores(*counts).items()})
        return scores


def pooled_scores(intersection, union, pred_sum, target_sum):
    """dict(iou, dice) from pixel counts summed over images (floats); 1 where both masks are empty."""
    return {"iou": intersection / union if union > 0 else 1.0,
            "dice": 2 * intersection / (pred_sum + target_sum) if pred_sum + target_sum > 0 else 1.0}


def consecutive_labels(labels):
    """Relabel an integer image so that background is 0 and objects are 1..N: -> (flat indices, N).

    A lookup table over the label values (one pass, no sort) when they are small, as label images' are."""
    flat = labels.ravel()
    if flat.size and flat.max() > 4 * flat.size:  # sparse huge values: sort instead
        values, indices = np.unique(flat, return_inverse=True)
        return (indices if values[0] == 0 else indices + 1), int(np.count_nonzero(values))
    present = np.bincount(flat) > 0
    present[:1] = False
    lookup = np.cumsum(present)
    return lookup[flat], int(lookup[-1]) if lookup.size else 0


def object_iou(true_labels, pred_labels):
    """IoU matrix [N_true, N_pred] between the objects of two label images, from one joint histogram."""
    true_idx, n_true = consecutive_labels(true_labels)
    pred_idx, n_pred = consecutive_labels(pred_labels)
    joint = np.bincount(true_idx * (n_pred + 1) + pred_idx, minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    intersection = joint[1:, 1:]
    union = joint.sum(1)[1:, None] + joint.sum(0)[None, 1:] - intersection
    return intersection / union


def check_label_images(true_labels, pred_labels):
    """Raise DataError unless both are integer label images of the same shape with no negative labels."""
    if true_labels.shape != pred_labels.shape:
        raise DataError(f"label images differ in shape: truth {true_labels.shape}, prediction {pred_labels.shape}")
    for name, labels in (("truth", true_labels), ("prediction", pred_labels)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"the {name} label image has dtype {labels.dtype}; expected integer object labels")
        if labels.size and labels.min() < 0:
            raise DataError(f"the {name} label image has negative labels; use 0 for background and 1..N")


def dsb_score(true_labels, pred_labels):
    """2018 Data Science Bowl score of two integer label images HxW (0 = background, 1..N objects).

    For each t in 0.50, 0.55, ..., 0.95 a true and a predicted object match when IoU > t (one-to-one since
    t >= 0.5); precision(t) = TP / (TP + FP + FN). Returns the mean over t, a float in [0, 1]: 1.0 when both
    images have no objects, 0.0 when exactly one has none.
    """
    check_label_images(true_labels, pred_labels)
    return dsb_score_of_iou(object_iou(true_labels, pred_labels))


def dsb_score_of_iou(iou):
    """:func:`dsb_score` from the objects' IoU matrix [N_true, N_pred] (:func:`object_iou`)."""
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        return 1.0
    matched = true_positives(iou)
    precision = matched / (n_true + n_pred - matched)
    return float(precision.mean())


def true_positives(iou, thresholds=DSB_THRESHOLDS):
    """The matched pairs of true and predicted objects at each IoU threshold (IoU > t; one-to-one for t >= 0.5, as
    two objects cannot both overlap one by more than half): int [T] for ``thresholds`` [T], from the IoU matrix
    [N_true, N_pred] (:func:`object_iou`)."""
    return (iou[None] > np.asarray(thresholds)[:, None, None]).sum(axis=(1, 2))


def panoptic_quality(iou):
    """Panoptic quality of matched nuclei (Kirillov et al. 2019; HoVer-Net's PQ) from the IoU matrix [N_true, N_pred]
    (:func:`object_iou`): -> (PQ, SQ). A true and a predicted nucleus match when IoU > 0.5 (one-to-one); SQ is the
    mean IoU of the matched pairs (NaN when none matched), PQ = (sum of their IoUs) / (TP + FP/2 + FN/2) = SQ x F1 at
    IoU 0.5, in [0, 1]: 1.0 when both images have no nuclei, 0.0 when nothing matched."""
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        return 1.0, float("nan")
    matched = iou[iou > 0.5]
    return 2 * float(matched.sum()) / (n_true + n_pred), float(matched.mean()) if matched.size else float("nan")


def nucleus_scores(iou):
    """One image's instance scores from its objects' IoU matrix [N_true, N_pred] (:func:`object_iou`): {dsb
    (:func:`dsb_score_of_iou`); at IoU 0.5 the matched nuclei tp, the false positives fp and negatives fn,
    precision, recall and F1 in [0, 1] (an empty side scores 1 only when the other is empty too: a tool that finds
    nothing is no precise one); pq and sq (:func:`panoptic_quality`); true_nuclei, pred_nuclei}."""
    n_true, n_pred = iou.shape
    tp = int(true_positives(iou, [0.5])[0])
    pq, sq = panoptic_quality(iou)
    return {"dsb": dsb_score_of_iou(iou), "tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
            "precision": tp / n_pred if n_pred else float(n_true == 0),
            "recall": tp / n_true if n_true else float(n_pred == 0),
            "f1": 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0, "pq": pq, "sq": sq,
            "true_nuclei": n_true, "pred_nuclei": n_pred}


def separation_scores(prob, true_labels, methods=("watershed", "cc"), **kwargs):
    """:func:`nucleus_scores` of each separation method's nuclei on one image: {method: scores}.

    prob: float [H, W] in [0, 1]; true_labels: int [H, W] of the same shape (0 background, 1..N); ``kwargs``
    (e.g. ``border``, ``min_size``) go to :func:`instances.split_instances`.
    """
    return {m: nucleus_scores(object_iou(true_labels, split_instances(prob, m, **kwargs))) for m in methods}
