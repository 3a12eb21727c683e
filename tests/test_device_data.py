"""device_data.py against today's albumentations pipeline (dataset.train_transform): the same distributions of
flips/rotations, crop positions, scale and colour jitter; and --loader device against --loader workers."""
import inspect
import io

import albumentations as A
import cv2
import numpy as np
import pytest
import tifffile
import torch
import yaml
from skimage.measure import regionprops

import augment
import dataset
import device_data
import image_files
import trainer
import splits
import utils
from config import build_train_parser, parse_train_args
from conftest import make_synthetic, train_argv
from device_data import (BatchAugment, DeviceImages, DeviceLoader, colour_jitter, d4, gaussian_blur, sample_window,
                         shift_hue)
from trainer import Trainer

N = 4000


def codes(h, w):
    """An image whose every pixel value is unique: uint8 [h, w, 3] (channel 0 row-major index mod 256, channel 1
    the index // 256, channel 2 constant)."""
    index = np.arange(h * w).reshape(h, w)
    return np.dstack([index % 256, index // 256, np.full((h, w), 7)]).astype(np.uint8)


def ours(images, masks, augment, n=N, seed=0):
    """n augmentations of sample 0 of (images, masks): float images [n, C, h, w] in [0, 1], masks [n, K, h, w]."""
    data = DeviceImages(list(zip(images, masks)), images[0].shape[2], torch.device("cpu"))
    out, hard = augment(data, [0] * n, torch.Generator().manual_seed(seed))
    return out * image_files.NORM_STD + image_files.NORM_MEAN, hard


def theirs(image, mask, transform, n):
    """n augmentations by albumentations, on the float image as dataset.Dataset feeds it."""
    x = dataset.image_to_float(image, 3)
    outs, hards = [], []
    for k in range(n):
        transform.set_random_seed(k)
        o = transform(image=x, mask=mask)
        outs.append(o["image"].transpose(2, 0, 1))
        hards.append(o["mask"].transpose(2, 0, 1))
    return torch.from_numpy(np.stack(outs)), torch.from_numpy(np.stack(hards))


def apply_d4(t, k):
    """Transform k of the eight (bit 4: transpose, bit 1: flip columns, bit 2: flip rows) on [..., h, w]."""
    if k & 4:
        t = t.transpose(-1, -2)
    if k & 1:
        t = t.flip(-1)
    if k & 2:
        t = t.flip(-2)
    return t


def d4_index(out, image):
    """Which of the 8 D4 transforms turns ``image`` [C, h, w] into ``out``; -1 if none."""
    return next((k for k in range(8) if torch.allclose(apply_d4(image, k), out, atol=1e-5, rtol=0)), -1)


def d4_counts(outs, image):
    return np.bincount([d4_index(o, image) for o in outs], minlength=8)


def test_each_flip_and_rotation_equally_often_and_the_mask_follows():
    image, mask = codes(16, 16), (np.arange(256).reshape(16, 16, 1) % 3 == 0).astype(np.uint8)
    out, hard = ours([image], [mask], BatchAugment(16, 16, color_jitter=False))
    reference = torch.from_numpy(image.transpose(2, 0, 1)).float() / 255
    counts = d4_counts(out, reference)
    assert counts.sum() == N  # every output is one of the eight, exactly
    assert np.all(np.abs(counts / N - 1 / 8) < 0.02), counts
    assert all(torch.equal(h.float(), _same_d4(o, reference, torch.from_numpy(mask.transpose(2, 0, 1)).float()))
               for o, h in zip(out[:200], hard[:200]))
    alb, _ = theirs(image, mask, dataset.train_transform(16, 16, color_jitter=False), 800)
    alb_counts = d4_counts(alb, reference)
    assert alb_counts.sum() == 800 and np.all(np.abs(alb_counts / 800 - 1 / 8) < 0.04), alb_counts


def _same_d4(out, image, mask):
    return apply_d4(mask, d4_index(out, image))


def crop_corners(outs, image):
    """(row, column) of each crop's first pixel in the un-flipped image [h, w] of unique codes."""
    flat = (image[:, :, 0].astype(int) + 256 * image[:, :, 1].astype(int))
    corners = []
    for o in outs:
        values = np.round(o[0].numpy() * 255).astype(int) + 256 * np.round(o[1].numpy() * 255).astype(int)
        corners.append(np.unravel_index(np.isin(flat.ravel(), values).nonzero()[0].min(), flat.shape))
    return np.array(corners)


def test_crop_positions_cover_the_same_range_uniformly():
    image, mask = codes(40, 56), np.zeros((40, 56, 1), np.uint8)
    out, _ = ours([image], [mask], BatchAugment(0, 0, crop_size=32, color_jitter=False), n=1500)
    alb, _ = theirs(image, mask, dataset.train_transform(0, 0, crop_size=32, color_jitter=False), 600)
    for outs in (out, alb):
        corners = crop_corners(outs, image)
        assert corners[:, 0].min() == 0 and corners[:, 0].max() == 40 - 32
        assert corners[:, 1].min() == 0 and corners[:, 1].max() == 56 - 32
        assert abs(corners[:, 0].mean() - 4) < 0.4 and abs(corners[:, 1].mean() - 12) < 1.0


def disk(size, radius):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    inside = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.uint8)
    return np.repeat(inside[:, :, None] * 200, 3, axis=2).astype(np.uint8), inside[:, :, None]


def test_scale_jitter_draws_the_same_range_of_sizes():
    image, mask = disk(64, 14)
    spread = {}
    for name, (out, hard) in {
            "ours": ours([image], [mask], BatchAugment(64, 64, scale_jitter=0.25, color_jitter=False), n=600),
            "albumentations": theirs(image, mask, dataset.train_transform(64, 64, scale_jitter=0.25,
                                                                           color_jitter=False), 600)}.items():
        ratio = hard.float().sum((1, 2, 3)) / mask.sum()  # area scales with the square of the factor
        assert ratio.min() >= 0.75 ** 2 - 0.05 and ratio.max() <= 1.25 ** 2 + 0.05
        spread[name] = np.quantile(ratio.sqrt().numpy(), [0.05, 0.5, 0.95])
        assert torch.all((hard == 0) | (hard == 1))
    np.testing.assert_allclose(spread["ours"], spread["albumentations"], atol=0.03)
    factors = np.random.default_rng(0).uniform(0.75, 1.25, (100000, 2))  # one per axis, as albumentations' Affine
    np.testing.assert_allclose(spread["ours"], np.quantile(np.sqrt(factors.prod(1)), [0.05, 0.5, 0.95]), atol=0.03)


@pytest.mark.parametrize("scale", [0.8, 1.2])
def test_a_rescale_fills_the_margins_as_albumentations_affine(scale):
    """One fixed factor both ways: the same pixels, the margins of a shrunk image mirrored about the end pixels'
    centres (OpenCV's BORDER_REFLECT_101), not about their edges."""
    h, w = 40, 48
    yy, xx = np.mgrid[:h, :w]
    wave = lambda t, period: np.abs(t % period - period / 2) / (period / 2)  # noqa: E731 (continuous, no flat parts)
    image = np.dstack([wave(xx + 0.3 * yy, 9), wave(yy, 7), wave(0.5 * xx + yy, 11)]).astype(np.float32)
    ys, xs, grid = BatchAugment(h, w, scale_jitter=0.25).window((h, w), (scale, scale), (0.3, 0.6))
    out, _ = sample_window(torch.from_numpy(image.transpose(2, 0, 1).copy())[:, ys, xs],
                           torch.zeros(1, h, w, dtype=torch.uint8)[:, ys, xs], grid)
    alb = A.Affine(scale=(scale, scale), border_mode=cv2.BORDER_REFLECT_101, p=1.0)(image=image)["image"]
    # OpenCV 4's warpAffine rounds its sample positions to 1/32 pixel (up to 0.003 here); OpenCV 5's does not
    atol = 1e-4 if int(cv2.__version__.split(".")[0]) >= 5 else 5e-3
    np.testing.assert_allclose(out[0].numpy(), alb.transpose(2, 0, 1), atol=atol)


def test_colour_jitter_draws_the_same_changes():
    """Against albumentations' ColorJitter and RandomBrightnessContrast as train_transform configures them, mixed
    as its OneOf states (0.2 unchanged, 0.4 each), each drawn with its own seed."""
    rng = np.random.default_rng(0)
    image = (rng.random((16, 16, 3)) * 120 + 60).astype(np.uint8)
    image[..., 0] //= 2  # coloured, so that saturation and hue matter
    base = torch.from_numpy(image.transpose(2, 0, 1)).float() / 255
    x = base.permute(1, 2, 0).numpy()
    jitter, brightness_contrast = dataset.train_transform(16, 16).transforms[-1].transforms
    choice = np.random.default_rng(1).random(2000)
    alb = []
    for k, u in enumerate(choice):
        t = None if u < 0.2 else jitter if u < 0.6 else brightness_contrast
        if t is not None:
            t.set_random_seed(k)
        alb.append(x if t is None else t(image=x)["image"])
    theirs = torch.from_numpy(np.stack(alb).transpose(0, 3, 1, 2))
    ours_ = colour_jitter(base[None].repeat(4000, 1, 1, 1), torch.Generator().manual_seed(0))
    stats = {}
    for name, out in {"ours": ours_, "albumentations": theirs}.items():
        changed = (out - base).abs().amax((1, 2, 3)) > 1e-4
        mean_ratio = out.mean((1, 2, 3)) / base.mean()
        red_share = out[:, 0].mean((1, 2)) / out.mean((1, 2, 3))
        stats[name] = np.array([changed.float().mean().item(),
                                *np.quantile(mean_ratio.numpy(), [0.05, 0.25, 0.5, 0.75, 0.95]),
                                *np.quantile(red_share.numpy(), [0.05, 0.5, 0.95])])
    np.testing.assert_allclose(stats["ours"][0], 0.8, atol=0.02)
    np.testing.assert_allclose(stats["ours"], stats["albumentations"], atol=0.03)


def _undo(out, base):
    """``out`` brought back to ``base``'s orientation by trying the eight transforms on its pixels' positions."""
    for k in range(8):
        t = out
        if k & 2:
            t = t.flip(-2)
        if k & 1:
            t = t.flip(-1)
        if k & 4:
            t = t.transpose(-1, -2)
        if torch.corrcoef(torch.stack([t.flatten(), base.flatten()]))[0, 1] > 0.9:
            return t
    return out


def test_shift_hue_and_identity_jitter():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(shift_hue(x, torch.zeros(2, 1, 1, 1)), x, atol=1e-6, rtol=0)
    turned = shift_hue(x, torch.full((2, 1, 1, 1), 1 / 3))  # a third of the circle: R -> G -> B
    torch.testing.assert_close(turned, x[:, [2, 0, 1]], atol=1e-5, rtol=0)
    images, masks = d4(x, (x > 0.5).to(torch.uint8), torch.Generator().manual_seed(0))
    assert torch.equal(masks.bool(), images > 0.5)
    assert colour_jitter(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_mixed_sizes_and_16_bit_images_are_resized_and_scaled():
    big = (np.arange(48 * 40 * 1).reshape(48, 40, 1) * 30).astype(np.uint16)
    small = codes(24, 20)[:, :, :1]
    masks = [np.ones((48, 40, 1), np.uint8), np.zeros((24, 20, 1), np.uint8)]
    data = DeviceImages([(big, masks[0]), (small, masks[1])], 3, torch.device("cpu"))
    assert not data.eight_bit and data.images.dtype == torch.float16 and not data.same_size
    images, hard = BatchAugment(32, 32, color_jitter=False)(data, [0, 1, 0], torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 32, 32) and hard.shape == (3, 1, 32, 32)
    assert hard[0].min() == 1 and hard[1].max() == 0
    unit = images * image_files.NORM_STD + image_files.NORM_MEAN
    assert unit.min() >= 0 and unit.max() <= 1 and unit[0].max() > 0.95  # min-max scaled, as in training


def test_an_epoch_repeats_and_the_next_differs(tmp_path):
    data = DeviceImages([(codes(16, 16), np.zeros((16, 16, 1), np.uint8))] * 8, 3, torch.device("cpu"))
    sampler = torch.utils.data.DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DeviceLoader(data, [f"s{i}" for i in range(8)], BatchAugment(16, 16), sampler, 4, seed=0)
    first = [b[0] for b in loader]
    assert len(loader) == 2 and len(first) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, [b[0] for b in loader]))
    sampler.set_epoch(1)
    assert not torch.equal(first[0], next(iter(loader))[0])


