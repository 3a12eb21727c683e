"""Tests for splits.py: the seed's split and the --init leak note, against counts and sets written out here."""
import hashlib
import subprocess
import sys
import unicodedata

import pandas as pd
import pytest

from conftest import ROOT
from splits import (changed_images_note, checked_split, held_out_seen_in_training, load_or_make_split, make_split,
                    part_sizes, read_split, split_ids, with_fingerprints)
from utils import DataError, UsageError


def test_a_test_part_takes_its_share_of_all_images_and_val_its_share_too():
    """--val_size and --test_size are fractions of the whole dataset: 0.2 and 0.2 of 100 images are 20 and 20,
    the rest trains (val is drawn from what the test part leaves, so its fraction there is 0.2 / 0.8)."""
    split = make_split([f"id{i:03d}" for i in range(100)], val_size=0.2, test_size=0.2)
    assert [len(split_ids(split, part)) for part in ("train", "val", "test")] == [60, 20, 20]
    assert sorted(split["img_id"]) == [f"id{i:03d}" for i in range(100)]  # each image in one part


def test_the_leak_note_counts_test_images_as_held_out_too(tmp_path):
    """Fine-tuning (--init) from a run that trained on some of this run's val or test images: both parts are
    named, since scores on either would overstate."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.yml").write_text("arch: UNet\n")
    pd.DataFrame({"img_id": ["a", "b", "c", "d"], "split": ["train", "train", "train", "val"]}).to_csv(
        folder / "split.csv", index=False)
    mine = pd.DataFrame({"img_id": ["a", "b", "c", "d"], "split": ["val", "test", "train", "test"]})
    assert held_out_seen_in_training(mine, str(folder / "model.pth")) == ["a", "b"]


def test_the_empty_rows_a_spreadsheet_leaves_are_skipped(tmp_path):
    """Excel saves rows of bare commas below the data; they are no ids (they were read as an id '' of part '')."""
    (tmp_path / "s.csv").write_text("img_id,split\r\na,train\r\nb,val\r\n,\r\n,\r\n")
    split = read_split(str(tmp_path / "s.csv"))
    assert split.to_dict("list") == {"img_id": ["a", "b"], "split": ["train", "val"]}


def test_the_val_and_test_files_are_fingerprinted_and_a_changed_one_is_named(tmp_path):
    """split.csv's third column holds the SHA-256 of each val and test image's file (train rows: empty), reads back
    beside the two columns of an older split.csv, and names the images whose files changed since, with their count."""
    for i in "abcd":
        (tmp_path / f"{i}.png").write_bytes(i.encode() * 100)
    path = str(tmp_path / "{}.png").format
    split = with_fingerprints(pd.DataFrame({"img_id": list("abcd"), "split": ["train", "val", "test", "train"]}), path)
    sha = {i: hashlib.sha256(i.encode() * 100).hexdigest() for i in "bc"}
    assert split.to_dict("list") == {"img_id": list("abcd"), "split": ["train", "val", "test", "train"],
                                     "sha256": ["", sha["b"], sha["c"], ""]}
    split.to_csv(tmp_path / "split.csv", index=False)
    split[["img_id", "split"]].to_csv(tmp_path / "old.csv", index=False)
    assert read_split(str(tmp_path / "split.csv")).equals(split)
    assert list(read_split(str(tmp_path / "old.csv")).columns) == ["img_id", "split"]
    assert changed_images_note(split, list("abcd"), "val/test", path, "data", "so") == ""
    (tmp_path / "c.png").write_bytes(b"other")
    (tmp_path / "a.png").write_bytes(b"other")  # a train image: not recorded, not checked
    assert changed_images_note(split, list("abcd"), "val/test", path, "data", "so").startswith(
        "note: 1 of the 2 val/test images in data are not the files the run was split with (their SHA-256 differs "
        "from its split.csv's: c): so; another dataset under the same name?")
    assert changed_images_note(read_split(str(tmp_path / "old.csv")), list("abcd"), "val/test", path, "data",
                               "so") == ""


def test_a_split_id_with_accents_encoded_otherwise_is_named():
    """An id typed on Linux (NFC) against a file name from a Mac (NFD): the error names the near match."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    split = pd.DataFrame({"img_id": [nfc, "b"], "split": ["val", "train"]})
    with pytest.raises(DataError, match=f"s.csv names ids that are not in data: {nfc} \\(it has {nfd}: the names "
                                        "differ only in upper/lower case or in how accents are encoded"):
        checked_split(split, "s.csv", "data", [nfd, "b"])
    assert checked_split(split, "s.csv", "data", [nfc, "b"]) is split


def test_val_and_predict_s_modules_do_not_import_scikit_learn():
    """val.py and predict.py read splits (through evaluation.py) but never make one: scikit-learn, which only
    make_split uses, cost each of their runs over half a second of CPU to import."""
    code = "import sys, evaluation, predict; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_folds_validate_every_id_once_and_keep_the_test_part_out():
    """--folds 5 --fold 0..4 (cross-validation): each fold's runs train on the others' ids; over the five runs every
    id outside the test part is validated exactly once, the folds' sizes differ by at most one, and the test part is
    the one --test_size holds out without folds, in every fold."""
    ids = [f"id{i:02d}" for i in range(23)]
    test = set(split_ids(make_split(ids, test_size=0.15), "test"))
    vals = []
    for fold in range(5):
        split = make_split(ids, test_size=0.15, folds=5, fold=fold)
        parts = {part: set(split_ids(split, part)) for part in ("train", "val", "test")}
        assert parts["test"] == test and sorted(split["img_id"]) == ids  # each id in one part
        assert parts["train"] | parts["val"] == set(ids) - test
        vals.append(parts["val"])
    assert sorted(i for val in vals for i in val) == sorted(set(ids) - test)  # validated once each
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    # dealt at random (by --split_seed), not in name order
    assert vals[0] != set(sorted(set(ids) - test)[:len(vals[0])])
    assert set(split_ids(make_split(ids, folds=5, fold=0, random_state=7), "val")) != \
        set(split_ids(make_split(ids, folds=5, fold=0), "val"))


def test_more_folds_than_ids_is_a_usage_error_naming_the_flag(tmp_path):
    with pytest.raises(UsageError, match=r"--folds 5: the 4 samples of data \(less the --test_size 0.0 part\) are "
                                         r"too few for 5 folds; give fewer --folds"):
        load_or_make_split(str(tmp_path / "split.csv"), "data", ["a", "b", "c", "d"], False, 0.2, 0.0, 41, folds=5)


@pytest.mark.parametrize("count", [3, 4, 7, 12, 30])
def test_the_part_sizes_named_in_the_error_are_those_the_split_makes(count):
    """A user's few images: the error on an empty part says how many each part got, as scikit-learn rounds them (up:
    --test_size 0.34 of 3 images takes 2); part_sizes against the split itself, where one is made."""
    ids = [f"i{k}" for k in range(count)]
    for val_size in (0.1, 0.2, 0.34, 0.5, 0.6):
        for test_size in (0.0, 0.1, 0.15, 0.34):
            if val_size + test_size >= 1:
                continue
            sizes = part_sizes(count, val_size, test_size)
            assert sum(sizes) == count
            try:
                split = make_split(ids, val_size, test_size)
            except ValueError:  # a part would be empty: so say the sizes
                assert 0 in (sizes[1], sizes[2]) or (test_size and not sizes[0]), (val_size, test_size, sizes)
                continue
            assert sizes == tuple(len(split_ids(split, part)) for part in ("test", "val", "train"))
    assert part_sizes(3, 0.2, 0.34) == (2, 1, 0)
