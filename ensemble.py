"""Several trained runs as one network (val.py and predict.py --ensemble): the mean of their probabilities.

The runs of a cross-validation (train.py --folds K, one run per fold) together trained on every image; nnU-Net
predicts with all K of them and averages their probabilities (what that gave here: docs/data.md). Here the
runs must read images the same way and put out the same channels (:data:`SAME_KEYS`); they may differ otherwise
(another arch, another recipe).
"""
import torch

from archs import final_logits
from checkpoints import load_run, made_by
from config import load_run_config
from evaluation import model_epoch
from utils import UsageError

# What runs averaged together must share: how an image is read and scaled for the network, what each output channel
# means, and the loss (a Lovasz run's logits are no probabilities to average with another's, and the default
# --min_confidence depends on it)
SAME_KEYS = ("input_channels", "normalization", "num_classes", "borders", "crop_size", "loss")
RESIZED_KEYS = ("input_h", "input_w")  # the size a run trained on resized images predicts at


class MeanProbability(torch.nn.Module):
    """Networks ``members`` as one: images [B, C, H, W] -> logits [B, K, H, W] whose sigmoid is the mean of the
    members' sigmoids (their final heads'; with ``prune`` L, head L's), one member after another. The mean is kept
    within [1e-6, 1 - 1e-6], so that the logits stay finite for a loss."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x, prune=None):
        total = None
        for member in self.members:
            logits = final_logits(member(x) if prune is None else member(x, prune=prune))
            probs = torch.sigmoid(logits.float())
            total = probs if total is None else total.add_(probs)
        return torch.logit(total.div_(len(self.members)), eps=1e-6)


def check_same_reading(name, others):
    """UsageError unless the runs ``others`` read images as run ``name`` does and put out the same channels
    (:data:`SAME_KEYS`, of crop_size whether it is 0; the training size too when ``name`` was trained on resized
    images): the first that differs, named with both values. A run named twice is refused too (it would count
    double)."""
    names = [name, *others]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--ensemble: run {repeated[0]} is named more than once (with --name); give each run once")
    cfg = load_run_config(name)
    keys = SAME_KEYS + (() if cfg.crop_size else RESIZED_KEYS)
    for other in others:
        theirs = load_run_config(other, "--ensemble")
        for key in keys:
            # crop-trained runs all predict whole images as they are, whatever the size of their crops
            same = bool(theirs.crop_size) == bool(cfg.crop_size) if key == "crop_size" else \
                getattr(theirs, key) == getattr(cfg, key)
            if not same:
                raise UsageError(f"--ensemble: run {other} has {key} {getattr(theirs, key)}, run {name} "
                                 f"{getattr(cfg, key)}; the runs averaged must read images alike and put out the same "
                                 f"channels ({', '.join(keys)})")


def load_models(name, others, device, prune=None):
    """Run ``name`` alone, or with the runs ``others`` (--ensemble) as a :class:`MeanProbability`: (``name``'s config
    Namespace, the model in eval mode on ``device``), as checkpoints.load_run loads one; ``others`` must pass
    :func:`check_same_reading`."""
    cfg, model = load_run(name, device, prune)
    if not others:
        return cfg, model
    check_same_reading(name, others)
    return cfg, MeanProbability([model] + [load_run(other, device, prune)[1] for other in others]).eval()


def members_record(others):
    """What evaluation.yml and prediction.yml record of the runs ``others`` averaged with --name's: for each, its
    name, the model's epoch (evaluation.model_epoch) and checkpoints.made_by's SHA-256 of its weights and config.yml;
    [] for none. Taken once they are loaded, as made_by says."""
    return [{"run": other, "model": model_epoch(other) or "model.pth",
             **{k: v for k, v in made_by(other).items() if k != "toolkit"}} for other in others]
