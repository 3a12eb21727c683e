"""Tests for dataset.py and layouts.py: image/mask readers, layout checks with their error messages, the Dataset and its
augmentation seeding."""
import os
import subprocess
import sys
import time
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, PngImagePlugin
from scipy import ndimage as ndi
from skimage.measure import regionprops

import dataset
from conftest import make_layout, make_synthetic, write_image
from dataset import (MODALITIES, Dataset, WeightedDistributedSampler, balance_weights, eval_transform, image_modality,
                     train_transform)
import image_files
import layouts
from image_files import NORM_MEAN, NORM_STD, decode_image, image_to_float, read_label_image, read_labels, read_mask
from instances import touching_borders
from layouts import images_left_out, list_ids, nucleus_diameter
from utils import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]

IDS = ["a", "b", "c"]


def normalised(x):
    return (x - NORM_MEAN) / NORM_STD


# --------------------------------------------------------------------------------------------- image readers

def test_grey_image(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    path = write_image(tmp_path / "g.png", grey)
    img = decode_image(path)
    assert img.shape == (8, 8, 1) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :, 0], grey)
    three = image_to_float(img, 3)
    assert three.shape == (8, 8, 3) and three.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(three[:, :, c], grey / 255.0, atol=1e-6)
    one = image_to_float(img, 1)
    assert one.shape == (8, 8, 1)


def test_rgb_image_is_returned_in_rgb_order(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # B, G, R
    img = decode_image(write_image(tmp_path / "c.png", bgr))
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [30, 20, 10]
    np.testing.assert_allclose(image_to_float(img, 3)[0, 0], np.array([30, 20, 10]) / 255.0, atol=1e-6)


def test_rgba_alpha_is_dropped(tmp_path):
    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 7
    img = decode_image(write_image(tmp_path / "a.png", bgra))
    assert img.shape == (4, 5, 3)
    assert img[2, 3].tolist() == [30, 20, 10]


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_scaled_by_own_min_max(tmp_path, channels):
    values = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    arr = values if channels == 1 else np.stack([values] * 3, axis=-1)
    img = decode_image(write_image(tmp_path / "d.png", arr))
    assert img.dtype == np.uint16 and img.shape == (16, 16, channels)
    out = image_to_float(img, 3)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out[..., 0], (values.astype(np.float64) - 1000) / 2000, atol=1e-5)
    # a constant 16-bit image does not divide by zero
    flat = image_to_float(np.full((4, 4, 1), 500, np.uint16), 1)
    assert np.isfinite(flat).all() and flat.max() == 0


