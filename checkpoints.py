"""Weights on disk: the training state a run resumes from, and trained runs loaded for inference.

Every file is loaded with ``torch.load(weights_only=True)``: tensors and plain types only, so a file that would
need arbitrary code to load is refused and never executed. A weights file with ``<path>.sha256`` beside it (the
bundled model) must match that checksum. val.py, predict.py, export.py and bundle.py load runs through here
without importing the training code.
"""
import io
import os
import re
import shlex
import warnings

import torch

from archs import build_model, fold_batchnorm
from config import (INIT_FLAGS, init_is_run, init_weights_path, load_run_config, output_channels,
                    read_run_config, saved_run_dir)
from files import atomic_write, sha256_file
from utils import DataError, UsageError, clipped, code_version


# what last.pth holds beside the epoch about the best epoch so far (config.track_best's dict)
BEST_KEYS = ("best_iou", "best_epoch", "stale_epochs")


def atomic_torch_save(obj, path):
    """``torch.save`` through files.atomic_write: the file at ``path`` is always a complete checkpoint. Serialised
    in memory first: torch.save writing to the file itself turns a full disk into a RuntimeError that names no
    file, where a plain write raises the OSError that the scripts report in one line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path, device):
    """The tensors and plain types saved at ``path`` (a state dict, or a last.pth dict), mapped to ``device``; a
    DataError when a float tensor holds NaN or infinite values (weights of a run that diverged, saved by an earlier
    version: they predict nothing, without a word)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: has the run saved weights yet? (train it first)")
    if os.path.lexists(path + ".sha256"):  # a folder or a broken link there fails to open: not a skipped check
        check_sha256(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
        raise DataError(f"refusing to load {path}: {_load_failure(e)}; only load weights saved by this toolkit or "
                        "from a source you trust") from None
    if holds_non_finite(saved):
        raise DataError(f"{path} holds NaN or infinite weights, as a training that diverged leaves them: use other "
                        "weights, or train again with a lower --lr")
    return saved


def holds_non_finite(saved):
    """Whether ``saved`` (a tensor, or dicts, lists and tuples of them and of plain values) holds a float tensor
    with a NaN or infinite value."""
    if isinstance(saved, torch.Tensor):
        return saved.is_floating_point() and not bool(torch.isfinite(saved).all())
    if isinstance(saved, dict):
        return any(holds_non_finite(v) for v in saved.values())
    if isinstance(saved, (list, tuple)):
        return any(holds_non_finite(v) for v in saved)
    return False


def _load_failure(error):
    """Why torch.load failed, in a few words: torch's own reason, without its advice about its API."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        body = text.partition("\n")[2].split("Check the documentation")[0].split("WeightsUnpickler error:")[-1]
        return ("it holds something other than tensors and plain types (which could run code) or is damaged "
                f"({clipped(body, 100)})")
    reason = clipped(text, 100) if text else type(error).__name__
    return f"it is damaged or not a PyTorch checkpoint ({reason})"


def check_sha256(path):
    """Compare ``path``'s SHA-256 with the first word of ``path``.sha256; a DataError when that is no SHA-256 or
    they differ."""
    with open(path + ".sha256", "rb") as f:
        words = f.read().split()
    expected = words[0].decode("ascii", "replace").lower() if words else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DataError(f"refusing to load {path}: {path}.sha256 holds no SHA-256 (64 hexadecimal digits, as "
                        "sha256sum writes it); restore it with git checkout, or delete it only if you made the "
                        "weights yourself")
    if sha256_file(path) != expected:
        raise DataError(f"refusing to load {path}: its SHA-256 differs from {path}.sha256 (damaged or replaced); "
                        "restore it with git checkout, or delete the .sha256 file only if you made the weights "
                        "yourself")


def load_weights(target, state, path, problem, fix=""):
    """``target.load_state_dict(state)`` (a network, optimizer, scheduler or scaler); a mismatch is a DataError
    naming ``path``, the ``problem``, how a network's tensors differ and the ``fix``."""
    differs = network_mismatch(state, target.state_dict()) if isinstance(target, torch.nn.Module) else ""
    if not differs:
        try:
            target.load_state_dict(state)
            return
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            differs = clipped(e, 160)
    raise DataError(f"{path} {problem} ({differs}){'; ' + fix if fix else ''}")


def network_mismatch(weights, expected):
    """How the state dict ``weights`` differs from the network's ``expected`` one (names, then shapes); '' if not."""
    if not isinstance(weights, dict):
        return f"it holds a {type(weights).__name__}, not a state dict"
    missing, unknown = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unknown:
        return f"{len(missing)} of the network's {len(expected)} tensors missing, {len(unknown)} unknown"
    shapes = [k for k, v in expected.items() if weights[k].shape != v.shape]
    return (f"{len(shapes)} tensors of another shape, e.g. {shapes[0]} {tuple(weights[shapes[0]].shape)} instead of "
            f"{tuple(expected[shapes[0]].shape)}" if shapes else "")


def load_run(name, device, prune=None):
    """models/<name> (or the bundled pretrained/<name>): (config Namespace, model in eval mode on ``device``, its
    BatchNorm folded into the convs for inference: archs.fold_batchnorm). ``prune`` (predict/val/export --prune)
    needs NestedUNet + DS. torch's random state is left as it was."""
    cfg = load_run_config(name)
    if prune is not None and not (cfg.arch == "NestedUNet" and cfg.deep_supervision):
        raise UsageError(f"--prune needs a NestedUNet trained with deep supervision; {name} is {cfg.arch} "
                         f"{'with' if cfg.deep_supervision else 'without'} deep supervision")
    path = os.path.join(saved_run_dir(name), "model.pth")
    weights = load_checkpoint(path, device)
    with torch.random.fork_rng(devices=[]):  # the random initial weights, all replaced, are no draws of the caller's
        model = build_model(cfg.arch, output_channels(cfg), cfg.input_channels, cfg.deep_supervision).to(device)
    load_weights(model, weights, path, "does not match the run's config.yml",
                 f"its arch, deep_supervision, input_channels, num_classes and borders must be those "
                 f"{os.path.dirname(path)} was trained with")
    return cfg, fold_batchnorm(model.eval())


def made_by(name):
    """What made a folder of outputs of run ``name`` (models/<name>, or the bundled pretrained/<name>), for
    prediction.yml and evaluation.yml: the SHA-256 of its model.pth and of its config.yml (read at each prediction:
    edited, the same weights give other outputs), and the toolkit's version (utils.code_version: another version may
    give other outputs). Taken once the run is loaded: a train.py of the run may save others meanwhile."""
    folder = saved_run_dir(name)
    return {"weights_sha256": sha256_file(os.path.join(folder, "model.pth")),
            "config_sha256": sha256_file(os.path.join(folder, "config.yml")),
            "toolkit": code_version(os.path.dirname(os.path.abspath(__file__)))}


def load_init_weights(net, init, device, flags):
    """--init NAME or PATH: copy the weights of run NAME (its model.pth) or of a .pth file (a state dict or a
    last.pth) into ``net``, built from the train.py ``flags``, for fine-tuning. A run (or a file with its run's
    config.yml beside it) trained with other :data:`INIT_FLAGS`, or without the --borders that ``flags`` ask for,
    is a UsageError naming them; other weights that do not fit a DataError. Returns a note for the user ('' for
    none): the border channel of a --borders run left out (``net`` has none), or how the output channels of a bare
    .pth file, whose run is unknown, were taken."""
    path = init_weights_path(init)
    if not os.path.isfile(path):
        if os.path.isdir(init):
            hint = run_folder_hint(init)
            raise UsageError(f"--init {init} is a run's folder{hint}" if hint else
                             f"--init {init} is a folder; give a run name from models/ or a weights file")
        raise UsageError(f"--init {init}: no such .pth file, and no run with {path}; give a run name from models/ "
                         "or a weights file")
    beside = os.path.join(os.path.dirname(path), "config.yml")  # a run's model.pth or last.pth given as a path
    theirs = load_run_config(init) if init_is_run(init) else read_run_config(beside) if os.path.isfile(beside) \
        else None
    if theirs is not None:
        differ = [k for k in INIT_FLAGS if getattr(theirs, k) != getattr(flags, k)]
        differ += ["borders"] if flags.borders and not theirs.borders else []
        if differ:
            was, given = (" ".join(f"--{k} {getattr(run, k)}" for k in differ) for run in (theirs, flags))
            raise UsageError(f"--init {init} was trained with {was}; fine-tune it with the same (not {given})")
    weights = load_checkpoint(path, device)
    weights = weights.get("model", weights)  # a last.pth holds the weights under "model"
    expected = net.state_dict()
    weights, dropped = without_border_channel(weights, expected)
    load_weights(net, weights, f"--init {init}: {path}", "holds a different network", "use the --arch, "
                 "--deep_supervision, --input_channels, --num_classes and --borders of the run it comes from")
    outputs = output_channels(flags)
    if theirs is not None:
        return "its learned-border channel is left out (this run has --borders False)" if dropped else ""
    if dropped:  # a file without its run: its extra channel may as well be a class
        return (f"{path} has no config.yml beside it: its last output channel (a learned-border map, or a class) is "
                f"left out to fit this run's {outputs} output channel{'s' if outputs > 1 else ''}")
    if outputs > 1:
        return (f"{path} has no config.yml beside it: its {outputs} output channels are taken as this run's "
                "classes (and border map) in their order; if it was trained with --borders, its last channel is a "
                "border map")
    return ""


def run_folder_hint(folder):
    """'; for a run's folder give its name, --init <name>' (or its model.pth outside models/ and pretrained/) when
    ``folder`` holds a run's weights; else ''."""
    if not os.path.isfile(os.path.join(folder, "model.pth")):
        return ""
    name = os.path.basename(os.path.normpath(folder))
    by_name = saved_run_dir(name) if name not in ("", ".", "..") and "\\" not in name else ""
    if os.path.isdir(by_name) and os.path.samefile(folder, by_name):
        return f"; for a run's folder give its name, --init {shlex.quote(name)}"
    return f"; for a run's folder give its weights, --init {shlex.quote(os.path.join(folder, 'model.pth'))}"


def without_border_channel(weights, expected):
    """(weights, dropped): ``weights`` with the heads' last output channel (the learned border map of a --borders
    run) dropped when that is all that differs from the state dict ``expected``, so that a --borders run can be
    fine-tuned on data without instance labels; else ``weights`` unchanged and dropped False."""
    differ = [k for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    heads = all(re.fullmatch(r"final\d?\.(weight|bias)", k) and weights[k].shape[1:] == expected[k].shape[1:]
                and weights[k].shape[0] == expected[k].shape[0] + 1 for k in differ)
    if not differ or not heads:
        return weights, False
    return {k: v[:expected[k].shape[0]] if k in differ else v for k, v in weights.items()}, True


def save_training_state(path, net, optimizer, scheduler, scaler, epoch, best):
    """Write everything to resume after ``epoch`` (1-based, completed) atomically: tensors and plain types only.
    ``best``: dict(best_iou, best_epoch, stale_epochs)."""
    atomic_torch_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, **best,
                       "torch_rng": torch.get_rng_state()}, path)


