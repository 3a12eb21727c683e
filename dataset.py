"""A torch Dataset over a dataset's samples (where their files are: layouts.py), its transforms, the image kinds
and the samplers that balance them, and the loaders of evaluation.

With ``borders=True`` (train.py --borders True) the labels are required: each sample gets one more target
channel after the classes, the pixels where two nuclei touch (:func:`instances.touching_borders`).

Images are scaled to [0, 1] as image_files.image_to_float says (``normalization``: fixed, percentile or
percentile_dark); the network then sees ``(x - 0.5) / 0.25`` (:func:`normalize`), applied once. Resizing uses
linear interpolation for images and nearest for masks (image_files.NEAREST, aligned with the linear one), so
targets stay hard.
"""
import multiprocessing
import os
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import cv2
import numpy as np
import torch

import distributed
from image_files import (JPEG_EXTS, NEAREST, decode_image, decoded_size, image_to_float, multi_object_ids, normalize,
                         read_mask)
from instances import touching_borders
from layouts import check_labels, find_layout
from measurements import foreground_note
from utils import STOP_SIGNALS, DataError, progress_bar, usable_cpus


# ------------------------------------------------------------------------------------------------ transforms

# train.py's flags that train_transform and device_data.BatchAugment both take, by these names: the trainer passes
# them to whichever loader --loader picks (on a CPU with the images cached, BatchAugment), so an augmentation that
# only one of the two draws does nothing in the other's runs (tests/test_device_data.py checks both take these).
AUGMENTATION_FLAGS = ("input_h", "input_w", "crop_size", "scale_jitter", "color_jitter", "greyscale", "invert",
                      "shot_noise", "blur")


def train_transform(input_h, input_w, crop_size=0, scale_jitter=0.0, color_jitter=True, greyscale=0.0, invert=0.0,
                    shot_noise=0.0, blur=0.0, stain_jitter=0.0):
    """Augmentation for training (albumentations 2.x): resize or random crop, the eight flips/rotations, jitter.

    With ``crop_size`` > 0 the image keeps its resolution and a random crop_size x crop_size window is taken
    (reflect-padded when the image is smaller); otherwise it is resized to input_h x input_w as in the seed.
    ``scale_jitter`` s rescales by a random factor in [1 - s, 1 + s] first. ``blur`` sigma (> 0): half the images
    defocused (:class:`Defocus`) after the flips; ``shot_noise`` photons (> 0): half the images made low-light
    (:class:`ShotNoise`) after that (optics before the camera), both before any colour change. ``greyscale`` and
    ``invert`` are the probabilities of turning the image grey (3 channels of OpenCV's grey) and of inverting it
    (1 - x), in that order, after the colour jitter. ``stain_jitter`` is the probability of re-staining an RGB
    image as H&E with a random preset stain matrix and intensity (A.HEStain), before the colour jitter; it runs in
    the loader workers alone (train.py picks them for it), every other augmentation also in
    device_data.BatchAugment (AUGMENTATION_FLAGS). Each transform draws from a seed of its own (:class:`DrawnApart`).
    """
    from augment import A, Defocus, DrawnApart, ShotNoise  # albumentations: imported only now (augment.py)
    size = []
    if scale_jitter > 0:
        size.append(A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if crop_size:
        size += [A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_REFLECT_101),
                 A.RandomCrop(crop_size, crop_size)]
    else:
        size.append(A.Resize(input_h, input_w, mask_interpolation=NEAREST))
    colour = [Defocus(blur)] if blur else []
    if shot_noise:
        colour.append(ShotNoise(shot_noise))
    if stain_jitter:
        colour.append(A.HEStain(method="random_preset", p=stain_jitter))
    if color_jitter:
        colour.append(A.OneOf([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=1.0),
                               A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0)], p=0.8))
    if greyscale:
        colour.append(A.ToGray(p=greyscale))
    if invert:
        colour.append(A.InvertImg(p=invert))
    return DrawnApart(size + [A.D4(p=1.0)] + colour)


class Resize:
    """Evaluation's resize of an image float [H, W, C] to ``size`` (h, w), linear, and of its mask uint8 [H, W] or
    [H, W, K], nearest (image_files.NEAREST), as albumentations' Resize does (tests/test_dataset.py compares them)
    without its import: ``transform(image=..., mask=...)`` -> {"image": ..., "mask": ...}."""

    def __init__(self, size):
        self.size = size

    def set_random_seed(self, seed):
        """Nothing is drawn: the Dataset seeds every transform."""

    def __call__(self, image, mask):
        return {"image": self._resized(image, cv2.INTER_LINEAR), "mask": self._resized(mask, NEAREST)}

    def _resized(self, array, interpolation):
        if array.shape[:2] == self.size:
            return array
        out = cv2.resize(array, self.size[::-1], interpolation=interpolation)
        return out.reshape(*self.size, *array.shape[2:])  # OpenCV drops a single channel's axis


