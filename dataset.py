"""The training layout on disk, and a torch Dataset over it.

Layout (the one pytorch-nested-unet used)::

    inputs/<dataset>/images/<id><img_ext>
    inputs/<dataset>/masks/<class>/<id><mask_ext>     # class folders 0, 1, ... one per output channel
    inputs/<dataset>/labels/<id>.png                   # optional 16-bit instance labels (0 = background)

With ``borders=True`` (train.py --borders True) the labels are required: each sample gets one more target
channel after the classes, the pixels where two nuclei touch (:func:`instances.touching_borders`).

Images may be grey, RGB, RGBA (alpha is dropped) or 16-bit. 8-bit images are divided by 255; 16-bit (and
float) images are scaled to [0, 1] by their own minimum and maximum, because microscopes rarely use the whole
16-bit range. The network then sees ``(x - 0.5) / 0.25``, applied once. Masks hold 0/255 or 0/1 and become
{0, 1}; resizing uses linear interpolation for images and nearest for masks, so targets stay hard.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import otherwise calls the network

import albumentations as A
import cv2
import numpy as np
import torch

from utils import DataError, UsageError

NORM_MEAN = 0.5
NORM_STD = 0.25


# ---------------------------------------------------------------------------------------------- reading files

def _imread(path, flags, what):
    """cv2.imread with a DataError naming the file when it is missing or not a readable image."""
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path} does not exist")
    img = cv2.imread(path, flags)
    if img is None or img.size == 0:
        raise DataError(f"cannot read {what} {path}: the file is not a readable image (truncated or wrong format?)")
    return img


def decode_image(path):
    """Read an image file as stored: uint8 or uint16 array [H, W, C] in RGB order, alpha dropped."""
    img = _imread(path, cv2.IMREAD_UNCHANGED, "image")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 3:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def image_to_float(img, input_channels):
    """Decoded image [H, W, C] (uint8, uint16 or float) -> float32 [H, W, input_channels] in [0, 1].

    uint8 is divided by 255; other types are min-max scaled per image. Grey images are repeated to 3 channels
    when the model wants 3; colour images are converted to grey when it wants 1.
    """
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    else:
        out = img.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    channels = out.shape[2]
    if channels == input_channels:
        return out
    if channels == 1:
        return np.repeat(out, input_channels, axis=2)
    if input_channels == 1:
        return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[:, :, None]
    raise DataError(f"an image has {channels} channels but --input_channels is {input_channels}")


def read_mask(path):
    """Read a mask file -> uint8 [H, W] with values {0, 1}. Accepts 0/255 or 0/1; anything else is an error."""
    mask = _imread(path, cv2.IMREAD_GRAYSCALE, "mask")
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 255}:
        return (mask > 0).astype(np.uint8)
    if set(values.tolist()) <= {0, 1}:
        return mask
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    raise DataError(f"mask {path} has values {{{shown}}}; masks must hold only 0/255 or 0/1 "
                    "(a JPEG mask or a resized soft mask? save hard masks as PNG)")


# ----------------------------------------------------------------------------------------- listing a dataset

def _ids_in(folder, ext):
    return {f[: -len(ext)] for f in os.listdir(folder) if f.endswith(ext) and not f.startswith(".")}


def _few(ids, n=3):
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def list_ids(dataset_dir, img_ext=".png", mask_ext=".png", num_classes=1):
    """Check the layout under ``dataset_dir`` and return the sorted sample ids.

    Raises DataError/UsageError naming the folder or ids when the folder is missing or empty, an image has
    no mask, a mask has no image, or the number of class folders differs from ``num_classes``.
    """
    img_dir = os.path.join(dataset_dir, "images")
    mask_dir = os.path.join(dataset_dir, "masks")
    if not os.path.isdir(img_dir):
        raise DataError(f"dataset folder {img_dir} not found: run preprocess_dsb2018.py, use --dataset synthetic, "
                        "or lay out your data as in the README ('Your own data')")
    ids = _ids_in(img_dir, img_ext)
    if not ids:
        others = sorted({os.path.splitext(f)[1] for f in os.listdir(img_dir) if os.path.splitext(f)[1]})
        hint = f"; found {', '.join(others)} files: pass --img_ext" if others else ""
        raise DataError(f"no {img_ext} images in {img_dir}{hint}")
    if not os.path.isdir(mask_dir):
        raise DataError(f"mask folder {mask_dir} not found: masks go in masks/<class>/<id>{mask_ext}")
    class_dirs = sorted((d for d in os.listdir(mask_dir) if os.path.isdir(os.path.join(mask_dir, d))
                         and not d.startswith(".")), key=lambda d: (len(d), d))  # numeric order: 0, 1, ..., 10
    expected = [str(c) for c in range(num_classes)]
    if class_dirs != expected:
        raise UsageError(f"--num_classes {num_classes} expects mask folders {expected} in {mask_dir}, "
                         f"found {class_dirs}; set --num_classes to the number of class folders")
    for c in expected:
        mask_ids = _ids_in(os.path.join(mask_dir, c), mask_ext)
        if not mask_ids:
            others = sorted({os.path.splitext(f)[1] for f in os.listdir(os.path.join(mask_dir, c))})
            hint = f"; found {', '.join(others)} files: pass --mask_ext" if others else ""
            raise DataError(f"no {mask_ext} masks in {os.path.join(mask_dir, c)}{hint}")
        if ids - mask_ids:
            raise DataError(f"{len(ids - mask_ids)} images have no mask in {os.path.join(mask_dir, c)}: "
                            f"{_few(ids - mask_ids)}")
        if mask_ids - ids:
            raise DataError(f"{len(mask_ids - ids)} masks in {os.path.join(mask_dir, c)} have no image in "
                            f"{img_dir}: {_few(mask_ids - ids)}")
    return sorted(ids)


# ------------------------------------------------------------------------------------------------ transforms

def check_labels(dataset_dir, ids):
    """--borders needs <dataset_dir>/labels/<id>.png for every id; raise a DataError naming the missing ones."""
    labels_dir = os.path.join(dataset_dir, "labels")
    missing = [i for i in ids if not os.path.isfile(os.path.join(labels_dir, i + ".png"))]
    if missing:
        raise DataError(f"--borders True needs instance labels {labels_dir}/<id>.png (16-bit, 0 = background, "
                        f"1..N one per nucleus; preprocess_dsb2018.py writes them); missing for {len(missing)} of "
                        f"{len(ids)} images, e.g. {_few(missing)}")


def train_transform(input_h, input_w, crop_size=0, scale_jitter=0.0, color_jitter=True):
    """Augmentation for training (albumentations 2.x): resize or random crop, the eight flips/rotations, jitter.

    With ``crop_size`` > 0 the image keeps its resolution and a random crop_size x crop_size window is taken
    (reflect-padded when the image is smaller); otherwise it is resized to input_h x input_w as in the seed.
    ``scale_jitter`` s rescales by a random factor in [1 - s, 1 + s] first.
    """
    size = []
    if scale_jitter > 0:
        size.append(A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if crop_size:
        size += [A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_REFLECT_101),
                 A.RandomCrop(crop_size, crop_size)]
    else:
        size.append(A.Resize(input_h, input_w))
    colour = []
    if color_jitter:
        colour = [A.OneOf([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=1.0),
                           A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0)], p=0.8)]
    return A.Compose(size + [A.D4(p=1.0)] + colour)


def eval_transform(input_h, input_w, crop_size=0):
    """Evaluation: resize to input_h x input_w, or (crop training) keep the original size."""
    return A.Compose([] if crop_size else [A.Resize(input_h, input_w)])


# --------------------------------------------------------------------------------------------------- dataset

class Dataset(torch.utils.data.Dataset):
    """Samples of the layout above.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` returns ``(image, mask, {'img_id': id})``:
    image float32 [input_channels, H, W], normalised ``(x - 0.5) / 0.25`` from [0, 1];
    mask float32 [num_classes (+1 with borders), H, W] in {0, 1}. The augmentation of sample i in a given epoch is seeded by
    (seed, epoch, i), so a run is repeatable and a resumed run sees the same augmentations.
    ``cache=True`` decodes every file once, in this process, before training (workers share it).
    """

    def __init__(self, img_ids, dataset_dir, img_ext=".png", mask_ext=".png", num_classes=1, input_channels=3,
                 transform=None, seed=0, cache=False, borders=False):
        self.img_ids = list(img_ids)
        self.img_dir = os.path.join(dataset_dir, "images")
        self.mask_dir = os.path.join(dataset_dir, "masks")
        self.labels_dir = os.path.join(dataset_dir, "labels") if borders else None
        if borders:
            check_labels(dataset_dir, self.img_ids)
        self.img_ext, self.mask_ext = img_ext, mask_ext
        self.num_classes, self.input_channels = num_classes, input_channels
        self.transform = transform
        self.seed = seed
        self.cached = None
        if cache:
            from tqdm import tqdm

            self.cached = [self.load(i) for i in tqdm(range(len(self.img_ids)), desc="caching", leave=False,
                                                      disable=len(self.img_ids) < 200)]

    def __len__(self):
        return len(self.img_ids)

    def load(self, index):
        """Decode sample ``index`` -> (image as stored [H, W, C] uint8/uint16, mask uint8 [H, W, K] in {0,1})."""
        img_id = self.img_ids[index]
        img_path = os.path.join(self.img_dir, img_id + self.img_ext)
        img = decode_image(img_path)
        masks = []
        for c in range(self.num_classes):
            mask_path = os.path.join(self.mask_dir, str(c), img_id + self.mask_ext)
            mask = read_mask(mask_path)
            if mask.shape != img.shape[:2]:
                raise DataError(f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image {img_path} is "
                                f"{img.shape[0]}x{img.shape[1]}; a mask must have its image's size")
            masks.append(mask)
        if self.labels_dir is not None:
            masks.append(self.read_borders(img_id, img.shape[:2]))
        return img, np.stack(masks, axis=-1)

    def modalities(self):
        """:func:`image_modality` of every sample, in order (from the cache, else decoding only the images)."""
        if self.cached is not None:
            return [image_modality(img) for img, _ in self.cached]
        return [image_modality(decode_image(os.path.join(self.img_dir, i + self.img_ext))) for i in self.img_ids]

    def read_borders(self, img_id, shape):
        """The touching-border target of ``img_id`` from its instance labels: uint8 [H, W] in {0, 1}."""
        from instances import read_labels, touching_borders

        path = os.path.join(self.labels_dir, img_id + ".png")
        labels = read_labels(path)
        if labels.shape != shape:
            raise DataError(f"labels {path} are {labels.shape[0]}x{labels.shape[1]} but the image is "
                            f"{shape[0]}x{shape[1]}; instance labels must have their image's size")
        return touching_borders(labels)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, mask = self.cached[index] if self.cached is not None else self.load(index)
        img = image_to_float(img, self.input_channels)
        if self.transform is not None:
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        img = (img.reshape(img.shape[0], img.shape[1], -1) - NORM_MEAN) / NORM_STD
        mask = mask.reshape(mask.shape[0], mask.shape[1], -1)
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1), dtype=np.float32)),
                {"img_id": self.img_ids[index]})


# ---------------------------------------------------------------------------------------- balancing image kinds

MODALITIES = ("fluorescence", "stained", "bright-field")


def image_modality(img):
    """Decoded image [H, W, C] (any type) -> 'fluorescence', 'stained' or 'bright-field'.

    The three kinds of nucleus image in DSB2018, told apart on the image scaled to [0, 1]: a dark background
    (mean below 0.5) is fluorescence; a bright one is stained when coloured (mean channel spread above 0.05),
    else bright-field.
    """
    x = image_to_float(img, img.shape[2])
    if x.mean() < 0.5:
        return "fluorescence"
    spread = float((x.max(axis=2) - x.min(axis=2)).mean())
    return "stained" if spread > 0.05 else "bright-field"


def balance_weights(groups, power):
    """Sampling weight of each sample, ``n ** -power`` with n the number of samples in its group: float64 [N].

    power 0 draws every sample equally often (each group in proportion to its size), 1 draws every group
    equally often, 0.5 is in between.
    """
    _, index, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return counts[index].astype(np.float64) ** -power


class WeightedDistributedSampler(torch.utils.data.Sampler):
    """Draws ``len(weights)`` indices with replacement in proportion to ``weights``, the same draw in every
    process (seeded by seed and epoch); process ``rank`` of ``num_replicas`` takes every num_replicas-th one.
    The weighted counterpart of DistributedSampler (same ``set_epoch``), like WeightedRandomSampler."""

    def __init__(self, weights, num_replicas=1, rank=0, seed=0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = -(-len(self.weights) // num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                 generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return self.num_samples


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler so it yields ``(epoch, index)``; ``set_epoch`` reaches the wrapped DistributedSampler.

    The dataset seeds each sample's augmentation from that pair, which works with persistent workers.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)
