"""Pictures a person can open: prediction overlays and a summary grid of the worst and best images.

An overlay panel is ``image | ground truth | prediction | errors`` side by side; in the errors panel false
positives (predicted, not true) are magenta and false negatives (true, missed) are cyan, on the grey image.
"""
import os

import cv2
import numpy as np

from dataset import NORM_MEAN, NORM_STD
from utils import atomic_imwrite

FALSE_POSITIVE = (255, 0, 255)  # BGR magenta
FALSE_NEGATIVE = (255, 255, 0)  # BGR cyan
TRUE_POSITIVE = (0, 200, 0)
GAP = 4


def denormalize(image):
    """Network input [C, H, W] (torch, normalised) -> uint8 BGR [H, W, 3] for drawing."""
    img = (image.float().cpu().numpy().transpose(1, 2, 0) * NORM_STD + NORM_MEAN).clip(0, 1)
    img = (img * 255).round().astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.shape[2] == 1 else cv2.cvtColor(img[:, :, :3],
                                                                                         cv2.COLOR_RGB2BGR)


def _outline(canvas, mask, colour):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, 1)
    return canvas


def overlay_panel(image, truth, prob, threshold=0.5):
    """image uint8 BGR [H, W, 3], truth bool [H, W], prob float [H, W] in [0, 1] -> uint8 BGR [H, 4W + 3*GAP, 3]."""
    pred = prob > threshold
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    truth_panel = _outline(image.copy(), truth, TRUE_POSITIVE)
    pred_panel = _outline(image.copy(), pred, FALSE_POSITIVE)
    errors = grey.copy()
    errors[pred & truth] = TRUE_POSITIVE
    errors[pred & ~truth] = FALSE_POSITIVE
    errors[~pred & truth] = FALSE_NEGATIVE
    gap = np.full((image.shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([image, gap, truth_panel, gap, pred_panel, gap, errors], axis=1)


def write_summary(overlay_dir, scores, out_path, k=4, row_height=128):
    """Grid of the k worst and k best overlays by IoU (scores: DataFrame with img_id, iou), labelled, as PNG."""
    scores = scores.sort_values("iou", kind="stable")
    chosen = list(scores.head(k).itertuples()) + list(scores.tail(min(k, max(len(scores) - k, 0))).itertuples())
    rows = []
    for rank, row in enumerate(chosen):
        panel = cv2.imread(os.path.join(overlay_dir, row.img_id + ".png"))
        scale = row_height / panel.shape[0]
        panel = cv2.resize(panel, (max(int(panel.shape[1] * scale), 1), row_height), interpolation=cv2.INTER_AREA)
        label = np.full((22, panel.shape[1], 3), 255, np.uint8)
        kind = "worst" if rank < k else "best"
        cv2.putText(label, f"{kind}: {row.img_id[:24]}  IoU {row.iou:.3f}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([label, panel], axis=0))
    header = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
    cv2.putText(header, "image | truth | prediction | errors (FP magenta, FN cyan)", (4, 16),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    rows.insert(0, header)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    atomic_imwrite(out_path, np.concatenate(rows, axis=0))