def eval_transform(input_h, input_w, crop_size=0):
    """Evaluation: resize to input_h x input_w (:class:`Resize`), or (crop training) keep the original size (None)."""
    return None if crop_size else Resize((input_h, input_w))


# --------------------------------------------------------------------------------------------------- dataset

class Dataset(torch.utils.data.Dataset):
    """Samples of the layout above.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` returns ``(image, mask, {'img_id': id})``:
    image float32 [input_channels, H, W], normalised ``(x - 0.5) / 0.25`` from [0, 1];
    mask float32 [num_classes (+1 with borders), H, W] in {0, 1}. The augmentation of sample i in a given epoch is
    seeded by (seed, epoch, i), so a run is repeatable and a resumed run sees the same augmentations.
    ``cache=True`` decodes every file once, in this process, before training (forked workers share it; under the
    spawn start method, macOS's default, each worker receives a copy).
    ``border_size`` (h, w): the size a run trained on resized images sees (:func:`reading_of`); its border target is
    drawn at that size (:func:`border_target`), so that resizing keeps the lines whole.
    ``kinds=True`` adds each image's kind (:func:`image_modality` of the image as stored) to its metadata as 'kind',
    so that val.py's table of kinds costs no second read of every image.
    """

    def __init__(self, img_ids, dataset_dir, img_ext=".png", mask_ext=".png", num_classes=1, input_channels=3,
                 transform=None, seed=0, cache=False, borders=False, normalization="fixed", border_size=None,
                 kinds=False):
        self.img_ids = list(img_ids)
        self.kinds = kinds
        self.normalization = normalization
        self.layout = find_layout(dataset_dir, img_ext, mask_ext)
        self.borders, self.border_size = borders, border_size
        if borders:
            check_labels(self.layout, self.img_ids)
        self.num_classes, self.input_channels = num_classes, input_channels
        self.transform = transform
        self.seed = seed
        self.cached = None
        if cache:
            self.cached = [self.load(i) for i in progress_bar(range(len(self.img_ids)), desc="caching", leave=False,
                                                              disable=len(self.img_ids) < 200)]

    def __len__(self):
        return len(self.img_ids)

    @cached_property
    def stored_sizes(self):
        """(height, width, channels, dtype) of each image as decode_image gives it, in img_ids order, read once from
        the files' headers (image_files.decoded_size): checking a set's sizes and types costs no decoding."""
        return [decoded_size(self.layout.image(img_id)) for img_id in self.img_ids]

    def load(self, index):
        """Decode sample ``index`` -> (image as stored [H, W, C] (decode_image), mask uint8 [H, W, K] in {0,1})."""
        img_id = self.img_ids[index]
        img_path = self.layout.image(img_id)
        img = decode_image(img_path)
        labels = self.read_labels(img_id, img.shape[:2]) if self.borders or self.layout.kind != "masks" else None
        if self.layout.kind == "masks":
            masks = [self.read_mask(img_id, c, img_path, img.shape[:2]) for c in range(self.num_classes)]
        else:
            masks = [(labels > 0).astype(np.uint8)]
        if self.borders:
            masks.append(border_target(labels, self.border_size))
        return img, np.stack(masks, axis=-1)

    def read_mask(self, img_id, c, img_path, shape):
        path = self.layout.mask(img_id, c)
        mask = read_mask(path)
        if mask.shape != shape:
            turned = mask.shape == shape[::-1] and str(img_path).lower().endswith(JPEG_EXTS)
            raise DataError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image {img_path} is "
                            f"{shape[0]}x{shape[1]}; a mask must have its image's size" +
                            ("; the JPEG is read turned as its EXIF orientation says, as viewers show it: save the "
                             "mask as the image is shown" if turned else ""))
        return mask

    def read_labels(self, img_id, shape):
        """The instance labels of ``img_id``: int32 [H, W], 0 = background."""
        path = self.layout.labels(img_id)
        labels = self.layout.read_labels(img_id, shape)
        if labels.shape != shape:
            raise DataError(f"label image {path} is {labels.shape[0]}x{labels.shape[1]} but the image is "
                            f"{shape[0]}x{shape[1]}; instance labels must have their image's size")
        return labels

    def has_foreground(self):
        """Whether any mask has a pixel above 0. Masks are read until the first that has one, so a usual dataset
        costs one read."""
        return any((self.cached[i] if self.cached else self.load(i))[1].any() for i in range(len(self)))

    def modalities(self):
        """:func:`image_modality` of every sample, in order (from the cache, else decoding only the images, in one
        thread per usable CPU: OpenCV and NumPy release the GIL)."""
        if self.cached is not None:
            return [image_modality(img) for img, _ in self.cached]
        with ThreadPoolExecutor(usable_cpus()) as pool:
            return list(pool.map(lambda i: image_modality(decode_image(self.layout.image(i))), self.img_ids))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        stored, mask = self.cached[index] if self.cached is not None else self.load(index)
        meta = {"img_id": self.img_ids[index], **({"kind": image_modality(stored)} if self.kinds else {})}
        img = image_to_float(stored, self.input_channels, self.normalization)
        if self.transform is not None:
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        img = normalize(img.reshape(img.shape[0], img.shape[1], -1))
        mask = mask.reshape(mask.shape[0], mask.shape[1], -1)
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1), dtype=np.float32)), meta)


