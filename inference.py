"""Probabilities for whole images of any size from a trained network: predict.py, and anything else that segments.

A run trained on resized images (``crop_size`` 0, the seed's way) sees each image resized to its input_h x input_w,
and the probability is resized back (linear). A run trained on crops predicts at full resolution: the whole image
at once (padded to a multiple of 16 by engine.forward) whenever its forward pass fits the memory budget (a quarter
of the RAM, or of the available RAM when less than half is available; half of a GPU's free memory), else overlapping
windows, as large as the budget allows beside the image's whole-image sums (or a given tile), blended with a weight
that falls off linearly over ``overlap`` pixels towards each window edge and normalised by the summed weights, so
there are no seams.
"""
import contextlib

import cv2
import numpy as np
import torch

from archs import final_logits
from config import output_channels
from engine import Precision, forward
from image_files import image_to_float, normalize
from utils import DataError, progress_bar, ram


def blend_weights(height, width, overlap):
    """Weight map float32 [height, width] for blending windows: the outer product of a row and a column ramp,
    each 1 inside and falling linearly to 1/(overlap+1) at its ends over ``overlap`` pixels, so 1/(overlap+1) along
    an edge and 1/(overlap+1)^2 in a corner (a side shorter than 2 * overlap + 1 never reaches 1). Always > 0, so
    every pixel of the image gets a defined average."""

    def ramp(n):
        i = np.arange(n)
        return np.minimum(np.minimum(i + 1, n - i), overlap + 1) / (overlap + 1)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


def window_starts(size, tile, overlap):
    """Start offsets of windows of length min(tile, size) covering 0..size with at least ``overlap`` shared."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block, then each of its modules back in its own mode: in training mode
    BatchNorm would normalise by the batch's statistics and fold them into the running ones of a network that is
    being trained (or was built and loaded by hand, which leaves it in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def forward_bytes_per_pixel(model, channels, device):
    """(upper bound of the memory one input pixel costs in a forward pass: the bytes of every layer's output on
    a small probe input, per pixel (inference frees most of them; the bound is safe); the channels of its output,
    summed over the deep-supervision heads). The probe runs in eval mode, so that a network being trained keeps its
    BatchNorm statistics. An ensemble (ensemble.MeanProbability) runs its members one after another: the bound of the
    largest, and the two outputs of its running mean."""
    members = getattr(model, "members", None)
    if members is not None:
        largest = max(forward_bytes_per_pixel(member, channels, device)[0] for member in members)
        with eval_mode(model), torch.inference_mode():
            channels_out = model(torch.zeros(1, channels, 64, 64, device=device)).shape[1]
        return largest + 2 * 4 * channels_out, channels_out
    total = [0]

    def count(module, inputs, output):
        outputs = output if isinstance(output, (list, tuple)) else [output]
        total[0] += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with eval_mode(model), torch.inference_mode():
            out = model(torch.zeros(1, channels, 64, 64, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total[0] / (64 * 64), sum(head.shape[1] for head in (out if isinstance(out, list) else [out]))


def memory_budget(device):
    """Bytes prediction may use: half of a GPU's free memory; on the CPU a quarter of the RAM while at least half of
    it is available, else a quarter of the available RAM. So on a machine with RAM to spare the windows, and the
    predictions, are the same from run to run (sized from the free RAM alone, they changed with it). Available RAM
    counts the page cache the kernel can drop: the never-used RAM alone shrinks as files are read, however much is
    to spare. RAM means what a container's or batch job's memory limit leaves (utils.ram)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    total, available = ram()
    return (total if 2 * available >= total else available) // 4