def test_both_loaders_take_every_augmentation_flag():
    """An augmentation added to dataset.train_transform alone would do nothing with --loader device, which --loader
    auto picks on a CPU when the images are cached (the default): both take dataset.AUGMENTATION_FLAGS, which
    train.py passes them, and no other (but stain_jitter, which runs in the workers alone)."""
    flags = {action.dest for action in build_train_parser()._actions}
    assert set(dataset.AUGMENTATION_FLAGS) <= flags
    assert tuple(inspect.signature(BatchAugment).parameters) == dataset.AUGMENTATION_FLAGS, \
        "draw the augmentation in device_data.BatchAugment too, and name its flag in dataset.AUGMENTATION_FLAGS"
    assert tuple(inspect.signature(dataset.train_transform).parameters) == (*dataset.AUGMENTATION_FLAGS,
                                                                           "stain_jitter"), \
        "draw the augmentation in device_data.BatchAugment too, and name its flag in dataset.AUGMENTATION_FLAGS"


def test_device_and_worker_loaders_give_the_same_split_and_sizes(tmp_path, monkeypatch):
    make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    built = {}
    for loader in ("device", "workers"):
        argv = train_argv(f"l_{loader}", "--loader", loader, "--crop_size", "16")
        with Trainer(parse_train_args(argv), progress=False) as t:
            images, masks, meta = next(iter(t.train_loader))
            built[loader] = (t.split, len(t.train_loader), images.shape, masks.shape, images.dtype, masks.dtype)
            assert t.on_device == (loader == "device")
            assert set(masks.unique().tolist()) <= {0.0, 1.0} and len(meta["img_id"]) == images.shape[0]
    device, workers = built["device"], built["workers"]
    assert device[0].equals(workers[0])
    assert device[1:] == workers[1:]
    # a crop-trained run records its training nuclei's median diameter for predict.py --scale auto
    train_ids = splits.split_ids(device[0], "train")
    labels_dir = tmp_path / "inputs" / "tiny" / "labels"
    labels = [image_files.read_label_image(str(labels_dir / f"{i}.png")) for i in train_ids]
    diameters = [r.equivalent_diameter_area for lab in labels for r in regionprops(lab)]
    saved = yaml.safe_load((tmp_path / "models" / "l_device" / "config.yml").read_text())["nucleus_diameter"]
    assert saved == pytest.approx(np.median(diameters), abs=0.01) and saved > 0


