"""Deterministic synthetic nuclei images, so that the toolkit can be tried with no download.

Writes the layout the training scripts read::

    <out>/images/syn_0000.png     3-channel 8-bit image
    <out>/masks/0/syn_0000.png    8-bit semantic mask, values 0/255
    <out>/labels/syn_0000.png     16-bit instance labels (0 background, 1..N one per nucleus)

Even-numbered images are fluorescence-like (bright grey nuclei on a dark background, stored as 3 equal
channels); odd-numbered ones are stained-like (dark purple/blue nuclei on a light pinkish background, as
H&E-stained tissue; val.py counts them as the 'stained' kind). Nuclei are slightly irregular ellipses of varied
size and orientation with some texture; some touch or overlap (the later-drawn nucleus owns the overlap in the
labels). The images get a Gaussian blur, noise and a smooth illumination gradient. Image ``i`` uses only
``numpy.random.default_rng(seed + i)``, so each image is reproducible on its own.

Usage::

    python synthetic.py [--out inputs/synthetic] [--num_images 160] [--size 96] [--seed 0]
"""
import os
import sys
import time

import cv2
import numpy as np

from files import atomic_imwrite, check_replaceable, folder_replaced_when_done, written_alone
from utils import ArgumentParser, at_least, path_arg, progress_bar, run_cli

DEFAULT_OUT = os.path.join("inputs", "synthetic")
STYLES = ("fluorescence", "stained")  # named as dataset.image_modality names the kinds


def image_id(index):
    """The id of synthetic image ``index``, e.g. ``syn_0007``."""
    return f"syn_{index:04d}"


def style_of(index):
    """Even indices are fluorescence-like, odd ones stained-like (so the two styles are half each)."""
    return STYLES[index % 2]


def _smooth_noise(rng, size, sigma):
    """A smooth random field with zero mean and unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _draw_nuclei(rng, size):
    """Draw the nuclei: returns (labels int32, density float32 in [0, 1]) before blur and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 96.0
    labels = np.zeros((size, size), np.int32)
    density = np.zeros((size, size), np.float32)
    texture = _smooth_noise(rng, size, 1.2)
    centers, radii = [], []
    n = int(rng.integers(5, 13))
    for k in range(1, n + 1):
        a = rng.uniform(4.5, 11.0) * scale  # semi-major axis
        b = a * rng.uniform(0.55, 0.95)  # semi-minor axis
        theta = rng.uniform(0.0, np.pi)
        wob = rng.uniform(0.0, 0.08, 2)
        wph = rng.uniform(0.0, 2 * np.pi, 2)
        level = rng.uniform(0.0, 1.0)
        touching = bool(centers) and rng.random() < 0.4
        if touching:  # next to an earlier nucleus: from overlapping to just touching
            j = int(rng.integers(len(centers)))
            angles = rng.uniform(0.0, 2 * np.pi, 6)
            dists = (radii[j] + 0.5 * (a + b)) * rng.uniform(0.65, 0.95, 6)
            candidates = [
                (centers[j][0] + d * np.cos(t), centers[j][1] + d * np.sin(t)) for t, d in zip(angles, dists)
            ]
        else:  # anywhere; nuclei near the border are cut
            candidates = [tuple(rng.uniform(0.0, size, 2)) for _ in range(6)]
        inside, (cx, cy) = _place(candidates, xx, yy, size, (a, b, theta, wob, wph), labels, k, touching)
        if inside is None:
            continue
        labels[inside] = k
        density[inside] = level
        centers.append((cx, cy))
        radii.append(0.5 * (a + b))
    # per-nucleus level -> texture; keep it in [0, 1]
    nuclei = labels > 0
    density[nuclei] = np.clip(density[nuclei] * (1.0 + 0.18 * texture[nuclei]), 0.0, 1.0)
    # renumber 1..N in drawing order (a nucleus entirely covered by later ones disappears)
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(max(int(labels.max()), 0) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels], density


def _place(candidates, xx, yy, size, shape, labels, k, touching):
    """The first of the ``candidates`` centres (x, y) where nucleus ``k`` (``shape``: semi-axes a, b, angle theta,
    two outline wobbles and their phases) fits among the ``labels`` drawn so far: (region bool [size, size],
    centre), or (None, (None, None))."""
    a, b, theta, wob, wph = shape
    c, s = np.cos(theta), np.sin(theta)
    for cx, cy in candidates:
        if not (0.0 <= cx < size and 0.0 <= cy < size):
            continue
        dx, dy = xx - cx, yy - cy
        u = (dx * c + dy * s) / a
        v = (-dx * s + dy * c) / b
        phi = np.arctan2(v, u)
        boundary = 1.0 + wob[0] * np.sin(2 * phi + wph[0]) + wob[1] * np.sin(3 * phi + wph[1])
        region = np.sqrt(u * u + v * v) <= boundary
        area = int(region.sum())
        if area < 12:
            continue
        # overlaps are allowed but must leave each earlier nucleus mostly visible (no slivers) and, for a
        # freely placed nucleus, stay small
        covered = np.bincount(labels[region], minlength=k)[1:]
        if covered.sum() > (0.3 if touching else 0.05) * area:
            continue
        if np.any(covered > 0.3 * np.maximum(np.bincount(labels.ravel(), minlength=k)[1:], 1)):
            continue
        return region, (cx, cy)
    return None, (None, None)