def tile_for_budget(bytes_per_pixel, budget):
    """The side of the largest square window (a multiple of 16, at least 64) whose forward pass fits ``budget``."""
    return max(64, int((budget / max(bytes_per_pixel, 1.0)) ** 0.5) // 16 * 16)


class WindowBudget:
    """The windows of ``model`` (inputs of ``channels``) within the memory budget of ``device``
    (:func:`memory_budget`): ``tile``, the side of the largest square window whose forward pass fits it, ``fits``, how
    many such windows one forward pass can hold (0 when not even one), and, for an image of any size, the windows
    that fit beside its whole-image buffers (:meth:`windows`)."""

    def __init__(self, model, channels, device):
        self.device = device
        self.per_pixel, self.outputs = forward_bytes_per_pixel(model, channels, device)
        self.budget = memory_budget(device)
        self.tile = tile_for_budget(self.per_pixel, self.budget)
        self.fits = int(self.budget // (self.per_pixel * self.tile * self.tile))

    def windows(self, height, width, held, batch=1):
        """(side at most ``tile``, how many fit at once) of the largest square windows of ``batch`` images whose
        forward pass fits the budget beside ``held`` bytes of a height x width image's whole-image buffers; 64 x 64
        windows where the budget leaves less, while they and the buffers fit the memory available
        (:func:`check_room`)."""
        smallest = batch * self.per_pixel * 64 * 64
        room = max(self.budget - held, smallest)
        check_room(held + smallest, memory_available(self.device), height, width)
        tile = min(self.tile, tile_for_budget(batch * self.per_pixel, room))
        return tile, max(1, int(room // (batch * self.per_pixel * tile * tile)))


def memory_available(device):
    """Bytes free now on ``device``: a GPU's free memory, or the RAM available to this process (utils.ram)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram()[1]


def check_room(needed, available, height, width):
    """DataError when a height x width image's whole-image buffers and its smallest windows, ``needed`` bytes,
    exceed the ``available`` bytes of its device."""
    if needed > available:
        raise DataError(f"a {height}x{width} image needs {needed / 2**30:.2f} GiB in windows (its whole-image sums "
                        f"beside the smallest windows), more than the {available / 2**30:.2f} GiB of memory available: "
                        "free the memory other processes hold, use a device or machine with more, or cut the image "
                        "into parts")


def network_input(image):
    """float32 [H, W, C] in [0, 1] -> the network's input for it: normalised, float32 [C, H, W], contiguous."""
    return np.ascontiguousarray(normalize(image).transpose(2, 0, 1), dtype=np.float32)


def host_probabilities(logits):
    """Logits [B, K, H, W] on any device -> their sigmoid, numpy float32 [B, K, H, W] in [0, 1]; a DataError when the
    network put out NaN, which every threshold would read as background (and instances.py refuses)."""
    probs = torch.sigmoid(logits.float()).cpu().numpy()
    if np.isnan(probs).any():
        raise DataError("the network put out NaN for an image: its arithmetic overflowed (--amp fp16 has the "
                        "smallest range: try --amp fp32), or its weights are those of a training that diverged")
    return probs


def check_scaled(image):
    """ValueError unless ``image`` is a float array [H, W, C] with values near [0, 1] (an interpolation's overshoot
    passes): the network would take an image as stored, 0-255 say, for one far brighter than any it learned, and
    predict nonsense without an error."""
    if not isinstance(image, np.ndarray):
        given = type(image).__name__
    elif image.ndim == 3 and image.dtype.kind == "f" and (not image.size or -0.5 <= image.min() <= image.max() <= 1.5):
        return
    else:
        given = f"{image.dtype} {list(image.shape)}"
        given += f" from {image.min():g} to {image.max():g}" if image.size else ""
    raise ValueError(f"Predictor.predict takes an image float [H, W, C] in [0, 1], not {given}: give it "
                     "predictor.as_input(image)")


class Predictor:
    """Probabilities for whole images: float32 [K, H, W] in [0, 1] at the image's own size.

    ``predict(image)`` takes the image as training sees it before normalisation: float32 [H, W, C] in [0, 1]
    (:meth:`as_input`). ``tile`` None sizes the windows from the memory budget
    (:func:`memory_budget`), so an image is predicted whole whenever it fits; ``amp`` is --amp
    (engine.Precision.choose). A crop-trained run predicts the image resized by ``scale`` (so that its nuclei have
    the size the network learned) and returns the probabilities at the image's own size. ``model`` predicts in eval
    mode, also while it is being trained, and keeps its mode and its BatchNorm statistics (:func:`eval_mode`).
    """

    def __init__(self, model, cfg, device, tile=None, overlap=64, batch_size=4, prune=None, tta=False, amp="auto",
                 scale=1.0):
        self.cfg, self.device, self.scale = cfg, device, scale
        self.overlap, self.batch_size = overlap, batch_size
        self.prune, self.tta = prune, tta
        self.precision = Precision.choose(device, amp)
        self.model = self.precision.prepare(model)
        self.budget = None if tile is not None else WindowBudget(self.model, cfg.input_channels, device)
        if tile is None:
            tile, fits = self.budget.tile, self.budget.fits
            self.batch_size = max(1, min(batch_size, fits))
            # a small budget can give windows no larger than --overlap; windows then still advance by half their side
            self.overlap = min(overlap, tile // 2)
        self.tile = tile

    def as_input(self, image):
        """One image (or plane) as stored, [H, W, C] or grey [H, W], as this run's network sees it before
        normalisation: float32 [H, W, C] in [0, 1] (the run's input_channels and --normalization)."""
        image = np.asarray(image)
        return image_to_float(image[:, :, None] if image.ndim == 2 else image, self.cfg.input_channels,
                              self.cfg.normalization)

    def probabilities(self, batch):
        """Normalised batch [B, C, h, w] (numpy float32) -> probabilities [B, K, h, w] (numpy float32)."""
        x = torch.from_numpy(batch).to(self.device)
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with eval_mode(self.model), torch.inference_mode(), self.precision.autocast():
            logits = final_logits(forward(self.model, x, prune=self.prune, tta=self.tta))
        return host_probabilities(logits)

    def run_batches(self, pieces):
        """Pieces [C, h, w] of one size -> their probabilities, ``batch_size`` at a time."""
        out = []
        for i in range(0, len(pieces), self.batch_size):
            out.append(self.probabilities(np.stack(pieces[i:i + self.batch_size])))
        return [o for chunk in out for o in chunk]

    def predict(self, image, scale=None):
        """float32 [H, W, C] in [0, 1] -> probabilities float32 [K, H, W] in [0, 1], the image's own size.
        ``scale`` (a crop-trained run) overrides the predictor's for this image. An image as stored (integers, or
        floats far outside [0, 1]) is a ValueError: :meth:`as_input` first."""
        check_scaled(image)
        height, width = image.shape[:2]
        scale = self.scale if scale is None else scale
        if not self.cfg.crop_size:  # trained on resized images: predict at the training size, resize back
            size, interpolation = (self.cfg.input_w, self.cfg.input_h), cv2.INTER_LINEAR
        elif scale != 1:
            size = (max(16, round(width * scale)), max(16, round(height * scale)))
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        else:
            return self.predict_full_size(image)
        resized = cv2.resize(image, size, interpolation=interpolation).reshape(size[1], size[0], -1)
        prob = self.predict_full_size(resized)
        return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in prob])

    def predict_full_size(self, image):
        """float32 [H, W, C] in [0, 1] -> probabilities [K, H, W]: whole when it fits the budget, else in windows."""
        x = network_input(image)
        if x.shape[1] * x.shape[2] <= self.tile * self.tile:
            return self.run_batches([x])[0]
        return self.predict_tiled(x)

    def predict_tiled(self, x):
        """Normalised image [C, H, W] -> probabilities [K, H, W] from blended overlapping windows (sized from the
        budget: smaller where the image, the sums and the weights leave too little of it for those of the predictor)."""
        _, height, width = x.shape
        channels = output_channels(self.cfg)
        tile, overlap, batch_size = self.tile, self.overlap, self.batch_size
        if self.budget is not None:
            held = x.nbytes + (channels + 1) * height * width * 4
            if self.device.type == "cpu":
                tile, fits = self.budget.windows(height, width, held)
                batch_size, overlap = max(1, min(batch_size, fits)), min(overlap, tile // 2)
            else:  # the image, the sums and the weights are in the RAM, the windows alone on the GPU
                check_room(held, memory_available(torch.device("cpu")), height, width)
        th, tw = min(tile, height), min(tile, width)
        weight = blend_weights(th, tw, overlap)
        corners = [(y, x0) for y in window_starts(height, tile, overlap) for x0 in window_starts(width, tile, overlap)]
        total = np.zeros((channels, height, width), np.float32)
        weights = np.zeros((height, width), np.float32)
        # a bar of its own for an image of many windows: predict.py's counts images, and one can take minutes
        with progress_bar(total=len(corners), desc="windows", unit="window", leave=False,
                          disable=len(corners) < 8 * batch_size) as bar:
            for i in range(0, len(corners), batch_size):
                chunk = corners[i:i + batch_size]
                probs = self.probabilities(np.stack([x[:, y:y + th, x0:x0 + tw] for y, x0 in chunk]))
                for (y, x0), p in zip(chunk, probs):
                    total[:, y:y + th, x0:x0 + tw] += p * weight
                    weights[y:y + th, x0:x0 + tw] += weight
                bar.update(len(chunk))
        total /= weights  # in place: a second [K, H, W] would take as much as the sums
        return total


class WindowedNetwork(torch.nn.Module):
    """``model`` on normalised images [B, C, H, W] (H and W multiples of 16, as engine.forward pads them): the whole
    image when it has at most ``tile`` x ``tile`` pixels, else overlapping windows of that size whose outputs are
    blended as :meth:`Predictor.predict_tiled` blends probabilities (:func:`blend_weights`, ``overlap`` pixels, at
    most half a window), here the logits. Returns what ``model`` returns: logits [B, K, H, W], or a list of them
    (deep supervision), float32 when windowed.

    What val.py and train.py's validation run a crop-trained run's whole images through (:func:`whole_image_network`),
    so that an image whose forward pass exceeds the memory budget (a whole slide) is scored in windows, as predict.py
    predicts it, instead of exhausting the memory. ``progress``: a bar over the windows of an image of many.
    """

    def __init__(self, model, tile, overlap=64, progress=True, budget=None):
        super().__init__()
        self.model, self.tile, self.overlap = model, tile, min(overlap, tile // 2)
        self.progress, self.budget = progress, budget

    def forward(self, x, **kwargs):
        height, width = x.shape[-2:]
        if height * width <= self.tile * self.tile:
            return self.model(x, **kwargs)
        tile, overlap = self.tile, self.overlap
        if self.budget is not None:  # the input, every head's sums and the weights stay beside the windows
            held = x.numel() * x.element_size() + (len(x) * self.budget.outputs + 1) * height * width * 4
            tile, _ = self.budget.windows(height, width, held, batch=len(x))
            overlap = min(overlap, tile // 2)
        th, tw = min(tile, height), min(tile, width)
        weight = torch.from_numpy(blend_weights(th, tw, overlap)).to(x.device)
        corners = [(y, x0) for y in window_starts(height, tile, overlap) for x0 in window_starts(width, tile, overlap)]
        totals, weights = None, torch.zeros((height, width), device=x.device)
        # val.py's bar counts images, and one image of many windows can take minutes
        with progress_bar(total=len(corners), desc="windows", unit="window", leave=False,
                          disable=not self.progress or len(corners) < 8) as bar:
            for y, x0 in corners:
                out = self.model(x[:, :, y:y + th, x0:x0 + tw], **kwargs)
                heads = out if isinstance(out, list) else [out]
                if totals is None:
                    totals = [torch.zeros(head.shape[:2] + (height, width), device=x.device) for head in heads]
                for total, head in zip(totals, heads):
                    total[:, :, y:y + th, x0:x0 + tw] += head.float() * weight
                weights[y:y + th, x0:x0 + tw] += weight
                bar.update()
        blended = [total.div_(weights) for total in totals]
        return blended if isinstance(out, list) else blended[0]


def whole_image_network(model, cfg, device, probe=None, progress=True):
    """The network val.py and train.py's validation run images through for a run of flags ``cfg``: a crop-trained
    run sees whole images of any size, so ``model`` in windows of the memory budget (:class:`WindowedNetwork`,
    :class:`WindowBudget` measured on ``probe``, the bare network of a DDP or compiled ``model``; default
    ``model``; ``progress``: its bar over the windows); a run trained on resized images sees them at its training
    size: ``model`` itself."""
    if not cfg.crop_size:
        return model
    budget = WindowBudget(model if probe is None else probe, cfg.input_channels, device)
    return WindowedNetwork(model, budget.tile, progress=progress, budget=budget)
