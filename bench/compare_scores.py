"""Is model B better than model A on the same images? A paired comparison of two val.py scores.csv files.

    python val.py --name nuclei --output outputs/nuclei_val          # A: the bundled model
    python val.py --name borders_longer_dark                           # B: a candidate trained on the same split
    python bench/compare_scores.py outputs/nuclei_val/scores.csv outputs/borders_longer_dark/scores.csv

For each score both files hold (iou, dice, dsb; score.py's f1 and pq; a run of several classes' iou_class<c> and
dice_class<c>): the mean over the images both scored of B - A, a 95 % bootstrap
interval of that mean (the images drawn again with replacement, 10,000 times, seed 0), and on how many images B
is better and worse. The same for each image kind. B is "clearly better" on a score (the rule for replacing the
bundled model) when the interval's lower end is above 0. Differences are paired by img_id and resampled in the
order of the sorted ids, so the order of the rows does not matter; images only one file holds are left out and
counted in a note. A score compared on fewer than 10 images gets no interval (NaN), as in val.py: a bootstrap of so
few spans little more than their own differences, so B won on all of 3 images would read as clearly better. Two
files of different classes (iou_class<c> columns) are refused: a run of several classes scores an image by the mean
of its classes. A note names the scoring settings in which the two evaluations differ (--tta, --prune, the
separation, --min_size, --min_confidence, as their evaluation.yml records them): B - A then measures them too (the
last three change the nuclei scores alone: dsb, f1, pq), and another those in which the files of one pattern (the
folds of one model) were scored differently.

A model cross-validated in folds (train.py --folds) has a scores.csv per fold's run, each image in one of them: give
each model as a quoted pattern, and its files' rows are compared as one table:

    python bench/compare_scores.py "outputs/a_fold?/scores.csv" "outputs/b_fold?/scores.csv"
"""
import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402  (after the path set-up above)
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from config import EVALUATION_FILE  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402
# evaluation.py's helpers are imported where they are used: it imports torch (seconds), which --help must not wait for

SCORES = ("iou", "dice", "dsb", "f1", "pq")
# val.py's choices besides the weights that change its scores (evaluation.yml's settings): two evaluations that
# differ in one measure it as well as the models. The network's output changes every score; the separation and the
# object filters make the nuclei, and iou and dice are scored on the pixels before them (evaluation.ImageWriter)
NETWORK_SETTINGS = ("tta", "prune")
NUCLEI_SETTINGS = ("separation", "min_size", "min_confidence")
PER_CLASS = re.compile(r"(iou|dice)_class\d+")  # val.py's columns for a run of several classes


def read_scores(path):
    """val.py's scores.csv at ``path``, or the rows of every file a pattern ``path`` matches (the folds of a
    cross-validated model), as a DataFrame indexed by img_id. A missing file, a pattern that matches none, a file
    without img_id and an img_id listed twice are UsageErrors."""
    paths = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not paths:
        raise UsageError(f"{path}: no file matches; run val.py of each fold first (it writes <output>/scores.csv)")
    tables = [read_scores_file(p) for p in paths]
    check_one_split(path, paths)
    table = pd.concat(tables)
    repeated = table["img_id"][table["img_id"].duplicated()].unique()
    if len(repeated):
        where = [p for p, t in zip(paths, tables) if repeated[0] in set(t["img_id"])]
        raise UsageError(f"{path} lists {len(repeated)} img_id more than once (e.g. {repeated[0]}"
                         f"{', in ' + ' and '.join(where) if len(paths) > 1 else ''}); give one val.py scores.csv, "
                         "or the folds of one cross-validation, each image in one of them")
    return table.set_index("img_id")


def check_one_split(pattern, paths):
    """A UsageError when the files ``paths`` that ``pattern`` matched score other splits (their evaluation.yml, as
    val.py writes it beside scores.csv; a file without one is not checked): outputs/r_fold*/scores.csv also matches
    outputs/r_fold0_test/, val.py --split test of fold 0, whose test images no fold validates, so that nothing else
    would keep them out of the folds' pooled validation scores."""
    from evaluation import describe_evaluation

    splits = {}
    for path in paths:
        try:
            with open(os.path.join(os.path.dirname(path), EVALUATION_FILE)) as f:
                record = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(record, dict):
            splits.setdefault(record.get("split"), (path, record))
    if len(splits) > 1:
        (first, one), (second, other) = list(splits.values())[:2]
        raise UsageError(f"{pattern} matches scores of {describe_evaluation(one)} ({first}) and of "
                         f"{describe_evaluation(other)} ({second}); give a pattern of one split's files, e.g. the "
                         "folds' val scores: outputs/<name>_fold?/scores.csv")


