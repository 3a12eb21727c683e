"""The one training/evaluation step and the epoch loops built on it.

train.py, val.py, predict.py and bench/ all go through these functions, so what is measured is what users run.
Scores and losses are accumulated on the device; the host reads them once per epoch (and for the progress
bar every ``LOG_EVERY`` steps).
"""
import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from losses import loss_over_heads
from distributed import reduce_sum
from metrics import SegmentationMeter

LOG_EVERY = 20


class Precision:
    """How the step runs on its device: autocast dtype (None = fp32), channels_last, and the fp16 GradScaler.

    ``Precision.choose(device, amp, channels_last)`` picks bf16 on CUDA GPUs that support it, else fp16 with a
    GradScaler; on the CPU everything stays fp32 and contiguous.
    """

    def __init__(self, device, amp_dtype=None, channels_last=False):
        self.device = device
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    @classmethod
    def choose(cls, device, amp=True, channels_last=True):
        if device.type != "cuda":
            return cls(device)
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
        return cls(device, dtype, channels_last)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images, masks):
        """Move a batch to the device (non-blocking from pinned memory) in the model's memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        return images, masks.to(self.device, non_blocking=True)

    def describe(self):
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        return amp[self.amp_dtype] + (", channels_last" if self.channels_last else "")


FLIPS = ((), (-1,), (-2,), (-2, -1))


def forward(model, images, prune=None, tta=False):
    """Run the model on images [B, C, H, W] of any size: pad bottom/right to a multiple of 16, crop back.

    Returns logits [B, K, H, W], or a list of them for deep supervision (one per head). With ``tta`` the
    logits are the mean over the four horizontal/vertical flips (each flipped back).
    """
    if tta:
        outs = [forward(model, images.flip(f) if f else images, prune) for f in FLIPS]
        heads = isinstance(outs[0], list)
        outs = [[o.flip(f) if f else o for o in (out if heads else [out])] for out, f in zip(outs, FLIPS)]
        mean = [torch.stack(per_flip).mean(0) for per_flip in zip(*outs)]
        return mean if heads else mean[0]
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % 16, -w % 16
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
    out = model(images) if prune is None else model(images, prune=prune)
    if pad_h or pad_w:
        out = [o[..., :h, :w] for o in out] if isinstance(out, list) else out[..., :h, :w]
    return out


def step(model, images, masks, criterion, precision, optimizer=None, prune=None, tta=False):
    """One step on a batch: forward, loss (mean over deep-supervision heads), and backward + update if an
    optimizer is given. images [B, C, H, W] normalised floats, masks [B, K, H, W] in {0, 1}, both on the device.

    Returns (loss as a 0-dim tensor on the device, logits of the final head [B, K, H, W] detached).
    """
    with precision.autocast():
        outputs = forward(model, images, prune, tta)
        loss = loss_over_heads(criterion, outputs, masks)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    final = outputs[-1] if isinstance(outputs, list) else outputs
    return loss.detach(), final.detach().float()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite at ``step`` of an epoch."""

    def __init__(self, step_index):
        super().__init__(step_index)
        self.step = step_index


def _mean_loss(loss_sum, seen):
    """Loss averaged over every image seen, on all processes together."""
    totals = reduce_sum(torch.stack([loss_sum, torch.full_like(loss_sum, seen)]))
    return (totals[0] / totals[1].clamp(min=1)).item()


def _bar(loader, desc, enabled):
    return tqdm(loader, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def train_one_epoch(model, loader, criterion, optimizer, precision, desc="train", progress=True, max_steps=None,
                    classes=None):
    """Train for one pass over ``loader``; returns dict(loss, iou) averaged over the epoch's images.

    ``classes``: IoU over the first ``classes`` channels only (the mask classes; a --borders channel after them
    is trained but not scored); None scores every channel.

    Raises NonFiniteLoss (with the first bad step) when the loss was NaN or infinite; checked once per epoch
    (and at progress-bar updates) so the device never waits for the host.
    """
    model.train()
    meter = SegmentationMeter(precision.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=precision.device)
    seen = 0
    first_bad = torch.full((), -1, dtype=torch.long, device=precision.device)
    bar = _bar(loader, desc, progress)
    for i, (images, masks, _) in enumerate(bar):
        images, masks = precision.to_device(images, masks)
        loss, logits = step(model, images, masks, criterion, precision, optimizer)
        bad = ~torch.isfinite(loss) & (first_bad < 0)
        first_bad = torch.where(bad, torch.full_like(first_bad, i), first_bad)
        loss_sum += loss.double() * images.shape[0]
        seen += images.shape[0]
        meter.update(logits[:, :classes], masks[:, :classes])
        if progress and i % LOG_EVERY == 0:
            if first_bad.item() >= 0:
                break
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if max_steps is not None and i + 1 >= max_steps:
            break
    meter.all_reduce()
    if first_bad.item() >= 0:
        raise NonFiniteLoss(int(first_bad.item()))
    return {"loss": _mean_loss(loss_sum, seen), "iou": meter.compute()["iou"]}


@torch.no_grad()
def recalibrate_batchnorm(model, loader, precision, max_batches):
    """Precise BatchNorm: reset every BatchNorm's running mean and variance and recompute them as the plain average
    over the first ``max_batches`` batches of ``loader`` (images [B, C, H, W]; masks and metadata unused), in
    training mode and without gradients. PyTorch's running averages weight the last ~10 batches of an epoch most;
    when batches differ a lot (crops of bright-field and fluorescence images) that makes the evaluated network
    swing from epoch to epoch. Pass the bare model, not the DDP wrapper.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for i, (images, masks, _) in enumerate(loader):
        if i >= max_batches:
            break
        images, _ = precision.to_device(images, masks)
        with precision.autocast():
            model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model, loader, criterion, precision, desc="val", progress=True, prune=None, tta=False, on_batch=None,
             classes=None):
    """Evaluate on every batch of ``loader``; returns dict(loss, iou, dice, iou_mean, dice_mean).

    iou/dice are pooled over the split (sum of intersections / sum of unions); iou_mean/dice_mean average the
    per-image scores, over the first ``classes`` channels (None: all; see :func:`train_one_epoch`). ``prune`` L
    runs NestedUNet only up to head L; ``tta`` averages flips.
    ``on_batch(meta, images, logits, masks)`` is called per batch (val.py writes its files there).
    Under DDP each rank evaluates its own shard and the sums are reduced over ranks.
    """
    model.eval()
    meter = SegmentationMeter(precision.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=precision.device)
    seen = 0
    for images, masks, meta in _bar(loader, desc, progress):
        images, masks = precision.to_device(images, masks)
        loss, logits = step(model, images, masks, criterion, precision, prune=prune, tta=tta)
        loss_sum += loss.double() * images.shape[0]
        seen += images.shape[0]
        meter.update(logits[:, :classes], masks[:, :classes])
        if on_batch is not None:
            on_batch(meta, images, logits, masks)
    meter.all_reduce()
    return {"loss": _mean_loss(loss_sum, seen), **meter.compute()}
