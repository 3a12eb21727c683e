"""Segmentation losses on logits, as in the seed (4uiiurz1/pytorch-nested-unet).

Every criterion takes logits [B, K, H, W] (raw scores, any real value) and a target of the same shape with
values in {0, 1}, and returns a scalar float32 tensor (computed in float32 also under autocast).
"""
import torch
import torch.nn.functional as F
from torch import nn

from lovasz_losses import in_float32, lovasz_hinge
from utils import DataError

DICE_SMOOTH = 1e-5


def check_same_shape(logits, target):
    """Raise DataError unless the model output and the mask batch are batches [B, K, H, W] of the same shape."""
    if logits.dim() != 4 or target.dim() != 4:
        # a [B, H, W] pair would be taken as B images of H classes: each row scored as a class of its own
        raise DataError(
            f"model output has shape {list(logits.shape)} and the masks {list(target.shape)}; both must be "
            "[B, K, H, W] (K classes): give single-class batches [B, H, W] their class axis, x[:, None]"
        )
    if logits.shape != target.shape:
        raise DataError(
            f"model output has shape {list(logits.shape)} but the masks have shape {list(target.shape)}: "
            "--num_classes must equal the number of mask channels"
        )


def soft_dice_per_sample(logits, target):
    """Soft Dice per sample over all its classes and pixels: [B, K, H, W] x2 -> [B] in (0, 1].

    (2 * sum(p * t) + 1e-5) / (sum(p) + sum(t) + 1e-5) with p = sigmoid(logits).
    """
    probs = torch.sigmoid(logits).reshape(logits.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    intersection = (probs * target).sum(1)
    return (2.0 * intersection + DICE_SMOOTH) / (probs.sum(1) + target.sum(1) + DICE_SMOOTH)


@in_float32
def bce_with_logits(logits, target):
    """Mean binary cross-entropy over all elements: [B, K, H, W] x2 -> scalar >= 0."""
    return F.binary_cross_entropy_with_logits(logits, target)


@in_float32
def bce_dice(logits, target):
    """0.5 * BCE-with-logits + (1 - mean over samples of the soft Dice): [B, K, H, W] x2 -> scalar >= 0."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return 0.5 * bce + (1.0 - soft_dice_per_sample(logits, target).mean())


class BCEWithLogitsLoss(nn.Module):
    """Mean binary cross-entropy over all elements, on logits."""

    def forward(self, logits, target):
        check_same_shape(logits, target)
        return bce_with_logits(logits, target)


class BCEDiceLoss(nn.Module):
    """0.5 * BCE-with-logits + (1 - mean over samples of the soft Dice); >= 0."""

    def forward(self, logits, target):
        check_same_shape(logits, target)
        return bce_dice(logits, target)


class LovaszHingeLoss(nn.Module):
    """Per-image binary Lovasz hinge; a [B, K, H, W] input is treated as B * K binary images."""

    def forward(self, logits, target):
        check_same_shape(logits, target)
        num_images = logits.shape[0] * logits.shape[1]
        return lovasz_hinge(logits.reshape(num_images, -1), target.reshape(num_images, -1))


# train.py's --loss: config.LOSSES lists the same names (without importing torch, so that --help answers at once).
# tests/test_losses.py checks every loss here: float32 under autocast, finite, lower for better logits, --borders.
LOSSES = {
    "BCEWithLogitsLoss": BCEWithLogitsLoss,
    "BCEDiceLoss": BCEDiceLoss,
    "LovaszHingeLoss": LovaszHingeLoss,
}


class WithBorderChannel(nn.Module):
    """The loss of a run trained with --borders True: ``criterion`` on the mask classes (channels [0, classes))
    plus ``criterion`` on the touching-border channel after them, each term its own binary target; >= 0. A target
    of the mask classes alone (val.py on a dataset without instance labels) is scored on them alone.

    One loss over all channels at once lets the border channel count for next to nothing: border pixels are about
    1 % of the nucleus pixels in DSB2018 at full size, and a full-size NestedUNet trained that way predicted a
    border probability below 0.02 everywhere, so its learned borders split nothing.
    """

    def __init__(self, criterion, classes):
        super().__init__()
        self.criterion, self.classes = criterion, classes

    def forward(self, logits, target):
        k = self.classes
        if target.shape[1] == k:
            return self.criterion(logits[:, :k], target)
        check_same_shape(logits, target)
        return self.criterion(logits[:, :k], target[:, :k]) + self.criterion(logits[:, k:], target[:, k:])


def build_loss(name, border_after=None):
    """Instantiate ``LOSSES[name]``; an unknown name is a ValueError. ``border_after`` = K: the
    targets hold K mask classes and then a border channel (--borders True), each scored by its own term
    (:class:`WithBorderChannel`)."""
    if name not in LOSSES:
        raise ValueError(f"name {name!r} is not one of: {', '.join(LOSSES)}")
    criterion = LOSSES[name]()
    return criterion if border_after is None else WithBorderChannel(criterion, border_after)


def loss_over_heads(criterion, outputs, target):
    """Loss of one logits tensor, or the mean over a list of them (deep-supervision heads)."""
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, target)
    return sum(criterion(output, target) for output in outputs) / len(outputs)
