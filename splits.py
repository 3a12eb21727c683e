"""A run's split of its samples into train, val and test parts: made as the seed made it, given as a CSV
(--split_file), or read back from models/<name>/split.csv (columns img_id,split, and sha256: the SHA-256 of each val
and test image's file when the run was split, so that val.py and --resume notice other images under the same ids).
"""
import math
import os

import pandas as pd

from files import sha256_file
from utils import NEAR_NAMES, DataError, UsageError, first_few, near_names

SPLITS = ("train", "val", "test")
COLUMNS = ["img_id", "split"]
FINGERPRINT = "sha256"  # split.csv's optional third column; empty for train rows


def read_split(path, label=None):
    """split.csv -> DataFrame(img_id, split[, sha256]), checked: the two columns (a run's own file may add sha256),
    known parts, each id once. Errors name the file as ``label`` (default: its path)."""
    label = label or path
    try:
        split = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        split = pd.DataFrame()
    except (UnicodeDecodeError, pd.errors.ParserError) as e:  # UTF-16 from a spreadsheet, an unclosed quote
        raise DataError(f"{label} is not a readable CSV ({str(e).splitlines()[0][:60]}); save it as a plain UTF-8 "
                        "CSV with columns img_id,split") from None
    split = split[(split != "").any(axis=1)].reset_index(drop=True)  # rows of bare commas a spreadsheet leaves
    columns = [str(c) for c in split.columns]
    if columns not in (COLUMNS, COLUMNS + [FINGERPRINT]):
        found = ",".join(columns) if columns else "none"
        raise DataError(f"{label} must have the columns img_id,split (found: {found}); separate them with commas, no "
                        "spaces")
    wrong = ~split["split"].isin(SPLITS)
    if wrong.any():
        row = int(wrong.to_numpy().argmax())
        raise DataError(f"{label}: {split['img_id'].iloc[row]!r} has the part {split['split'].iloc[row]!r}; each "
                        "must be train, val or test (no spaces)")
    twice = split["img_id"][split["img_id"].duplicated()].unique().tolist()
    if twice:
        raise DataError(f"{label} lists {len(twice)} id{'s' if len(twice) > 1 else ''} more than once, e.g. "
                        f"{twice[0]}; give each image one part")
    return split


def held_out_seen_in_training(split, weights_path):
    """The val and test ids of ``split`` named like training images of the run whose weights are ``weights_path``
    (--init), by the split.csv of its run folder (sorted; empty when it is no run's): if they are the same images,
    scores on them overstate the fine-tuned run."""
    folder = os.path.dirname(weights_path)
    path = os.path.join(folder, "split.csv")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, "config.yml"))):
        return []
    trained = set(split_ids(read_split(path), "train"))
    return sorted(trained & set(split.loc[split["split"] != "train", "img_id"]))


def split_ids(split, part):
    """The ids of ``part`` ('train', 'val' or 'test') in a split DataFrame, in file order."""
    return split.loc[split["split"] == part, "img_id"].tolist()


def make_split(ids, val_size=0.2, test_size=0.0, random_state=41, folds=0, fold=0):
    """Split sorted ids into train/val(/test) the way the seed did: train_test_split(random_state=41).

    With test_size 0 this is exactly the seed's 80/20 split. With a test part, the test ids are drawn first
    and the validation ids from the rest. With ``folds`` K (cross-validation) the rest is dealt into K folds
    (scikit-learn's KFold, shuffled by ``random_state``; ``val_size`` is then unused): fold ``fold`` (0..K-1) is the
    validation part, so that the K runs of folds 0..K-1 validate every id once. Returns a DataFrame with columns
    img_id, split (:data:`SPLITS`). Raises ValueError when a part would be empty.
    """
    # here, not at the top: scikit-learn takes over half a second of CPU to import, and val.py and predict.py read
    # splits (through evaluation.py) without ever making one
    from sklearn.model_selection import KFold, train_test_split

    ids = sorted(ids)
    rest, test = (ids, []) if test_size == 0 else train_test_split(ids, test_size=test_size, random_state=random_state)
    if folds:
        train_at, val_at = list(KFold(folds, shuffle=True, random_state=random_state).split(rest))[fold]
        train, val = [rest[i] for i in train_at], [rest[i] for i in val_at]
    else:
        train, val = train_test_split(rest, test_size=val_size / (1 - test_size), random_state=random_state)
    rows = [(i, "train") for i in train] + [(i, "val") for i in val] + [(i, "test") for i in test]
    return pd.DataFrame(rows, columns=["img_id", "split"])