def state_like_parameters(optimizer):
    """Give each of ``optimizer``'s state tensors shaped like its parameter (momentum, Adam's moments) the
    parameter's memory layout, values unchanged. load_state_dict keeps the layout they were saved in, and in a run
    resumed in the other memory format (--channels_last, which auto sets by the machine: channels_last on a GPU or
    where bf16 trained, NCHW on an AVX2 CPU in fp32) torch's fused update (optim.fused_update; torch 2.13 on the
    CPU) stepped each weight with another weight's momentum, without an error (tests/test_safety.py); its foreach
    and for-loop updates index by strides and took the same step in either layout."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def saved_progress(path):
    """(epoch, dict(best_iou, best_epoch, stale_epochs)) of the last.pth at ``path``, read on the CPU without
    restoring anything: how far the run has come."""
    ckpt = load_checkpoint(path, "cpu")
    if not isinstance(ckpt, dict) or "epoch" not in ckpt:  # e.g. a model.pth copied over it: a plain state dict
        raise DataError(f"{path} has no 'epoch': it is not a last.pth of this toolkit; restore it, or start the run "
                        "again with --overwrite")
    return ckpt["epoch"], {k: ckpt[k] for k in BEST_KEYS}


def load_training_state(path, net, optimizer, scheduler, scaler, device):
    """Restore what :func:`save_training_state` wrote into the given objects and torch's RNG; returns
    (epoch, dict(best_iou, best_epoch, stale_epochs))."""
    ckpt = load_checkpoint(path, device)
    fix = "resume with the run's own settings or start again with --overwrite"
    for target, key in ((net, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if key not in ckpt:
            raise DataError(f"{path} has no '{key}': it is not a last.pth of this toolkit; {fix}")
        if key == "scaler" and not ckpt[key]:
            continue  # saved without fp16 (a disabled GradScaler); resumed in fp16 (--amp, --device), it starts anew
        load_weights(target, ckpt[key], path, "does not match this run's flags", fix)
    state_like_parameters(optimizer)
    torch.set_rng_state(ckpt["torch_rng"].cpu())  # map_location may have moved it to the GPU
    return ckpt["epoch"], {k: ckpt[k] for k in BEST_KEYS}