def evaluation_settings(path):
    """The ``settings`` of the evaluation.yml beside ``path`` (a scores.csv), or beside each file a pattern ``path``
    matches (the folds of a cross-validated model): a list of dicts, one per file that has an evaluation.yml
    (score.py's scores.csv and older val.py outputs have none)."""
    found = []
    for scores in sorted(glob.glob(path)) if glob.has_magic(path) else [path]:
        try:
            with open(os.path.join(os.path.dirname(scores), EVALUATION_FILE)) as f:
                record = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        settings = record.get("settings") if isinstance(record, dict) else None
        if isinstance(settings, dict):
            found.append(settings)
    return found


def common_settings(found):
    """The settings of :data:`NETWORK_SETTINGS` + :data:`NUCLEI_SETTINGS` that every dict of ``found`` records with
    one value: {setting: value}."""
    values = {key: {repr(f[key]) for f in found if key in f} for key in NETWORK_SETTINGS + NUCLEI_SETTINGS}
    return {key: found[0][key] for key, seen in values.items()
            if len(seen) == 1 and all(key in f for f in found)}


def mixed_settings_note(path):
    """The note ('' for none) naming the settings in which the files of pattern ``path`` were scored differently
    (fold 0 with --tta, the other folds without): its pooled scores then mix two ways of scoring."""
    found = evaluation_settings(path)
    mixed = [key for key in NETWORK_SETTINGS + NUCLEI_SETTINGS
             if len({repr(f[key]) for f in found if key in f}) > 1]
    if not mixed:
        return ""
    values = ", ".join(f"{key} {' / '.join(sorted({str(f[key]) for f in found if key in f}))}" for key in mixed)
    return (f"note: the files of {path} were scored with other settings ({values}): their scores mix them; evaluate "
            "every fold with the same val.py flags")


def settings_note(a_path, b_path):
    """The note ('' for none) naming the settings in which the evaluations of ``a_path`` and ``b_path`` differ
    (:func:`common_settings` of each; one that either does not record is not compared): B - A then measures them as
    well as the two models, in every score for :data:`NETWORK_SETTINGS`, in dsb, f1 and pq alone for
    :data:`NUCLEI_SETTINGS`."""
    a, b = (common_settings(evaluation_settings(path)) for path in (a_path, b_path))
    differ = [key for key in NETWORK_SETTINGS + NUCLEI_SETTINGS if key in a and key in b and a[key] != b[key]]
    if not differ:
        return ""
    which = ("B - A measures them as well as the models" if set(differ) & set(NETWORK_SETTINGS) else
             "B - A of dsb, f1 and pq measures them as well as the models (iou and dice do not depend on them)")
    return (f"note: A and B were scored with other settings ({', '.join(f'{k} {a[k]} / {b[k]}' for k in differ)}, "
            f"A / B): {which}; evaluate both with the same val.py flags to compare the models alone")


def read_scores_file(path):
    """One scores.csv as a DataFrame with its img_id column; a missing file or one without img_id is a
    UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; run val.py first (it writes <output>/scores.csv)")
    # only an empty cell (a score val.py could not give) is missing: images named NA, None or null keep their ids
    table = pd.read_csv(path, dtype={"img_id": str}, keep_default_na=False, na_values=[""])
    if "img_id" not in table.columns:
        raise UsageError(f"{path} has no img_id column; give a scores.csv written by val.py")
    return table


def check_same_classes(*named):
    """A UsageError unless the (path, table) ``named`` score the same classes: the iou and dice of a run of several
    classes are the mean of an image's classes, not the one class of another run."""
    from evaluation import scored_classes

    held = [(path, scored_classes(table.columns)) for path, table in named]
    if held[0][1] != held[1][1]:
        raise UsageError(" and ".join(f"{path} scores {f'{len(c)} classes (iou_class<c>)' if c else 'one class'}"
                                      for path, c in held) +
                         ": their iou and dice (the mean of an image's classes) are not one score; compare "
                         "evaluations of runs with the same classes (val.py again for a scores.csv written before "
                         "it gave each class's columns)")


