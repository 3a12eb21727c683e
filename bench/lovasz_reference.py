"""The reference Lovasz hinge: the seed's per-image Python loop, which lovasz_losses.lovasz_hinge batches.

Used by the tests (as the oracle of the batched loss), bench/lovasz.py and bench/seed_loop.py; never by training.
"""
if __name__ == "__main__":  # a module, not a command
    raise SystemExit(f"{__file__} is imported by the tests, bench/lovasz.py and bench/seed_loop.py; it is not a "
                     "command (see python bench/lovasz.py --help)")

import torch
import torch.nn.functional as F

from lovasz_losses import hinge_errors, in_float32, lovasz_grad


@in_float32
def lovasz_hinge_flat(logits, labels):
    """Lovasz hinge of one image: logits [P], labels [P] in {0, 1} -> scalar float32 (0 for P = 0)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    errors = hinge_errors(logits, labels)
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = lovasz_grad(labels[perm])
    return torch.dot(F.relu(errors_sorted), grad)


@in_float32
def lovasz_hinge_per_image_loop(logits, labels):
    """Reference: a Python loop of :func:`lovasz_hinge_flat` over images [B, ...] -> mean, scalar float32."""
    losses = [lovasz_hinge_flat(logit.reshape(-1), label.reshape(-1)) for logit, label in zip(logits, labels)]
    return torch.stack(losses).mean()
