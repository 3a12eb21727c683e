"""Convert Kaggle's raw DSB2018 stage1_train into the layout the training scripts read.

Raw layout (as unzipped from stage1_train.zip)::

    <src>/<id>/images/<id>.png    8-bit RGBA, RGB or grey image (16-bit ones are refused: see the README's "your
                                  own data" for a layout that reads them as they are)
    <src>/<id>/masks/*.png        one 0/255 (or 0/1) mask per nucleus, hidden files such as ._* skipped (or, with
                                  --masks_csv, none: Kaggle's stage1_test ships its ground truth as
                                  stage1_solution.csv, one run-length row per nucleus)

Output layout::

    <dst>/images/<id>.png         8-bit image, 3 channels (alpha dropped), or 1 for a grey image
    <dst>/masks/0/<id>.png        hard 0/255 semantic mask (union of the nuclei)
    <dst>/labels/<id>.png         16-bit instance labels: nucleus i (sorted mask-file order) has value i

Images are resized with INTER_LINEAR to ``--img_size`` squared (as the original pytorch-nested-unet did); the
semantic mask is resized with INTER_LINEAR and thresholded at 128 (hard 0/255, where the original kept soft
values); the labels are resized with INTER_NEAREST_EXACT (nearest-neighbour, pixel centres aligned with the
linear resize's), so a nucleus too small to survive the resize loses its number (the numbers are never reassigned).
``--img_size 0`` keeps every image at its original size.
A ``--src`` whose folder name holds ``test`` (stage1_test) goes to ``inputs/dsb2018_test_<img_size>`` or
``inputs/dsb2018_test_full``: a test set, scored with ``val.py --name <run> --dataset dsb2018_test_full``.

The output is built in a temporary folder beside the destination and renamed into place at the end, so an
interrupted run leaves nothing half-made; an existing destination is replaced only when the run succeeds.

Usage::

    python preprocess_dsb2018.py [--src inputs/data-science-bowl-2018/stage1_train] [--img_size 96]
                                 [--dst FOLDER] [--num_workers N] [--limit N]
"""
import multiprocessing
import os
import signal
import sys
import time

import cv2
import numpy as np
import pandas as pd

from files import atomic_imwrite, check_replaceable, folder_replaced_when_done, written_alone
from image_files import opencv_read, read_mask
from utils import (ArgumentParser, DataError, UsageError, check_utf8_names, integer, path_arg, progress_bar, run_cli,
                   usable_cpus)

DEFAULT_SRC = os.path.join("inputs", "data-science-bowl-2018", "stage1_train")
DOWNLOAD_HINT = (
    "download stage1_train.zip from https://www.kaggle.com/c/data-science-bowl-2018/data and unzip it to "
    "inputs/data-science-bowl-2018/stage1_train, or pass --src"
)


def default_dst(img_size, src=DEFAULT_SRC):
    """``inputs/dsb2018_<img_size>``, or ``inputs/dsb2018_full`` for ``img_size == 0``; ``dsb2018_test_...`` when
    the source folder's name holds 'test'."""
    prefix = "dsb2018_test" if "test" in os.path.basename(os.path.normpath(src)).lower() else "dsb2018"
    return os.path.join("inputs", f"{prefix}_full" if img_size == 0 else f"{prefix}_{img_size}")


def rle_decode(encoded, height, width):
    """Kaggle's run-length encoding -> bool [height, width]: 'start length ...' pairs, pixels numbered from 1 top to
    bottom, then left to right (column-major)."""
    words = str(encoded).split()
    values = np.asarray([int(w) for w in words if w.isdigit()], dtype=np.int64)  # not 'nan' (an empty cell), '-2'
    starts, lengths = values[0::2], values[1::2]
    well_formed = len(values) == len(words) and len(starts) == len(lengths) and (
        not len(values) or (starts.min() >= 1 and (starts + lengths).max() - 1 <= height * width))
    if not well_formed:
        raise DataError(f"a run-length mask of a {height}x{width} image is malformed: {str(encoded)[:60]}")
    flat = np.zeros(height * width, bool)
    for start, length in zip(starts - 1, lengths):
        flat[start:start + length] = True
    return flat.reshape(width, height).T


def csv_labels(csv_path, sid):
    """16-bit instance labels of image ``sid`` from a Kaggle solution CSV (ImageId, EncodedPixels, Height, Width):
    nucleus i (row order) has value i; None when the CSV has no row for it."""
    rows = _read_csv(csv_path).get(sid)
    if rows is None:
        return None
    height, width = int(rows["Height"].iloc[0]), int(rows["Width"].iloc[0])
    labels = np.zeros((height, width), np.uint16)
    for i, encoded in enumerate(rows["EncodedPixels"], start=1):
        labels[rle_decode(encoded, height, width)] = i
    return labels


_CSV = {}  # {(path, modification time, size): _read_csv's table}, for the last CSV read