def spread_sample(count, samples):
    """Up to ``samples`` indices of ``count`` items (all of them when there are no more): one drawn from each of
    ``samples`` equal runs of the items, at random with a seed of ``count`` (a set gives the same sample each time):
    int array, sorted. A fixed stride (evenly spaced indices) fell in step with sets that alternate: of 31 images,
    two exports of each field in turn, it took the 16 even ones, one kind alone."""
    if count <= samples:
        return np.arange(count)
    edges = np.linspace(0, count, samples + 1).round().astype(int)  # runs of 1 item or more
    return edges[:-1] + (np.random.default_rng(count).random(samples) * np.diff(edges)).astype(int)


def mostly_foreground_note(data, what, samples=64):
    """A note ('' for none) when the nuclei of Dataset ``data`` (its class-0 masks or label images, up to ``samples``
    of them spread over the set (:func:`spread_sample`); the cache's when it holds them, else read alone, without
    their images) cover more than :data:`measurements.MOSTLY_FOREGROUND` of their images on average: masks drawn
    dark-on-light, or label images whose background is not 0, would otherwise train a model of the background, or
    score one, without a word. ROI sets and GeoJSON objects, drawn on a background of 0, are not checked. ``what``
    names the masks in the note ('the training masks')."""
    layout = data.layout
    if layout.kind in ("rois", "geojson"):
        return ""
    picked = spread_sample(len(data), samples)
    return foreground_note([(nuclei_marked(data, i) > 0).mean() for i in picked],
                           [layout.nuclei_file(data.img_ids[i]) for i in picked], what,
                           "a mask marks nuclei with values above 0 on a background of 0, so masks drawn dark on a "
                           "light background must be inverted (and label images need a background of 0)")


# The least share of the ids (pooled over the label images looked at) that split into separate objects for a note:
# resizing splits a few thin nuclei (27 of 28,862 ids in DSB2018's 96x96 labels, 9 of 247 in its worst image), a
# label image of classes instead of nuclei, or one numbered by another rule, splits many
SPLIT_SHARE = 0.01


def multi_object_ids_note(data, what, samples=64):
    """A note ('' for none) when, in the label images of Dataset ``data`` (up to ``samples`` of them spread over the
    set, read again from their files), at least :data:`SPLIT_SHARE` of the ids mark several separate objects
    (image_files.multi_object_ids): nuclei given one id, or cut in two. The DSB2018 score counts each such id as one
    nucleus, so that finding its parts scores a miss and false nuclei, and --borders sees no border between them;
    whether they are meant so cannot be told, so they are read as they are. ROI sets and GeoJSON objects, one polygon
    per nucleus, are not checked. ``what`` names the label images in the note."""
    layout = data.layout
    if layout.kind in ("rois", "geojson"):
        return ""
    picked = spread_sample(len(data), samples)
    split, ids_seen = {}, 0
    for i in picked:
        img_id = data.img_ids[i]
        if layout.labels(img_id) is not None:
            labels = layout.read_labels(img_id)
            ids_seen += len(np.unique(labels[labels > 0]))
            ids = multi_object_ids(labels)
            if len(ids):
                split[layout.labels(img_id)] = ids
    if sum(map(len, split.values())) < SPLIT_SHARE * ids_seen or not split:
        return ""
    path, ids = next(iter(split.items()))
    return (f"note: in {len(split)} of {len(picked)} of {what} an id marks several separate objects ({path}: "
            f"{len(ids)} id{'s' * (len(ids) > 1)}, e.g. {ids[0]}); each id is one nucleus to the DSB2018 score and "
            "--borders: give separate nuclei ids of their own (e.g. relabel the connected components)")


