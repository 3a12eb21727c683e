"""The one training/evaluation step and the epoch loops built on it, and where and how it runs: the device
(:func:`choose_device`, :func:`fit_threads_to_cpus`), the precision (:class:`Precision`) and the seeds.

train.py, val.py, predict.py and bench/ all go through these functions, so what is measured is what users run.
Scores and losses are accumulated on the device; the host reads them once per epoch (and for the progress
bar every ``LOG_EVERY`` steps).
"""
import contextlib
import random

import numpy as np
import torch

from archs import crop_to, final_logits, pad_to_multiple
from distributed import launched_by_torchrun, reduce_sum
from losses import loss_over_heads
from metrics import SegmentationMeter
from utils import UsageError, amp_mode, progress_bar, usable_cpus

LOG_EVERY = 20


def choose_device(requested="auto"):
    """--device (utils.device_name: auto, cpu, cuda or cuda:N) -> torch.device; auto picks CUDA when available, and
    cuda:N becomes torch's current GPU. Asking for CUDA where PyTorch sees none is a UsageError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested} was asked for but no CUDA GPU is visible to PyTorch; use --device cpu "
                         "or auto")
    device = torch.device(requested)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {requested}: PyTorch sees {count} CUDA GPU{'s' * (count > 1)} (cuda:0 to "
                         f"cuda:{count - 1}); give one of those, or --device auto")
    if device.type == "cuda" and device.index is not None and not launched_by_torchrun():
        # torch puts on the current GPU what it is not given a device for: the DataLoader's pin_memory thread and
        # HostCopy's CUDA event, which on cuda:0 would open a context there and wait for none of cuda:N's work.
        # Under torchrun each process takes the GPU of its LOCAL_RANK (distributed.setup) and opens no other.
        torch.cuda.set_device(device)
    return device


def fit_threads_to_cpus():
    """Cap torch's CPU threads at the CPUs this process may use (utils.usable_cpus): torch sizes its thread pool by
    the CPU affinity alone, so under a CPU quota (docker --cpus, a Kubernetes limit) the threads beyond it only wait
    for their turn, and every step waits for the slowest. Never raises the count (torchrun's OMP_NUM_THREADS=1
    stays)."""
    cpus = usable_cpus()
    if cpus < torch.get_num_threads():
        torch.set_num_threads(cpus)


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) so that a CPU run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def random_states_kept():
    """Give Python's, NumPy's and torch's global random states back after the block (torch's of the CPU, and of the
    current GPU when CUDA is already in use): a run seeds them (:func:`seed_everything`), and a notebook or script
    that trains between its own random draws goes on with its own numbers, not with ones that the run's --seed
    fixed."""
    python, numpy = random.getstate(), np.random.get_state()
    gpus = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []  # not a context on every GPU
    with torch.random.fork_rng(devices=gpus):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def grad_scaler(enabled):
    """The fp16 loss scaler for CUDA: torch.amp.GradScaler("cuda") since torch 2.3, torch.cuda.amp's before."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def cpu_has_fast_bf16():
    """True when the CPU computes bf16 natively (AMX tiles or AVX512-BF16): there bf16 autocast with channels_last
    trains faster than fp32 (docs/speed.md). Without them oneDNN emulates bf16, slower than fp32. torch asks the CPU
    since 2.5; before, Linux's /proc/cpuinfo says."""
    probes = [getattr(torch.cpu, p, None) for p in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(probes):
        return any(probe() for probe in probes if probe)
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cuda_has_fast_bf16(device):
    """True when the GPU ``device`` computes bf16 natively (compute capability 8.0, Ampere, or later). Not
    torch.cuda.is_bf16_supported(): by default it is also True on older GPUs (T4, V100), which emulate bf16 far
    slower than their fp16, and it asks the current GPU, not ``device``."""
    return torch.cuda.get_device_properties(device).major >= 8


def cpu_flags(path="/proc/cpuinfo"):
    """The feature flags of the first CPU in Linux's ``path`` ('flags : fpu ... avx512_bf16 ...'); empty elsewhere."""
    try:
        with open(path) as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


class Precision:
    """How the step runs on its device: autocast dtype (None = fp32), channels_last, and the fp16 GradScaler.

    ``Precision.choose(device, amp, channels_last)`` resolves ``--amp`` (utils.AMP_MODES): ``auto`` is bf16 on a
    CUDA GPU that has it natively (else fp16 with a GradScaler) and on a CPU with native bf16 (else fp32); ``bf16``,
    ``fp16`` (CUDA only) and ``fp32`` force one. Losses and metrics are computed in fp32 in every mode.
    """

    def __init__(self, device, amp_dtype=None, channels_last=False, reason=""):
        self.device = device
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.reason = reason
        self.scaler = grad_scaler(enabled=amp_dtype == torch.float16)

    @classmethod
    def choose(cls, device, amp="auto", channels_last=True):
        """``channels_last``: True, False or ``"auto"`` (train.py's default): on, except in fp32 on a CPU without
        AVX512, where oneDNN's convolution backward is faster in NCHW (bench/memory_format.py, docs/speed.md: 0.81-0.89x
        in channels_last on AVX2, 1.17-1.20x on AVX512). Inference keeps True."""
        mode = amp_mode(amp)
        cuda = device.type == "cuda"
        reason = ""
        if mode == "auto":
            if cuda:
                mode = "bf16" if cuda_has_fast_bf16(device) else "fp16"
            else:
                mode = "bf16" if cpu_has_fast_bf16() else "fp32"
                reason = "--amp auto: " + ("the CPU has native bf16" if mode == "bf16" else
                                           "no native bf16 on this CPU")
        elif mode == "bf16" and not cuda and not cpu_has_fast_bf16():
            # Said in the run's header line: an emulated bf16 step can be many times slower than fp32.
            reason = "--amp bf16 on a CPU without native bf16: emulated, far slower than fp32 (use --amp auto)"
        if mode == "fp16" and not cuda:
            raise UsageError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or fp32 (or auto)")
        if mode == "bf16" and cuda and not cuda_has_fast_bf16(device):
            raise UsageError("--amp bf16: this GPU has no native bf16 (it needs compute capability 8.0, Ampere, or "
                             "later); use --amp fp16 or auto")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[mode]
        if channels_last == "auto":
            channels_last = cuda or dtype is not None or torch.backends.cpu.get_cpu_capability() == "AVX512"
        return cls(device, dtype, channels_last, reason)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model):
        """The model in this precision's memory format (channels_last or not)."""
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def to_device(self, images, masks):
        """Move a batch to the device (non-blocking from pinned memory) in the model's memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        return images, masks.to(self.device, non_blocking=True)

    def label(self):
        """The precision and memory format in one token, as log.csv records each epoch's: 'bf16+channels_last',
        'fp32', 'fp16+channels_last'..."""
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return dtype + ("+channels_last" if self.channels_last else "")

    def describe(self):
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        return (amp[self.amp_dtype] + (", channels_last" if self.channels_last else "") +
                (f"; {self.reason}" if self.reason else ""))


FLIPS = ((), (-1,), (-2,), (-2, -1))


def forward(model, images, prune=None, tta=False):
    """Run the model on images [B, C, H, W] of any size: pad bottom/right to a multiple of 16, crop back.

    Returns logits [B, K, H, W], or a list of them for deep supervision (one per head; with ``prune`` L, head L's
    alone, not a list: archs.NestedUNet.forward). With ``tta`` the logits are the mean over the four
    horizontal/vertical flips (each flipped back).
    """
    if tta:
        outs = [forward(model, images.flip(f) if f else images, prune) for f in FLIPS]
        heads = isinstance(outs[0], list)
        outs = [[o.flip(f) if f else o for o in (out if heads else [out])] for out, f in zip(outs, FLIPS)]
        mean = [torch.stack(per_flip).mean(0) for per_flip in zip(*outs)]
        return mean if heads else mean[0]
    padded, size = pad_to_multiple(images)
    out = model(padded) if prune is None else model(padded, prune=prune)
    if padded is images:
        return out
    return [crop_to(o, size) for o in out] if isinstance(out, list) else crop_to(out, size)


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
    return loss.detach(), final_logits(outputs).detach().float()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite at ``step`` of an epoch."""

    def __init__(self, step_index):
        super().__init__(step_index)
        self.step = step_index