def _read_csv(path):
    """The solution CSV's rows by image, {ImageId: DataFrame of its rows in file order}, read and grouped once per
    process: picking each image's rows out of the whole table made a large dataset's preprocessing quadratic. A CSV
    changed since (fixed, and given again in one Python session) is read again."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CSV:
        try:
            # an image named NA or null stays a name, not a missing id that would lose its rows
            table = pd.read_csv(path, dtype={"ImageId": str, "EncodedPixels": str}, keep_default_na=False,
                                na_values=[""])
        except (OSError, ValueError) as e:
            raise DataError(f"--masks_csv {path}: cannot read it ({str(e).splitlines()[0][:100]})") from None
        missing = {"ImageId", "EncodedPixels", "Height", "Width"} - set(table.columns)
        if missing:
            semicolons = len(table.columns) == 1 and ";" in str(table.columns[0])  # a spreadsheet's CSV
            raise DataError(f"--masks_csv {path} lacks the columns {', '.join(sorted(missing))} (Kaggle's "
                            "stage1_solution.csv has ImageId,EncodedPixels,Height,Width)" +
                            ("; its fields are separated by ';': save it with commas" if semicolons else ""))
        _CSV.clear()
        _CSV[key] = dict(tuple(table.groupby("ImageId", sort=False)))
    return _CSV[key]


def list_samples(src):
    """Sorted sample ids (sub-folders of ``src``); a DataError with the download hint if there are none."""
    if not os.path.isdir(src):
        raise DataError(f"--src {src} does not exist; {DOWNLOAD_HINT}")
    ids = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    check_utf8_names(os.path.join(src, i) for i in ids)
    if not ids:
        raise DataError(f"--src {src} contains no sample folders; {DOWNLOAD_HINT}")
    sample_id = os.path.basename(os.path.normpath(src))
    if "images" in ids and os.path.isfile(os.path.join(src, "images", sample_id + ".png")):
        raise DataError(f"--src {src} is one sample (it holds images/); give the folder that holds one folder per "
                        f"sample: --src {os.path.dirname(os.path.normpath(src)) or '.'}")
    return ids


def _read(path, flags):
    image = opencv_read(path, flags, "image")
    if image is None:
        raise DataError(f"cannot read {path}: " + ("not a readable PNG (corrupt or truncated download?)" if
                                                   os.access(path, os.R_OK) else "permission denied"))
    return image


def load_sample(sample_dir, masks_csv=None):
    """Read one raw sample: returns (image uint8 HxWx3 BGR, instance labels uint16 HxW, number of nuclei).

    The nuclei come from the mask PNGs, 0/255 or 0/1 (nucleus i in sorted file order has value i; a later mask owns
    any overlap; hidden files such as a Mac's ._ copies are skipped), or from the rows of ``masks_csv`` for this id
    (row order). The number counts the nuclei the labels hold."""
    sid = os.path.basename(os.path.normpath(sample_dir))
    image_path = os.path.join(sample_dir, "images", sid + ".png")
    if not os.path.isfile(image_path):
        raise DataError(f"sample folder {sample_dir} has no image: expected {image_path}")
    # RGBA -> BGR, alpha dropped; grey -> 3. Not turned by a PNG's EXIF orientation tag, as IMREAD_COLOR alone
    # does: read_mask reads the masks as stored, and a square image lay turned against its nuclei
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    image = _read(image_path, flags)
    if image.dtype != np.uint8:  # IMREAD_COLOR alone would divide 16-bit values by 256: a dim image turned black
        raise DataError(f"{image_path} is a {image.dtype.itemsize * 8}-bit image; this script converts the 8-bit "
                        "images of DSB2018's layout: put 16-bit images in the dataset layout of the README's \"your "
                        "own data\" (images/ and masks/0/), which reads them as they are")
    if masks_csv is not None:
        labels = csv_labels(masks_csv, sid)
        if labels is None:
            raise DataError(f"--masks_csv {masks_csv} has no row for image {sid}")
        if labels.shape != image.shape[:2]:
            raise DataError(f"--masks_csv {masks_csv} gives {sid} the size {labels.shape[1]}x{labels.shape[0]} but "
                            f"the image is {image.shape[1]}x{image.shape[0]}")
        return image, labels, count_nuclei(labels)
    mask_dir = os.path.join(sample_dir, "masks")
    mask_files = sorted(f for f in os.listdir(mask_dir) if f.lower().endswith(".png") and not f.startswith(".")) \
        if os.path.isdir(mask_dir) else []
    check_utf8_names(os.path.join(mask_dir, f) for f in mask_files)
    if not mask_files:
        raise DataError(f"sample folder {sample_dir} has no masks: expected PNG files in {mask_dir} (or pass "
                        "--masks_csv with the run-length CSV)")
    if len(mask_files) > 65535:
        raise DataError(f"sample folder {sample_dir} has {len(mask_files)} masks, more than a 16-bit label image "
                        "holds")
    labels = np.zeros(image.shape[:2], np.uint16)
    for i, f in enumerate(mask_files, start=1):
        path = os.path.join(mask_dir, f)
        m = read_mask(path)
        if m.shape != image.shape[:2]:
            raise DataError(f"{path} is {m.shape[1]}x{m.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}")
        labels[m > 0] = i
    return image, labels, count_nuclei(labels)


def count_nuclei(labels):
    """The number of distinct nuclei (values > 0) in ``labels`` [H, W]."""
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def convert_sample(sample_dir, out_dir, img_size, masks_csv=None):
    """Convert one sample into ``out_dir`` (images/, masks/0/, labels/); returns (id, nuclei its labels/ image
    holds, nuclei of the original): a nucleus narrower than a pixel at ``img_size`` has none left."""
    sid = os.path.basename(os.path.normpath(sample_dir))
    image, labels, count = load_sample(sample_dir, masks_csv)
    union = np.where(labels > 0, 255, 0).astype(np.uint8)
    if img_size:
        size = (img_size, img_size)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        union = cv2.resize(union, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST_EXACT)
    mask = np.where(union >= 128, 255, 0).astype(np.uint8)
    if (image == image[:, :, :1]).all():
        image = image[:, :, 0]  # grey: one channel is half the file, and reads back as the same three channels
    atomic_imwrite(os.path.join(out_dir, "images", sid + ".png"), image)
    atomic_imwrite(os.path.join(out_dir, "masks", "0", sid + ".png"), mask)
    atomic_imwrite(os.path.join(out_dir, "labels", sid + ".png"), labels)
    return sid, count_nuclei(labels), count


class _Job:
    """Picklable ``convert_sample`` with the source and destination fixed, for Pool.imap."""

    def __init__(self, src, out_dir, img_size, masks_csv=None):
        self.src, self.out_dir, self.img_size, self.masks_csv = src, out_dir, img_size, masks_csv

    def __call__(self, sid):
        return convert_sample(os.path.join(self.src, sid), self.out_dir, self.img_size, self.masks_csv)


def _init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, in the parent
    cv2.setNumThreads(1)


def parse_args(argv=None):
    p = ArgumentParser(
        prog="preprocess_dsb2018.py",
        description="Convert Kaggle's raw DSB2018 stage1_train (or stage1_test) into images/, masks/0/ and labels/.")
    p.add_argument("--src", type=path_arg, default=DEFAULT_SRC,
                   help="raw stage1_train folder (one sub-folder per sample)")
    p.add_argument("--img_size", type=integer, default=96, help="output height and width; 0 keeps the original size")
    p.add_argument("--dst", type=path_arg, default=None,
                   help="output folder (default inputs/dsb2018_<img_size> or inputs/dsb2018_full; "
                   "dsb2018_test_... for a --src named stage1_test)")
    p.add_argument("--masks_csv", type=path_arg, default=None,
                   help="read the nuclei from this run-length CSV (Kaggle's stage1_solution.csv: ImageId, "
                        "EncodedPixels, Height, Width) instead of the masks/ folders")
    p.add_argument("--num_workers", type=integer, default=usable_cpus(), help="worker processes")
    p.add_argument("--limit", type=integer, default=None, help="only convert the first N samples (sorted ids)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.img_size < 0:
        raise UsageError(f"--img_size must be 0 (keep the original size) or a positive size, got {args.img_size}")
    if args.num_workers < 1:
        raise UsageError(f"--num_workers must be at least 1, got {args.num_workers}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    dst = args.dst or default_dst(args.img_size, args.src)
    if args.masks_csv is not None and not os.path.isfile(args.masks_csv):
        raise UsageError(f"--masks_csv {args.masks_csv}: no such file")
    check_replaceable(dst, "--dst")
    ids = list_samples(args.src)
    if args.limit is not None:
        ids = ids[: args.limit]

    start = time.time()
    pool = None
    # One process at a time writes a folder: the one that ended last would replace the other's dataset
    with written_alone(dst, "--dst"), folder_replaced_when_done(dst) as tmp:
        try:
            for sub in ("images", os.path.join("masks", "0"), "labels"):
                os.makedirs(os.path.join(tmp, sub))
            job = _Job(args.src, tmp, args.img_size, args.masks_csv)
            workers = min(args.num_workers, len(ids))
            if workers > 1:
                # spawn, not fork: fork can deadlock in a threaded parent
                pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
                results = pool.imap(job, ids, chunksize=4)
            else:
                results = map(job, ids)
            nuclei = original = 0
            for _, kept, n in progress_bar(results, total=len(ids), desc="dsb2018", unit="sample", leave=False):
                nuclei, original = nuclei + kept, original + n
            if pool is not None:
                pool.close()
                pool.join()
        except BaseException:
            if pool is not None:
                pool.terminate()
                pool.join()
            raise
    size = "original size" if args.img_size == 0 else f"{args.img_size}x{args.img_size}"
    lost = f"; {original - nuclei} of the {original} nuclei were too small to keep a pixel" if original > nuclei else ""
    print(f"wrote {len(ids)} samples ({nuclei} nuclei, {size}{lost}) to {dst} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
