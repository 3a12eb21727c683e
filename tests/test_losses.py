"""Tests for losses.py and lovasz_losses.py: hand-worked values, batched vs looped Lovasz, float32, heads.

The tests parametrized over ``LOSSES`` are what training relies on of every loss: one added to the registry is
checked by them without further edits here.
"""
import math
import re

import numpy as np
import pytest
import torch

from losses import LOSSES, BCEDiceLoss, BCEWithLogitsLoss, LovaszHingeLoss, build_loss, loss_over_heads
from lovasz_losses import lovasz_hinge
from lovasz_reference import lovasz_hinge_flat, lovasz_hinge_per_image_loop
import config
from utils import DataError

# One 2x2 image; target [[0, 1], [0, 1]].
TARGET = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
LOGITS = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_with_logits_by_hand():
    # Per pixel -[t log s(x) + (1 - t) log(1 - s(x))]:
    #   x=0,t=0: log 2;  x=2,t=1: log(1 + e^-2);  x=-2,t=0: log(1 + e^-2);  x=0,t=1: log 2.
    expected = (2 * math.log(2) + 2 * math.log(1 + math.exp(-2))) / 4
    assert BCEWithLogitsLoss()(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_bce_dice_by_hand():
    bce = (2 * math.log(2) + 2 * math.log(1 + math.exp(-2))) / 4
    # p = [0.5, s(2), s(-2), 0.5]; sum p = 1 + s(2) + (1 - s(2)) = 2, sum t = 2, sum p*t = s(2) + 0.5.
    dice = (2 * (sigmoid(2) + 0.5) + 1e-5) / (2 + 2 + 1e-5)
    expected = 0.5 * bce + (1 - dice)
    assert BCEDiceLoss()(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_bce_dice_takes_the_mean_of_per_sample_dice():
    # Sample 0: the example above. Sample 1: target all 0 and logits all -inf-like (p ~ 0): dice = 1e-5/1e-5 = 1.
    logits = torch.cat([LOGITS, torch.full_like(LOGITS, -100.0)])
    target = torch.cat([TARGET, torch.zeros_like(TARGET)])
    bce = (2 * math.log(2) + 2 * math.log(1 + math.exp(-2))) / 8 + 4 * math.log(1 + math.exp(-100)) / 8
    dice0 = (2 * (sigmoid(2) + 0.5) + 1e-5) / (4 + 1e-5)
    expected = 0.5 * bce + (1 - (dice0 + 1.0) / 2)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_bce_dice_gradient_is_that_of_its_formula_written_out():
    """The gradient that trains the network, not only the loss value: both terms must pass it on (a Dice computed
    on detached probabilities would report the same loss and train on BCE alone). Reference: the formula written
    with torch.log and sums in float64, differentiated by autograd."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 1, 8, 8, dtype=torch.float64) * 3).requires_grad_()
    target = (torch.rand(3, 1, 8, 8) > 0.6).double()
    BCEDiceLoss()(logits, target).backward()
    ours = logits.grad.clone()
    logits.grad = None
    p = 1 / (1 + torch.exp(-logits))
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    dice = (2 * (p * target).sum((1, 2, 3)) + 1e-5) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1e-5)
    (0.5 * bce + 1 - dice.mean()).backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-4, atol=1e-7)


def test_lovasz_by_hand_with_ties():
    # Hinge errors 1 - x * (2t - 1): [1, -1, -1, 1]; relu keeps the two errors of 1 (pixels 0 and 3, labels 0
    # and 1). Their summed Lovasz gradient is the Jaccard loss of that prefix: gts = 2, I = 2 - 1 = 1,
    # U = 2 + 1 = 3, so the loss is 1 - 1/3 = 2/3 whatever the order of the tie.
    assert LovaszHingeLoss()(LOGITS, TARGET).item() == pytest.approx(2 / 3, rel=1e-6)


def test_lovasz_by_hand_without_ties():
    # logits [[0.5, 2], [-1, 0]] -> errors [1.5, -1, 0, 1]; sorted: 1.5 (t=0), 1 (t=1), 0 (t=0), -1 (t=1).
    # gts = 2; cumsum t = 0,1,1,2; cumsum(1-t) = 1,1,2,2; I = 2,1,1,0; U = 3,3,4,4;
    # J = 1 - I/U = 1/3, 2/3, 3/4, 1; grad = 1/3, 1/3, 1/12, 1/4; loss = 1.5/3 + 1/3 + 0 + 0 = 5/6.
    logits = torch.tensor([[[[0.5, 2.0], [-1.0, 0.0]]]])
    assert LovaszHingeLoss()(logits, TARGET).item() == pytest.approx(5 / 6, rel=1e-6)
    assert lovasz_hinge_flat(logits.reshape(-1), TARGET.reshape(-1)).item() == pytest.approx(5 / 6, rel=1e-6)


def test_lovasz_is_zero_when_every_pixel_has_margin():
    logits = torch.tensor([[[[-1.5, 1.0], [-3.0, 2.0]]]])
    assert LovaszHingeLoss()(logits, TARGET).item() == 0.0


def random_batch_with_empty_and_full_images(seed=0, shape=(5, 1, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 2
    labels = (torch.rand(shape, generator=gen) > 0.6).float()
    labels[1] = 0.0  # all background
    labels[2] = 1.0  # all foreground
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_lovasz_equals_the_per_image_loop_values_and_gradients(seed):
    logits, labels = random_batch_with_empty_and_full_images(seed)
    batched_in = logits.clone().requires_grad_(True)
    loop_in = logits.clone().requires_grad_(True)
    batched = lovasz_hinge(batched_in, labels)
    looped = lovasz_hinge_per_image_loop(loop_in, labels)
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)
    batched.backward()
    looped.backward()
    assert batched_in.grad.abs().sum() > 0
    torch.testing.assert_close(batched_in.grad, loop_in.grad, rtol=1e-6, atol=1e-7)


def test_per_image_loop_is_the_mean_of_single_images():
    logits, labels = random_batch_with_empty_and_full_images(3)
    singles = [lovasz_hinge_flat(lg.reshape(-1), lb.reshape(-1)) for lg, lb in zip(logits, labels)]
    expected = torch.stack(singles).mean()
    torch.testing.assert_close(lovasz_hinge_per_image_loop(logits, labels), expected)
    # Per image, not pooled over the batch: the batch as one flat image gives a different value.
    assert not torch.allclose(expected, lovasz_hinge_flat(logits.reshape(-1), labels.reshape(-1)))


def lovasz_from_the_definition(errors, truth):
    """The Lovasz extension of the Jaccard loss at the hinge errors (paper, eq. 8-9), with sets: add the pixels in
    order of decreasing error and weigh each error by how much the Jaccard loss of the mispredicted set grows."""
    def jaccard_loss(wrong):  # pixels of ``truth`` left out and background taken in
        if not wrong.any():
            return 0.0
        return 1.0 - (truth.sum() - (wrong & truth).sum()) / (truth.sum() + (wrong & ~truth).sum())

    wrong, before, loss = np.zeros(len(errors), bool), 0.0, 0.0
    for i in sorted(range(len(errors)), key=lambda j: -errors[j]):
        wrong[i] = True
        after = jaccard_loss(wrong)
        loss += max(errors[i], 0.0) * (after - before)
        before = after
    return loss


def test_lovasz_equals_the_extension_written_from_its_definition():
    logits, labels = random_batch_with_empty_and_full_images(6, shape=(5, 2, 5, 5))
    flat_logits, flat_labels = logits.reshape(10, -1).double().numpy(), labels.reshape(10, -1).numpy() > 0.5
    expected = np.mean([lovasz_from_the_definition(1.0 - lg * np.where(lb, 1.0, -1.0), lb)
                        for lg, lb in zip(flat_logits, flat_labels)])
    assert LovaszHingeLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_multiclass_lovasz_treats_each_class_as_an_image():
    logits, labels = random_batch_with_empty_and_full_images(4, shape=(3, 2, 8, 8))
    expected = lovasz_hinge_per_image_loop(logits.reshape(6, 8, 8), labels.reshape(6, 8, 8))
    torch.testing.assert_close(LovaszHingeLoss()(logits, labels), expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_float32_under_bfloat16_autocast(name):
    logits, labels = random_batch_with_empty_and_full_images(5, shape=(3, 1, 16, 16))
    criterion = build_loss(name)
    low, low_labels = logits.bfloat16(), labels.bfloat16()  # as a bfloat16 model and a cast mask would give
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = criterion(low, low_labels)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, criterion(low.float(), labels))


def test_lovasz_flat_and_loop_are_float32_under_autocast():
    logits, labels = random_batch_with_empty_and_full_images(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flat = lovasz_hinge_flat(logits[0].reshape(-1).bfloat16(), labels[0].reshape(-1).bfloat16())
        looped = lovasz_hinge_per_image_loop(logits.bfloat16(), labels.bfloat16())
    assert flat.dtype == torch.float32 and looped.dtype == torch.float32


def test_loss_over_heads_is_the_mean_over_heads():
    criterion = BCEWithLogitsLoss()
    heads = [LOGITS, LOGITS * 3, LOGITS - 1]
    expected = sum(criterion(head, TARGET).item() for head in heads) / 3
    assert loss_over_heads(criterion, heads, TARGET).item() == pytest.approx(expected, rel=1e-6)
    assert loss_over_heads(criterion, LOGITS, TARGET).item() == pytest.approx(criterion(LOGITS, TARGET).item())


def test_build_loss_registry_and_unknown_name():
    assert set(LOSSES) == set(config.LOSSES), "--loss's choices: name each loss of losses.LOSSES in config.LOSSES too"
    assert isinstance(build_loss("LovaszHingeLoss"), LovaszHingeLoss)
    with pytest.raises(ValueError, match=re.escape(f"name 'Dice' is not one of: {', '.join(LOSSES)}")):
        build_loss("Dice")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_and_lower_for_better_logits(name):
    """On a batch with an empty and a full mask: a finite scalar >= 0 with a finite gradient, also for logits far
    beyond where float32's sigmoid is 0 or 1 (log(sigmoid(x)) is -inf there, and a NaN loss stops a run), and lower
    for logits that agree with the masks than for ones that do not (a loss of the wrong sign trains towards the
    wrong masks without an error)."""
    logits, labels = random_batch_with_empty_and_full_images(7)
    criterion = build_loss(name)
    right = (labels * 2 - 1) * 200
    losses = []
    for x in (right, logits, -right):
        x = x.clone().requires_grad_()
        loss = criterion(x, labels)
        loss.backward()
        assert loss.shape == () and torch.isfinite(loss) and loss.item() >= 0, (name, loss)
        assert torch.isfinite(x.grad).all(), name
        losses.append(loss.item())
    assert losses[0] < losses[1] < losses[2], (name, losses)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_border_channel_is_a_loss_term_of_its_own(name):
    """--borders: mask classes and the border channel are scored separately and added. With BCEDice the thin
    border channel then weighs as much as the masks; one Dice over both channels hardly notices missing borders."""
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 32, 32) > 0.5).float()
    target[:, 1] = 0
    target[:, 1, 15, 4:28] = 1  # a thin border: 24 of 1024 pixels
    logits = (target * 2 - 1) * 6  # right everywhere ...
    logits[:, 1] = -6  # ... except that no border pixel is predicted
    criterion, plain = build_loss(name, border_after=1), build_loss(name)
    expected = plain(logits[:, :1], target[:, :1]) + plain(logits[:, 1:], target[:, 1:])
    assert criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    if name == "BCEDiceLoss":
        assert criterion(logits, target).item() > 10 * plain(logits, target).item()
    with pytest.raises(DataError, match="--num_classes"):
        criterion(logits[:, :1], target)
    # val.py on a dataset without instance labels: a target of the mask classes alone scores the mask channels
    assert criterion(logits, target[:, :1]).item() == pytest.approx(plain(logits[:, :1], target[:, :1]).item(),
                                                                    rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_mismatch_names_num_classes(name):
    with pytest.raises(DataError, match="--num_classes"):
        build_loss(name)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_batch_without_its_class_axis_is_refused(name):
    """[B, H, W] logits and masks (a single-class batch as many libraries hold it) would be B images of H classes:
    the Lovasz hinge of each row on its own instead of each image's; every loss refuses them, so that swapping
    losses never turns a right loss into a wrong one."""
    logits, labels = random_batch_with_empty_and_full_images(7, shape=(3, 1, 8, 8))
    with pytest.raises(DataError, match=r"\[B, K, H, W\].*x\[:, None\]"):
        build_loss(name)(logits[:, 0], labels[:, 0])
