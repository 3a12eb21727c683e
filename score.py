"""Score segmentations made elsewhere against a dataset's truth: predict.py's nuclei, Cellpose's, StarDist's or a
colleague's label images.

    python score.py --pred predictions/ --truth mycells --suffix _instances    # predict.py --instances's nuclei
    python score.py --pred cellpose_out/ --truth mycells                        # <id>_cp_masks.png of Cellpose

--truth is a dataset of any layout the toolkit reads (dataset.find_layout; a name in inputs/ or a folder path);
its instance labels are the true nuclei. A dataset of binary masks alone has no true nuclei: it is scored by IoU
and Dice only. --pred is a folder of label images (one integer per nucleus, 8/16/32-bit PNG or TIFF), each named
like its image: ``<id>`` or ``<id>`` plus one of PRED_SUFFIXES (``--suffix`` picks one); a binary mask there is
taken as its connected components (touching nuclei stay one), with a note.

Per image (scores.csv, a row per image, worst IoU first, with val.py's img_id, iou, dice and dsb columns, so that
bench/compare_scores.py compares two tools, or a tool with val.py): the pixel IoU and Dice of the foregrounds, the
DSB2018 score (metrics.dsb_score) and at IoU 0.5 the matched nuclei (tp), false positives and negatives,
precision, recall and F1 (1 where nothing was to find and nothing was found), and the numbers of true and
predicted nuclei. Then a summary like val.py's.
"""
import os
import shlex

from utils import ArgumentParser, DataError, UsageError, file_extension, first_few, path_arg, run_cli

# What tools append to an image's name in the label images they write: predict.py --instances, Cellpose, the
# Cellpose layout's truth, and common hand-made names
PRED_SUFFIXES = ("_instances", "_cp_masks", "_masks", "_labels", "_label")
# Other files that tools write beside them: predict.py's probabilities and overlays, the Cellpose layout's images
OTHER_OUTPUTS = ("_prob", "_overlay", "_img")
COLUMNS = ["img_id", "iou", "dice", "dsb", "tp", "fp", "fn", "precision", "recall", "f1", "true_nuclei",
           "pred_nuclei", "prediction"]


