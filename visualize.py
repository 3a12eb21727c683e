"""Pictures a person can open: prediction overlays, outlines of nuclei, a summary grid of the worst and best
images, and a training batch as the network gets it.

An overlay panel is ``image | ground truth | prediction | errors`` side by side: the truth outlined in green and the
prediction in magenta, and in the errors panel false positives (predicted, not true) magenta, false negatives (true,
missed) cyan and true positives green, each on the grey image.
"""
import os

import cv2
import numpy as np
from skimage.segmentation import find_boundaries

from files import atomic_imwrite
from image_files import denormalize

FALSE_POSITIVE = (255, 0, 255)  # BGR magenta
FALSE_NEGATIVE = (255, 255, 0)  # BGR cyan
TRUE_POSITIVE = (0, 200, 0)
OUTLINE = (0, 255, 255)  # BGR yellow
# the outline of each class of a training batch: green first, as it shows on black, white and a stain's purple
CLASS_OUTLINES = (TRUE_POSITIVE, FALSE_NEGATIVE, FALSE_POSITIVE, OUTLINE, (0, 140, 255))
CLASS_NAMES = ("green", "cyan", "magenta", "yellow", "orange")  # more classes take them again
BORDER = (0, 0, 255)  # BGR red
GAP = 4
BATCH_SHOWN = 16  # samples of a training batch drawn (a GPU batch of 64 would make a picture too large to look at)


def to_bgr(image):
    """float [H, W, C] in [0, 1] (values outside are clipped), C = 1 or 3 -> uint8 BGR [H, W, 3] for drawing."""
    img = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)


def draw_outlines(image_bgr, mask, colour=OUTLINE, labels=None):
    """A copy of ``image_bgr`` with the outline of each object (``labels``, int [H, W]: inner boundaries, so
    touching nuclei stay apart) or of the mask (bool [H, W]: its contours) drawn in ``colour``. Either outline is
    closed along the image's edge (labels are padded with background first, as findContours sees the mask)."""
    out = image_bgr.copy()
    if labels is not None:
        out[find_boundaries(np.pad(labels, 1), mode="inner")[1:-1, 1:-1]] = colour
        return out
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def overlay_panel(image, truth, prob, threshold=0.5):
    """image uint8 BGR [H, W, 3], truth bool [H, W], prob float [H, W] in [0, 1] -> uint8 BGR [H, 4W + 3*GAP, 3]."""
    pred = prob > threshold
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    errors = grey.copy()
    errors[pred & truth] = TRUE_POSITIVE
    errors[pred & ~truth] = FALSE_POSITIVE
    errors[~pred & truth] = FALSE_NEGATIVE
    gap = np.full((image.shape[0], GAP, 3), 255, np.uint8)
    # outlines on the grey image: on a stain's purple the magenta outline hardly shows (CIEDE2000 17; 32 on any grey)
    return np.concatenate([image, gap, draw_outlines(grey, truth, TRUE_POSITIVE), gap,
                           draw_outlines(grey, pred, FALSE_POSITIVE), gap, errors], axis=1)


def shrunk_panel(panel, height):
    """An overlay panel (uint8 BGR, :func:`overlay_panel`) drawn again ``height`` pixels high, from its image and the
    truth and prediction its errors panel holds (exactly: its colours are never grey). Shrinking the panel itself
    would blend its 1 pixel outlines into the image (8x smaller: no outline left to see)."""
    width = (panel.shape[1] - 3 * GAP) // 4
    image, errors = panel[:, :width], panel[:, -width:]
    truth, pred = ((errors == TRUE_POSITIVE).all(axis=2) | (errors == colour).all(axis=2)
                   for colour in (FALSE_NEGATIVE, FALSE_POSITIVE))
    size = (max(round(width * height / panel.shape[0]), 1), height)
    truth, pred = (cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) for m in (truth, pred))
    return overlay_panel(cv2.resize(image, size, interpolation=cv2.INTER_AREA), truth > 0.5, pred)


def text_row(text, width):
    """A white uint8 BGR row [22, width, 3] with ``text`` written in it, smaller where it would not fit."""
    row = np.full((22, width, 3), 255, np.uint8)
    size = 0.45 * min(1.0, (width - 8) / cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0])
    cv2.putText(row, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, size, (0, 0, 0), 1, cv2.LINE_AA)
    return row


