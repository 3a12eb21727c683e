"""The training set as one tensor on the training device, augmented a whole batch at a time there.

``train.py --loader device`` (and ``auto`` when the images are cached and, on a GPU, fit a quarter of its free
memory) uses this instead of DataLoader workers running albumentations per sample: on a 2-core CPU the cores then
all go to the model, and a GPU is not fed by CPU workers. It draws the same augmentations as
``dataset.train_transform`` (tests/test_device_data.py compares the two distributions):

- size: resize to input_h x input_w (bilinear for images, nearest for masks), or a random crop_size window at
  full resolution, uniform over the positions; ``scale_jitter`` s first rescales about the centre by a factor
  uniform in [1 - s, 1 + s], the image keeping its size (reflected at the borders, as albumentations' Affine);
- the eight flips and rotations (D4), each with probability 1/8 (square outputs; flips only otherwise);
- with ``blur`` sigma (> 0), with probability 0.5, defocus: a Gaussian blur of sigma uniform in [0, blur] pixels
  (augment.Defocus, cv2.GaussianBlur's kernel and reflected borders), before the shot noise;
- with ``shot_noise`` photons (> 0), with probability 0.5, the shot noise of a camera that collected few photons
  (augment.ShotNoise), before any colour change;
- with ``color_jitter``, with probability 0.8, either (1/2 each) albumentations' ColorJitter (brightness,
  contrast and saturation factors in [0.8, 1.2], hue shift in [-0.05, 0.05] of the circle, in a random order) or
  RandomBrightnessContrast (x * (1 + a) + b, a and b in [-0.2, 0.2]), clipped to [0, 1];
- with probability ``greyscale`` the image turned grey (three channels of OpenCV's grey), then with probability
  ``invert`` inverted (1 - x).

The random numbers come from a CPU generator seeded by (seed, epoch), so an epoch's augmentations are the same on
any device and after a resume. Images are stored as uint8 (8-bit files, exact) or float16 in [0, 1] (16-bit
files, after the per-image min-max scaling of image_files.image_to_float); masks as uint8 in {0, 1}.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from image_files import BLUR_P, MOST_PHOTONS, SHOT_NOISE_P, image_to_float, normalize
from utils import progress_bar

GREY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights, which albumentations' contrast and saturation use
COLOUR_P, JITTER = 0.8, 0.2
HUE = 0.05


class DeviceImages:
    """Decoded samples packed into one flat image tensor and one flat mask tensor on ``device``.

    ``samples``: (image as stored [H, W, C] uint8/uint16/float, mask uint8 [H, W, K] in {0, 1}) pairs, as
    ``dataset.Dataset.load`` returns them, scaled to [0, 1] by ``image_to_float(img, input_channels,
    normalization)`` and stored as uint8 when every file is 8-bit (a percentile-stretched image then to the
    nearest 1/255). ``image(i)`` is a view [input_channels, h, w] (uint8 0..255 or float16
    0..1) and ``mask(i)`` a view [K, h, w] (uint8 0/1) of sample i. ``progress``: a bar over the samples once they
    take more than a second (536 full-size DSB2018 images take 3-14 s on 2 CPU cores, after the caching bar).
    """

    def __init__(self, samples, input_channels, device, normalization="fixed", progress=True):
        self.eight_bit = all(img.dtype == np.uint8 for img, _ in samples)
        self.shapes = [img.shape[:2] for img, _ in samples]
        self.channels, self.classes = input_channels, samples[0][1].shape[2]
        sizes = [h * w for h, w in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
        dtype = torch.uint8 if self.eight_bit else torch.float16
        images = torch.empty(sum(sizes) * self.channels, dtype=dtype)
        masks = torch.empty(sum(sizes) * self.classes, dtype=torch.uint8)
        bar = progress_bar(zip(samples, self.offsets, sizes), desc="scaling", total=len(samples), unit="img",
                           leave=False, delay=1, disable=not progress)
        for (img, mask), offset, size in bar:
            x = image_to_float(img, input_channels, normalization)
            x = np.round(x * 255).astype(np.uint8) if self.eight_bit else x.astype(np.float16)
            images[offset * self.channels:(offset + size) * self.channels] = torch.from_numpy(
                np.ascontiguousarray(x.transpose(2, 0, 1))).reshape(-1)
            masks[offset * self.classes:(offset + size) * self.classes] = torch.from_numpy(
                np.ascontiguousarray(mask.transpose(2, 0, 1))).reshape(-1)
        self.images, self.masks = images.to(device), masks.to(device)
        self.same_size = len(set(self.shapes)) == 1

    def __len__(self):
        return len(self.shapes)

    def _view(self, flat, i, channels):
        h, w = self.shapes[i]
        start = self.offsets[i] * channels
        return flat[start:start + channels * h * w].view(channels, h, w)

    def image(self, i):
        return self._view(self.images, i, self.channels)

    def mask(self, i):
        return self._view(self.masks, i, self.classes)

    def stacked(self, indices):
        """Same-size sets: images [B, C, H, W] and masks [B, K, H, W] of ``indices``, one gather each."""
        h, w = self.shapes[0]
        index = torch.as_tensor(indices, device=self.images.device)
        return (self.images.view(len(self), self.channels, h, w).index_select(0, index),
                self.masks.view(len(self), self.classes, h, w).index_select(0, index))

    def as_unit_float(self, x):
        """Stored images (uint8 or float16) -> float32 in [0, 1]."""
        return x.float() / 255 if self.eight_bit else x.float()


class BatchAugment:
    """``augment(data, indices, generator)`` -> (images float32 [B, C, oh, ow] normalised ``(x - 0.5) / 0.25``,
    masks float32 [B, K, oh, ow] in {0, 1}) for the samples ``indices`` of a :class:`DeviceImages`, where
    (oh, ow) is (crop_size, crop_size) or (input_h, input_w). Crop training needs every image at least crop_size
    on each side (train.py checks it once)."""

    def __init__(self, input_h, input_w, crop_size=0, scale_jitter=0.0, color_jitter=True, greyscale=0.0, invert=0.0,
                 shot_noise=0.0, blur=0.0):
        self.out_h, self.out_w = (crop_size, crop_size) if crop_size else (input_h, input_w)
        self.crop_size, self.scale_jitter, self.color_jitter = crop_size, scale_jitter, color_jitter
        self.greyscale, self.invert, self.shot_noise, self.blur = greyscale, invert, shot_noise, blur

    def __call__(self, data, indices, generator):
        images, masks = self.geometry(data, indices, generator)
        images, masks = d4(images, masks, generator)
        if self.blur:
            images = defocus(images, self.blur, generator)
        if self.shot_noise:
            images = shot_noise(images, self.shot_noise, generator)
        if self.color_jitter and images.shape[1] in (1, 3):
            images = colour_jitter(images, generator)
        if self.greyscale and images.shape[1] == 3:
            images = where_drawn(self.greyscale, grey(images).expand_as(images), images, generator)
        if self.invert:
            images = where_drawn(self.invert, 1 - images, images, generator)
        return normalize(images), masks.float()

    def geometry(self, data, indices, generator):
        """Resize or crop (after the scale jitter): images float [B, C, oh, ow] in [0, 1], masks uint8."""
        n = len(indices)
        scales = 1 + self.scale_jitter * (2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1)
        starts = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        if not self.scale_jitter and self.crop_size:  # plain crops: slices, no interpolation
            cs = self.crop_size
            corners = [(int(u * (data.shapes[i][0] - cs + 1)), int(v * (data.shapes[i][1] - cs + 1)))
                       for i, (u, v) in zip(indices, starts.tolist())]
            images = torch.stack([data.image(i)[:, y:y + cs, x:x + cs] for i, (y, x) in zip(indices, corners)])
            masks = torch.stack([data.mask(i)[:, y:y + cs, x:x + cs] for i, (y, x) in zip(indices, corners)])
            return data.as_unit_float(images), masks
        if not self.scale_jitter and data.same_size and data.shapes[0] == (self.out_h, self.out_w):
            images, masks = data.stacked(indices)  # already the training size: nothing to resample
            return data.as_unit_float(images), masks
        windows = [self.window(data.shapes[i], s, start) for i, s, start in zip(indices, scales.tolist(),
                                                                              starts.tolist())]
        pieces = [sample_window(data.as_unit_float(data.image(i)[:, ys, xs]), data.mask(i)[:, ys, xs], grid)
                  for i, (ys, xs, grid) in zip(indices, windows)]
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])

    def window(self, shape, scale, start):
        """Where output pixels come from in an image of ``shape`` rescaled by ``scale`` (rows, columns: each axis
        its own factor, as albumentations' Affine) about its centre: (row slice, column slice, grid [1, oh, ow, 2]
        in grid_sample's align_corners=True coordinates of that window)."""
        axes = []
        for size, out, u, scale in zip(shape, (self.out_h, self.out_w), start, scale):
            if self.crop_size:  # a window of the rescaled image, at a uniform integer position
                pos = int(u * (size - out + 1)) + torch.arange(out, dtype=torch.float64)
            else:  # resize: half-pixel centres, the edge pixels repeated beyond them, as OpenCV's INTER_LINEAR
                pos = ((torch.arange(out, dtype=torch.float64) + 0.5) * size / out - 0.5).clamp(0, size - 1)
            centre = (size - 1) / 2
            src = centre + (pos - centre) / scale
            lo = max(int(np.floor(src.min().item())) - 1, 0)
            hi = min(int(np.ceil(src.max().item())) + 2, size)
            # align_corners=True: -1 and 1 are the centres of the window's end pixels, so grid_sample's reflection
            # mirrors about them, as OpenCV's BORDER_REFLECT_101 that albumentations' Affine uses
            axes.append((slice(lo, hi), 2 * (src - lo) / max(hi - lo - 1, 1) - 1))
        (ys, gy), (xs, gx) = axes
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
        return ys, xs, grid


def sample_window(image, mask, grid):
    """Image [C, h, w] float and mask [K, h, w] uint8 sampled at ``grid`` [1, oh, ow, 2] (bilinear / nearest,
    align_corners=True, reflected about the end pixels' centres outside): ([1, C, oh, ow], [1, K, oh, ow] uint8)."""
    grid = grid.to(image.device)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    hard = F.grid_sample(mask[None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=True)
    return out.clamp(0, 1), hard.to(torch.uint8)


def d4(images, masks, generator):
    """One of the eight flips/rotations per sample, each with probability 1/8 (only the four flips when the
    batch is not square): images [B, C, H, W] and masks [B, K, H, W], transformed alike."""
    n = images.shape[0]
    square = images.shape[-1] == images.shape[-2]
    k = torch.randint(0, 8 if square else 4, (n,), generator=generator).to(images.device)
    ops = [(k & 1, lambda t: t.flip(-1)), (k & 2, lambda t: t.flip(-2))]
    if square:
        ops.append((k & 4, lambda t: t.transpose(-1, -2)))
    for chosen, op in ops:
        where = chosen.bool().view(n, 1, 1, 1)
        images = torch.where(where, op(images), images)
        masks = torch.where(where, op(masks), masks)
    return images, masks


def where_drawn(p, changed, images, generator):
    """Per sample of ``images`` [B, ...], ``changed`` with probability p, else ``images``."""
    n = images.shape[0]
    pick = (torch.rand(n, generator=generator) < p).to(images.device)
    return torch.where(pick.view(n, *[1] * (images.dim() - 1)), changed, images)


def shot_noise(images, photons, generator):
    """With probability 0.5 per sample, images float [B, C, H, W] in [0, 1] -> Poisson(x n) / n clipped to [0, 1],
    n log-uniform in [photons, MOST_PHOTONS] per sample, as augment.ShotNoise. The counts are drawn on the CPU from
    ``generator``, so that they are the same on any device."""
    b = images.shape[0]
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64)
    n = torch.exp(math.log(photons) + u[:, 1] * math.log(MOST_PHOTONS / photons)).float().view(b, 1, 1, 1)
    noisy = (torch.poisson(images.cpu() * n, generator=generator) / n).clamp(max=1)
    return torch.where((u[:, 0] < SHOT_NOISE_P).view(b, 1, 1, 1).to(images.device), noisy.to(images.device), images)


def defocus(images, blur, generator):
    """With probability 0.5 per sample, images float [B, C, H, W] -> :func:`gaussian_blur` of sigma uniform in
    [0, blur] pixels per sample, as augment.Defocus. The coins and sigmas are drawn on the CPU from ``generator``."""
    u = torch.rand(images.shape[0], 2, generator=generator, dtype=torch.float64)
    picked = (u[:, 0] < BLUR_P).nonzero()[:, 0]
    # the others are left out of the convolutions, which then cost half as much
    index = picked.to(images.device)
    return images.index_copy(0, index, gaussian_blur(images.index_select(0, index), u[picked, 1] * blur))


def gaussian_blur(images, sigma):
    """images float [B, C, H, W], sigma float64 [B] (CPU; 0 leaves a sample as it is) -> each sample as
    cv2.GaussianBlur(image, (0, 0), sigma) blurs a float image: the kernel cut where OpenCV cuts it, borders
    reflected 101 however small the image. One grouped convolution per axis for the whole batch."""
    b, c, h, w = images.shape
    # OpenCV's kernel size for a float image, cvRound(8 sigma + 1) | 1 (rint, as torch.round)
    radius = torch.div(torch.round(sigma * 8 + 1).long() | 1, 2, rounding_mode="floor")
    r = int(radius.max()) if b else 0  # b = 0: no coin of the batch fell for defocus
    if r == 0:
        return images
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    # a sample's taps beyond its own radius are 0 (the batch shares the widest); the clamp only keeps 0 / 0 out of
    # the centre of a sigma of 0, whose kernel is then [1]
    kernel = torch.exp(-0.5 * (x / sigma.clamp(min=1e-12).view(b, 1)) ** 2) * (x.abs() <= radius.view(b, 1))
    kernel = (kernel / kernel.sum(1, keepdim=True)).float().repeat_interleave(c, 0).to(images.device)
    out = images.reshape(1, b * c, h, w).index_select(3, reflected_101(w, r, images.device))
    out = F.conv2d(out, kernel.view(b * c, 1, 1, -1), groups=b * c).index_select(2, reflected_101(h, r, images.device))
    return F.conv2d(out, kernel.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)


def reflected_101(n, r, device):
    """The indices of a length-n axis padded by r on each side, reflected about its end pixels as OpenCV's
    BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), repeatedly where r >= n, which F.pad's reflect refuses."""
    if n == 1:
        return torch.zeros(2 * r + 1, dtype=torch.long, device=device)
    i = torch.arange(-r, n + r, device=device).remainder(2 * (n - 1))
    return torch.where(i < n, i, 2 * (n - 1) - i)


def grey(x):
    """[B, C, H, W] (C = 1 or 3, RGB) -> [B, 1, H, W] grey, OpenCV's weights."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def colour_jitter(images, generator):
    """With probability 0.8 per sample, ColorJitter or RandomBrightnessContrast (1/2 each), as
    ``dataset.train_transform``: images float [B, C, H, W] in [0, 1] -> the same, clipped to [0, 1].

    ColorJitter applies its four parts in a random order; here one order is drawn per batch, so each sample's
    order is still uniform over the 24."""
    n, dev = images.shape[0], images.device
    u = torch.rand(n, 7, generator=generator)
    apply, jitter = u[:, 0] < COLOUR_P, u[:, 1] < 0.5
    cj, bc = apply & jitter, apply & ~jitter
    factors = 1 + JITTER * (2 * u[:, 2:5] - 1)  # brightness, contrast, saturation in [0.8, 1.2]
    factors[~cj] = 1.0
    hue = torch.where(cj, HUE * (2 * u[:, 5] - 1), torch.zeros(n))
    alpha = torch.where(bc, 1 + JITTER * (2 * u[:, 6] - 1), torch.ones(n))
    beta = torch.where(bc, JITTER * (2 * torch.rand(n, generator=generator) - 1), torch.zeros(n))
    order = torch.randperm(4, generator=generator).tolist()

    def per_sample(t):
        return t.to(dev).view(n, 1, 1, 1)

    brightness, contrast, saturation = (per_sample(factors[:, j]) for j in range(3))
    hue, alpha, beta = per_sample(hue), per_sample(alpha), per_sample(beta)
    x = images
    for part in order:
        if part == 0:
            x = (x * brightness).clamp(0, 1)
        elif part == 1:
            mean = grey(x).mean((1, 2, 3), keepdim=True)
            x = (x * contrast + mean * (1 - contrast)).clamp(0, 1)
        elif part == 2 and x.shape[1] == 3:
            x = (x * saturation + grey(x) * (1 - saturation)).clamp(0, 1)
        elif part == 3 and x.shape[1] == 3 and bool(cj.any()):
            x = torch.where(cj.to(dev).view(n, 1, 1, 1), shift_hue(x, hue), x)
    return (x * alpha + beta).clamp(0, 1)


def shift_hue(rgb, shift):
    """RGB [B, 3, H, W] in [0, 1] with its HSV hue turned by ``shift`` [B, 1, 1, 1] (a fraction of the circle)."""
    r, g, b = rgb.unbind(1)
    top, _ = rgb.max(1)
    low, _ = rgb.min(1)
    span = top - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    h = torch.where(top == r, ((g - b) / safe) % 6, torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(span > 0, h, torch.zeros_like(h)) / 6
    h = (h + shift[:, 0]) % 1.0
    s = torch.where(top > 0, span / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    k = (torch.tensor([5.0, 3.0, 1.0], device=rgb.device).view(1, 3, 1, 1) + h[:, None] * 6) % 6
    return top[:, None] - top[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


class DeviceLoader:
    """Batches of a :class:`DeviceImages` set, augmented on its device: iterating yields ``(images, masks,
    {'img_id': [...]})`` like a DataLoader over ``dataset.Dataset`` (drop_last). ``sampler`` is a
    DistributedSampler or WeightedDistributedSampler (``set_epoch`` picks the epoch's order and augmentations).
    """

    def __init__(self, data, ids, augment, sampler, batch_size, seed):
        self.data, self.ids, self.augment = data, list(ids), augment
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        state = int(np.random.SeedSequence([self.seed, self.sampler.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(state)
        order = list(self.sampler)
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            images, masks = self.augment(self.data, batch, generator)
            yield images, masks, {"img_id": [self.ids[i] for i in batch]}