def build_parser():
    p = ArgumentParser(prog="score.py",
                       description="Score label images made by another tool (or by predict.py --instances) against "
                                   "a dataset's truth: pixel IoU and Dice, the DSB2018 score, and precision, recall "
                                   "and F1 of the nuclei at IoU 0.5.")
    p.add_argument("--pred", type=path_arg, required=True, metavar="DIR",
                   help="folder of predicted label images, <id><suffix>.png or .tif, <id> as in the dataset")
    p.add_argument("--truth", type=path_arg, required=True, metavar="DATASET",
                   help="the dataset that holds the truth: a folder in inputs/ or a path, in any layout of the "
                        "README's 'Your own data'")
    p.add_argument("--suffix", default=None,
                   help=f"what the predictions' names add to the image's id ('' for none); default: none or one of "
                        f"{', '.join(PRED_SUFFIXES)}, whichever is there")
    p.add_argument("--img_ext", default=".png", type=file_extension, help="the dataset's image file extension")
    p.add_argument("--mask_ext", default=".png", type=file_extension,
                   help="the dataset's mask or label image file extension")
    p.add_argument("--output", type=path_arg, default=None, metavar="CSV",
                   help="the per-image scores (default: scores.csv in the --pred folder)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def truth_files(dataset, img_ext, mask_ext):
    """{id: (label image path or None, binary mask path or None)} of every image of dataset ``dataset`` (a name in
    inputs/ or a path; dataset.list_ids checks its layout), and its folder. The mask is class 0's of the 'masks'
    layout, which val.py scores pixels by; label-image layouts derive their foreground from the labels."""
    from config import INPUTS_DIR, dataset_folder
    from dataset import find_layout, list_ids

    folder = dataset_folder(dataset)
    if not os.path.isdir(folder):  # find_layout's message names train.py's --dataset
        raise DataError(f"--truth {dataset}: no dataset of that name in {INPUTS_DIR}/ and no such folder; give the "
                        "folder of the annotated images (images/ and labels/, or another layout of 'Your own data')")
    layout = find_layout(folder, img_ext, mask_ext)
    masks = os.path.join(folder, "masks")
    classes = sum(d.isdigit() for d in os.listdir(masks)) if layout.kind == "masks" and os.path.isdir(masks) else 1
    ids = list_ids(folder, img_ext, mask_ext, max(classes, 1))  # class 0 is the nuclei
    return {i: (layout.labels(i), layout.mask(i, 0) if layout.kind == "masks" else None) for i in ids}, folder


def pair_predictions(pred_dir, ids, suffix):
    """{id: the prediction file of each of ``ids`` in ``pred_dir``} (named <id><suffix>, for ``suffix`` None with no
    suffix or one of PRED_SUFFIXES), and the image files there that belong to no id. An id with two predictions or
    none is a DataError naming them."""
    from predict import CELLPOSE_OUTPUTS, IMAGE_EXTS
    from utils import check_utf8_names

    if not os.path.isdir(pred_dir):
        raise DataError(f"--pred {pred_dir}: no such folder; give the folder of the predicted label images")
    names = sorted(f for f in os.listdir(pred_dir) if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
                   and not os.path.isdir(os.path.join(pred_dir, f)))
    check_utf8_names(names)
    wanted = ("", *PRED_SUFFIXES) if suffix is None else (suffix,)
    known = ("", *PRED_SUFFIXES, *OTHER_OUTPUTS, *CELLPOSE_OUTPUTS, *wanted)
    candidates, strays = {i: [] for i in ids}, []

    def owner(stem, endings):
        return next((stem[:len(stem) - len(e)] for e in endings
                     if stem.endswith(e) and stem[:len(stem) - len(e)] in candidates), None)

    for name in names:
        stem = os.path.splitext(name)[0]
        img_id = owner(stem, wanted)
        if img_id is not None:
            candidates[img_id].append(name)
        elif owner(stem, known) is None:
            strays.append(name)
    for img_id, found in candidates.items():
        if len(found) > 1:
            ends = [os.path.splitext(f)[0][len(img_id):] for f in found]
            fix = (f"choose with --suffix {shlex.quote(ends[1])} or --suffix {shlex.quote(ends[0])}"
                   if ends[0] != ends[1] else "keep one of them")
            raise DataError(f"{img_id} has two predictions in {pred_dir}: {found[0]} and {found[1]}; {fix}")
    missing = [i for i, found in candidates.items() if not found]
    if missing:
        names_like = f"<id>{suffix}" if suffix is not None else f"<id> or <id> plus one of {', '.join(PRED_SUFFIXES)}"
        raise DataError(f"{len(missing)} of {len(ids)} images have no prediction in {pred_dir}: {first_few(missing)}; "
                        f"name each prediction {names_like} (.png or .tif), or score a dataset of the images "
                        "predicted")
    return {i: os.path.join(pred_dir, found[0]) for i, found in candidates.items()}, strays


def score_image(img_id, pred_path, labels_path, mask_path):
    """One image's row of COLUMNS (the instance scores NaN without ``labels_path``), its pixel counts
    (intersection, union, predicted, true) and whether the prediction was a binary mask."""
    import numpy as np

    from image_files import read_label_image, read_labels_or_components, read_mask
    from metrics import dsb_score_of_iou, object_iou, pooled_scores, true_positives

    pred, binary = read_labels_or_components(pred_path)
    truth = read_label_image(labels_path) if labels_path else None
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
              int(true_mask.sum())]
    row = {"img_id": img_id, **pooled_scores(*counts), "prediction": os.path.basename(pred_path)}
    if truth is None:
        return {**row, "pred_nuclei": len(np.unique(pred[pred_mask]))}, counts, binary
    iou = object_iou(truth, pred)
    n_true, n_pred = iou.shape
    tp = int(true_positives(iou, [0.5])[0])
    return {**row, "dsb": dsb_score_of_iou(iou), "tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
            # an empty side scores 1 only when the other is empty too: a tool that finds nothing is no precise one
            "precision": tp / n_pred if n_pred else float(n_true == 0),
            "recall": tp / n_true if n_true else float(n_pred == 0),
            "f1": 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0, "true_nuclei": n_true,
            "pred_nuclei": n_pred}, counts, binary


