"""Write a split.csv whose validation images come from whole groups that training never sees, for
``train.py --split_file``: a validation score that measures how a model does on unseen kinds of image.

    python bench/group_split.py --sizes_from inputs/dsb2018_full --output bench/results/group_split.csv
    python train.py --config configs/dsb2018_96_UNet_bcedice.yml --split_file bench/results/group_split.csv

A group is one kind of image (dataset.image_modality: fluorescence, stained, bright-field) at one original size,
the closest stand-in for "one experiment" that stage1_train's files give. The groups are drawn by scikit-learn's
GroupShuffleSplit; the first random_state whose validation part holds ``--val_size`` of the images (within 0.03)
and never the largest group is taken, so the draw depends on the training images only. Ids and image kinds are
read from ``--sizes_from`` (a prepared full-size dataset, for the original sizes); the split is valid for any
dataset with the same ids (dsb2018_96 too).
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402  (after the path set-up above)
import pandas as pd  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit  # noqa: E402

from dataset import image_modality  # noqa: E402
from layouts import list_ids  # noqa: E402
from files import atomic_write  # noqa: E402
from image_files import decode_image  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402


def image_groups(dataset_dir, ids):
    """'<kind> <height>x<width>' of every id, in order (the image as stored in ``dataset_dir``/images)."""
    groups = []
    for img_id in ids:
        img = decode_image(os.path.join(dataset_dir, "images", img_id + ".png"))
        groups.append(f"{image_modality(img)} {img.shape[0]}x{img.shape[1]}")
    return groups


def group_split(ids, groups, val_size, tolerance=0.03, tries=1000):
    """(DataFrame(img_id, split), the random_state drawn): whole groups in 'val', about ``val_size`` of the ids,
    never the largest group."""
    groups = np.asarray(groups)
    names, counts = np.unique(groups, return_counts=True)
    largest = names[counts.argmax()]
    for seed in range(tries):
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_size, random_state=seed)
        _, val = next(splitter.split(ids, groups=groups))
        if abs(len(val) / len(ids) - val_size) <= tolerance and largest not in groups[val]:
            is_val = np.zeros(len(ids), bool)
            is_val[val] = True
            return pd.DataFrame({"img_id": ids, "split": np.where(is_val, "val", "train")}), seed
    raise UsageError(f"no draw of whole groups gives --val_size {val_size} (within {tolerance}); try another size")


def main(argv):
    p = ArgumentParser(prog="bench/group_split.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_from", default=os.path.join("inputs", "dsb2018_full"),
                   help="a full-size prepared dataset (preprocess_dsb2018.py --img_size 0)")
    p.add_argument("--val_size", default=0.2, type=float, help="fraction of the images in whole validation groups")
    p.add_argument("--output", default=os.path.join("bench", "results", "group_split.csv"), help="the CSV to write")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.sizes_from, "images")):
        raise UsageError(f"--sizes_from {args.sizes_from}: no images/ folder; run preprocess_dsb2018.py --img_size 0")
    ids = sorted(list_ids(args.sizes_from))
    groups = image_groups(args.sizes_from, ids)
    split, seed = group_split(ids, groups, args.val_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output) as f:
        split.to_csv(f, index=False)
    table = pd.crosstab(pd.Series(groups, name="group"), pd.Series(split["split"].to_numpy(), name="split"))
    print(table.to_string())
    print(f"{args.output}: {int((split['split'] == 'train').sum())} train / {int((split['split'] == 'val').sum())} "
          f"val images, no group in both (GroupShuffleSplit random_state {seed})")


if __name__ == "__main__":
    run_cli(main)
