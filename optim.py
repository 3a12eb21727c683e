"""The optimizer and the learning-rate schedule of a run: built from train.py's flags (config.OPTIMIZERS,
config.SCHEDULERS) and stepped once per epoch.
"""
import torch


def fused_update(name, device_type):
    """Whether optimizer ``name`` has the single-kernel ("fused") update on ``device_type`` ('cpu' or 'cuda'): one
    pass over each parameter instead of one per elementwise operation. On the CPU it came with torch 2.4 (Adam,
    AdamW and SGD), as SGD's did on CUDA; Adam's and AdamW's on CUDA are older."""
    if device_type not in ("cpu", "cuda"):
        return False
    return torch.__version__ >= "2.4" or (device_type == "cuda" and name != "SGD")


def build_optimizer(name, params, lr, momentum, nesterov, weight_decay, fused=False):
    """``name`` (config.OPTIMIZERS) over ``params``; ``fused``: the single-kernel update (see :func:`fused_update`)."""
    implementation = {"fused": True} if fused else {}  # else torch's default (torch 2.2's SGD has no fused flag)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               **implementation)
    if name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=weight_decay, **implementation)
    raise ValueError(f"name {name!r} is not one of SGD, Adam, AdamW")


def build_scheduler(name, optimizer, epochs, warmup_epochs, min_lr, factor, patience, milestones, gamma):
    """The schedule ``name`` (config.SCHEDULERS), stepped once per epoch by :func:`step_scheduler`.
    ``warmup_epochs`` W > 0 prepends a linear ramp from lr/(W+1) to lr over W epochs (not with ReduceLROnPlateau)."""
    lr_scheduler = torch.optim.lr_scheduler
    if name == "ReduceLROnPlateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience, min_lr=min_lr)
    schedules = {"CosineAnnealingLR": lambda: lr_scheduler.CosineAnnealingLR(
                     optimizer, T_max=max(epochs - warmup_epochs, 1), eta_min=min_lr),
                 "MultiStepLR": lambda: lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma),
                 "ConstantLR": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)}
    if name not in schedules:
        raise ValueError(f"name {name!r} is not one of CosineAnnealingLR, ReduceLROnPlateau, MultiStepLR, ConstantLR")
    schedule = schedules[name]()
    if not warmup_epochs:
        return schedule
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, schedule], milestones=[warmup_epochs])


def cosine_parts(scheduler):
    """The CosineAnnealingLR schedules in ``scheduler`` (itself, or the part after a warm-up)."""
    parts = scheduler._schedulers if isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR) else [scheduler]
    return [p for p in parts if isinstance(p, torch.optim.lr_scheduler.CosineAnnealingLR)]


def step_scheduler(scheduler, val_loss):
    """Step the learning-rate schedule once per epoch (ReduceLROnPlateau on the val loss)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()
