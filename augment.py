"""Training augmentation on the CPU (albumentations 2.x), run in DataLoader workers (train.py --loader workers).

Imported only when a run augments there (by dataset.train_transform): albumentations' import takes seconds (3 s on a
2-core Zen 1) that val.py, predict.py and runs augmenting on the device (device_data.BatchAugment) need not pay.
"""
import math
import os

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import otherwise calls the network

import albumentations as A  # noqa: E402  (after the setting above)

from image_files import BLUR_P, MOST_PHOTONS, SHOT_NOISE_P  # noqa: E402


class Defocus(A.ImageOnlyTransform):
    """With probability p, an image float [H, W, C] in [0, 1] blurred by cv2.GaussianBlur (kernel size from sigma,
    borders reflected 101), sigma uniform in [0, blur] pixels per image. A.GaussianBlur is not this: its kernel
    stops at 3.5 sigma (PIL's), OpenCV's at 4, and at a sigma of 0 its kernel is 0 / 0."""

    def __init__(self, blur, p=BLUR_P):
        super().__init__(p=p)
        self.blur = blur

    def get_params(self):
        return {"sigma": self.py_random.uniform(0, self.blur)}

    def apply(self, img, sigma, **params):
        if sigma == 0:  # OpenCV refuses a sigma of 0 with no kernel size
            return img
        return cv2.GaussianBlur(img, (0, 0), sigma).reshape(img.shape)  # OpenCV drops a single channel's axis


class ShotNoise(A.ImageOnlyTransform):
    """With probability p, an image float [H, W, C] in [0, 1] -> Poisson(x n) / n clipped to [0, 1], with n (the
    photons at the value 1) log-uniform in [photons, MOST_PHOTONS] per image. A.ShotNoise is not this: it works
    in gamma-corrected light and draws its scale uniformly."""

    def __init__(self, photons, p=SHOT_NOISE_P):
        super().__init__(p=p)
        self.photons = photons

    def get_params(self):
        return {"n": math.exp(self.py_random.uniform(math.log(self.photons), math.log(MOST_PHOTONS)))}

    def apply(self, img, n, **params):
        return np.minimum(self.random_generator.poisson(img * n) / n, 1).astype(np.float32)


class DrawnApart(A.Compose):
    """A.Compose whose transforms each draw from a seed of their own, derived from the one it is given.
    albumentations hands every transform the Compose's seed itself, so that their first draws are the same numbers:
    every image turned grey was also inverted (--greyscale 0.5 --invert 0.5), and the flips fell with the crop
    position, where device_data.BatchAugment draws each augmentation independently."""

    def set_random_seed(self, seed):
        super().set_random_seed(seed)
        if seed is not None:
            seed_apart(self.transforms, seed)


def seed_apart(transforms, seed):
    """Seed each of ``transforms`` (and each transform of an A.OneOf among them) from SeedSequence([seed, its
    place])."""
    for place, transform in enumerate(transforms):
        own = int(np.random.SeedSequence([seed, place]).generate_state(1)[0])
        transform.set_random_seed(own)
        if isinstance(transform, A.BaseCompose):
            seed_apart(transform.transforms, own)
