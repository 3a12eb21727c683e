"""Do a split's validation (and test) images share content with its training images? Tiles cut from one slide with
an overlap, or one field saved twice at another contrast, put the same nuclei on both sides of a split made by
image, and the validation score then overstates the run.

    python bench/split_overlap.py --dataset inputs/dsb2018_full --split pretrained/nuclei/split.csv
    python bench/split_overlap.py --dataset inputs/my_tiles --split models/mine/split.csv

Two checks of every held-out image against every training image: a patch of at least 32x32 pixels identical in
both, anywhere in either (each 32x32 window of the held-out images is hashed, the training images' windows on an
8-pixel grid are looked up, and each hit is checked pixel for pixel over the whole overlap at its offset: an overlap
of 39x39 or more is always found; windows of one value, such as an empty background, are left out); and the same
field at another contrast or size (evaluation.same_field). Prints each image that shares content,
then the count per part. Keep the tiles of one slide in one part (train.py --split_file).

DSB2018's stage1_train under the seed's split (the bundled model's): none of the 134 validation images (20 s on 2
CPUs). A folder of links to stage1_train and stage1_test, the latter as 'test': 3 of the 65 test images are training
fields at another contrast (4be73d68, 697a05c6, 7f4cbe0b; a fourth, 0a849e0e, is the validation image 7c318172).
"""
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  (after the path set-up above)

from layouts import find_layout  # noqa: E402
from evaluation import FIELD_PRINT_MATCH, field_print, same_field  # noqa: E402
from image_files import decode_image  # noqa: E402
from splits import read_split, split_ids  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402

PATCH, GRID = 32, 8
# odd multipliers of a polynomial hash over the rows and columns of a window, modulo 2**64 (numpy's uint64 wraps)
ROW_BASE, COLUMN_BASE, BYTE_BASE = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(257)


def window_hashes(image):
    """A decoded image [H, W, C] (any type) -> (hash of each PATCH x PATCH window [H-31, W-31] uint64, whether the
    window holds more than one value [H-31, W-31] bool); windows are named by their top left pixel."""
    h, w = image.shape[:2]
    pixel = np.zeros((h, w), np.uint64)
    for byte in np.moveaxis(np.ascontiguousarray(image).view(np.uint8).reshape(h, w, -1), 2, 0):
        pixel = pixel * BYTE_BASE + byte + np.uint64(1)
    rows = np.zeros((h, w - PATCH + 1), np.uint64)
    for dx in range(PATCH):
        rows = rows * COLUMN_BASE + pixel[:, dx:dx + w - PATCH + 1]
    windows = np.zeros((h - PATCH + 1, w - PATCH + 1), np.uint64)
    for dy in range(PATCH):
        windows = windows * ROW_BASE + rows[dy:dy + h - PATCH + 1]
    grey = image.astype(np.float64).mean(2)
    varied = np.zeros(grey.shape, bool)  # a pixel unlike its right or lower neighbour
    varied[:, :-1] |= grey[:, 1:] != grey[:, :-1]
    varied[:-1] |= grey[1:] != grey[:-1]
    counts = np.pad(varied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inner = PATCH - 1  # the window's last row and column compare with pixels outside it
    changes = counts[inner:, inner:] - counts[:-inner, inner:] - counts[inner:, :-inner] + counts[:-inner, :-inner]
    return windows, changes[:h - PATCH + 1, :w - PATCH + 1] > 0


def identical_overlap(a, b, dy, dx):
    """(rows, columns) of the overlap of ``a`` and ``b`` [H, W, C] where a[y, x] is b[y + dy, x + dx], or None
    where its pixels differ anywhere."""
    y0, x0 = max(0, -dy), max(0, -dx)
    y1, x1 = min(a.shape[0], b.shape[0] - dy), min(a.shape[1], b.shape[1] - dx)
    same = np.array_equal(a[y0:y1, x0:x1], b[y0 + dy:y1 + dy, x0 + dx:x1 + dx])
    return (y1 - y0, x1 - x0) if same else None


def shared_content(images, held_out, trained):
    """{held-out id: 'what it shares with which training image'} for the ids of ``held_out`` that share content
    with an id of ``trained`` (module docstring); ``images``: id -> decoded image [H, W, C]."""
    found = {}
    table, owners = [], []
    for k, i in enumerate(held_out):
        if min(images[i].shape[:2]) >= PATCH:
            windows, varied = window_hashes(images[i])
            ys, xs = np.nonzero(varied)
            table.append(windows[ys, xs])
            owners.append(np.stack([np.full(len(ys), k), ys, xs], 1).astype(np.int32))
    if table:
        table, owners = np.concatenate(table), np.concatenate(owners)
        order = np.argsort(table)
        table, owners = table[order], owners[order]
    for j in trained:
        if not len(table) or min(images[j].shape[:2]) < PATCH:
            continue
        windows, varied = window_hashes(images[j])
        windows, varied = windows[::GRID, ::GRID], varied[::GRID, ::GRID]
        ys, xs = np.nonzero(varied)
        lo, hi = np.searchsorted(table, windows[ys, xs], "left"), np.searchsorted(table, windows[ys, xs], "right")
        offsets = Counter((int(owners[m, 0]), int(ys[n] * GRID - owners[m, 1]), int(xs[n] * GRID - owners[m, 2]))
                          for n in np.nonzero(hi > lo)[0] for m in range(lo[n], hi[n]))
        for (k, dy, dx), _ in offsets.most_common():
            i = held_out[k]
            size = None if i in found else identical_overlap(images[i], images[j], dy, dx)
            if size:
                found[i] = f"{size[0]}x{size[1]} pixels identical with {j} (at offset {dy}, {dx} in it)"
    prints = {j: field_print(images[j]) for j in trained}
    for i in held_out:
        if i not in found:
            fingerprint = field_print(images[i])
            same = [j for j in trained if fingerprint @ prints[j] >= FIELD_PRINT_MATCH
                    and same_field(images[i], images[j])]
            if same:
                found[i] = f"the field of {same[0]} at another contrast or size"
    return found


def main(argv):
    p = ArgumentParser(prog="bench/split_overlap.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="the dataset folder the split is of, e.g. inputs/dsb2018_full")
    p.add_argument("--split", required=True, help="its split.csv, e.g. models/<name>/split.csv")
    p.add_argument("--img_ext", default=".png", help="image file extension")
    p.add_argument("--mask_ext", default=".png", help="mask file extension")
    args = p.parse_args(argv)
    if not os.path.isfile(args.split):
        raise UsageError(f"--split {args.split}: no such file; give a CSV with columns img_id,split")
    split = read_split(args.split, f"--split {args.split}")
    layout = find_layout(args.dataset, args.img_ext, args.mask_ext)
    missing = sorted(set(split["img_id"]) - layout.image_ids())
    if missing:
        raise UsageError(f"--split {args.split} names {len(missing)} ids without an image in {args.dataset}, e.g. "
                         f"{missing[0]}; give the dataset the split was made of")
    images = {i: decode_image(layout.image(i)) for i in split["img_id"]}
    trained = split_ids(split, "train")
    for part in ("val", "test"):
        held_out = split_ids(split, part)
        if held_out:
            found = shared_content(images, held_out, trained)
            for i in sorted(found):
                print(f"{part} {i}: {found[i]}")
            print(f"{len(found)} of the {len(held_out)} {part} images share content with training images")


if __name__ == "__main__":
    run_cli(main)