def test_greyscale_and_invert_as_often_as_albumentations_draws_them():
    rng = np.random.default_rng(0)
    image = (rng.random((16, 16, 3)) * 80 + 20).astype(np.uint8)
    image[..., 0] //= 3  # coloured and dark: grey outputs have equal channels, inverted ones a bright mean
    mask = np.zeros((16, 16, 1), np.uint8)
    shares = {}
    for name, (out, _) in {
            "ours": ours([image], [mask], BatchAugment(16, 16, color_jitter=False, greyscale=0.3, invert=0.4), n=3000),
            "albumentations": theirs(image, mask, dataset.train_transform(16, 16, color_jitter=False, greyscale=0.3,
                                                                           invert=0.4), 1500)}.items():
        grey_ = (out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-4
        inverted = out.mean((1, 2, 3)) > 0.5
        shares[name] = np.array([grey_.float().mean(), inverted.float().mean(), (grey_ & inverted).float().mean()])
    np.testing.assert_allclose(shares["ours"], [0.3, 0.4, 0.12], atol=0.03)  # independent draws
    # albumentations draws each with the same probability, but a Compose seeded per sample (as dataset.Dataset
    # does) gives every transform in it the same random number, so here grey images are always inverted too
    np.testing.assert_allclose(shares["albumentations"][:2], [0.3, 0.4], atol=0.04)


def shot_noise_draws(image, photons, n=1500):
    """--shot_noise photons on a flat ``image`` (uint8 [h, w, 3]), n draws on each path: {path: (whether each draw
    was left alone [n], each noisy draw's values [m, 3 h w] in [0, 1])}."""
    mask = np.zeros(image.shape[:2] + (1,), np.uint8)
    draws = {"ours": ours([image], [mask], BatchAugment(*image.shape[:2], color_jitter=False, shot_noise=photons),
                          n=n)[0],
             "albumentations": theirs(image, mask, dataset.train_transform(*image.shape[:2], color_jitter=False,
                                                                           shot_noise=photons), n)[0]}
    x = torch.from_numpy(image.transpose(2, 0, 1)).float() / 255
    return {path: ((out - x).abs().amax((1, 2, 3)) < 1e-6, out[(out - x).abs().amax((1, 2, 3)) >= 1e-6].flatten(1))
            for path, out in draws.items()}


def test_shot_noise_is_the_poisson_law_of_a_fixed_photon_count_on_both_paths():
    """--shot_noise 1000 (the top of the range, so every noisy image has n = 1000): half the images are left
    alone, the others hold Poisson counts / 1000: integers, whose mean and variance are both x n."""
    image = np.dstack([np.full((16, 16), v, np.uint8) for v in (2, 60, 200)])
    expected = image[0, 0].astype(np.float64) / 255 * 1000
    for path, (kept, noisy) in shot_noise_draws(image, 1000).items():
        assert abs(kept.float().mean().item() - 0.5) < 0.04, path
        counts = noisy.double().view(len(noisy), 3, -1).transpose(0, 1).reshape(3, -1) * 1000
        np.testing.assert_allclose(counts, counts.round(), atol=2e-3, err_msg=path)
        np.testing.assert_allclose(counts.mean(1), expected, rtol=0.01, err_msg=path)
        np.testing.assert_allclose(counts.var(1), expected, rtol=0.05, err_msg=path)


def test_shot_noise_photon_counts_are_log_uniform_alike_on_both_paths():
    """--shot_noise 10: each noisy image's photon count n, read back from its variance (x / n on a flat image),
    spreads log-uniformly over [10, 1000] on both paths; the mean stays x."""
    x = 64 / 255  # low enough that Poisson(x n) / n almost never passes 1, where it is clipped
    quantiles = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    for path, (kept, noisy) in shot_noise_draws(np.full((32, 32, 3), 64, np.uint8), 10).items():
        assert abs(kept.float().mean().item() - 0.5) < 0.04, path
        assert abs(noisy.double().mean().item() - x) < 1e-3, path
        log_n = np.log(x / noisy.double().var(1).numpy())
        uniform = (log_n - np.log(10)) / np.log(100)
        np.testing.assert_allclose(np.quantile(uniform, quantiles), quantiles, atol=0.05, err_msg=path)


def test_shot_noise_is_drawn_apart_from_the_other_augmentations():
    """The workers' Compose gives every transform the same seed, so ShotNoise's coin was InvertImg's: under
    --invert 0.5 every noisy image was inverted and no other. Both paths: about a quarter noisy and inverted."""
    x = 40 / 255
    image, mask = np.full((16, 16, 3), 40, np.uint8), np.zeros((16, 16, 1), np.uint8)
    for path, (out, _) in {
            "ours": ours([image], [mask], BatchAugment(16, 16, color_jitter=False, invert=0.5, shot_noise=10), n=800),
            "albumentations": theirs(image, mask, dataset.train_transform(16, 16, color_jitter=False, invert=0.5,
                                                                           shot_noise=10), 800)}.items():
        inverted = out.mean((1, 2, 3)) > 0.5
        noisy = ((out - x).abs().amax((1, 2, 3)) > 1e-6) & ((1 - out - x).abs().amax((1, 2, 3)) > 1e-6)
        shares = [inverted.float().mean().item(), noisy.float().mean().item(), (inverted & noisy).float().mean().item()]
        np.testing.assert_allclose(shares, [0.5, 0.5, 0.25], atol=0.05, err_msg=path)


def test_the_workers_augmentations_are_drawn_independently_of_each_other():
    """albumentations seeds every transform of a Compose with the same number, so that their coins fell together:
    every image turned grey was also inverted, and no other (--greyscale 0.5 --invert 0.5). Both paths: grey,
    inverted and the identity flip each drawn on their own (a quarter grey and inverted, 1/16 identity and grey)."""
    rng = np.random.default_rng(0)
    image = (rng.random((16, 16, 3)) * np.array([40, 80, 120]) + 10).astype(np.uint8)  # coloured, dark
    mask = np.zeros((16, 16, 1), np.uint8)
    mask[0, 1] = 1  # lands on one of eight places, one per flip or rotation
    augment = dict(color_jitter=False, greyscale=0.5, invert=0.5)
    for path, (out, hard) in {
            "ours": ours([image], [mask], BatchAugment(16, 16, **augment), n=800),
            "albumentations": theirs(image, mask, dataset.train_transform(16, 16, **augment), 800)}.items():
        grey = (out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6
        inverted = out.mean((1, 2, 3)) > 0.5
        identity = hard[:, 0, 0, 1] == 1
        shares = [(grey & inverted).float().mean().item(), (grey & ~inverted).float().mean().item(),
                  (identity & grey).float().mean().item(), (identity & inverted).float().mean().item()]
        np.testing.assert_allclose(shares, [0.25, 0.25, 1 / 16, 1 / 16], atol=0.035, err_msg=path)


def test_shot_noise_0_draws_as_before():
    """--shot_noise 0 (the default) adds no transform and draws no random number: every other augmentation is
    drawn as it was."""
    image, mask = codes(16, 16), np.zeros((16, 16, 1), np.uint8)
    for shot_noise, same in ((0, True), (10, False)):
        transform = dataset.train_transform(16, 16, greyscale=0.5, invert=0.5, shot_noise=shot_noise)
        drawn = theirs(image, mask, transform, 64)[0]
        assert torch.equal(drawn, theirs(image, mask, dataset.train_transform(16, 16, greyscale=0.5, invert=0.5),
                                         64)[0]) == same
    plain = ours([image], [mask], BatchAugment(16, 16, greyscale=0.5, invert=0.5), n=64)[0]
    assert torch.equal(ours([image], [mask], BatchAugment(16, 16, greyscale=0.5, invert=0.5, shot_noise=0),
                            n=64)[0], plain)
    assert not torch.equal(ours([image], [mask], BatchAugment(16, 16, greyscale=0.5, invert=0.5, shot_noise=10),
                                n=64)[0], plain)


@pytest.mark.parametrize("h, w, channels", [(32, 32, 3), (96, 96, 1), (5, 40, 3)])
def test_blur_is_opencvs_gaussian_blur_on_both_paths(h, w, channels):
    """--blur: at a fixed sigma both paths blur as cv2.GaussianBlur(image, (0, 0), sigma) blurs a float image (the
    same kernel length, borders reflected 101), also where the kernel (65 px at sigma 8) is wider than the image."""
    rng = np.random.default_rng(h)
    image = rng.random((h, w, channels)).astype(np.float32)
    sigmas = [0.0, 0.05, 0.3, 1.0, 2.5, 4.0, 8.0]
    expected = [image if s == 0 else cv2.GaussianBlur(image, (0, 0), s).reshape(image.shape) for s in sigmas]
    batch = torch.from_numpy(np.stack([image] * len(sigmas)).transpose(0, 3, 1, 2)).contiguous()
    blurred = gaussian_blur(batch, torch.tensor(sigmas, dtype=torch.float64)).numpy().transpose(0, 2, 3, 1)
    for sigma, out, want in zip(sigmas, blurred, expected):
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=0, err_msg=f"sigma {sigma}")
        assert sigma < 0.0625 or np.abs(want - image).max() > 1e-3  # a blur that changes the image, but OpenCV's [1]
        np.testing.assert_allclose(augment.Defocus(8.0).apply(image, sigma), want, atol=1e-6, rtol=0)
    assert gaussian_blur(batch[:0], torch.zeros(0, dtype=torch.float64)).shape == (0, channels, h, w)  # none drawn


def blur_draws(blur, background=0, n=1500, **augment):
    """--blur on a 48 x 48 image of ``background`` (uint8) with one white pixel near its centre, n draws on each
    path: {path: images float [n, 3, 48, 48]}."""
    image, mask = np.full((48, 48, 3), background, np.uint8), np.zeros((48, 48, 1), np.uint8)
    image[23, 24] = 255
    return {"ours": ours([image], [mask], BatchAugment(48, 48, color_jitter=False, blur=blur, **augment), n=n)[0],
            "albumentations": theirs(image, mask, dataset.train_transform(48, 48, color_jitter=False, blur=blur,
                                                                          **augment), n)[0]}


def test_blur_sigma_is_uniform_and_half_the_images_are_left_alone_on_both_paths():
    """--blur 4: the white pixel spreads into a Gaussian whose spatial variance is sigma^2 (its kernel, cut at 4
    sigma, ends 16 px from the pixel: inside the image). About half the draws keep it a single pixel (the coin's,
    and sigmas under about 0.15 px, whose kernel rounds to [1] in float32); over all draws, the sigmas read back
    (0 for those) are 0 with probability 1/2, else uniform over [0, 4]."""
    quantiles = np.array([0.625, 0.75, 0.875, 0.975])  # sigmas 1, 2, 3, 3.8, where the variance reads sigma^2 back
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    for path, out in blur_draws(4, n=2000).items():
        spot = out[:, 0].double()
        mass = spot.sum((1, 2))
        np.testing.assert_allclose(mass, 1, atol=1e-4, err_msg=path)  # nothing lost at the borders, nothing added
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2]), path
        cy, cx = (spot * yy).sum((1, 2)) / mass, (spot * xx).sum((1, 2)) / mass
        variance = (spot * ((yy - cy.view(-1, 1, 1)) ** 2 + (xx - cx.view(-1, 1, 1)) ** 2)).sum((1, 2)) / mass / 2
        kept = spot.amax((1, 2)) == 1
        assert abs(kept.double().mean().item() - 0.52) < 0.04, path
        sigma = torch.where(kept, 0, variance.sqrt()).numpy()
        assert sigma.max() <= 4 + 1e-3, path
        np.testing.assert_allclose(np.quantile(sigma / 4, quantiles), 2 * quantiles - 1, atol=0.05, err_msg=path)