def paired(a, b):
    """The rows of ``a`` and ``b`` (DataFrames indexed by img_id) for the images both hold, in the order of the
    sorted ids: the bootstrap's draws then land on the same images whatever order the files list them in."""
    common = a.index.intersection(b.index).sort_values()
    if common.empty:
        raise UsageError("the two score tables share no img_id; compare two evaluations of the same images")
    return a.loc[common], b.loc[common]


def shared_scores(a, b):
    """The score columns both tables hold: SCORES, then the per-class ones, in ``a``'s order."""
    return [c for c in a.columns if c in b.columns and (c in SCORES or PER_CLASS.fullmatch(c))]


def compare(a, b, groups=None):
    """One row per (group, score) both tables hold: images, mean A, mean B, mean B - A, its 95 % interval, and on
    how many images B is better / worse. ``groups``: a column to compare within as well ('kind'), or None."""
    from evaluation import MIN_IMAGES_FOR_INTERVAL, bootstrap_interval

    a, b = paired(a, b)
    parts = [("all", a.index)]
    if groups is not None and groups in a.columns:
        parts += [(g, a.index[a[groups] == g]) for g in sorted(a[groups].unique())]
    rows = []
    for name, ids in parts:
        for score in shared_scores(a, b):
            x, y = a.loc[ids, score].to_numpy(float), b.loc[ids, score].to_numpy(float)
            keep = ~(np.isnan(x) | np.isnan(y))
            diffs = y[keep] - x[keep]
            if not len(diffs):
                continue
            low, high = (bootstrap_interval(diffs, draws=10_000) if len(diffs) >= MIN_IMAGES_FOR_INTERVAL else
                         (np.nan, np.nan))
            rows.append({"images": name, "n": len(diffs), "score": score, "mean_a": x[keep].mean(),
                         "mean_b": y[keep].mean(), "b_minus_a": diffs.mean(), "ci_low": low, "ci_high": high,
                         "b_better": int((diffs > 0).sum()), "b_worse": int((diffs < 0).sum())})
    return pd.DataFrame(rows)


def main(argv):
    p = ArgumentParser(prog="compare_scores.py",
                       description="Paired comparison of two val.py scores.csv files (B against A), with 95 % "
                                   "bootstrap intervals; B is clearly better where ci_low > 0.")
    p.add_argument("a", help="scores.csv of model A (the one in use), or a quoted pattern of its folds' files")
    p.add_argument("b", help="scores.csv of model B (the candidate), or a quoted pattern of its folds' files")
    args = p.parse_args(argv)
    a, b = read_scores(args.a), read_scores(args.b)
    check_same_classes((args.a, a), (args.b, b))
    table = compare(a, b, groups="kind")
    print(f"A = {args.a}\nB = {args.b}")
    for note in (mixed_settings_note(args.a), mixed_settings_note(args.b), settings_note(args.a, args.b)):
        if note:
            print(note)
    for path, only in ((args.a, a.index.difference(b.index)), (args.b, b.index.difference(a.index))):
        if len(only):
            many = len(only) != 1
            print(f"note: {len(only)} image{'s' * many} only in {path} (e.g. {only[0]}) {'are' if many else 'is'} "
                  "left out")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    from evaluation import MIN_IMAGES_FOR_INTERVAL  # imported by compare already: no cost here
    few = table["n"] < MIN_IMAGES_FOR_INTERVAL if len(table) else []
    if any(few):
        print(f"note: no interval where fewer than {MIN_IMAGES_FOR_INTERVAL} images were compared (as few as "
              f"{table['n'].min()} here): a bootstrap of so few cannot tell a gain from chance; b_better and b_worse "
              "count them. To compare on all your images, cross-validate (train.py --folds, docs/data.md)")
    return table


if __name__ == "__main__":
    run_cli(main)
