"""A biologist's few annotated images: train.py on datasets of a handful of images (one much larger than the rest,
fewer training batches than a flag asks for), where a run must say what it does with them or stop with what to do.
"""
import math
import re

import cv2
import numpy as np
import pytest

import train
from conftest import make_layout, train_argv, write_image
from dataset import Dataset, image_modality, train_transform
from image_files import decode_image
from trainer import crop_coverage_note

CROP = 32


def few_images(root, large):
    """inputs/few: three 32x32 images and one ``large`` x ``large`` one (random pixels, a square nucleus each) and a
    split that trains on the large one and two small ones; returns the split file's path."""
    make_layout(root / "inputs" / "few", ["a", "b", "c"], size=CROP)
    make_layout(root / "inputs" / "few", ["large"], size=large)
    split = root / "split.csv"
    split.write_text("img_id,split\na,train\nb,train\nlarge,train\nc,val\n")
    return str(split)


@pytest.mark.parametrize("large", [160, 48])
def test_a_large_image_among_small_ones_is_named_when_its_crops_leave_most_of_it_unseen(tmp_path, monkeypatch, capsys,
                                                                                        large):
    """An epoch of crop training draws one crop of each training image, whatever its size: over 2 epochs the
    160x160 image gets 2 crops of 32x32, about 8 % of its pixels, and the run says so; the 48x48 one's 2 crops show
    more than half of it (63 % counted), and nothing is said."""
    monkeypatch.chdir(tmp_path)
    split = few_images(tmp_path, large)
    train.main(train_argv("few", "--crop_size", str(CROP), "--split_file", split, "--cache", "True", dataset="few",
                          epochs=2, batch=3))
    out = capsys.readouterr().out
    worth = large ** 2 / CROP ** 2
    note = (f"inputs/few/images/large.png ({large}x{large}, {worth:.0f} crops' worth) gets about 2 in --epochs 2, "
            f"which show about {1 - math.exp(-2 / worth):.0%} of its pixels")
    assert (note in out) is (large == 160), out
    assert ("cut images much larger than --crop_size into tiles" in out) is (large == 160)


def shown_share(side, crop_size, scale_jitter, crops, trials=20):
    """The share of a side x side image's pixels that ``crops`` training crops show, counted: averaged over
    ``trials`` draws of train_transform's rescaling and cropping of an image whose mask codes each pixel's place."""
    rows, cols = np.mgrid[:side, :side]
    code = np.dstack([rows // 256, rows % 256, cols // 256, cols % 256]).astype(np.uint8)
    transform = train_transform(crop_size, crop_size, crop_size=crop_size, scale_jitter=scale_jitter,
                                color_jitter=False)
    shares = []
    for trial in range(trials):
        seen = np.zeros((side, side), bool)
        for crop in range(crops):
            transform.set_random_seed(trial * 1000 + crop)
            place = transform(image=np.zeros((side, side, 3), np.float32), mask=code)["mask"].astype(int)
            seen[place[..., 0] * 256 + place[..., 1], place[..., 2] * 256 + place[..., 3]] = True
        shares.append(seen.mean())
    return float(np.mean(shares))


def test_the_crop_coverage_note_says_about_what_share_the_crops_show(tmp_path):
    """8 epochs of one 32x32 crop, rescaled by 0.8 to 1.2, show about a quarter of a 160x160 image (counted): the
    note says so, also for a run whose images are not cached (the sizes are read from the files' headers). The
    largest crops side by side gave 8 * 40^2 / 160^2 = 50 % and no note."""
    few_images(tmp_path, 160)
    data = Dataset(["a", "b", "large"], str(tmp_path / "inputs" / "few"))
    note = crop_coverage_note(data, CROP, 0.2, 8, np.ones(3))
    said = re.search(r"large\.png \(160x160, 25 crops' worth\) gets about 8 in --epochs 8, which show about (\d+)%",
                     note)
    assert said, note
    assert abs(int(said.group(1)) / 100 - shown_share(160, CROP, 0.2, 8)) < 0.06
    # DSB2018's largest images (1040x1388) under the walk-through's CPU recipe (12 epochs of 256 crops) are 43 % seen:
    # no note for a recipe that the README runs as it is
    data.stored_sizes = [(1040, 1388, 3, np.dtype(np.uint8))] * 3
    assert crop_coverage_note(data, 256, 0.2, 12, np.ones(3)) == ""
    assert "which show about 21% of its pixels" in crop_coverage_note(data, 256, 0.2, 5, np.ones(3))


@pytest.mark.parametrize("precise_bn", [4, 1])
def test_precise_bn_beyond_an_epoch_s_batches_says_how_many_it_gets(tmp_path, monkeypatch, capsys, precise_bn):
    """3 training images in batches of 3 are one batch per epoch: --precise_bn 4 (the full-size recipes' 40 on a
    user's dozen images) recomputes BatchNorm's statistics from that one batch's 3 crops, and the run says so;
    --precise_bn 1 gets what it asks for."""
    monkeypatch.chdir(tmp_path)
    split = few_images(tmp_path, 48)
    train.main(train_argv("few", "--crop_size", str(CROP), "--split_file", split, "--precise_bn", str(precise_bn),
                          dataset="few", epochs=1, batch=3))
    out = capsys.readouterr().out
    note = (f"note: --precise_bn {precise_bn}: an epoch has 1 batch of 3, so BatchNorm's statistics come from those "
            "3 crops before each validation; --precise_bn 0 keeps PyTorch's running averages")
    assert (note in out) is (precise_bn > 1), out
    # it fires on the fine-tuning flow of most users' data sets (the recipes' 40 batches of 8): at most two lines
    assert all(len(line) <= 240 for line in out.splitlines() if line.startswith("note: --precise_bn")), out


def test_balance_says_nothing_of_a_training_set_of_one_kind(tmp_path, monkeypatch, capsys):
    """The fine-tuning recipe's --balance 0.5 on a user's images of one kind draws that kind every time: a line
    saying '3 fluorescence images drawn 100% of the time' tells nothing (a mixed set's line: test_train_val.py)."""
    monkeypatch.chdir(tmp_path)
    split = few_images(tmp_path, 48)
    for i in ("a", "b", "large"):  # darkened: fluorescence, each (random pixels' mean is about 0.5, either kind)
        path = str(tmp_path / "inputs" / "few" / "images" / f"{i}.png")
        write_image(path, cv2.imread(path, cv2.IMREAD_UNCHANGED) // 2)
        assert image_modality(decode_image(path)) == "fluorescence"
    train.main(train_argv("few", "--crop_size", str(CROP), "--split_file", split, "--balance", "0.5", dataset="few",
                          epochs=1, batch=3))
    out = capsys.readouterr().out
    assert "--balance" not in out and "of the time" not in out, out