def test_blur_comes_before_the_shot_noise_on_both_paths():
    """Optics before the camera: with --shot_noise 1000 (1000 photons at the value 1), a noisy image holds counts /
    1000, blurred or not, so half the draws are such counts (the grey 40 / 255 is not one); blurring after the
    noise would leave only the quarter that was noisy and not blurred. Drawn apart: a quarter blurred alone."""
    for path, out in blur_draws(4, background=40, n=800, shot_noise=1000).items():
        flat = out.double().flatten(1) * 1000
        counts = (flat - flat.round()).abs().amax(1) < 1e-3
        blurred_alone = ~counts & (out.flatten(1).amax(1) < 1)  # else the white pixel is still 1
        np.testing.assert_allclose([counts.double().mean().item(), blurred_alone.double().mean().item()],
                                   [0.5, 0.25], atol=0.05, err_msg=path)


def test_blur_0_draws_as_before():
    """--blur 0 (the default) adds no transform and draws no random number: every other augmentation, the shot
    noise included, is drawn as it was, bit for bit."""
    image, mask = codes(16, 16), np.zeros((16, 16, 1), np.uint8)
    augment = dict(greyscale=0.5, invert=0.5, shot_noise=10)
    plain = theirs(image, mask, dataset.train_transform(16, 16, **augment), 64)[0]
    for blur, same in ((0, True), (2, False)):
        assert torch.equal(theirs(image, mask, dataset.train_transform(16, 16, blur=blur, **augment), 64)[0],
                           plain) == same
    plain = ours([image], [mask], BatchAugment(16, 16, **augment), n=64)[0]
    for blur, same in ((0, True), (2, False)):
        assert torch.equal(ours([image], [mask], BatchAugment(16, 16, blur=blur, **augment), n=64)[0], plain) == same


