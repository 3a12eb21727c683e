"""Tests for splits.py: the seed's split and the --init leak note, against counts and sets written out here."""
import subprocess
import sys
import unicodedata

import pandas as pd
import pytest

from conftest import ROOT
from splits import checked_split, held_out_seen_in_training, make_split, read_split, split_ids
from utils import DataError


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