def write_summary(overlay_dir, scores, out_path, title, k=4, row_height=128, classes=1):
    """Grid of the k worst and k best overlays by IoU (scores: DataFrame with img_id, iou), labelled, as PNG, under
    ``title`` (which run, which images). With several ``classes`` the IoU is the mean of an image's classes and the
    overlays show class 0, so each row also gives class 0's IoU (scores' iou_class0)."""
    scores = scores.sort_values("iou", kind="stable")
    chosen = list(scores.head(k).itertuples()) + list(scores.tail(min(k, max(len(scores) - k, 0))).itertuples())
    rows = []
    for rank, row in enumerate(chosen):
        panel = shrunk_panel(cv2.imread(os.path.join(overlay_dir, row.img_id + ".png")), row_height)
        shown = f" (class 0 {row.iou_class0:.3f})" if classes > 1 else ""
        label = text_row(f"{'worst' if rank < k else 'best'}: {row.img_id[:24]}  IoU {row.iou:.3f}{shown}",
                         panel.shape[1])
        rows.append(np.concatenate([label, panel], axis=0))
    width = max(r.shape[1] for r in rows)
    rows[:0] = [text_row(title, width),
                text_row("image | truth | prediction | errors (TP green, FP magenta, FN cyan)", width)]
    if classes > 1:
        rows.insert(2, text_row(f"panels of class 0; IoU: the mean of the {classes} classes (class 0's)", width))
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    atomic_imwrite(out_path, np.concatenate(rows, axis=0))


def batch_picture(images, masks, ids, classes, title, columns=4, side=(128, 256)):
    """The first :data:`BATCH_SHOWN` samples of a training batch as the network gets them, uint8 BGR: a grid of
    ``columns`` panels a row under ``title`` and a legend, each panel labelled with its id (``ids``).

    images: float [B, C, H, W], C = 1 or 3, normalised as image_files.normalize (shown denormalised, clipped to
    [0, 1]); masks: [B, K, H, W] in {0, 1}, the first ``classes`` channels the mask classes (each outlined in its
    colour of :data:`CLASS_OUTLINES`), a --borders channel after them (its pixels red). A sample whose longer side
    is under ``side[0]`` pixels is enlarged by a whole factor (nearest: every pixel stays a visible square and the
    outlines 1 pixel), one whose longer side is over ``side[1]`` shrunk to it (a 5x600 sample is not enlarged 26x).
    """
    images = denormalize(images[:BATCH_SHOWN].detach().float().cpu()).numpy()
    masks = masks[:BATCH_SHOWN].detach().float().cpu().numpy() > 0.5
    h, w = images.shape[2:]
    longer = max(h, w)
    scale = -(-side[0] // longer) if longer < side[0] else min(1.0, side[1] / longer)
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    panels = []
    for image, mask, img_id in zip(images, masks, ids):
        panel = cv2.resize(to_bgr(image.transpose(1, 2, 0)), size,
                           interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)
        shown = [cv2.resize(m.astype(np.float32), size,
                            interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA) > 0.5 for m in mask]
        for border in shown[classes:]:
            panel[border] = BORDER
        for c, m in enumerate(shown[:classes]):
            panel = draw_outlines(panel, m, CLASS_OUTLINES[c % len(CLASS_OUTLINES)])
        panels.append(np.concatenate([panel, text_row(img_id[:24], size[0])], axis=0))
    columns, blank = min(columns, len(panels)), np.full_like(panels[0], 255)
    rows = [np.concatenate([p for panel in panels[i:i + columns] + [blank] * (i + columns - len(panels))
                            for p in (panel, np.full((panel.shape[0], GAP, 3), 255, np.uint8))][:-1], axis=1)
            for i in range(0, len(panels), columns)]
    width = rows[0].shape[1]
    outlines = ", ".join(f"class {c} {CLASS_NAMES[c % len(CLASS_NAMES)]}" for c in range(classes))
    legend = f"outlines: the training mask ({outlines})" if classes > 1 else "green outlines: the training mask"
    legend += "; red: the border channel" if masks.shape[1] > classes else ""
    rows[:0] = [text_row(title, width), text_row(legend, width)]
    return np.concatenate([np.pad(r, ((0, GAP), (0, 0), (0, 0)), constant_values=255) for r in rows], axis=0)