def test_stain_jitter_restains_as_often_as_asked_and_runs_in_workers(tmp_path, monkeypatch):
    """--stain_jitter P: albumentations' HEStain colours a grey bright-field image in about P of the draws, keeps
    values in [0, 1] and leaves the mask alone; --loader auto then augments in the workers (HEStain is theirs)."""
    rng = np.random.default_rng(0)
    image = np.repeat((rng.random((16, 16, 1)) * 60 + 180).astype(np.uint8), 3, axis=2)  # grey, bright background
    mask = (rng.random((16, 16, 1)) > 0.5).astype(np.uint8)
    out, hard = theirs(image, mask, dataset.train_transform(16, 16, stain_jitter=0.3), 600)  # with colour jitter
    coloured = (out.amax(1) - out.amin(1)).amax((1, 2)) > 1e-3
    assert abs(coloured.float().mean().item() - 0.3) < 0.06
    assert out.min() >= 0 and out.max() <= 1
    assert set(hard.unique().tolist()) <= {0, 1} and (hard.sum((1, 2, 3)) == int(mask.sum())).all()
    make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    with Trainer(parse_train_args(train_argv("stain", "--stain_jitter", "0.5")), progress=False) as t:
        assert not t.on_device and isinstance(t.train_loader, torch.utils.data.DataLoader)