class EpochTotals:
    """An epoch's loss and pixel scores, summed batch by batch on the device (no host sync), then reduced over
    the processes: what train_one_epoch and evaluate both report."""

    def __init__(self, device, classes=None):
        self.meter = SegmentationMeter(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.seen, self.classes = 0, classes

    def add(self, loss, logits, masks):
        """One batch: its mean loss (0-dim), logits and masks [B, K(+1), H, W], scored over the first ``classes``
        channels (the mask classes; None: all). Returns its scores per image and mask class (iou [B, K], dice
        [B, K]) on the device."""
        self.loss_sum += loss.double() * logits.shape[0]
        self.seen += logits.shape[0]
        return self.meter.update(logits[:, :self.classes], masks[:, :self.classes])

    def result(self):
        """dict(loss: averaged over every image of every process, iou, dice, iou_mean, dice_mean)."""
        self.meter.all_reduce()
        totals = reduce_sum(torch.stack([self.loss_sum, torch.full_like(self.loss_sum, self.seen)]))
        return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), **self.meter.compute()}


class HostCopy:
    """A small device tensor copied to the host without waiting for the device: the progress bar shows values
    from an earlier step once they have arrived, so the device never stalls for the host inside an epoch."""

    def __init__(self, tensor):
        self.host = tensor.to("cpu", non_blocking=True)
        self.event = None
        if tensor.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self):
        return self.event is None or self.event.query()

    def values(self):
        return self.host.tolist()