def summary(table, counts, pred_dir, folder, output):
    """The lines score.py prints: pooled and mean IoU, mean Dice, DSB2018, F1 / precision / recall at IoU 0.5, the
    bootstrap interval (evaluation.interval_line), the worst image. ``counts``: the pixel counts summed."""
    from evaluation import interval_line
    from metrics import pooled_scores

    pooled = pooled_scores(*counts)
    labelled = table["dsb"].notna()
    lines = [f"{pred_dir} against {folder} ({len(table)} images):",
             f"  IoU  {pooled['iou']:.4f} pooled   {table['iou'].mean():.4f} mean per image",
             f"  Dice {pooled['dice']:.4f} pooled   {table['dice'].mean():.4f} mean per image"]
    if labelled.any():
        nuclei = table[labelled]
        over = f", over the {labelled.sum()} images with instance labels" if not labelled.all() else ""
        lines += [f"  DSB2018 score {nuclei['dsb'].mean():.4f} mean per image{over}",
                  f"  at IoU 0.5: F1 {nuclei['f1'].mean():.4f}, precision {nuclei['precision'].mean():.4f}, recall "
                  f"{nuclei['recall'].mean():.4f} (means per image); {nuclei['tp'].sum()} of "
                  f"{nuclei['true_nuclei'].sum()} true nuclei found, {nuclei['fp'].sum()} false positives"]
    if not labelled.all():
        lines.append(f"  {(~labelled).sum()} of {len(table)} images have no instance labels in {folder} (labels/ "
                     "or a label-image layout): their masks alone are scored (IoU and Dice; the DSB2018 score and "
                     "F1 need instance labels)")
    lines += interval_line(table, None)
    worst = table.iloc[0]
    dsb = f", DSB2018 {worst['dsb']:.3f}" if labelled.iloc[0] else ""
    lines.append(f"  worst image {worst['img_id']} (IoU {worst['iou']:.3f}{dsb}); per image in {output}")
    return "\n".join(lines)


def main(argv):
    args = build_parser().parse_args(argv)
    output = args.output or os.path.join(args.pred, "scores.csv")
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder; give the path of the CSV file to write")
    # Heavy imports only now, so that --help and flag errors answer at once.
    import numpy as np
    import pandas as pd

    from files import atomic_write
    from utils import BatchedThreads

    truths, folder = truth_files(args.truth, args.img_ext, args.mask_ext)
    preds, strays = pair_predictions(args.pred, sorted(truths), args.suffix)
    for img_id, pred in preds.items():
        if any(truth and os.path.exists(truth) and os.path.samefile(pred, truth) for truth in truths[img_id]):
            raise UsageError(f"--pred {args.pred}: {pred} is the truth of {img_id} itself; give the folder of the "
                             "predictions (or --suffix)")
    if strays:
        print(f"note: {len(strays)} file{'s' * (len(strays) != 1)} in {args.pred} belong{'s' * (len(strays) == 1)} "
              f"to no image of {folder} and {'are' if len(strays) != 1 else 'is'} left out: {first_few(strays)}")
    rows, counts, binary = [], np.zeros(4, np.int64), []

    def keep(result):
        row, image_counts, was_binary = result
        rows.append(row)
        counts[:] += image_counts
        if was_binary:
            binary.append(row["prediction"])

    with BatchedThreads(keep, desc="score") as jobs:  # reading and matching release the GIL
        for img_id, pred in preds.items():
            jobs.submit(score_image, img_id, pred, *truths[img_id])
        jobs.flush()
    if binary:
        print(f"note: {len(binary)} prediction{'s are' if len(binary) != 1 else ' is'} a binary mask, scored as "
              f"{'their' if len(binary) != 1 else 'its'} connected components (touching nuclei count as one): "
              f"{first_few(binary)}")
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("iou", kind="stable").reset_index(drop=True)
    for column in ("tp", "fp", "fn", "true_nuclei", "pred_nuclei"):
        table[column] = table[column].astype("Int64")  # counts as integers, empty without instance labels
    with atomic_write(output) as f:
        table.to_csv(f, index=False, float_format="%.6f")
    print(summary(table, counts, args.pred, folder, output))
    return table


if __name__ == "__main__":
    run_cli(main)