def test_device_images_store_the_percentile_stretched_image():
    """--normalization percentile on --loader device: the stored image is the workers' float image to 1/255."""
    rng = np.random.default_rng(1)
    image = (rng.random((20, 24, 3)) * 90 + 20).astype(np.uint8)  # a dim, low-contrast image
    mask = np.zeros((20, 24, 1), np.uint8)
    data = DeviceImages([(image, mask)], 3, torch.device("cpu"), "percentile")
    stored = data.as_unit_float(data.image(0)).numpy().transpose(1, 2, 0)
    expected = dataset.image_to_float(image, 3, "percentile")
    np.testing.assert_allclose(stored, expected, atol=0.5 / 255 + 1e-6)
    assert stored.max() == 1 and stored.min() == 0


@pytest.mark.parametrize("scale_jitter", [0.0, 1e-6])
def test_crops_come_from_every_row_and_column_pair(scale_jitter):
    """A crop's row and column offsets are drawn independently, each over every valid position (0 .. size - crop
    inclusive), as albumentations' RandomCrop: all 5 x 5 corners of a 16-pixel crop of a 20 x 20 image occur, with
    and without scale jitter (a near-identity factor here, so that the crop's pixels keep their unique codes)."""
    image, mask = codes(20, 20), np.zeros((20, 20, 1), np.uint8)
    augment = BatchAugment(0, 0, crop_size=16, scale_jitter=scale_jitter, color_jitter=False)
    out, _ = ours([image], [mask], augment, n=400)
    alb, _ = theirs(image, mask, dataset.train_transform(0, 0, crop_size=16, color_jitter=False), 300)
    every = {(r, c) for r in range(5) for c in range(5)}
    for outs in (out, alb):
        corners = crop_corners(outs, image)
        assert {tuple(c) for c in corners.tolist()} == every
        assert abs(np.corrcoef(corners[:, 0], corners[:, 1])[0, 1]) < 0.15


def test_an_image_is_augmented_alike_whatever_else_is_in_its_batch():
    """Per-image augmentation: with the same random state, image a comes out the same in the batches [a, b] and
    [a, c] (colour jitter's contrast pulls toward the image's own mean grey, not the batch's)."""
    rng = np.random.default_rng(0)
    a = (rng.random((16, 16, 3)) * 120 + 60).astype(np.uint8)
    b, c = np.full_like(a, 10), np.full_like(a, 245)  # a dark and a bright neighbour
    mask = np.zeros((16, 16, 1), np.uint8)
    data = DeviceImages([(a, mask), (b, mask), (c, mask)], 3, torch.device("cpu"))
    changed = 0
    for seed in range(10):
        with_b, _ = BatchAugment(16, 16)(data, [0, 1], torch.Generator().manual_seed(seed))
        with_c, _ = BatchAugment(16, 16)(data, [0, 2], torch.Generator().manual_seed(seed))
        torch.testing.assert_close(with_b[0], with_c[0], atol=1e-6, rtol=0)
        changed += d4_index(with_b[0] * image_files.NORM_STD + image_files.NORM_MEAN,
                            torch.from_numpy(a.transpose(2, 0, 1)).float() / 255) == -1
    assert changed >= 3  # the colour jitter did change a in most of these draws


def test_greyscale_is_opencvs_rgb_to_grey():
    """greyscale=1: every output's three channels are OpenCV's grey of the RGB image (cv2.COLOR_RGB2GRAY, the
    weights of albumentations' ToGray), up to the flip/rotation drawn."""
    rng = np.random.default_rng(0)
    image = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    image[..., 2] //= 4  # unequal channels, so that the weights' order matters
    out, _ = ours([image], [np.zeros((12, 12, 1), np.uint8)],
                  BatchAugment(12, 12, color_jitter=False, greyscale=1.0), n=16)
    expected = torch.from_numpy(cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2GRAY))[None]
    for o in out:
        torch.testing.assert_close(o, o[:1].expand_as(o), atol=1e-6, rtol=0)
        assert d4_index(o[:1], expected) != -1


