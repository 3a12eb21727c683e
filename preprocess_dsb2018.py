"""Convert Kaggle's raw DSB2018 stage1_train into the layout the training scripts read.

Raw layout (as unzipped from stage1_train.zip)::

    <src>/<id>/images/<id>.png    RGBA image
    <src>/<id>/masks/*.png        one 0/255 mask per nucleus

Output layout::

    <dst>/images/<id>.png         3-channel 8-bit image (alpha dropped; grey images stay 3-channel)
    <dst>/masks/0/<id>.png        hard 0/255 semantic mask (union of the nuclei)
    <dst>/labels/<id>.png         16-bit instance labels: nucleus i (sorted mask-file order) has value i

Images are resized with INTER_LINEAR to ``--img_size`` squared (as the original pytorch-nested-unet did); the
semantic mask is resized with INTER_LINEAR and thresholded at 128 (hard 0/255, where the original kept soft
values); the labels are resized with INTER_NEAREST, so a nucleus too small to survive the resize loses its
number (the numbers are never reassigned). ``--img_size 0`` keeps every image at its original size.

The output is built in a temporary folder beside the destination and renamed into place at the end, so an
interrupted run leaves nothing half-made; an existing destination is replaced only when the run succeeds.

Usage::

    python preprocess_dsb2018.py [--src inputs/data-science-bowl-2018/stage1_train] [--img_size 96]
                                 [--dst FOLDER] [--num_workers N] [--limit N]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

from utils import DataError, UsageError, check_replaceable_dataset, replace_folder, run_cli

DEFAULT_SRC = os.path.join("inputs", "data-science-bowl-2018", "stage1_train")
DOWNLOAD_HINT = (
    "download stage1_train.zip from https://www.kaggle.com/c/data-science-bowl-2018/data and unzip it to "
    "inputs/data-science-bowl-2018/stage1_train, or pass --src"
)


def default_dst(img_size):
    """``inputs/dsb2018_<img_size>``, or ``inputs/dsb2018_full`` for ``img_size == 0``."""
    return os.path.join("inputs", "dsb2018_full" if img_size == 0 else f"dsb2018_{img_size}")


def list_samples(src):
    """Sorted sample ids (sub-folders of ``src``); a DataError with the download hint if there are none."""
    if not os.path.isdir(src):
        raise DataError(f"--src {src} does not exist; {DOWNLOAD_HINT}")
    ids = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not ids:
        raise DataError(f"--src {src} contains no sample folders; {DOWNLOAD_HINT}")
    return ids


def _read(path, flags):
    import cv2

    image = cv2.imread(path, flags)
    if image is None:
        raise DataError(f"cannot read {path}: not a readable PNG (corrupt or truncated download?)")
    return image


def load_sample(sample_dir):
    """Read one raw sample: returns (image uint8 HxWx3 BGR, list of instance masks as bool HxW)."""
    import cv2

    sid = os.path.basename(os.path.normpath(sample_dir))
    image_path = os.path.join(sample_dir, "images", sid + ".png")
    if not os.path.isfile(image_path):
        raise DataError(f"sample folder {sample_dir} has no image: expected {image_path}")
    mask_dir = os.path.join(sample_dir, "masks")
    mask_files = sorted(f for f in os.listdir(mask_dir) if f.lower().endswith(".png")) if os.path.isdir(mask_dir) else []
    if not mask_files:
        raise DataError(f"sample folder {sample_dir} has no masks: expected PNG files in {mask_dir}")
    image = _read(image_path, cv2.IMREAD_COLOR)  # RGBA -> BGR with alpha dropped; grey -> 3 channels
    masks = []
    for f in mask_files:
        path = os.path.join(mask_dir, f)
        m = _read(path, cv2.IMREAD_GRAYSCALE)
        if m.shape != image.shape[:2]:
            raise DataError(f"{path} is {m.shape[1]}x{m.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}")
        masks.append(m >= 128)
    return image, masks


def convert_sample(sample_dir, out_dir, img_size):
    """Convert one sample into ``out_dir`` (images/, masks/0/, labels/); returns (id, number of nuclei)."""
    import cv2
    import numpy as np

    from utils import atomic_imwrite

    sid = os.path.basename(os.path.normpath(sample_dir))
    image, masks = load_sample(sample_dir)
    if len(masks) > 65535:
        raise DataError(f"sample folder {sample_dir} has {len(masks)} masks, more than a 16-bit label image holds")
    labels = np.zeros(image.shape[:2], np.uint16)
    for i, m in enumerate(masks, start=1):  # a later mask owns any overlap
        labels[m] = i
    union = np.where(labels > 0, 255, 0).astype(np.uint8)
    if img_size:
        size = (img_size, img_size)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        union = cv2.resize(union, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    mask = np.where(union >= 128, 255, 0).astype(np.uint8)
    atomic_imwrite(os.path.join(out_dir, "images", sid + ".png"), image)
    atomic_imwrite(os.path.join(out_dir, "masks", "0", sid + ".png"), mask)
    atomic_imwrite(os.path.join(out_dir, "labels", sid + ".png"), labels)
    return sid, len(masks)


class _Job:
    """Picklable ``convert_sample`` with the source and destination fixed, for Pool.imap."""

    def __init__(self, src, out_dir, img_size):
        self.src, self.out_dir, self.img_size = src, out_dir, img_size

    def __call__(self, sid):
        return convert_sample(os.path.join(self.src, sid), self.out_dir, self.img_size)


def _init_worker():
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, in the parent
    cv2.setNumThreads(1)






def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Convert Kaggle's raw DSB2018 stage1_train into images/, masks/0/ and labels/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--src", default=DEFAULT_SRC, help="raw stage1_train folder (one sub-folder per sample)")
    p.add_argument("--img_size", type=int, default=96, help="output height and width; 0 keeps the original size")
    p.add_argument("--dst", default=None, help="output folder (default inputs/dsb2018_<img_size> or inputs/dsb2018_full)")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--limit", type=int, default=None, help="only convert the first N samples (sorted ids)")
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
    dst = args.dst or default_dst(args.img_size)
    check_replaceable_dataset(dst, "--dst")
    ids = list_samples(args.src)
    if args.limit is not None:
        ids = ids[: args.limit]

    from tqdm import tqdm

    start = time.time()
    dst_abs = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst_abs), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dst_abs), prefix="." + os.path.basename(dst_abs) + ".tmp-")
    pool = None
    try:
        for sub in ("images", os.path.join("masks", "0"), "labels"):
            os.makedirs(os.path.join(tmp, sub))
        job = _Job(args.src, tmp, args.img_size)
        workers = min(args.num_workers, len(ids))
        if workers > 1:
            import multiprocessing

            # spawn, not fork: fork can deadlock in a threaded parent
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
            results = pool.imap(job, ids, chunksize=4)
        else:
            results = map(job, ids)
        nuclei = 0
        for _, n in tqdm(results, total=len(ids), desc="dsb2018", unit="sample", leave=False):
            nuclei += n
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        replace_folder(tmp, dst_abs)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = "original size" if args.img_size == 0 else f"{args.img_size}x{args.img_size}"
    print(f"wrote {len(ids)} samples ({nuclei} nuclei, {size}) to {dst} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