def nuclei_marked(data, index):
    """Sample ``index``'s class-0 mask (uint8, 0 background) or label image (int32) [H, W], from the cache when it
    holds it, else read alone (no image, no size check)."""
    if data.cached:
        return data.cached[index][1][..., 0]
    img_id = data.img_ids[index]
    return read_mask(data.layout.mask(img_id, 0)) if data.layout.kind == "masks" else data.layout.read_labels(img_id)


def eval_loader(dataset_dir, ids, reading, size, batch_size, num_workers, pin_memory=False, cache=False,
                kinds=False):
    """A DataLoader over ``ids`` at evaluation size, in order. ``reading``: dict(img_ext, mask_ext, num_classes,
    input_channels, borders) for :class:`Dataset`; ``size``: (input_h, input_w, crop_size); crop-trained runs
    (crop_size > 0) see whole images, whose sizes differ, so one per batch; ``kinds``: each batch's metadata also
    holds the images' kinds (:class:`Dataset`). Under DDP each process gets every world_size-th id, so every image
    is seen exactly once."""
    input_h, input_w, crop_size = size
    shard = ids[distributed.rank()::distributed.world_size()]
    data = Dataset(shard, dataset_dir, transform=eval_transform(input_h, input_w, crop_size), cache=cache,
                   kinds=kinds, **reading)
    return torch.utils.data.DataLoader(data, batch_size=1 if crop_size else batch_size, shuffle=False,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0, worker_init_fn=quiet_worker)


def quiet_worker(worker_id):
    """DataLoader ``worker_init_fn``: a worker stops without a traceback when the run stops.

    It ends with exit status 0 on SIGTERM. When the whole process group gets SIGTERM (``timeout``, a batch system
    ending a job), the main process then stops cleanly on its own SIGTERM; a worker killed by the signal would make
    it fail with a DataLoader traceback instead. (Ignoring the signal is no way out: multiprocessing ends leftover
    workers at exit with SIGTERM and waits for them.) And the thread through which it hands a batch's memory to the
    main process (multiprocessing's resource_sharer) prints nothing when the main process stops in the middle of
    taking one (Ctrl-C): that thread reports through sys.excepthook, which then passes over its errors."""
    for sig in STOP_SIGNALS:
        if not (sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN):  # nohup's stays ignored
            signal.signal(sig, _exit_quietly)
    sys.excepthook = quiet_about_fd_server


def _exit_quietly(signum, frame):
    os._exit(0)


RESOURCE_SHARER = os.path.join("multiprocessing", "resource_sharer.py")


def quiet_about_fd_server(exc_type, exc, tb):
    """sys.excepthook of a loader worker: a lost connection in multiprocessing's resource_sharer (the main process
    left mid-handshake) is not printed; every other error (too many open files, say) goes to the default hook."""
    gone = issubclass(exc_type, (EOFError, ConnectionError, multiprocessing.AuthenticationError))
    if not (gone and any(frame.f_code.co_filename.endswith(RESOURCE_SHARER) for frame, _ in traceback.walk_tb(tb))):
        sys.__excepthook__(exc_type, exc, tb)


def reading_of(cfg):
    """The :class:`Dataset` arguments of a run's flags ``cfg`` that say how its files are read."""
    return {**{k: getattr(cfg, k)
               for k in ("img_ext", "mask_ext", "num_classes", "input_channels", "borders", "normalization")},
            "border_size": None if cfg.crop_size else (cfg.input_h, cfg.input_w)}


def border_target(labels, size=None):
    """The --borders target of instance labels int [H, W]: uint8 [H, W] in {0, 1} (instances.touching_borders).
    With ``size`` (h, w), the size the labels will be resized to, it is drawn at that size and resized back: drawn
    at the file's size, the 2-pixel lines would mostly fall between the pixels that nearest-neighbour keeps."""
    if size is None or labels.shape == tuple(size):
        return touching_borders(labels)
    small = touching_borders(cv2.resize(labels, (size[1], size[0]), interpolation=NEAREST))
    return cv2.resize(small, (labels.shape[1], labels.shape[0]), interpolation=NEAREST)


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