def test_hue_shifts_stay_within_albumentations_hue_limit():
    """Colour jitter turns the hue (OpenCV's HSV, of a mid-saturated colour that the other parts leave the hue of)
    by at most ColorJitter's hue limit in train_transform (0.05 of the circle), and uses that whole range."""
    colour = np.array([0.6, 0.35, 0.3], np.float32)
    image = np.tile(colour, (4, 4, 1))
    jitter = dataset.train_transform(16, 16).transforms[-1].transforms[0]
    limit = max(abs(h) for h in jitter.hue)

    def shifts(outs):
        hue = cv2.cvtColor(np.ascontiguousarray(outs.numpy().transpose(0, 2, 3, 1)).reshape(-1, 4, 3),
                           cv2.COLOR_RGB2HSV)[..., 0] / 360
        base = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[0, 0, 0] / 360
        return np.abs((hue - base + 0.5) % 1 - 0.5).max(1)

    alb = []
    for k in range(300):
        jitter.set_random_seed(k)
        alb.append(jitter(image=image)["image"].transpose(2, 0, 1))
    theirs_ = shifts(torch.from_numpy(np.stack(alb)))
    ours_ = shifts(colour_jitter(torch.from_numpy(image.transpose(2, 0, 1).copy())[None].repeat(2000, 1, 1, 1),
                                 torch.Generator().manual_seed(0)))
    for s in (ours_, theirs_):
        assert s.max() <= limit + 1e-3 and s.max() > 0.9 * limit, s.max()
    np.testing.assert_allclose(np.quantile(ours_[ours_ > 1e-3], [0.25, 0.5, 0.75]),
                               np.quantile(theirs_[theirs_ > 1e-3], [0.25, 0.5, 0.75]), atol=0.006)


@pytest.mark.parametrize("size", [(20, 24), (50, 44)])
def test_resize_is_opencvs_bilinear_resize(size):
    """Without jitter the resize is the workers' A.Resize: cv2.resize(INTER_LINEAR) (half-pixel centres, edge
    pixels repeated when enlarging) of the stored image, up to the flip drawn, enlarging or shrinking."""
    h, w = size
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    out, _ = ours([image], [np.zeros((h, w, 1), np.uint8)], BatchAugment(32, 28, color_jitter=False), n=8)
    expected = torch.from_numpy(cv2.resize(image.astype(np.float32) / 255, (28, 32), interpolation=cv2.INTER_LINEAR)
                                .transpose(2, 0, 1))
    for o in out:  # a non-square output is only flipped: transforms 0-3
        assert min((apply_d4(expected, k) - o).abs().max().item() for k in range(4)) < 1e-5


