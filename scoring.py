"""What score.py does: pair predicted label images with a dataset's truth, score each image (pixel IoU and Dice,
the DSB2018 score, the nuclei matched at IoU 0.5) and sum up. Imported by score.py once its flags are parsed, so
that --help answers at once.
"""
import os
import shlex

import numpy as np

from config import INPUTS_DIR, dataset_folder
from layouts import find_layout, list_ids, read_instance_labels
from evaluation import interval_line, matched_nuclei_lines
from image_files import multi_object_ids, read_labels_or_components, read_mask
from measurements import MOSTLY_FOREGROUND
from metrics import NUCLEUS_SCORES, nucleus_scores, object_iou, pooled_scores
from predict import CELLPOSE_OUTPUTS, IMAGE_EXTS
from utils import DataError, check_utf8_names, first_few

# Other files that tools write beside them: predict.py's probabilities and overlays, the Cellpose layout's images
OTHER_OUTPUTS = ("_prob", "_overlay", "_img")
COLUMNS = ["img_id", "iou", "dice", *NUCLEUS_SCORES, "prediction"]


def truth_files(dataset, img_ext, mask_ext):
    """{id: (label file or None, binary mask path or None, image path)} of every image of dataset ``dataset`` (a
    name in inputs/ or a path; layouts.list_ids checks its layout), and its folder. The mask is class 0's of the 'masks'
    layout, which val.py scores pixels by; label-image layouts derive their foreground from the labels."""
    folder = dataset_folder(dataset)
    if not os.path.isdir(folder):  # find_layout's message names train.py's --dataset
        raise DataError(f"--truth {dataset}: no dataset of that name in {INPUTS_DIR}/ and no such folder; give the "
                        "folder of the annotated images (images/ and labels/, or another layout of 'Your own data')")
    layout = find_layout(folder, img_ext, mask_ext)
    masks = os.path.join(folder, "masks")
    classes = sum(d.isdigit() for d in os.listdir(masks)) if layout.kind == "masks" and os.path.isdir(masks) else 1
    ids = list_ids(folder, img_ext, mask_ext, max(classes, 1))  # class 0 is the nuclei
    return {i: (layout.labels(i), layout.mask(i, 0) if layout.kind == "masks" else None, layout.image(i))
            for i in ids}, folder


def pair_predictions(pred_dir, ids, suffix, suffixes, image_stems=None):
    """{id: the prediction file of each of ``ids`` in ``pred_dir``} (named <id><suffix>, for ``suffix`` None with no
    suffix or one of ``suffixes``, score.PRED_SUFFIXES), and the image files there that belong to no id. An id whose
    image file is named otherwise (``image_stems`` {id: its name without extension}: x_img of Cellpose's layout) also
    pairs with that name plus a suffix (x_img_instances, x_img_cp_masks: the names predict.py and Cellpose give the
    outputs of x_img.png), though not with that name alone, the image's own. An id with two predictions or none is a
    DataError naming them."""
    if not os.path.isdir(pred_dir):
        raise DataError(f"--pred {pred_dir}: no such folder; give the folder of the predicted label images")
    names = sorted(f for f in os.listdir(pred_dir) if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
                   and not os.path.isdir(os.path.join(pred_dir, f)))
    check_utf8_names(names)
    wanted = ("", *suffixes) if suffix is None else (suffix,)
    known = ("", *suffixes, *OTHER_OUTPUTS, *CELLPOSE_OUTPUTS, *wanted)
    candidates, strays = {i: [] for i in ids}, []
    # an ending of "" would pair the image file itself (Cellpose's x_img.png), as a prediction of x
    aliases = {stem: i for i, stem in (image_stems or {}).items() if stem != i}

    def owner(stem, endings):
        """(id, ending) of a file named ``stem`` + one of ``endings``, or None."""
        for e in endings:
            base = stem[:len(stem) - len(e)] if stem.endswith(e) else None
            if base in candidates:
                return base, e
            if e and base in aliases:
                return aliases[base], e
        return None

    for name in names:
        stem = os.path.splitext(name)[0]
        found = owner(stem, wanted)
        if found is not None:
            candidates[found[0]].append((name, found[1]))
        elif owner(stem, known) is None:
            strays.append(name)
    for img_id, found in candidates.items():
        if len(found) > 1:
            (first, end_first), (second, end_second) = found[:2]
            fix = (f"choose with --suffix {shlex.quote(end_second)} or --suffix {shlex.quote(end_first)}"
                   if end_first != end_second else "keep one of them")
            raise DataError(f"{img_id} has two predictions in {pred_dir}: {first} and {second}; {fix}")
    missing = [i for i, found in candidates.items() if not found]
    if missing:
        names_like = f"<id>{suffix}" if suffix is not None else f"<id> or <id> plus one of {', '.join(suffixes)}"
        raise DataError(f"{len(missing)} of {len(ids)} images have no prediction in {pred_dir}: {first_few(missing)}; "
                        f"name each prediction {names_like} (.png or .tif), or score a dataset of the images "
                        "predicted")
    return {i: os.path.join(pred_dir, found[0][0]) for i, found in candidates.items()}, strays


