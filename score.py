"""Score segmentations made elsewhere against a dataset's truth: predict.py's nuclei, Cellpose's, StarDist's or a
colleague's label images.

    python score.py --pred predictions/ --truth mycells --suffix _instances    # predict.py --instances's nuclei
    python score.py --pred cellpose_out/ --truth mycells                        # <id>_cp_masks.png of Cellpose

--truth is a dataset of any layout the toolkit reads (layouts.find_layout; a name in inputs/ or a folder path);
its instance labels are the true nuclei. A dataset of binary masks alone has no true nuclei: it is scored by IoU
and Dice only. --pred is a folder of label images (one integer per nucleus, 8/16/32-bit PNG or TIFF), each named
like its image: ``<id>`` or ``<id>`` plus one of PRED_SUFFIXES (``--suffix`` picks one); a binary mask there is
taken as its connected components (touching nuclei stay one), with a note.

Per image (scores.csv, a row per image, worst IoU first, with val.py's img_id, iou, dice and dsb columns, so that
bench/compare_scores.py compares two tools, or a tool with val.py): the pixel IoU and Dice of the foregrounds, the
DSB2018 score (metrics.dsb_score) and at IoU 0.5 the matched nuclei (tp), false positives and negatives,
precision, recall and F1 (1 where nothing was to find and nothing was found), the panoptic quality PQ and its SQ
(metrics.panoptic_quality: the measure of nucleus papers such as HoVer-Net's), and the numbers of true and predicted
nuclei. Then a summary like val.py's.
"""
import os

import numpy as np

from utils import ArgumentParser, BatchedThreads, UsageError, file_extension, first_few, path_arg, run_cli

# What tools append to an image's name in the label images they write: predict.py --instances, Cellpose, the
# Cellpose layout's truth, and common hand-made names
PRED_SUFFIXES = ("_instances", "_cp_masks", "_masks", "_labels", "_label")


def build_parser():
    p = ArgumentParser(prog="score.py",
                       description="Score label images made by another tool (or by predict.py --instances) against "
                                   "a dataset's truth: pixel IoU and Dice, the DSB2018 score, precision, recall "
                                   "and F1 of the nuclei at IoU 0.5, and their panoptic quality (PQ).")
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


def main(argv):
    args = build_parser().parse_args(argv)
    output = args.output or os.path.join(args.pred, "scores.csv")
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder; give the path of the CSV file to write")
    # Heavy imports only now, so that --help and flag errors answer at once.
    import pandas as pd

    from dataset import SPLIT_SHARE
    from files import atomic_write
    from scoring import COLUMNS, mostly_foreground_notes, pair_predictions, score_image, summary, truth_files

    truths, folder = truth_files(args.truth, args.img_ext, args.mask_ext)
    image_stems = {i: os.path.splitext(os.path.basename(files[2]))[0] for i, files in truths.items()}
    preds, strays = pair_predictions(args.pred, sorted(truths), args.suffix, PRED_SUFFIXES, image_stems)
    for img_id, pred in preds.items():
        if any(truth and os.path.exists(truth) and os.path.samefile(pred, truth) for truth in truths[img_id][:2]):
            raise UsageError(f"--pred {args.pred}: {pred} is the truth of {img_id} itself; give the folder of the "
                             "predictions (or --suffix)")
    if strays:
        print(f"note: {len(strays)} file{'s' * (len(strays) != 1)} in {args.pred} belong{'s' * (len(strays) == 1)} "
              f"to no image of {folder} and {'are' if len(strays) != 1 else 'is'} left out: {first_few(strays)}")
    rows, counts, binary, split = [], np.zeros(5, np.int64), [], {}

    def keep(result):
        row, image_counts, was_binary, split_truth = result
        rows.append(row)
        counts[:] += image_counts
        if was_binary:
            binary.append(row["prediction"])
        if split_truth:
            split[row["img_id"]] = split_truth

    with BatchedThreads(keep, desc="score") as jobs:  # reading and matching release the GIL
        for img_id, pred in preds.items():
            jobs.submit(score_image, img_id, pred, *truths[img_id])
        jobs.flush()
    if binary:
        print(f"note: {len(binary)} prediction{'s are' if len(binary) != 1 else ' is'} a binary mask, scored as "
              f"{'their' if len(binary) != 1 else 'its'} connected components (touching nuclei count as one): "
              f"{first_few(binary)}")
    true_ids = sum(row.get("true_nuclei", 0) for row in rows)
    if split and sum(split.values()) >= SPLIT_SHARE * true_ids:
        print(f"note: in the truth of {len(split)} image{'s' * (len(split) != 1)} an id marks several separate "
              f"objects, each scored as one nucleus (a miss and false nuclei where a prediction separates them): "
              f"{first_few(sorted(split))}; give separate nuclei ids of their own")
    for note in mostly_foreground_notes(counts, args.pred, folder):
        print(note)
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("iou", kind="stable").reset_index(drop=True)
    for column in ("tp", "fp", "fn", "true_nuclei", "pred_nuclei"):
        table[column] = table[column].astype("Int64")  # counts as integers, empty without instance labels
    with atomic_write(output) as f:
        table.to_csv(f, index=False, float_format="%.6f")
    print(summary(table, counts, args.pred, folder, output))
    return table


if __name__ == "__main__":
    run_cli(main)