def test_percentile_normalization_against_hand_computed_percentiles():
    """0..999 in one channel: numpy's linear percentile puts p1 at 9.99 and p99.8 at 997.002 (positions 999 * p)."""
    img = np.arange(1000, dtype=np.uint16).reshape(25, 40, 1)
    out = image_to_float(img, 1, "percentile")
    lo, hi = 0.01 * 999, 0.998 * 999
    np.testing.assert_allclose(out[:, :, 0], np.clip((img[:, :, 0] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert (out == 0).sum() == 10 and (out == 1).sum() == 2  # 0..9 below p1, 998 and 999 above p99.8


def test_percentile_normalization_ignores_gain_and_offset_and_keeps_colour_balance():
    rng = np.random.default_rng(0)
    bright = rng.integers(0, 128, (32, 32, 3)).astype(np.uint8) * 2
    bright[..., 2] = bright[..., 2] // 4 * 2  # a stained-like image: less blue (still even, so halving is exact)
    dim = bright // 2 + 3  # the same image, half the gain and an offset: exact in uint8
    a, b = image_to_float(bright, 3, "percentile"), image_to_float(dim, 3, "percentile")
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(image_to_float(bright, 3), image_to_float(dim, 3), atol=0.1)  # 'fixed' keeps the gain
    assert a.min() == 0 and a.max() == 1 and a[..., 2].mean() < a[..., 0].mean() - 0.1
    assert image_to_float(np.full((4, 4, 3), 9, np.uint8), 3, "percentile").max() == 0  # a flat image


@pytest.mark.parametrize("normalization", ["percentile", "percentile_dark"])
def test_percentile_keeps_a_few_nuclei_on_an_exactly_flat_background(normalization):
    """Over 98.8 % of the pixels one value makes the 1st and 99.8th percentiles equal: the image is stretched from
    its minimum to its maximum instead of becoming all zeros (the nuclei lost). Dark nuclei on a saturated
    background too (percentile_dark inverts them to bright)."""
    img = np.zeros((100, 100, 1), np.uint16)
    img[50:53, 50:53] = 200
    out = image_to_float(img, 1, normalization)
    assert out[50:53, 50:53].min() == 1 and out.sum() == 9
    stained = np.full((100, 100, 3), 255, np.uint8)
    stained[10:13, 10:13] = (90, 40, 120)
    out = image_to_float(stained, 3, normalization)
    nucleus, background = out[10:13, 10:13].mean(), out[20:, 20:].mean()
    assert (background == 1 and nucleus < 0.5) if normalization == "percentile" else (background == 0 and nucleus > 0.5)


def test_percentile_dark_inverts_bright_backgrounds_only():
    """A stained-like image (dark nuclei on a bright background) becomes 1 - its percentile stretch; a
    fluorescence-like one (bright nuclei on a dark background) is left as 'percentile' gives it."""
    rng = np.random.default_rng(1)
    dark = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
    dark[8:16, 8:16] = 220  # a bright nucleus
    bright = (255 - dark).copy()
    bright[..., 1] //= 2  # coloured, as a stain is
    np.testing.assert_array_equal(image_to_float(dark, 3, "percentile_dark"), image_to_float(dark, 3, "percentile"))
    inverted = image_to_float(bright, 3, "percentile_dark")
    np.testing.assert_allclose(inverted, 1 - image_to_float(bright, 3, "percentile"), atol=1e-6)
    assert inverted.mean() < 0.5 and inverted[8:16, 8:16].mean() > 0.8  # the nucleus is bright now
    grey = image_to_float(bright, 1, "percentile_dark")  # a 1-channel run sees the inverted image in grey
    assert grey.shape == (32, 32, 1) and grey[8:16, 8:16].mean() > 0.8 and grey.mean() < 0.5


@pytest.mark.parametrize("dtype, value, ext", [(np.uint8, 255, ".png"), (np.uint8, 1, ".png"),
                                               (np.uint16, 1, ".png"), (np.uint16, 65535, ".png"),
                                               (np.uint16, 1, ".tif"), (np.uint16, 65535, ".tif")])
def test_masks_0_255_and_0_1_become_0_1(tmp_path, dtype, value, ext):
    """8-bit 0/255 or 0/1, 16-bit 0/1 or 0/65535, PNG or TIFF (a 16-bit 0/1 PNG read as grey is all 0)."""
    mask = np.zeros((8, 8), dtype)
    mask[2:5, 1:6] = value
    path = str(tmp_path / f"m{ext}")
    if ext == ".tif":
        tifffile.imwrite(path, mask)
    else:
        cv2.imwrite(path, mask)
    out = read_mask(path)
    assert out.dtype == np.uint8 and set(np.unique(out).tolist()) == {0, 1}
    np.testing.assert_array_equal(out, mask > 0)


def test_a_valid_mask_is_checked_without_sorting_its_pixels(tmp_path, monkeypatch):
    """preprocess_dsb2018.py reads one mask per nucleus, and np.unique over every pixel doubled each read's time:
    it runs only to name the values of a refused mask."""
    calls = []
    unique = np.unique
    monkeypatch.setattr(np, "unique", lambda *args, **kwargs: calls.append(args[0].size) or unique(*args, **kwargs))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:20, 8:20] = 255
    np.testing.assert_array_equal(read_mask(write_image(tmp_path / "m.png", mask)), mask > 0)
    assert calls == []
    mask[0, 0] = 7
    with pytest.raises(DataError, match=r"has values \{0, 7, 255\}"):
        read_mask(write_image(tmp_path / "soft.png", mask))
    assert calls == [64 * 64]


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (0, 0, 255)])
def test_a_mask_drawn_in_its_alpha_channel_is_read_from_it(tmp_path, colour):
    """A transparent layer saved as a mask: flat colour (black, white or red), the shape in alpha (was all background
    under black and all foreground under white); nothing drawn (alpha 0 throughout) is empty. A mask whose colour
    holds the shape keeps ignoring its alpha, and so does an opaque flat one."""
    shape = np.zeros((32, 32), np.uint8)
    shape[8:20, 8:20] = 255
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[..., :3], layer[..., 3] = colour, shape
    np.testing.assert_array_equal(read_mask(write_image(tmp_path / "layer.png", layer)), shape > 0)
    Image.fromarray(np.stack([np.full_like(shape, 255), shape], axis=-1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(str(tmp_path / "la.png")), shape > 0)  # grey + alpha
    layer[..., 3] = 0
    assert read_mask(write_image(tmp_path / "nothing.png", layer)).sum() == 0
    drawn = np.zeros((32, 32, 4), np.uint8)
    drawn[..., 0], drawn[..., 1], drawn[..., 2], drawn[..., 3] = shape, shape, shape, 255 - shape
    np.testing.assert_array_equal(read_mask(write_image(tmp_path / "drawn.png", drawn)), shape > 0)
    if colour[0] == colour[2]:  # opaque flat black or white: an empty or a full mask, as before
        layer[..., 3] = 255
        assert read_mask(write_image(tmp_path / "opaque.png", layer)).sum() == (0 if colour[0] == 0 else 32 * 32)


def test_a_half_transparent_layer_is_named_and_tiff_channels_are_not_alpha(tmp_path):
    """Soft alpha values are named as the layer's; a two-channel TIFF (ImageJ CYX: nuclei, cells) is no layer: its
    first channel is the mask, even where it is empty and the second is not."""
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[8:20, 8:20, 3] = 127
    with pytest.raises(DataError, match=r"has values \{0, 127\} in its alpha channel \(a transparent layer"):
        read_mask(write_image(tmp_path / "half.png", layer))
    cells = np.zeros((2, 32, 32), np.uint8)
    cells[1, 4:24, 4:24] = 255
    tifffile.imwrite(tmp_path / "cyx.tif", cells, imagej=True, metadata={"axes": "CYX"})
    assert read_mask(str(tmp_path / "cyx.tif")).sum() == 0


@pytest.mark.parametrize("dtype, value", [(np.int32, -1), (np.uint32, 3_000_000_000), (np.int64, 2**31)])
def test_label_values_below_0_or_beyond_int32_are_refused_by_name(tmp_path, dtype, value):
    """A nucleus labelled -1 became background of the training target, and 3e9 wrapped to a negative label."""
    labels = np.zeros((16, 16), dtype)
    labels[2:5, 2:5], labels[8:12, 8:12] = 1, value
    path = str(tmp_path / "labels.tif")
    tifffile.imwrite(path, labels)
    with pytest.raises(DataError, match=f"label image {path} holds the value {value}; labels are 0 for the background"):
        read_label_image(path)


@pytest.mark.parametrize("image", [np.array([[0.0, 0.5], [1.0, 1e39]]), np.array([[-3.4e38, 0.0], [1.0, 3.4e38]])])
@pytest.mark.parametrize("normalization", ["fixed", "percentile"])
def test_float_images_beyond_float32_s_range_stay_finite(image, normalization):
    """Finite values too large for float32 became inf, then NaN over the whole image (an empty prediction)."""
    out = image_to_float(image[:, :, None], 1, normalization)
    assert out.dtype == np.float32 and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert out[1, 1, 0] == 1.0 and out[0, 0, 0] <= out[1, 0, 0]


def test_mask_with_grey_values_is_refused(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :4] = 128
    mask[1, :4] = 255
    path = write_image(tmp_path / "soft.png", mask)
    with pytest.raises(DataError) as e:
        read_mask(path)
    assert path in str(e.value) and "128" in str(e.value)


@pytest.mark.parametrize("name", ["mask.jpg", "mask.png"])
def test_a_jpeg_mask_or_label_image_is_refused(tmp_path, name):
    """At quality 75 (PIL's default) a 0/1 mask decodes to 0 and 1 alone with most nuclei pixels flipped, and a
    label image's ids blur into their neighbours': no value check sees it. A JPEG renamed .png is one too."""
    mask = np.zeros((32, 32), np.uint8)
    mask[4:11, 5:11], mask[18:25, 20:26] = 1, 1
    ok, jpeg = cv2.imencode(".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert set(np.unique(cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)).tolist()) <= {0, 1}  # passes the value check
    (tmp_path / name).write_bytes(jpeg.tobytes())
    for read, what in ((read_mask, "mask"), (read_label_image, "label image")):
        with pytest.raises(DataError, match=f"{what} .*{name} is a JPEG, whose lossy compression .* save {what}s as "
                                            "PNG or TIFF"):
            read(str(tmp_path / name))


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_or_truncated_image(tmp_path, content):
    good = write_image(tmp_path / "good.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    data = open(good, "rb").read()
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(DataError) as e:
        decode_image(str(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(DataError) as e:
        read_mask(str(bad))
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path, channels):
    """A phone's or a viewer's rotation is an EXIF tag: the image must come out as every viewer shows it (and as
    its mask was drawn), not as stored."""
    shown = np.zeros((24, 40), np.uint8)
    shown[4:10, 4:30] = 255
    stored = np.ascontiguousarray(np.rot90(shown, 1))  # 40 x 24, tag 6: turn 90 degrees clockwise to show
    picture = Image.fromarray(stored if channels == 1 else np.stack([stored] * 3, axis=-1))
    exif = picture.getexif()
    exif[0x0112] = 6
    picture.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    image = decode_image(str(tmp_path / "turned.jpg"))
    assert image.shape[:2] == (24, 40)
    assert np.abs(image[..., 0].astype(int) - shown).max() < 32  # JPEG at quality 100: near, not exact
    root = make_layout(tmp_path / "ds", ["a"])  # a mask saved from the stored, unturned pixels is named as such
    os.remove(os.path.join(root, "images", "a.png"))
    os.rename(tmp_path / "turned.jpg", os.path.join(root, "images", "a.jpg"))
    write_image(os.path.join(root, "masks", "0", "a.png"), np.where(stored > 127, 255, 0).astype(np.uint8))
    with pytest.raises(DataError, match="is 40x24 but its image .*a.jpg is 24x40; .*; the JPEG is read turned as "
                                        "its EXIF orientation says"):
        Dataset(["a"], root, num_classes=1, input_channels=3, img_ext=".jpg")[0]


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_a_file_this_user_may_not_read_is_named_as_such(tmp_path, monkeypatch, ext):
    """OpenCV returns None for a file it may not open, as for a broken one: the message says which it is. (Tests run
    as root here, who may read every file, so os.access answers for a user who may not.)"""
    path = write_image(tmp_path / f"locked{ext}", np.zeros((32, 32), np.uint8))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    for read in (decode_image, read_mask, read_label_image):
        with pytest.raises(DataError, match=f"cannot read .* {path}: permission denied; make it readable"):
            read(str(path))


def test_unreadable_image_inside_dataset(tmp_path):
    root = make_layout(tmp_path / "ds", IDS)
    path = os.path.join(root, "images", "b.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:40])
    ds = Dataset(IDS, root, num_classes=1, input_channels=3)
    ds[0]  # the others still read
    with pytest.raises(DataError) as e:
        ds[1]
    assert path in str(e.value)


# ----------------------------------------------------------------------------------------- layout checks

def test_list_ids_sorted(tmp_path):
    root = make_layout(tmp_path / "ds", ["c", "a", "b"])
    assert list_ids(root) == ["a", "b", "c"]


def test_missing_dataset_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as e:
        list_ids(missing)
    assert missing in str(e.value)


def test_empty_image_folder(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        list_ids(str(tmp_path / "ds"))
    assert os.path.join(str(tmp_path / "ds"), "images") in str(e.value) and ".png" in str(e.value)


def test_image_folder_with_other_extension_hints_img_ext(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, img_ext=".tif")
    with pytest.raises(DataError) as e:
        list_ids(root)
    assert ".tif" in str(e.value) and "--img_ext" in str(e.value)
    assert list_ids(root, img_ext=".tif") == IDS


def test_image_without_mask(tmp_path):
    root = make_layout(tmp_path / "ds", IDS)
    os.remove(os.path.join(root, "masks", "0", "b.png"))
    with pytest.raises(DataError) as e:
        list_ids(root)
    msg = str(e.value)
    assert "b" in msg.split(":")[-1] and os.path.join(root, "masks", "0") in msg and "no mask" in msg


@pytest.mark.parametrize("twin", ["b.PNG", "B.png"])
def test_a_mask_named_in_another_case_is_named_in_the_error(tmp_path, twin):
    """On a Mac or Windows b.PNG opens as b.png; here it does not, and the message says why the mask is missing."""
    root = make_layout(tmp_path / "ds", IDS)
    os.rename(os.path.join(root, "masks", "0", "b.png"), os.path.join(root, "masks", "0", twin))
    with pytest.raises(DataError, match=f"1 image has no mask in .*: b; give every image its mask, named like the "
                                        f"image \\(found {twin}: the names differ only in upper/lower case"):
        list_ids(root)


@pytest.mark.parametrize("ids, exts, renamed, named, flags", [
    (["1", "2", "10"], (".png", ".png"), {"1.png": "001.png", "2.png": "002.png", "10.png": "010.png"},
     "001.png for image 1: the numbers are zero-padded otherwise; rename it to 1.png", None),
    (["a", "b"], (".png", ".png"), {"a.png": "a_mask.png", "b.png": "b_mask.png"},
     "a_mask.png for image a: rename it to a.png, and the others alike, without '_mask'", None),
    (["a", "b"], (".tif", ".tif"), {"a.tif": "a.ome.tif", "b.tif": "b.ome.tif"},
     "a.ome.tif for image a: pass --mask_ext .ome.tif", dict(img_ext=".tif", mask_ext=".ome.tif")),
    (["a.ome", "b.ome"], (".tif", ".tif"), {"a.ome.tif": "a.tif", "b.ome.tif": "b.tif"},
     "a.tif for image a.ome: pass --img_ext .ome.tif", dict(img_ext=".ome.tif", mask_ext=".tif")),
    (["a", "b"], (".tif", ".tif"), {"b.tif": "b.tiff"}, "b.tiff for image b: rename it to b.tif\\)$", None),
    # 10_mask.png, listed first, is not 1's: the name's rest must start with a separator
    (["1", "10"], (".png", ".png"), {"1.png": "1_mask.png", "10.png": "10_mask.png"},
     "1_mask.png for image 1: rename it to 1.png, and the others alike, without '_mask'", None),
])
def test_a_pairing_error_names_the_nearest_unpaired_mask_and_the_fix(tmp_path, ids, exts, renamed, named, flags):
    """A mask named otherwise than its image (zero-padded, with a suffix, another ending) is refused, naming it and
    the fix; the fix it names (the ``flags``, else naming the masks as their images again) pairs them."""
    img_ext, mask_ext = exts
    root = make_layout(tmp_path / "ds", ids, img_ext=img_ext, mask_ext=mask_ext)
    masks = tmp_path / "ds" / "masks" / "0"
    for old, new in renamed.items():
        os.rename(masks / old, masks / new)
    with pytest.raises(DataError, match=f"no mask in .*named like the image \\(nearest unpaired mask: {named}"):
        list_ids(root, img_ext=img_ext, mask_ext=mask_ext)
    if flags:
        assert len(list_ids(root, **flags)) == len(ids)
    else:
        for old, new in renamed.items():
            os.rename(masks / new, masks / old)
        assert list_ids(root, img_ext=img_ext, mask_ext=mask_ext) == sorted(ids)


def test_the_nearest_name_of_thousands_of_unpaired_masks_is_found_at_once(tmp_path):
    """Every mask of 2,000 images named otherwise (img_<n> and mask_<n>): the hint compared each image's name with
    every file's, its zero-padding-free form computed anew each time: 33 s on a 2-core Zen 1 (75 s for 3,000), now
    0.1 s. A bound of 5 s leaves a loaded machine room."""
    for folder in ("images", "masks/0"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(2000):  # empty files: the check lists the folders and reads no file
        (tmp_path / "images" / f"img_{i:05d}.png").touch()
        (tmp_path / "masks" / "0" / f"mask_{i:05d}.png").touch()
    started = time.monotonic()
    with pytest.raises(DataError, match=r"nearest unpaired mask: mask_00000.png for image img_00000: rename it to "):
        list_ids(str(tmp_path))
    assert time.monotonic() - started < 5


def test_a_label_image_named_with_a_suffix_is_named_in_the_error(tmp_path):
    """The label-image layout names the nearest unpaired label image too."""
    root = tmp_path / "ds"
    for i in ("a", "b"):
        write_image(str(root / "images" / f"{i}.png"), np.zeros((8, 8), np.uint8))
        write_image(str(root / "labels" / f"{i}_labels.png"), np.ones((8, 8), np.uint16))
    with pytest.raises(DataError, match="no label image in .*\\(nearest unpaired label image: a_labels.png for image "
                                        "a: rename it to a.png"):
        list_ids(str(root))


def test_a_mask_named_with_accents_encoded_otherwise_is_named_in_the_error(tmp_path):
    """A Mac-made zip stores 'café' decomposed (NFD): it looks like the image's name and is not."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = make_layout(tmp_path / "ds", ["a", nfc])
    os.rename(os.path.join(root, "masks", "0", f"{nfc}.png"), os.path.join(root, "masks", "0", f"{nfd}.png"))
    with pytest.raises(DataError, match=f"1 image has no mask in .*: {nfc}; .*\\(found {nfd}.png: the names differ "
                                        "only in upper/lower case or in how accents are encoded"):
        list_ids(root)


def test_mask_without_image(tmp_path):
    root = make_layout(tmp_path / "ds", IDS + ["zz_orphan"])
    os.remove(os.path.join(root, "images", "zz_orphan.png"))
    with pytest.raises(DataError) as e:
        list_ids(root)
    msg = str(e.value)
    assert "zz_orphan" in msg and "no image" in msg


def test_num_classes_must_match_class_folders(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, num_classes=2)
    with pytest.raises(UsageError) as e:
        list_ids(root, num_classes=1)
    assert "--num_classes" in str(e.value)
    with pytest.raises(UsageError) as e:
        list_ids(root, num_classes=3)
    assert "--num_classes" in str(e.value)
    assert list_ids(root, num_classes=2) == IDS


def test_eleven_class_folders_and_hidden_folders(tmp_path):
    """Class folders are compared in numeric order (10 after 9) and hidden folders such as
    .ipynb_checkpoints are not classes."""
    root = make_layout(tmp_path / "ds", ["a", "b"], size=16, num_classes=11)
    os.makedirs(os.path.join(root, "masks", ".ipynb_checkpoints"))
    assert list_ids(root, num_classes=11) == ["a", "b"]
    assert Dataset(["a"], root, num_classes=11)[0][1].shape == (11, 16, 16)


def test_mask_of_another_size(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, size=16)
    mask_path = os.path.join(root, "masks", "0", "c.png")
    write_image(mask_path, np.zeros((16, 20), np.uint8))
    ds = Dataset(IDS, root)
    with pytest.raises(DataError) as e:
        ds[2]
    assert mask_path in str(e.value)
    with pytest.raises(DataError):  # with caching the error comes when the dataset is built
        Dataset(IDS, root, cache=True)


def test_grey_mask_values_in_dataset(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, mask_value=128)
    with pytest.raises(DataError) as e:
        Dataset(IDS, root)[0]
    assert os.path.join(root, "masks", "0", "a.png") in str(e.value)


# ------------------------------------------------------------------------------------------------- Dataset

def test_dataset_item_types_and_normalisation(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, size=16)
    ds = Dataset(IDS, root, num_classes=1, input_channels=3)
    assert len(ds) == 3
    image, mask, meta = ds[1]
    assert meta == {"img_id": "b"}
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert mask.dtype == torch.float32 and mask.shape == (1, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    raw = decode_image(os.path.join(root, "images", "b.png")).astype(np.float32) / 255.0
    np.testing.assert_allclose(image.numpy(), normalised(raw).transpose(2, 0, 1), atol=1e-6)
    assert image.min() >= normalised(0.0) - 1e-6 and image.max() <= normalised(1.0) + 1e-6
    truth = read_mask(os.path.join(root, "masks", "0", "b.png"))
    np.testing.assert_array_equal(mask[0].numpy(), truth)
    # the cache gives the same samples
    cached = Dataset(IDS, root, num_classes=1, input_channels=3, cache=True)[1]
    assert torch.equal(cached[0], image) and torch.equal(cached[1], mask)


def test_dataset_grey_and_rgba_images(tmp_path):
    root = make_layout(tmp_path / "grey", IDS, size=16, channels=1)
    image, _, _ = Dataset(IDS, root, input_channels=3)[0]
    assert image.shape == (3, 16, 16) and torch.equal(image[0], image[2])
    image, _, _ = Dataset(IDS, root, input_channels=1)[0]
    assert image.shape == (1, 16, 16)
    root = make_layout(tmp_path / "rgba", IDS, size=16, channels=4)
    image, _, _ = Dataset(IDS, root, input_channels=3)[0]
    assert image.shape == (3, 16, 16)


def test_dataset_16bit(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, size=16)
    values = np.linspace(200, 40000, 256).reshape(16, 16).astype(np.uint16)
    write_image(os.path.join(root, "images", "a.png"), values)
    image, _, _ = Dataset(IDS, root, input_channels=3)[0]
    assert image.shape == (3, 16, 16)
    assert image.min().item() == pytest.approx(normalised(0.0)) and image.max().item() == pytest.approx(normalised(1.0))


def test_mask_0_1_same_as_0_255(tmp_path):
    a = Dataset(IDS, make_layout(tmp_path / "m255", IDS, mask_value=255))[0][1]
    b = Dataset(IDS, make_layout(tmp_path / "m1", IDS, mask_value=1))[0][1]
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}


def test_multi_class_masks(tmp_path):
    root = make_layout(tmp_path / "ds", IDS, size=16, num_classes=2)
    assert list_ids(root, num_classes=2) == IDS
    _, mask, _ = Dataset(IDS, root, num_classes=2)[2]
    assert mask.shape == (2, 16, 16)
    for c in range(2):
        np.testing.assert_array_equal(mask[c].numpy(), read_mask(os.path.join(root, "masks", str(c), "c.png")))
    assert not torch.equal(mask[0], mask[1])


@pytest.mark.parametrize("transform", [
    eval_transform(48, 48), eval_transform(16, 16), eval_transform(48, 16),
    train_transform(48, 48), train_transform(16, 16),
    train_transform(0, 0, crop_size=16, scale_jitter=0.3),
], ids=["eval48", "eval16", "eval48x16", "train48", "train16", "crop16_jitter"])
def test_resizing_keeps_masks_hard(tmp_path, transform):
    ids = make_synthetic(tmp_path, "syn", num_images=4, size=32)
    ds = Dataset(ids, str(tmp_path / "inputs" / "syn"), transform=transform)
    seen = set()
    for i in range(len(ds)):
        image, mask, _ = ds[(0, i)]
        assert image.shape[1:] == mask.shape[1:] and image.shape[1:] != (32, 32)
        values = set(mask.unique().tolist())
        assert values <= {0.0, 1.0}
        seen |= values
    assert seen == {0.0, 1.0}  # over the samples: a random crop may hold background alone


@pytest.mark.parametrize("transform", [eval_transform(32, 48), train_transform(32, 48, color_jitter=False)],
                         ids=["eval", "train"])
def test_resized_masks_stay_on_their_image(tmp_path, transform):
    """A disc drawn in the image and in its mask, 99x141 resized to 32x48: the mask is the linearly resized image
    thresholded at half, give or take a pixel (cv2.INTER_NEAREST moved it half an input pixel up and left: 37
    pixels off here). Label images are resized the same way (evaluation at a 96x96 run's size)."""
    yy, xx = np.mgrid[:99, :141]
    disc = (((yy - 49) ** 2 + (xx - 70) ** 2) < 40 ** 2).astype(np.uint8)
    out = transform(image=np.repeat(disc[..., None] * 255, 3, axis=2), mask=disc)
    mask, image = out["mask"], out["image"][..., 0] / 255.0
    assert mask.shape == image.shape == (32, 48) or mask.shape == image.shape == (48, 32)  # D4 may transpose
    assert np.sum(mask != (image > 0.5)) <= 2
    if mask.shape == (32, 48):
        path = os.path.join(tmp_path, "labels.png")
        cv2.imwrite(path, disc.astype(np.uint16) * 7)
        np.testing.assert_array_equal(read_labels(path, (32, 48)) > 0, mask > 0)


def test_border_target_of_a_resized_run_is_drawn_at_its_size(tmp_path):
    """A --borders run trained on 96x96 images resized to 32x32: its border target is touching_borders of the
    labels at 32x32 (drawn at 96x96 and shrunk, most of the lines fell between the pixels kept)."""
    ids = make_synthetic(tmp_path, "syn", num_images=6, size=96)
    root = str(tmp_path / "inputs" / "syn")
    ds = Dataset(ids, root, transform=eval_transform(32, 32), borders=True, border_size=(32, 32))
    drawn = 0
    for i, img_id in enumerate(ids):
        expected = touching_borders(read_labels(os.path.join(root, "labels", img_id + ".png"), (32, 32)))
        np.testing.assert_array_equal(ds[i][1][-1].numpy(), expected)
        drawn += expected.sum()
    assert drawn > 0
    assert Dataset(ids, root, borders=True, border_size=(32, 32)).load(0)[1].shape[:2] == (96, 96)


def test_eval_transform_with_crop_keeps_size(tmp_path):
    ids = make_synthetic(tmp_path, "syn", num_images=2, size=48)
    image, mask, _ = Dataset(ids, str(tmp_path / "inputs" / "syn"), transform=eval_transform(32, 32, crop_size=32))[0]
    assert image.shape == (3, 48, 48) and mask.shape == (1, 48, 48)


@pytest.mark.parametrize("size", [(48, 40), (20, 16), (33, 33), (24, 30)], ids=["up", "down", "same", "mixed"])
def test_eval_resize_is_albumentations_resize(size):
    """dataset.Resize (evaluation's, without albumentations' import) gives exactly what albumentations' Resize with
    the mask interpolation of training gives: images of 1 and 3 channels (float, as the Dataset hands them over),
    masks of [H, W] and [H, W, K] (uint8)."""
    import albumentations as A  # here only: the point of dataset.Resize is that the scripts' imports lack it
    rng = np.random.default_rng(0)
    theirs = A.Compose([A.Resize(*size, mask_interpolation=image_files.NEAREST)])
    for image, mask in ((rng.random((33, 33, 3), np.float32), rng.integers(0, 2, (33, 33), np.uint8)),
                        (rng.random((33, 33, 1), np.float32), rng.integers(0, 2, (33, 33, 1), np.uint8)),
                        (rng.random((33, 33, 3), np.float32), rng.integers(0, 2, (33, 33, 5), np.uint8))):
        want, got = theirs(image=image, mask=mask), eval_transform(*size)(image=image, mask=mask)
        for key in ("image", "mask"):
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            np.testing.assert_array_equal(got[key], want[key])


def test_evaluation_scripts_load_without_albumentations():
    """val.py and predict.py (and train.py's modules, for runs that augment on the device) do not import
    albumentations, whose import takes seconds; training in loader workers does."""
    code = ("import sys, predict, trainer, val, evaluation\nbefore = 'albumentations' in sys.modules\n"
            "trainer.train_transform(16, 16)\nprint(before, 'albumentations' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


def test_augmentation_seeded_by_epoch_and_index(tmp_path):
    ids = make_synthetic(tmp_path, "syn", num_images=4, size=32)
    root = str(tmp_path / "inputs" / "syn")
    ds = Dataset(ids, root, transform=train_transform(32, 32), seed=0)
    first = ds[(0, 2)]
    again = ds[(0, 2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # another Dataset object (a resumed run, a worker process) gives the same sample
    other = Dataset(ids, root, transform=train_transform(32, 32), seed=0)[(0, 2)]
    assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    # another epoch, or another seed, gives another augmentation
    assert not torch.equal(first[0], ds[(1, 2)][0])
    assert not torch.equal(first[0], Dataset(ids, root, transform=train_transform(32, 32), seed=1)[(0, 2)][0])


def _d4(x):
    """The eight flips/rotations of x [..., H, W]."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, r.flip(-1)]
    return out


def test_image_and_mask_get_the_same_flip_or_rotation(tmp_path):
    ids = make_synthetic(tmp_path, "syn", num_images=4, size=32)
    root = str(tmp_path / "inputs" / "syn")
    plain = Dataset(ids, root, transform=None)
    aug = Dataset(ids, root, transform=train_transform(32, 32, color_jitter=False), seed=3)
    used = set()
    for epoch in range(4):
        for i in range(len(ids)):
            image, mask, _ = plain[i]
            a_image, a_mask, _ = aug[(epoch, i)]
            matches = [k for k, t in enumerate(_d4(image)) if torch.allclose(t, a_image, atol=1e-5)]
            assert matches, "the augmented image is not a flip/rotation of the original"
            assert any(torch.equal(_d4(mask)[k], a_mask) for k in matches)
            used.add(matches[0])
    assert len(used) > 1


def test_borders_channel_comes_from_the_instance_labels(tmp_path):
    ids = make_synthetic(tmp_path)
    root = tmp_path / "inputs" / "tiny"
    data = Dataset(ids, str(root), borders=True)
    touching = 0
    for i, sid in enumerate(ids):
        _, mask, _ = data[i]
        assert mask.shape == (2, 32, 32)
        border = touching_borders(read_labels(str(root / "labels" / f"{sid}.png")))
        assert np.array_equal(mask[1].numpy(), border.astype(np.float32))
        assert (mask[1] <= mask[0]).all()  # borders lie inside the nuclei
        touching += int(border.any())
    assert touching > 0, "the synthetic images have touching nuclei"
    os.remove(root / "labels" / f"{ids[3]}.png")
    with pytest.raises(DataError, match=r"--borders True needs instance labels .*missing for 1 of 10 images"):
        Dataset(ids, str(root), borders=True)
    assert Dataset(ids, str(root))[3][1].shape == (1, 32, 32)


# ------------------------------------------------------------------------------------------ --balance by kind

def _flat(value, channels=3, dtype=np.uint8, size=8):
    return np.full((size, size, channels), value, dtype)


def test_image_modality_tells_the_three_kinds_apart():
    assert image_modality(_flat(20)) == "fluorescence"  # dark, grey, RGB
    assert image_modality(_flat(20, channels=1)) == "fluorescence"  # dark, one channel
    assert image_modality(_flat(210)) == "bright-field"  # bright, grey
    assert image_modality(_flat(210, channels=1)) == "bright-field"
    pink = _flat(0)
    pink[...] = (220, 150, 200)  # bright and coloured, like H&E
    assert image_modality(pink) == "stained"
    dark_16bit = np.zeros((8, 8, 1), np.uint16)
    dark_16bit[0, 0] = 4000  # one bright nucleus pixel on a dark background, scaled by its own range
    assert image_modality(dark_16bit) == "fluorescence"


def test_balance_weights():
    groups = ["a"] * 6 + ["b"] * 3 + ["c"]
    assert np.allclose(balance_weights(groups, 0), 1)  # uniform
    w = balance_weights(groups, 1)  # each group the same total weight
    assert np.allclose([w[:6].sum(), w[6:9].sum(), w[9:].sum()], 1)
    w = balance_weights(groups, 0.5)
    assert np.allclose(w, [6 ** -0.5] * 6 + [3 ** -0.5] * 3 + [1])


def test_weighted_sampler_draws_in_proportion_and_splits_the_draw_between_processes():
    weights = balance_weights(["a"] * 8 + ["b"] * 2, 1)  # group b (indices 8, 9) should get half the draws
    whole = WeightedDistributedSampler(weights, seed=3)
    halves = [WeightedDistributedSampler(weights, num_replicas=2, rank=r, seed=3) for r in range(2)]
    draws = []
    for epoch in range(300):
        for s in [whole, *halves]:
            s.set_epoch(epoch)
        drawn = list(whole)
        assert len(drawn) == len(whole) == 10 and len(halves[0]) == 5
        assert sorted(list(halves[0]) + list(halves[1])) == sorted(drawn)  # the same draw, shared out
        draws += drawn
    assert abs(np.isin(draws, [8, 9]).mean() - 0.5) < 0.03  # 3000 draws: the standard error is 0.009
    whole.set_epoch(0)
    first = list(whole)
    assert first == list(whole)  # repeatable for a given seed and epoch
    whole.set_epoch(1)
    assert first != list(whole)


def test_dataset_modalities_with_and_without_cache(tmp_path):
    ids = make_synthetic(tmp_path, num_images=6)
    folder = os.path.join(tmp_path, "inputs", "tiny")
    kinds = Dataset(ids, folder).modalities()
    assert Dataset(ids, folder, cache=True).modalities() == kinds
    expected = [image_modality(decode_image(os.path.join(folder, "images", i + ".png"))) for i in ids]
    assert kinds == expected and set(kinds) <= set(MODALITIES)


# ------------------------------------------------------------------------------ datasets given as label images

def _label_sample(rng, size=24):
    """A uint16 grey image and its instance labels (two touching squares and one apart)."""
    labels = np.zeros((size, size), np.uint16)
    labels[3:11, 3:9] = 1
    labels[3:11, 9:15] = 2
    labels[15:21, 14:20] = 7
    image = (rng.integers(0, 2000, (size, size)) + (labels > 0) * 30000).astype(np.uint16)
    return image, labels


@pytest.mark.parametrize("kind", ["stardist_labels", "stardist_masks", "cellpose"])
def test_label_image_datasets_give_masks_and_borders(tmp_path, kind, capfd):
    rng = np.random.default_rng(0)
    samples = {f"s{i}": _label_sample(rng) for i in range(3)}
    for sid, (image, labels) in samples.items():
        if kind == "cellpose":
            cv2.imwrite(str(tmp_path / f"{sid}_img.png"), image)
            cv2.imwrite(str(tmp_path / f"{sid}_masks.png"), labels)
        else:
            folder = "labels" if kind == "stardist_labels" else "masks"
            (tmp_path / "images").mkdir(exist_ok=True)
            (tmp_path / folder).mkdir(exist_ok=True)
            tifffile.imwrite(tmp_path / "images" / f"{sid}.tif", image)
            tifffile.imwrite(tmp_path / folder / f"{sid}.tif", labels)
    ext = ".png" if kind == "cellpose" else ".tif"
    assert list_ids(str(tmp_path), ext, ext) == sorted(samples)
    data = Dataset(sorted(samples), str(tmp_path), ext, ext, borders=True)
    for i, sid in enumerate(sorted(samples)):
        image, mask, meta = data[i]
        labels = samples[sid][1]
        assert meta["img_id"] == sid and image.shape == (3, 24, 24) and mask.shape == (2, 24, 24)
        np.testing.assert_array_equal(mask[0].numpy(), labels > 0)
        np.testing.assert_array_equal(mask[1].numpy(), touching_borders(labels.astype(np.int32)))
        assert mask[1].sum() > 0  # nuclei 1 and 2 touch
        unit = image.numpy() * NORM_STD + NORM_MEAN
        assert unit.min() == pytest.approx(0) and unit.max() == pytest.approx(1)  # 16-bit: min-max scaled
    assert "warn" not in capfd.readouterr().err.lower()  # tifffile, not OpenCV's TIFF warnings
    with pytest.raises(UsageError, match="one class"):
        list_ids(str(tmp_path), ext, ext, num_classes=2)


def test_label_image_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, labels = _label_sample(rng)
    for sid in ("a", "b", "c", "d"):
        tifffile.imwrite(tmp_path / "images" / f"{sid}.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.dstack([labels, labels * 2, labels]).astype(np.uint16))
    tifffile.imwrite(tmp_path / "labels" / "b.tif", labels.astype(np.float32) / 3)
    tifffile.imwrite(tmp_path / "labels" / "c.tif", labels[:20])
    with pytest.raises(DataError, match="1 image has no label image .*: d"):
        list_ids(str(tmp_path), ".tif", ".tif")
    tifffile.imwrite(tmp_path / "labels" / "d.tif", labels)
    data = Dataset(["a", "b", "c", "d"], str(tmp_path), ".tif", ".tif")
    for index, message in ((0, "labels/a.tif is a colour image"), (1, "labels/b.tif holds float32"),
                           (2, "labels/c.tif is 20x24 but the image is 24x24")):
        with pytest.raises(DataError, match=message):
            data.load(index)
    assert data.load(3)[1].sum() == (labels > 0).sum()


def test_layout_mistakes_name_the_fix(tmp_path):
    """Label images in masks/ of another extension than --mask_ext, an empty masks/, Cellpose files of another
    extension than --img_ext (and macOS's ._ files beside them, skipped)."""
    image, labels = _label_sample(np.random.default_rng(0))
    stardist = tmp_path / "stardist"
    for sid in ("a", "b"):
        write_image(stardist / "images" / f"{sid}.png", image)
        tifffile.imwrite(write_dir(stardist / "masks") / f"{sid}.tif", labels)
    with pytest.raises(DataError, match="no class folders in .*masks.*found .tif files: pass --mask_ext .tif"):
        list_ids(str(stardist))
    assert list_ids(str(stardist), mask_ext=".tif") == ["a", "b"]
    for sid in ("a", "b"):  # the images of another type too: both flags in one error, not one after the other
        os.remove(stardist / "images" / f"{sid}.png")
        tifffile.imwrite(stardist / "images" / f"{sid}.tif", image)
    with pytest.raises(DataError, match=r"pass --img_ext .tif and --mask_ext .tif \(the type of the files in "
                                        r".*masks\)"):
        list_ids(str(stardist))
    empty = tmp_path / "empty"
    write_image(empty / "images" / "a.png", image)
    write_dir(empty / "masks")
    with pytest.raises(DataError, match="no class folders in .*masks: masks go in masks/0/<id>.png"):
        list_ids(str(empty))
    write_dir(empty / "masks" / "nuclei")
    with pytest.raises(DataError, match=r"holds the class folders \['nuclei'\]; name them 0, 1, \.\.\."):
        list_ids(str(empty))
    cellpose = write_dir(tmp_path / "cellpose")
    for sid in ("a", "b"):
        write_image(cellpose / f"{sid}_img.png", image)
        write_image(cellpose / f"{sid}_masks.png", labels)
    (cellpose / "._a_img.png").write_bytes(b"AppleDouble")
    with pytest.raises(DataError, match="found Cellpose-style <name>_img.png files: pass --img_ext .png"):
        list_ids(str(cellpose), img_ext=".tif")
    assert list_ids(str(cellpose)) == ["a", "b"]
    cellpose_tif = write_dir(tmp_path / "cellpose_tif")
    for sid in ("a", "b"):
        tifffile.imwrite(cellpose_tif / f"{sid}_img.tif", image)
        tifffile.imwrite(cellpose_tif / f"{sid}_masks.tif", labels)
    with pytest.raises(DataError, match="found Cellpose-style <name>_img.tif files: pass --img_ext .tif and --mask_ext "
                                        ".tif$"):
        list_ids(str(cellpose_tif))
    own = write_dir(tmp_path / "cellpose_own")  # Cellpose's training folders: <id>.tif + <id>_masks.tif
    for sid in ("a", "b"):
        tifffile.imwrite(own / f"{sid}.tif", image)
        tifffile.imwrite(own / f"{sid}_masks.tif", labels)
    with pytest.raises(DataError, match=r"found Cellpose-style <name>_masks.tif files: pass --mask_ext .tif"):
        list_ids(str(own))
    assert list_ids(str(own), img_ext=".tif", mask_ext=".tif") == ["a", "b"]
    os.rename(cellpose / "b_masks.png", cellpose / "B_masks.png")  # the hint names the label file, not an image
    with pytest.raises(DataError, match=r"1 image has no <id>_masks label image in .*: b; .* \(found B_masks.png: "):
        list_ids(str(cellpose))
    os.rename(own / "b_masks.tif", own / "b_Masks.tif")  # images without _img: b.tif itself is no twin
    with pytest.raises(DataError, match=r"no <id>_masks label image in .*: b, b_Masks; .*named like the image "
                                        r"\(found b_Masks.tif: "):  # (b_Masks.tif reads as an image of its own)
        list_ids(str(own), img_ext=".tif", mask_ext=".tif")


def test_images_of_another_extension_are_named(tmp_path):
    """train.py notes the images its --img_ext leaves out (a .tif or .PNG among .png files)."""
    make_layout(tmp_path, ["a", "b"])
    assert images_left_out(str(tmp_path), ".png") == ""
    for name in ("c.tif", "d.PNG", ".DS_Store"):
        (tmp_path / "images" / name).write_bytes(b"")
    assert images_left_out(str(tmp_path), ".png").startswith("note: 2 files are in ") and \
        images_left_out(str(tmp_path), ".png").endswith("without the extension .png and left out: c.tif, d.PNG "
                                                        "(one --img_ext for all images)")
    assert list_ids(str(tmp_path)) == ["a", "b"]


def write_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_binary_mask_given_as_a_label_image_is_refused(tmp_path):
    """A 0/255 mask saved where label images go (masks/<id>.png without the class folder 0/) would be one nucleus
    per image; one object alone may hold one value."""
    binary = np.zeros((24, 24), np.uint8)
    binary[2:6, 2:6] = binary[12:18, 10:16] = 255
    with pytest.raises(DataError, match=r"m.png gives one value \(255\) to several separate objects.*masks/0/"):
        read_label_image(write_image(tmp_path / "m.png", binary))
    binary[12:18, 10:16] = 0
    assert read_label_image(write_image(tmp_path / "one.png", binary)).max() == 255


def grid_labels(count, side=3, gap=2):
    """A label image int32 of ``count`` square nuclei ``side`` px wide, ids 1..count, ``gap`` px apart."""
    step = side + gap
    columns = 16
    labels = np.zeros((step * (-(-count // columns)) + gap, step * columns + gap), np.int32)
    for i in range(count):
        row, col = divmod(i, columns)
        labels[gap + row * step:gap + row * step + side, gap + col * step:gap + col * step + side] = i + 1
    return labels


@pytest.mark.parametrize("saved", ["wrapped", "clipped"])
def test_label_images_whose_ids_wrapped_or_clipped_at_their_bits_are_refused(tmp_path, saved):
    """A tool that saves 300 ids in 8 bits wraps them (256 -> 0, 257 -> 1) or clips them at 255: nuclei vanish or
    share an id, and a perfect prediction of them scored 0.61 (wrapped) or 0.84 (clipped) without a word."""
    labels = grid_labels(300)
    stored = labels % 256 if saved == "wrapped" else np.minimum(labels, 255)
    with pytest.raises(DataError, match=r"l.png is 8-bit, uses the id 255 and gives one id to several separate "
                                        r"objects.*16-bit"):
        read_label_image(write_image(tmp_path / "l.png", stored.astype(np.uint8)))
    np.testing.assert_array_equal(read_label_image(write_image(tmp_path / "l16.png", labels.astype(np.uint16))),
                                  labels)
    clipped16 = grid_labels(10).astype(np.uint16)
    clipped16[clipped16 >= 9] = 65535  # as ids 65535 and 65536 clipped in 16 bits
    with pytest.raises(DataError, match=r"l16c.png is 16-bit, uses the id 65535 .*e\.g\. 65535.*32-bit TIFF"):
        read_label_image(write_image(tmp_path / "l16c.png", clipped16))
    full = grid_labels(255)  # 255 nuclei fit 8 bits
    np.testing.assert_array_equal(read_label_image(write_image(tmp_path / "l255.png", full.astype(np.uint8))), full)
    # 255 nuclei of which one is cut in two (a thin one, resized): neither 255 (clipped) nor the lowest id (wrapped)
    # is shared, so the ids are read as they are, the split one left to the notes on such ids
    cut = grid_labels(255, side=8)
    rows = np.flatnonzero((cut == 7).any(axis=1))
    cut[rows[3]][cut[rows[3]] == 7] = 0
    assert image_files.multi_object_ids(cut).tolist() == [7]  # the case meant
    np.testing.assert_array_equal(read_label_image(write_image(tmp_path / "cut.png", cut.astype(np.uint8))), cut)


def test_multi_object_ids_are_the_ids_of_several_separate_objects():
    """Parts under a quarter of the median nucleus (a stray speck beside a DSB2018 nucleus) do not count."""
    labels = grid_labels(40, side=4, gap=3)
    labels[labels == 7] = 3  # 3 now marks two squares
    labels[labels == 30] = 19
    labels[3:7, 4:6] = 0  # id 1 cut in two halves by the background
    labels[labels == 12] = 0
    labels[4:7, 81] = 11  # a speck of 3 pixels beside 11, where 12 was
    median = np.median([np.count_nonzero(labels == v) for v in np.unique(labels)[1:]])
    expected = []
    for v in np.unique(labels)[1:]:
        parts, count = ndi.label(labels == v, np.ones((3, 3)))
        if np.count_nonzero(np.bincount(parts.ravel())[1:] >= median / 4) > 1:
            expected.append(v)
    assert 11 not in expected and len(expected) == 3  # the checks below must see some of each
    np.testing.assert_array_equal(image_files.multi_object_ids(labels), expected)


def test_a_note_names_label_images_that_give_one_id_to_separate_objects(tmp_path):
    """Two nuclei given one id are one nucleus to the DSB2018 score: a perfect prediction of them scored 0.375."""
    root = tmp_path / "set"
    for i in range(3):
        labels = grid_labels(8, side=6)
        if i == 1:
            labels[labels == 8] = 2
        write_image(write_dir(root / "images") / f"{i}.png", (labels > 0).astype(np.uint8) * 200)
        write_image(write_dir(root / "labels") / f"{i}.png", labels.astype(np.uint16))
    data = Dataset(["0", "1", "2"], str(root))
    note = dataset.multi_object_ids_note(data, "these")
    assert note.startswith("note: in 1 of 3 of these an id marks several separate objects") and \
        f"{root / 'labels' / '1.png'}: 1 id, e.g. 2)" in note
    assert dataset.multi_object_ids_note(Dataset(["0", "2"], str(root)), "these") == ""
    # one id split among more than a hundred (as resizing splits a few thin nuclei of DSB2018's 96x96 labels): none
    many = grid_labels(120, side=6)
    many[many == 120] = 2
    write_image(root / "labels" / "1.png", many.astype(np.uint16))
    write_image(root / "images" / "1.png", (many > 0).astype(np.uint8) * 200)
    assert len(image_files.multi_object_ids(many)) == 1
    assert dataset.multi_object_ids_note(Dataset(["0", "1", "2"], str(root)), "these") == ""


def test_a_tiff_thumbnail_stored_before_the_image_is_passed_over(tmp_path):
    """A reduced-resolution page (NewSubfileType 1) before the image is tifffile's first series: it was read as the
    image, and a mask saved so at its size, which then matched."""
    image = np.random.default_rng(0).integers(0, 4096, (64, 48), dtype=np.uint16)
    mask = np.zeros((64, 48), np.uint8)
    mask[10:30, 5:25] = 255
    for name, full in (("i.tif", image), ("m.tif", mask)):
        with tifffile.TiffWriter(tmp_path / name) as tif:
            tif.write(full[::4, ::4], subfiletype=1)
            tif.write(full)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "i.tif"))[:, :, 0], image)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m.tif")), mask // 255)
    assert image_files.tiff_header(str(tmp_path / "i.tif")).series == 1


def test_a_soft_edged_or_one_colour_mask_is_refused_with_its_likely_cause(tmp_path):
    """A drawing tool's anti-aliasing leaves values 1-254 along every edge: `> 0` would fatten each nucleus by its
    soft rim, and no threshold is the one the user meant."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    soft = cv2.GaussianBlur(mask, (5, 5), 1)
    assert len(np.unique(soft)) > 3
    with pytest.raises(DataError, match=r"soft.png has values \{0, .*anti-aliasing.*threshold it at half"):
        read_mask(write_image(tmp_path / "soft.png", soft))
    with pytest.raises(DataError, match=r"class.png has values \{0, 128\}.*a class's colour\? save the nuclei as "):
        read_mask(write_image(tmp_path / "class.png", mask // 255 * 128))
    # several values none of which is the full one: ids or colours, not a soft rim around nuclei drawn at 255
    labels = np.zeros((32, 32), np.uint8)
    labels[2:8, 2:8], labels[10:16, 10:16], labels[20:30, 20:30] = 1, 2, 3
    colours = np.zeros((32, 32, 3), np.uint8)
    colours[4:12, 4:12], colours[16:28, 16:28] = (0, 0, 255), (0, 255, 0)  # red nuclei, green cytoplasm
    for name, drawn, values in (("labels.png", labels, "0, 1, 2, 3"), ("colours.png", colours, "0, 76, 150")):
        with pytest.raises(DataError, match=rf"{name} has values \{{{values}\}}.*\(a label image\? put label images "
                                            r"in labels/; a colour mask of several classes\?") as refused:
            read_mask(write_image(tmp_path / name, drawn))
        assert "soft edges" not in str(refused.value)


def test_tiff_images_channels_first_and_stacks(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "chw.tif", rgb, photometric="minisblack")
    assert decode_image(str(tmp_path / "chw.tif")).shape == (20, 30, 3)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "chw.tif"))[..., 0], rgb[0])  # RGB order kept
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((7, 20, 30), np.uint16))
    with pytest.raises(DataError, match="stack.tif is a stack of 7 planes.*one plane per file"):
        decode_image(str(tmp_path / "stack.tif"))


@pytest.mark.parametrize("shape, axes, layout", [
    ((20, 30), "YX", ([0, 1], "", "")),
    ((20, 30, 3), "YXS", ([0, 1, 2], "", "S")),
    ((3, 20, 30), "QYX", ([1, 2, 0], "", "Q")),  # no axis metadata: 3 leading pages are colour channels
    ((7, 20, 30), "QYX", ([0, 1, 2], "Q", "")),
    ((3, 20, 30), "TYX", ([0, 1, 2], "T", "")),  # recorded axes: 3 time points are planes
    ((2, 1, 4, 20, 30), "TCZYX", ([0, 2, 3, 4], "TZ", "")),  # an axis of one element is left out
    ((5, 2, 20, 30), "ZCYX", ([0, 2, 3, 1], "Z", "C")),
    ((5, 20, 30, 3), "QYXS", ([0, 1, 2, 3], "Q", "S")),
])
def test_tiff_layout_finds_planes_and_channels(shape, axes, layout):
    assert image_files.tiff_layout(shape, axes) == layout


def test_tiff_layout_refuses_two_channel_axes():
    with pytest.raises(ValueError, match="two channel axes"):
        image_files.tiff_layout((4, 2, 20, 30, 3), "ZCYXS")


def test_a_float_tiff_with_nan_is_named_not_read_as_an_empty_image(tmp_path):
    image = np.random.default_rng(0).uniform(0, 100, (20, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "fine.tif", image)
    np.testing.assert_array_equal(image_files.decode_image(tmp_path / "fine.tif")[..., 0], image)
    image[:3] = np.nan  # the margin a registration leaves
    tifffile.imwrite(tmp_path / "registered.tif", image)
    with pytest.raises(DataError, match=r"registered.tif holds NaN or infinite values.*Remove NaNs"):
        image_files.decode_image(tmp_path / "registered.tif")
    # a NaN margin in one channel only: the other channel, picked by predict.py --channel, reads as it is
    channels = np.stack([np.nan_to_num(image), image])[None].transpose(0, 2, 3, 1)  # [1, H, W, 2]
    assert np.isfinite(image_files.select_channel(channels, 0, "two.tif")).all()
    with pytest.raises(DataError, match="two.tif holds NaN"):
        image_files.select_channel(channels, 1, "two.tif")


def test_tiff_stacks_read_as_planes(tmp_path):
    rng = np.random.default_rng(0)
    movie = rng.integers(0, 60000, (2, 3, 20, 30), dtype=np.uint16)  # T, Z, Y, X
    tifffile.imwrite(tmp_path / "movie.tif", movie, imagej=True, metadata={"axes": "TZYX"})
    planes, plane_axes = image_files.decode_planes(tmp_path / "movie.tif")
    assert plane_axes == "TZ" and image_files.tiff_header(str(tmp_path / "movie.tif"))[:2] == ("TZ", "")
    np.testing.assert_array_equal(planes[..., 0], movie.reshape(6, 20, 30))
    colour = rng.integers(0, 255, (4, 20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", colour)
    planes, plane_axes = image_files.decode_planes(tmp_path / "colour.tif")
    np.testing.assert_array_equal(planes, colour)  # RGB order kept
    assert image_files.tiff_header(str(tmp_path / "broken.tif")) == image_files.TiffHeader()
    two = rng.integers(0, 60000, (4, 2, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", two, ome=True, metadata={"axes": "ZCYX"})
    planes, plane_axes = image_files.decode_planes(tmp_path / "two.tif")
    assert plane_axes == "Z" and planes.shape == (4, 20, 30, 2)
    np.testing.assert_array_equal(image_files.select_channel(planes, 1, "two.tif")[..., 0], two[:, 1])
    with pytest.raises(DataError, match="two.tif has 2 channels.*--channel \\(0 to 1\\)"):
        image_files.select_channel(planes, None, "two.tif")
    with pytest.raises(DataError, match="--channel 2: image two.tif has 2 channels"):
        image_files.select_channel(planes, 2, "two.tif")
    tifffile.imwrite(tmp_path / "two2d.tif", two[0], ome=True, metadata={"axes": "CYX"})
    with pytest.raises(DataError, match="two2d.tif has 2 channels; training and val.py read grey or RGB"):
        decode_image(str(tmp_path / "two2d.tif"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grey_in_three_channels_reads_as_grey(dtype):
    """A grey image stored as one channel or as three equal ones gives the network the same values (the percentiles
    of three copies would differ slightly)."""
    grey = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (37, 29, 1)).astype(dtype)
    for normalization in image_files.NORMALIZATIONS:
        for input_channels in (1, 3):
            np.testing.assert_array_equal(image_files.image_to_float(grey, input_channels, normalization),
                                          image_files.image_to_float(np.repeat(grey, 3, axis=2), input_channels,
                                                                     normalization))


def test_nucleus_diameter_from_the_labels_or_else_the_mask_components(tmp_path):
    ids = make_synthetic(tmp_path)
    root = tmp_path / "inputs" / "tiny"
    labels = [image_files.read_label_image(str(root / "labels" / f"{i}.png")) for i in ids[:4]]
    expected = np.median([r.equivalent_diameter_area for lab in labels for r in regionprops(lab)])
    assert nucleus_diameter(str(root), ids[:4]) == pytest.approx(expected)
    masks_only = make_layout(tmp_path / "squares", ["a", "b"], size=16)  # one 6 x 8 square each
    assert nucleus_diameter(masks_only, ["a", "b"]) == pytest.approx(2 * np.sqrt(48 / np.pi))


def test_nucleus_diameter_shows_a_bar_for_many_samples(tmp_path, monkeypatch):
    """Measuring the nuclei reads every label image, silently before (about 20 s for 3000 of 1000 x 1000 at the
    start of a crop run's training): from 200 samples on, a bar shows it."""
    ids = make_synthetic(tmp_path)
    bars = []
    monkeypatch.setattr(layouts, "progress_bar", lambda items, **kwargs: bars.append(kwargs) or items)
    for many in (False, True):
        nucleus_diameter(str(tmp_path / "inputs" / "tiny"), ids * (20 if many else 1))
    assert [(bar["desc"], bar["disable"]) for bar in bars] == [("nucleus sizes", True), ("nucleus sizes", False)]


def test_an_indexed_png_mask_or_label_image_is_read_as_its_palette_means(tmp_path):
    """labelme, VOC and CVAT save label images as indexed PNGs, ImageJ a binary mask with an inverting LUT (255 =
    nucleus, shown black) too: the indices are the ids and the mask, the palette only colours them on screen. A PNG
    optimiser's palette, grey in any order, holds the values instead."""
    labels = np.zeros((16, 16), np.uint8)
    labels[2:6, 2:6], labels[9:14, 9:14] = 1, 2
    picture = Image.fromarray(labels, mode="P")
    picture.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    picture.save(tmp_path / "labels.png")
    np.testing.assert_array_equal(read_label_image(str(tmp_path / "labels.png")), labels)
    inverting = [v for i in range(256) for v in (255 - i,) * 3]
    picture = Image.fromarray(labels * 127, mode="P")  # ids 127 and 254: the inverting LUT shows them 128 and 1
    picture.putpalette(inverting)
    picture.save(tmp_path / "inverted_labels.png")
    np.testing.assert_array_equal(read_label_image(str(tmp_path / "inverted_labels.png")), labels * 127)
    picture = Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8), mode="P")
    picture.putpalette(inverting)
    note = PngImagePlugin.PngInfo()
    note.add_text("Software", "ImageJ")
    picture.save(tmp_path / "mask.png", pnginfo=note)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "mask.png")), labels > 0)
    picture = Image.fromarray((labels == 0).astype(np.uint8), mode="P")  # an optimiser's order: white first
    picture.putpalette([255, 255, 255, 0, 0, 0])
    picture.save(tmp_path / "optimised.png")
    np.testing.assert_array_equal(read_mask(str(tmp_path / "optimised.png")), labels > 0)  # as shown


def test_an_indexed_png_with_a_bad_text_checksum_is_read_as_libpng_reads_it(tmp_path):
    """libpng, and so OpenCV, skips an ancillary chunk whose checksum is wrong; PIL, which reads the palette,
    refused the whole file: predict.py left out a palette image it used to predict, and an ImageJ mask was refused."""
    def damaged(picture, name):
        note = PngImagePlugin.PngInfo()
        note.add_text("Software", "ImageJ")
        picture.save(tmp_path / name, pnginfo=note)
        data = bytearray((tmp_path / name).read_bytes())
        data[data.index(b"tEXt") + 4] ^= 0xFF
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(colours.ravel().tolist())
    np.testing.assert_array_equal(decode_image(damaged(picture, "photo.png")), colours[indices])
    mask = np.zeros((16, 16), bool)
    mask[3:9, 4:12] = True
    picture = Image.fromarray(mask.astype(np.uint8) * 255, mode="P")
    picture.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # ImageJ's inverting LUT
    np.testing.assert_array_equal(read_mask(damaged(picture, "mask.png")), mask)


def test_an_indexed_png_whose_pixels_pass_its_palette_is_named(tmp_path):
    """A 4-bit palette PNG of two colours whose nuclei use index 3: libpng shows them black (an empty mask), and
    indexing the palette with them was an IndexError traceback."""
    mask = np.zeros((16, 16), np.uint8)
    mask[3:8, 3:8] = 3

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = b"".join(b"\0" + bytes((a << 4) | b for a, b in zip(row[::2], row[1::2])) for row in mask.tolist())
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", bytes([0, 0, 0, 16] * 2 + [4, 3, 0, 0, 0]))
                                     + chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])) +
                                     chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    for read, what in ((read_mask, "mask"), (read_label_image, "label image")):
        with pytest.raises(DataError, match=f"cannot read {what} .*m.png: its pixels use palette entry 3 of a "
                                            "palette of 2 colours"):
            read(str(tmp_path / "m.png"))


@pytest.mark.parametrize("lut", [(0, 0, 255), (0, 255, 0), (0, 255, 255)])  # Fiji's Blue, Green, Cyan
def test_an_8_bit_png_image_saved_with_a_one_colour_lut_is_read_as_its_intensities(tmp_path, lut):
    """Fiji saves an 8-bit image shown with a one-colour LUT (a DAPI channel in Blue) as an indexed PNG; its indices
    are what the microscope measured, and were read as the LUT's colours (the bundled model then found a quarter of
    the nuclei). A palette of other colours (a quantised photograph) stays its colours."""
    rng = np.random.default_rng(0)
    intensities = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    picture = Image.fromarray(intensities, mode="P")
    picture.putpalette([round(i * c / 255) for i in range(256) for c in lut])
    picture.save(tmp_path / "dapi.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "dapi.png")), intensities[:, :, None])
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    picture.putpalette(colours.ravel().tolist())
    picture.save(tmp_path / "photo.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "photo.png")), colours[intensities])


def test_an_image_whose_header_claims_gigapixels_is_named_not_decoded(tmp_path, monkeypatch):
    """A decompression bomb, or a damaged header: a PNG claiming more pixels than OpenCV decodes was a cv2.error
    traceback; a TIFF claiming more bytes than the memory had tifffile try to allocate them all (no limit of its
    own). Both are now refused from the header, before any pixel is read."""
    side = 1 << 16  # 2^32 pixels, over OpenCV's 2^30
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((16, 16), np.uint8))
    data = bytearray((tmp_path / "small.png").read_bytes())
    data[16:24] = side.to_bytes(4, "big") * 2  # IHDR's width and height, then its CRC
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    tifffile.imwrite(tmp_path / "bomb.tif", np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(tmp_path / "bomb.tif", mode="r+") as tif:
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[tag].overwrite(side)
    monkeypatch.setattr(image_files, "ram", lambda: (2**32, 2**31))  # 2 GiB available: 4 GiB claimed
    for name in ("bomb.png", "bomb.tif"):
        with pytest.raises(DataError, match=rf"{name}: .*more than.*decompression bomb"):
            decode_image(tmp_path / name)


def test_a_tiff_is_read_when_its_pixels_fit_the_memory_available(tmp_path, monkeypatch):
    """The limit for a TIFF is the memory, not OpenCV's pixel count: a whole-slide scan of more than 2^30 pixels
    that fits is read (it was, before that limit came in), one that does not is named."""
    tifffile.imwrite(tmp_path / "scan.tif", np.arange(40 * 50, dtype=np.uint16).reshape(40, 50))
    monkeypatch.setattr(image_files, "ram", lambda: (2**40, 40 * 50 * 2))
    assert decode_image(tmp_path / "scan.tif").shape == (40, 50, 1)
    monkeypatch.setattr(image_files, "ram", lambda: (2**40, 40 * 50 * 2 - 1))
    with pytest.raises(DataError, match=r"scan.tif: its header claims 0.0 GiB of pixels \(40, 50\), more than"):
        decode_image(tmp_path / "scan.tif")


def test_decoded_size_reads_from_the_header_what_decoding_gives(tmp_path):
    """image_files.decoded_size (which sizes the training cache without decoding) against decode_image's array, for
    every kind of file it reads from a header; a palette PNG counts 3 channels, the most it can decode to."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for name, array in {"g8.png": grey, "g16.png": grey.astype(np.uint16) * 257, "c16.png": colour.astype(np.uint16),
                        "rgba.png": np.dstack([colour, grey]), "g.jpg": grey, "c.jpg": colour, "c.bmp": colour}.items():
        cv2.imwrite(str(tmp_path / name), array)
    Image.fromarray(grey).convert("LA").save(tmp_path / "ga.png")
    Image.fromarray(colour).convert("P").save(tmp_path / "palette.png")
    tifffile.imwrite(tmp_path / "g16.tif", grey.astype(np.uint16))
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([colour, grey]), photometric="rgb")
    tifffile.imwrite(tmp_path / "f32.tif", grey.astype(np.float32))
    tifffile.imwrite(tmp_path / "channels.tif", np.stack([grey] * 3), imagej=True, metadata={"axes": "CYX"})
    (tmp_path / "named.png").write_bytes((tmp_path / "c.jpg").read_bytes())  # a JPEG named .png: PIL's header
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's photo: stored 37x53, shown (and decoded) turned a quarter, 53x37
    Image.fromarray(colour).save(tmp_path / "turned.jpg", exif=exif)
    for path in sorted(tmp_path.iterdir()):
        image = image_files.decode_image(str(path))
        assert image_files.decoded_size(str(path)) == (*image.shape, image.dtype), path.name


def test_decoded_size_of_files_pil_reads_otherwise_than_opencv(tmp_path, monkeypatch):
    """decoded_size against decode_image where PIL's header told otherwise: a 16-bit PGM (--img_ext .pgm; PIL said
    8-bit, so the note on mixed bit depths was not said), a palette BMP of colours (PIL's one channel, OpenCV's RGB),
    a GIF, and a phone's JPEG named .png (decode_image's flags for a PNG leave its EXIF turn alone); and a JPEG
    larger than PIL's pixel limit is sized from its header (Image.open refused it, and the scan was decoded)."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g16.pgm"), colour[..., 0].astype(np.uint16) * 257)
    Image.fromarray(colour).convert("P").save(tmp_path / "palette.bmp")
    Image.fromarray(colour).save(tmp_path / "c.gif")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(colour).save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "turned_named.png").write_bytes((tmp_path / "turned.jpg").read_bytes())
    for name in ("g16.pgm", "palette.bmp", "c.gif", "turned_named.png"):
        image = decode_image(str(tmp_path / name))
        assert image_files.decoded_size(str(tmp_path / name)) == (*image.shape, image.dtype), name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 37x53 is then over twice the limit, as a 20k^2 scan is
    monkeypatch.setattr(image_files, "decode_image", lambda path: pytest.fail(f"{path} decoded"))
    assert image_files.decoded_size(str(tmp_path / "turned.jpg")) == (53, 37, 3, np.uint8)
