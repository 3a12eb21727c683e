"""The seed's training loop, written plainly the way 4uiiurz1/pytorch-nested-unet's train.py does it.

This is the baseline that bench/speed.py times against our Trainer; it is never used for training. What it
keeps from the seed, on purpose:

* a Dataset that decodes the image and every mask PNG from disk with cv2 on every item (no cache);
* the seed's augmentations in albumentations 2.x spelling (``Flip`` is now ``HorizontalFlip`` + ``VerticalFlip``,
  ``RandomBrightness`` / ``RandomContrast`` are ``RandomBrightnessContrast`` with one limit at 0), then
  ``Normalize()`` and then ``/ 255`` again (the seed's double normalisation);
* a DataLoader with ``num_workers`` workers, no pinned memory and no persistent workers, so the worker processes
  are started again at every epoch;
* fp32, plain ``.to(device)`` copies (the seed's ``input.cuda()``);
* the seed's losses: BCEDiceLoss as the seed wrote it, or the Lovasz hinge as a Python loop over the images
  (:func:`lovasz_reference.lovasz_hinge_per_image_loop`);
* a host synchronisation at every step: ``loss.item()`` into an AverageMeter and the seed's ``iou_score``,
  which copies the output to the host and thresholds it in numpy.

The seed's tqdm progress bar is left out (our loop is timed with its bar off too). The model is our archs.py,
which is the seed's architecture with the same layers and state-dict keys.
"""
if __name__ == "__main__":  # a module, not a command
    raise SystemExit(f"{__file__} is imported by bench/speed.py; it is not a command "
                     "(see python bench/speed.py --help)")

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lovasz_reference import lovasz_hinge_per_image_loop


class SeedDataset(torch.utils.data.Dataset):
    """The seed's dataset.py: cv2 decode of image + masks every item, transform, then /255."""

    def __init__(self, img_ids, img_dir, mask_dir, img_ext, mask_ext, num_classes, transform=None):
        self.img_ids = img_ids
        self.img_dir = img_dir
        self.mask_dir = mask_dir
        self.img_ext = img_ext
        self.mask_ext = mask_ext
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self):
        return len(self.img_ids)

    def __getitem__(self, idx):
        img_id = self.img_ids[idx]
        img = cv2.imread(os.path.join(self.img_dir, img_id + self.img_ext))
        mask = []
        for i in range(self.num_classes):
            mask.append(cv2.imread(os.path.join(self.mask_dir, str(i), img_id + self.mask_ext),
                                   cv2.IMREAD_GRAYSCALE)[..., None])
        mask = np.dstack(mask)
        if self.transform is not None:
            augmented = self.transform(image=img, mask=mask)
            img = augmented["image"]
            mask = augmented["mask"]
        img = img.astype("float32") / 255
        img = img.transpose(2, 0, 1)
        mask = mask.astype("float32") / 255
        mask = mask.transpose(2, 0, 1)
        return img, mask, {"img_id": img_id}


def seed_train_transform(input_h, input_w):
    """The seed's train_transform in albumentations 2.x."""
    return A.Compose([
        A.RandomRotate90(),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        A.OneOf([
            A.HueSaturationValue(),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2),
        ], p=1),
        A.Resize(input_h, input_w),
        A.Normalize(),
    ])


class SeedBCEDiceLoss(nn.Module):
    """The seed's losses.BCEDiceLoss."""

    def forward(self, input, target):
        bce = F.binary_cross_entropy_with_logits(input, target)
        smooth = 1e-5
        input = torch.sigmoid(input)
        num = target.size(0)
        input = input.view(num, -1)
        target = target.view(num, -1)
        intersection = input * target
        dice = (2.0 * intersection.sum(1) + smooth) / (input.sum(1) + target.sum(1) + smooth)
        dice = 1 - dice.sum() / num
        return 0.5 * bce + dice


class SeedLovaszHingeLoss(nn.Module):
    """The seed's losses.LovaszHingeLoss: per-image Lovasz hinge, a Python loop over the batch."""

    def forward(self, input, target):
        input = input.squeeze(1)
        target = target.squeeze(1)
        return lovasz_hinge_per_image_loop(input, target)


def seed_criterion(name):
    if name == "BCEDiceLoss":
        return SeedBCEDiceLoss()
    if name == "LovaszHingeLoss":
        return SeedLovaszHingeLoss()
    if name == "BCEWithLogitsLoss":
        return nn.BCEWithLogitsLoss()
    raise ValueError(f"unknown loss {name!r}")


def iou_score(output, target):
    """The seed's metrics.iou_score: host copy, numpy threshold, pooled IoU of the batch."""
    smooth = 1e-5
    if torch.is_tensor(output):
        output = torch.sigmoid(output).data.cpu().numpy()
    if torch.is_tensor(target):
        target = target.data.cpu().numpy()
    output_ = output > 0.5
    target_ = target > 0.5
    intersection = (output_ & target_).sum()
    union = (output_ | target_).sum()
    return (intersection + smooth) / (union + smooth)


class AverageMeter:
    """The seed's utils.AverageMeter."""

    def __init__(self):
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def seed_loader(train_ids, dataset_dir, args_like, batch_size, num_workers):
    """The seed's train DataLoader: shuffle, drop_last, no pin_memory, workers restarted every epoch."""
    data = SeedDataset(train_ids, os.path.join(dataset_dir, "images"), os.path.join(dataset_dir, "masks"),
                       args_like["img_ext"], args_like["mask_ext"], args_like["num_classes"],
                       seed_train_transform(args_like["input_h"], args_like["input_w"]))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       drop_last=True)


def seed_train_epoch(train_loader, model, criterion, optimizer, device, deep_supervision, max_steps=None):
    """The seed's train(): returns dict(loss, iou) averaged over the images seen."""
    avg_meters = {"loss": AverageMeter(), "iou": AverageMeter()}
    model.train()
    for i, (input, target, _) in enumerate(train_loader):
        input = input.to(device)
        target = target.to(device)
        if deep_supervision:
            outputs = model(input)
            loss = 0
            for output in outputs:
                loss += criterion(output, target)
            loss /= len(outputs)
            iou = iou_score(outputs[-1], target)
        else:
            output = model(input)
            loss = criterion(output, target)
            iou = iou_score(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        avg_meters["loss"].update(loss.item(), input.size(0))
        avg_meters["iou"].update(iou, input.size(0))
        if max_steps is not None and i + 1 >= max_steps:
            break
    return {"loss": avg_meters["loss"].avg, "iou": avg_meters["iou"].avg}