def load_or_make_split(path, dataset_dir, ids, resume, val_size, test_size, split_seed, split_file=None, folds=0,
                       fold=0):
    """The run's split: its split.csv at ``path`` when resuming (a DataError when it is gone), else the given
    ``split_file`` (--split_file), else a new :func:`make_split` of ``ids`` (the samples of ``dataset_dir``; fold
    ``fold`` of ``folds`` with --folds)."""
    if resume:
        if not os.path.isfile(path):  # made again, it would differ if the dataset has changed since
            raise DataError(f"{path} not found; a resumed run keeps the split it started with (restore it, or start "
                            "again with --overwrite)")
        return checked_split(read_split(path), path, dataset_dir, ids)
    if split_file:
        if not os.path.isfile(split_file):
            what = "is a folder" if os.path.isdir(split_file) else "no such file"
            raise UsageError(f"--split_file {split_file}: {what}; give a CSV with columns img_id,split")
        label = f"--split_file {split_file}"
        split = checked_split(read_split(split_file, label), label, dataset_dir, ids)
        if not split_ids(split, "train") or not split_ids(split, "val"):
            raise DataError(f"--split_file {split_file} needs at least one 'train' and one 'val' id")
        return split
    if len(ids) < 3:
        raise DataError(too_few_note(dataset_dir, len(ids)))
    try:
        return make_split(ids, val_size, test_size, split_seed, folds, fold)
    except ValueError:  # scikit-learn: a part would be empty
        if folds:
            raise UsageError(f"--folds {folds}: the {len(ids)} samples of {dataset_dir} (less the --test_size "
                             f"{test_size} part) are too few for {folds} folds; give fewer --folds") from None
        test, val, train = part_sizes(len(ids), val_size, test_size)
        raise UsageError(f"--val_size {val_size} and --test_size {test_size} leave an empty part of the "
                         f"{len(ids)} samples of {dataset_dir} (each rounded up: {train} to train, {val} to validate"
                         f"{f', {test} to test' if test_size else ''}); give smaller fractions") from None


def part_sizes(count, val_size, test_size):
    """(test, val, train): how many of ``count`` samples :func:`make_split` puts in each part, as scikit-learn's
    train_test_split rounds them (the test part's and then the validation part's share of the rest rounded up)."""
    test = min(count, math.ceil(test_size * count))
    rest = count - test
    val = min(rest, math.ceil(val_size / (1 - test_size) * rest)) if test_size < 1 else 0
    return test, val, rest - val


def too_few_note(dataset_dir, count):
    """The error for a dataset of ``count`` samples, 1 or 2 (layouts.list_ids refuses none), too few for a split
    made by fractions (--val_size): 2 can be split by name (--split_file), 1 only once cut into tiles."""
    fix = ("give --split_file a CSV that puts one in 'train' and the other in 'val'" if count == 2 else
           "cut it into tiles, the image and its mask alike, each tile a sample of its own (at least 3)")
    return (f"{dataset_dir} has {count} sample{'s' * (count != 1)}; a split made here needs at least 3, to train and "
            f"to validate: {fix}")


def unlisted_note(split, source, dataset_dir, ids):
    """A note naming the samples of ``dataset_dir`` (``ids``) that ``split`` (read from ``source``) puts in no part,
    so that no run step reads them; '' when it lists them all."""
    unlisted = sorted(set(ids) - set(split["img_id"]))
    if not unlisted:
        return ""
    return (f"note: {source} lists {len(ids) - len(unlisted)} of the {len(ids)} images of {dataset_dir}; the "
            f"other {len(unlisted)} are in no part and left out: {first_few(unlisted)}")


def checked_split(split, source, dataset_dir, ids):
    """``split`` (read from ``source``) unchanged, or a DataError when it names ids that ``dataset_dir`` lacks."""
    missing = sorted(set(split["img_id"]) - set(ids))
    if missing:
        near = near_names(missing, ids)
        raise DataError(f"{source} names ids that are not in {dataset_dir}: {first_few(missing)}" +
                        (f" (it has {first_few(near)}: {NEAR_NAMES})" if near else ""))
    return split


def with_fingerprints(split, image_path):
    """``split`` (img_id, split) with the column sha256: the SHA-256 of each val and test image's file
    (``image_path(img_id)``), '' for the train rows."""
    # not the train rows: most of a big dataset, they would make every new run's start wait for them
    hashed = split["split"] != "train"
    return split[COLUMNS].assign(**{FINGERPRINT: [sha256_file(image_path(i)) if h else ""
                                                  for i, h in zip(split["img_id"], hashed)]})


def changed_images_note(split, ids, what, image_path, folder, meaning):
    """A note naming those of ``ids`` ('val', 'test' or 'val/test' images: ``what``) whose file in ``folder``
    (``image_path(img_id)``) has not the SHA-256 that ``split`` recorded when the run was split, followed by
    ``meaning``; '' when none differs or none was recorded (a split.csv of two columns, train ids)."""
    recorded = dict(zip(split["img_id"], split[FINGERPRINT])) if FINGERPRINT in split else {}
    checked = [i for i in ids if recorded.get(i)]
    changed = [i for i in checked if sha256_file(image_path(i)) != recorded[i]]
    if not changed:
        return ""
    return (f"note: {len(changed)} of the {len(checked)} {what} images in {folder} are not the files the run was "
            f"split with (their SHA-256 differs from its split.csv's: {first_few(changed)}): {meaning}; another "
            "dataset under the same name? (a file saved again with the same pixels differs too)")