def _illumination(rng, size):
    """A smooth linear gradient around 1, e.g. 0.75 .. 1.25 across the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    ang = rng.uniform(0.0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang)
    return 1.0 + rng.uniform(0.1, 0.5) * ramp


def render(index, size=96, seed=0):
    """Render synthetic image ``index``: returns (image uint8 HxWx3 BGR, mask uint8 0/255, labels uint16)."""
    rng = np.random.default_rng(seed + index)
    labels, density = _draw_nuclei(rng, size)
    blur = rng.uniform(0.6, 1.4)
    illum = _illumination(rng, size)
    if style_of(index) == "fluorescence":
        # nucleus brightness 0.22..0.85 over a dark background; a few unlabelled faint specks of debris
        signal = np.where(labels > 0, 0.22 + 0.63 * density, 0.0).astype(np.float32)
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = rng.uniform(0, size, 2)
            cv2.circle(signal, (int(cx), int(cy)), int(rng.integers(1, 3)), float(rng.uniform(0.08, 0.2)), -1)
        signal = cv2.GaussianBlur(signal, (0, 0), blur)
        background = rng.uniform(0.03, 0.12) * (1.0 + 0.3 * _smooth_noise(rng, size, size / 6.0))
        grey = (background + signal) * illum + rng.normal(0.0, rng.uniform(0.01, 0.045), (size, size))
        grey = np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        # stained: background pinkish, nuclei dark purple/blue; RGB colours, converted to BGR for OpenCV
        bg_rgb = np.array([232, 196, 214], np.float32) + rng.uniform(-12, 12, 3)
        nuc_rgb = np.array([88, 58, 142], np.float32) + rng.uniform(-20, 20, 3)
        alpha = np.where(labels > 0, 0.45 + 0.5 * density, 0.0).astype(np.float32)
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur)[:, :, None]
        stroma = 1.0 + 0.04 * _smooth_noise(rng, size, size / 8.0)[:, :, None]  # faint uneven staining
        rgb = (bg_rgb * stroma * (1.0 - alpha) + nuc_rgb * alpha) * illum[:, :, None]
        rgb = rgb + rng.normal(0.0, rng.uniform(3.0, 10.0), (size, size, 3))
        rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        image = np.ascontiguousarray(rgb[:, :, ::-1])
    mask = np.where(labels > 0, 255, 0).astype(np.uint8)
    return image, mask, labels.astype(np.uint16)


def generate_synthetic(out_dir, num_images=160, size=96, seed=0, progress=False):
    """Write ``num_images`` synthetic samples of ``size`` x ``size`` into ``out_dir``; returns the list of ids.

    Files are written in place (each one atomically); use :func:`ensure_synthetic` or the CLI to build a whole
    dataset folder atomically.
    """
    if num_images < 1 or size < 16:
        raise ValueError(f"num_images must be at least 1 and size at least 16, got {num_images} and {size}")
    for sub in ("images", os.path.join("masks", "0"), "labels"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    ids = []
    for index in progress_bar(range(num_images), desc="synthetic", unit="img", disable=not progress, leave=False):
        image, mask, labels = render(index, size, seed)
        name = image_id(index)
        atomic_imwrite(os.path.join(out_dir, "images", name + ".png"), image)
        atomic_imwrite(os.path.join(out_dir, "masks", "0", name + ".png"), mask)
        atomic_imwrite(os.path.join(out_dir, "labels", name + ".png"), labels)
        ids.append(name)
    return ids


def _build_atomically(dataset_dir, num_images, size, seed, progress):
    """Generate into a temporary folder beside ``dataset_dir`` and move it into place only when complete."""
    with folder_replaced_when_done(dataset_dir) as tmp:
        return generate_synthetic(tmp, num_images, size, seed, progress=progress)


def ensure_synthetic(dataset_dir, num_images=160, size=96, seed=0, progress=True):
    """Generate the synthetic dataset into ``dataset_dir`` unless ``dataset_dir/images`` already exists.

    The generation goes into a temporary folder beside ``dataset_dir`` that is renamed into place at the end,
    so an interrupted run leaves nothing half-made. Returns ``dataset_dir``.
    """
    if os.path.isdir(os.path.join(dataset_dir, "images")):
        return dataset_dir
    check_replaceable(dataset_dir, "the synthetic dataset folder")
    if progress:
        print(f"generating {num_images} synthetic images into {dataset_dir}", file=sys.stderr)
    _build_atomically(dataset_dir, num_images, size, seed, progress)
    return dataset_dir


def parse_args(argv=None):
    p = ArgumentParser(prog="synthetic.py",
                       description="Generate a deterministic synthetic nuclei dataset (images/, masks/0/, labels/).")
    p.add_argument("--out", type=path_arg, default=DEFAULT_OUT,
                   help="output dataset folder (replaced if it is an old dataset)")
    p.add_argument("--num_images", type=at_least(1), default=160, help="number of images (half of each style)")
    p.add_argument("--size", type=at_least(16), default=96, help="image height and width in pixels")
    p.add_argument("--seed", type=at_least(0), default=0, help="image i uses numpy default_rng(seed + i)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_replaceable(args.out, "--out")
    start = time.time()
    # One process at a time writes a folder: the one that ended last would replace the other's dataset
    with written_alone(args.out, "--out"):
        ids = _build_atomically(args.out, args.num_images, args.size, args.seed, progress=True)
    print(
        f"wrote {len(ids)} synthetic images ({args.size}x{args.size}, seed {args.seed}) "
        f"to {args.out} in {time.time() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