def _bar(loader, desc, enabled):
    return progress_bar(loader, desc=desc, leave=False, disable=not enabled)


def batchnorm_layers(model):
    """Every BatchNorm layer of ``model`` (SyncBatchNorm and those inside a DDP or torch.compile wrapper too)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def train_mode(model, freeze_bn=False):
    """Put ``model`` in training mode; with ``freeze_bn`` (--freeze_bn) its BatchNorm layers stay in eval mode, so
    they normalise with, and keep, the running statistics of the weights the run started from (their affine weight
    and bias still train): a few images of one kind would otherwise replace the statistics those weights were
    fitted to with their own."""
    model.train()
    if freeze_bn:
        for m in batchnorm_layers(model):
            m.eval()


def train_one_epoch(model, loader, criterion, optimizer, precision, desc="train", progress=True, max_steps=None,
                    classes=None, freeze_bn=False, on_first_batch=None):
    """Train for one pass over ``loader``; returns dict(loss, iou): the loss averaged over the epoch's images, the
    IoU pooled over all their pixels (as val_iou).

    ``classes``: IoU over the first ``classes`` channels only (the mask classes; a --borders channel after them
    is trained but not scored); None scores every channel. ``freeze_bn``: see :func:`train_mode`.
    ``on_first_batch(images, masks, meta)`` is called with the first batch as the model gets it (on the device).

    Raises NonFiniteLoss (with the first bad step) when the loss was NaN or infinite; checked once per epoch
    (and at progress-bar updates) so the device never waits for the host.
    """
    train_mode(model, freeze_bn)
    totals = EpochTotals(precision.device, classes)
    first_bad = torch.full((), -1, dtype=torch.long, device=precision.device)
    bar = _bar(loader, desc, progress)
    shown = None  # the loss and first bad step of the last progress update, on their way to the host
    for i, (images, masks, meta) in enumerate(bar):
        images, masks = precision.to_device(images, masks)
        if i == 0 and on_first_batch is not None:
            on_first_batch(images, masks, meta)
        loss, logits = step(model, images, masks, criterion, precision, optimizer)
        bad = ~torch.isfinite(loss) & (first_bad < 0)
        first_bad = torch.where(bad, torch.full_like(first_bad, i), first_bad)
        totals.add(loss, logits, masks)
        if progress and i % LOG_EVERY == 0:
            if shown is not None and shown.ready():
                value, bad_step = shown.values()
                if bad_step >= 0:
                    break
                bar.set_postfix(loss=f"{value:.4f}")
            shown = HostCopy(torch.stack([loss.double(), first_bad.double()]))
        if max_steps is not None and i + 1 >= max_steps:
            break
    result = totals.result()
    if first_bad.item() >= 0:
        raise NonFiniteLoss(int(first_bad.item()))
    return {"loss": result["loss"], "iou": result["iou"]}


@torch.no_grad()
def recalibrate_batchnorm(model, loader, precision, max_batches, progress=True):
    """Precise BatchNorm: reset every BatchNorm's running mean and variance and recompute them as the plain average
    over the first ``max_batches`` batches of ``loader`` (images [B, C, H, W]; masks and metadata unused), in
    training mode and without gradients. PyTorch's running averages weight the last ~10 batches of an epoch most;
    when batches differ a lot (crops of bright-field and fluorescence images) that makes the evaluated network
    swing from epoch to epoch. Pass the bare model, not the DDP wrapper. ``progress``: a bar over the batches (40
    forward passes of 256x256 crops take minutes on a CPU, between the epoch's bar and validation's).
    """
    norms = batchnorm_layers(model)
    if not norms or max_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    with progress_bar(loader, desc="precise BN", total=min(len(loader), max_batches), leave=False,
                      disable=not progress) as bar:
        for i, (images, masks, _) in enumerate(bar):
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
    ``on_batch(meta, images, logits, masks, scores)`` is called per batch with its scores per image and class =
    (iou [B, K], dice [B, K]), the K scored classes; iou_mean/dice_mean average their means over K (val.py writes its
    files and rows there).
    Under DDP each rank evaluates its own shard and the sums are reduced over ranks.
    """
    model.eval()
    totals = EpochTotals(precision.device, classes)
    for images, masks, meta in _bar(loader, desc, progress):
        images, masks = precision.to_device(images, masks)
        loss, logits = step(model, images, masks, criterion, precision, prune=prune, tta=tta)
        scores = totals.add(loss, logits, masks)
        if on_batch is not None:
            on_batch(meta, images, logits, masks, scores)
    return totals.result()