def test_the_last_partial_batch_is_dropped_as_by_the_workers_loader():
    """10 samples in batches of 4: two full batches, as the workers' DataLoader (drop_last=True) gives."""
    data = DeviceImages([(codes(8, 8), np.zeros((8, 8, 1), np.uint8))] * 10, 3, torch.device("cpu"))
    sampler = torch.utils.data.DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DeviceLoader(data, [f"s{i}" for i in range(10)], BatchAugment(8, 8), sampler, 4, seed=0)
    workers = torch.utils.data.DataLoader(range(10), batch_size=4, sampler=sampler, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == len(workers) == 2
    assert all(images.shape[0] == masks.shape[0] == len(meta["img_id"]) == 4 for images, masks, meta in batches)


def test_scaling_the_training_images_shows_a_bar_once_it_takes_a_second(monkeypatch):
    """The full-size recipes' 536 training images took 3-14 s to scale after the caching bar, with nothing on
    screen; 96x96 ones take 0.1 s, and a bar that flashes for them is noise (delay: shown only after a second)."""
    bars = []

    def spy(iterable=None, **kwargs):
        bars.append((kwargs, utils.progress_bar(iterable, file=io.StringIO(), **kwargs)))
        return bars[-1][1]

    monkeypatch.setattr(device_data, "progress_bar", spy)
    samples = [(codes(8, 8), np.zeros((8, 8, 1), np.uint8))] * 5
    for progress in (True, False):
        bars.clear()
        DeviceImages(samples, 3, torch.device("cpu"), progress=progress)
        (kwargs, bar), = bars
        assert (kwargs["total"], kwargs["delay"], kwargs["disable"]) == (5, 1, not progress)
        if progress:
            assert bar.n == 5


def small_first_dataset(root):
    """inputs/sized under ``root``: 8 small 8-bit grey images first in id order, then 3 larger 16-bit colour ones
    (one with alpha), with masks and a split file that trains on all of them but one small image; returns the
    training ids and the split file."""
    folder = root / "inputs" / "sized"
    (folder / "images").mkdir(parents=True)
    (folder / "masks" / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"a{i}" for i in range(8)] + ["b0", "b1", "b2"]
    for img_id in ids:
        side = 8 if img_id < "b" else 64
        channels = 1 if img_id < "b" else 4 if img_id == "b2" else 3
        image = rng.integers(0, 256 if side == 8 else 65536, (side, side, channels))
        cv2.imwrite(str(folder / "images" / f"{img_id}.png"), image.astype(np.uint8 if side == 8 else np.uint16))
        mask = np.zeros((side, side), np.uint8)
        mask[2:6, 2:6] = 255
        cv2.imwrite(str(folder / "masks" / "0" / f"{img_id}.png"), mask)
    (root / "split.csv").write_text("img_id,split\n" + "".join(f"{i},{'val' if i == 'a7' else 'train'}\n"
                                                               for i in ids))
    return ids[:7] + ids[8:], root / "split.csv"


def test_decoded_bytes_counts_every_image_as_the_cache_and_its_copy_hold_it(tmp_path):
    """The training cache's and --loader device's bytes, from the files' headers, are what Dataset's cache and
    DeviceImages hold, also when the first 8 ids are small 8-bit images and the rest large 16-bit ones (they stood
    for all before: 8x8 grey for 64x64 colour)."""
    train_ids, _ = small_first_dataset(tmp_path)
    folder = str(tmp_path / "inputs" / "sized")
    data = dataset.Dataset(train_ids, folder, input_channels=3, cache=True)
    copy = DeviceImages(data.cached, 3, torch.device("cpu"))
    held = sum(image.nbytes + mask.nbytes for image, mask in data.cached)
    copied = copy.images.nbytes + copy.masks.nbytes
    assert trainer.decoded_bytes(folder, train_ids, ".png", ".png", 1, 3) == (held, copied)


def test_loader_auto_leaves_a_cache_whose_copy_would_pass_a_quarter_of_the_ram_to_workers(tmp_path, monkeypatch):
    """--loader auto on a CPU: the images stay cached and go through the workers when the cache fits a quarter of
    the RAM but the cache and DeviceImages' copy of it together do not (both are held while the copy is made)."""
    train_ids, split_file = small_first_dataset(tmp_path)
    data = dataset.Dataset(train_ids, str(tmp_path / "inputs" / "sized"), input_channels=3, cache=True)
    held = sum(image.nbytes + mask.nbytes for image, mask in data.cached)
    copied = DeviceImages(data.cached, 3, torch.device("cpu"))
    both = held + copied.images.nbytes + copied.masks.nbytes
    monkeypatch.chdir(tmp_path)
    for ram, on_device in ((4 * both + 4, True), (4 * both - 4, False)):
        monkeypatch.setattr(trainer, "ram", lambda: (ram, ram))
        argv = train_argv(f"sized{on_device}", "--dataset", "sized", "--split_file", str(split_file))
        with Trainer(parse_train_args(argv), progress=False) as t:
            assert t.on_device == on_device and t.cache


def test_decoded_bytes_counts_a_float16_copy_of_one_byte_tiffs_that_are_not_uint8(tmp_path):
    """DeviceImages keeps uint8 images as bytes and scales any other type to float16, an int8 or bool TIFF (one
    byte each, like uint8) too: decoded_bytes counted their copy at one byte a pixel, half what it holds. Label
    images and --borders (2 mask channels) as well, against what Dataset's cache and DeviceImages hold."""
    folder = tmp_path / "one_byte"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c"]
    for img_id, image in zip(ids, (rng.integers(-100, 100, (40, 30), dtype=np.int8), rng.random((33, 30)) > 0.5,
                                   rng.integers(0, 256, (35, 30), dtype=np.uint8))):
        tifffile.imwrite(folder / "images" / f"{img_id}.tif", image)
        labels = np.zeros(image.shape, np.uint16)
        labels[5:15, 5:15], labels[15:25, 5:15] = 1, 2
        tifffile.imwrite(folder / "labels" / f"{img_id}.tif", labels)
    data = dataset.Dataset(ids, str(folder), ".tif", ".tif", input_channels=1, cache=True, borders=True)
    copy = DeviceImages(data.cached, 1, torch.device("cpu"), progress=False)
    held = sum(image.nbytes + mask.nbytes for image, mask in data.cached)
    copied = copy.images.nbytes + copy.masks.nbytes
    assert trainer.decoded_bytes(str(folder), ids, ".tif", ".tif", 2, 1) == (held, copied)


def test_spawned_loader_workers_count_their_copies_of_the_cache(tmp_path, monkeypatch):
    """Loader workers started by spawn or forkserver (macOS, Windows, Linux from Python 3.14) each unpickle the
    Dataset with its cache; forked ones share its pages. A cache that fits a quarter of the RAM once, but not once
    per worker besides, is kept under fork and left out under spawn."""
    train_ids, split_file = small_first_dataset(tmp_path)
    data = dataset.Dataset(train_ids, str(tmp_path / "inputs" / "sized"), input_channels=3, cache=True)
    held = sum(image.nbytes + mask.nbytes for image, mask in data.cached)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "ram", lambda: (4 * 2 * held, 4 * 2 * held))  # a quarter: the cache twice
    for method, kept in (("fork", True), ("spawn", False), ("forkserver", False)):
        monkeypatch.setattr(trainer.multiprocessing, "get_start_method", lambda: method)
        argv = train_argv(f"spawned_{method}", "--dataset", "sized", "--split_file", str(split_file), "--loader",
                          "workers", "--num_workers", "2")
        with Trainer(parse_train_args(argv), progress=False) as t:
            assert (t.on_device, t.cache) == (False, kept), method


def test_loader_auto_shares_the_quarter_of_the_ram_among_torchrun_processes(tmp_path, monkeypatch):
    """Under torchrun each process on a machine caches the whole training set and makes its own copy: with 2 of
    them (LOCAL_WORLD_SIZE), a set whose cache and copy fit a quarter of the RAM once, not twice, is cached but not
    copied (each process sized it for itself, and the 2 held twice the quarter)."""
    train_ids, split_file = small_first_dataset(tmp_path)
    data = dataset.Dataset(train_ids, str(tmp_path / "inputs" / "sized"), input_channels=3, cache=True)
    copied = DeviceImages(data.cached, 3, torch.device("cpu"))
    held = sum(image.nbytes + mask.nbytes for image, mask in data.cached)
    both = held + copied.images.nbytes + copied.masks.nbytes
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "ram", lambda: (4 * both + 4, 4 * both + 4))  # a quarter: once, not twice
    assert held < both / 2  # the cache alone still fits each process's share
    for processes in (1, 2):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        argv = train_argv(f"shared{processes}", "--dataset", "sized", "--split_file", str(split_file))
        with Trainer(parse_train_args(argv), progress=False) as t:
            assert (t.on_device, t.cache) == (processes == 1, True)