def score_image(img_id, pred_path, labels_path, mask_path, image_path):
    """One image's row of COLUMNS (the instance scores NaN without ``labels_path``, a label image or ImageJ ROIs drawn
    at the size of ``image_path``: layouts.read_instance_labels), its pixel counts
    (intersection, union, predicted, true, all of the image's), whether the prediction was a binary mask, and how
    many ids of the truth mark several separate objects (image_files.multi_object_ids: the score takes each for one
    nucleus; 0 without instance labels)."""
    pred, binary = read_labels_or_components(pred_path)
    truth = read_instance_labels(labels_path, image_path) if labels_path else None
    true_mask = read_mask(mask_path) > 0 if mask_path else truth > 0
    if pred.shape != true_mask.shape:
        raise DataError(f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} pixels, its truth "
                        f"{labels_path or mask_path} {true_mask.shape[1]}x{true_mask.shape[0]}: segment the image at "
                        "its size in the dataset")
    if truth is not None and truth.shape != true_mask.shape:
        raise DataError(f"label image {labels_path} is {truth.shape[1]}x{truth.shape[0]} pixels, its mask "
                        f"{mask_path} {true_mask.shape[1]}x{true_mask.shape[0]}: give them one size")
    pred_mask = pred > 0
    counts = [int((pred_mask & true_mask).sum()), int((pred_mask | true_mask).sum()), int(pred_mask.sum()),
              int(true_mask.sum()), true_mask.size]
    row = {"img_id": img_id, **pooled_scores(*counts[:4]), "prediction": os.path.basename(pred_path)}
    if truth is None:
        return {**row, "pred_nuclei": len(np.unique(pred[pred_mask]))}, counts, binary, 0
    return {**row, **nucleus_scores(object_iou(truth, pred))}, counts, binary, len(multi_object_ids(truth))


def mostly_foreground_notes(counts, pred_dir, folder):
    """Notes (a list, empty for none) when the predictions or the truth mark more than measurements.MOSTLY_FOREGROUND of
    all their pixels as nuclei (``counts`` as :func:`summary`'s): label images whose background is not 0, or masks
    drawn dark on light, would score as nuclei over the background without a word."""
    shares = {f"the predictions in {pred_dir}": counts[2] / counts[4], f"the truth of {folder}": counts[3] / counts[4]}
    return [f"note: {what} mark {share:.0%} of their pixels as nuclei; nuclei are values above 0 on a background of 0 "
            "(label images with another background, or masks drawn dark on light, score the background)"
            for what, share in shares.items() if share > MOSTLY_FOREGROUND]


def summary(table, counts, pred_dir, folder, output):
    """The lines score.py prints: pooled and mean IoU, mean Dice, DSB2018, F1 / precision / recall at IoU 0.5, PQ, the
    bootstrap interval (evaluation.interval_line), the worst image. ``counts``: the pixel counts summed."""
    pooled = pooled_scores(*counts[:4])
    labelled = table["dsb"].notna()
    lines = [f"{pred_dir} against {folder} ({len(table)} images):",
             f"  IoU  {pooled['iou']:.4f} pooled   {table['iou'].mean():.4f} mean per image",
             f"  Dice {pooled['dice']:.4f} pooled   {table['dice'].mean():.4f} mean per image"]
    if labelled.any():
        nuclei = table[labelled]
        over = f", over the {labelled.sum()} images with instance labels" if not labelled.all() else ""
        lines += [f"  DSB2018 score {nuclei['dsb'].mean():.4f} mean per image{over}", *matched_nuclei_lines(nuclei)]
    if not labelled.all():
        lines.append(f"  {(~labelled).sum()} of {len(table)} images have no instance labels in {folder} (labels/ "
                     "or a label-image layout): their masks alone are scored (IoU and Dice; the DSB2018 score and "
                     "F1 need instance labels)")
    lines += interval_line(table, None)
    worst = table.iloc[0]
    dsb = f", DSB2018 {worst['dsb']:.3f}" if labelled.iloc[0] else ""
    lines.append(f"  worst image {worst['img_id']} (IoU {worst['iou']:.3f}{dsb}); per image in {output}")
    return "\n".join(lines)
