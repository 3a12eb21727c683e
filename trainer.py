"""One training run: data split and loaders, model, optimizer, scheduler, the epoch loop, checkpoints, logs.

train.py is its command line; bench/speed.py drives the same class. Every file in models/<name>/ is written
atomically (temporary file, then os.replace), only by the main process, so a crash, Ctrl-C or SIGTERM leaves
each file either in its old or its new complete version.
"""
import os
import shutil
import signal
import time

import numpy as np
import pandas as pd
import torch

import distributed
from archs import build_model
from config import (INPUTS_DIR, init_weights_path, load_run_config, output_channels, run_dir, save_run_config,
                    saved_run_dir)
from dataset import (MODALITIES, Dataset, EpochSampler, WeightedDistributedSampler, balance_weights, decode_image,
                     eval_transform, find_layout, list_ids, train_transform)
from device_data import BatchAugment, DeviceImages, DeviceLoader
from engine import NonFiniteLoss, Precision, evaluate, recalibrate_batchnorm, train_one_epoch
from losses import build_loss
from utils import (DataError, UsageError, UserError, atomic_torch_save, atomic_write, choose_device, seed_everything,
                   sha256_file)

LOG_COLUMNS = ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "val_iou_mean", "val_dice_mean",
               "seconds"]


# ------------------------------------------------------------------------------------------------------ split

def make_split(ids, val_size=0.2, test_size=0.0, random_state=41):
    """Split sorted ids into train/val(/test) the way the seed did: train_test_split(random_state=41).

    With test_size 0 this is exactly the seed's 80/20 split. With a test part, the test ids are drawn first
    and the validation ids from the rest. Returns a DataFrame with columns img_id, split.
    """
    from sklearn.model_selection import train_test_split  # imported here: it takes a second to import

    ids = sorted(ids)
    rest, test = (ids, []) if test_size == 0 else train_test_split(ids, test_size=test_size, random_state=random_state)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), random_state=random_state)
    rows = [(i, "train") for i in train] + [(i, "val") for i in val] + [(i, "test") for i in test]
    return pd.DataFrame(rows, columns=["img_id", "split"])


def read_split(path):
    """split.csv -> DataFrame(img_id, split), checked."""
    split = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(split.columns) != ["img_id", "split"] or not split["split"].isin(["train", "val", "test"]).all():
        raise DataError(f"{path} must have columns img_id,split with values train/val/test")
    return split


def decoded_bytes(dataset_dir, ids, img_ext):
    """Estimate the decoded size of the images ``ids`` (bytes) from the first 8 of them, with a 1.4 margin."""
    layout = find_layout(dataset_dir, img_ext)
    per_image = np.mean([decode_image(layout.image(i)).nbytes * 1.4 for i in ids[:8]] or [0])
    return per_image * len(ids)


def train_on_device(loader, cached, decoded, device):
    """--loader: True to keep the training set on ``device`` and augment batches there (device_data.py). auto does
    so when the images are cached (--cache True and they fit a quarter of the RAM) and, on a GPU, their ``decoded``
    bytes also fit a quarter of its free memory."""
    if loader != "auto":
        return loader == "device"
    if device.type != "cuda":
        return cached
    return cached and decoded < torch.cuda.mem_get_info(device)[0] / 4


def make_eval_loader(args, dataset_dir, ids, device, cache=False):
    """A loader over ``ids`` at evaluation size (whole images with batch 1 for crop-trained runs, whose images
    differ in size). Under DDP each process gets every world_size-th id, so every image is seen exactly once."""
    shard = ids[distributed.rank()::distributed.world_size()]
    data = Dataset(shard, dataset_dir, args.img_ext, args.mask_ext, args.num_classes, args.input_channels,
                   eval_transform(args.input_h, args.input_w, args.crop_size), seed=args.seed, cache=cache,
                   borders=args.borders)
    return torch.utils.data.DataLoader(data, batch_size=1 if args.crop_size else args.batch_size, shuffle=False,
                                       num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=args.num_workers > 0)


def build_criterion(args):
    """The run's loss (--loss), with the border channel scored by its own term when --borders is on."""
    return build_loss(args.loss, border_after=args.num_classes if args.borders else None)


# ---------------------------------------------------------------------------------------- optimizer, schedule

def build_optimizer(args, params, fused=False):
    """--optimizer over ``params``; ``fused``: Adam/AdamW's single-kernel CUDA update."""
    if args.optimizer == "SGD":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=args.weight_decay)
    if args.optimizer in ("Adam", "AdamW"):
        cls = torch.optim.Adam if args.optimizer == "Adam" else torch.optim.AdamW
        return cls(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)
    raise UsageError(f"--optimizer {args.optimizer!r} is not one of SGD, Adam, AdamW")


def build_scheduler(args, optimizer):
    """The learning-rate schedule, stepped once per epoch (ReduceLROnPlateau on the val loss).

    ``--warmup_epochs`` W prepends a linear ramp from lr/(W+1) to lr over W epochs.
    """
    main_epochs = max(args.epochs - args.warmup_epochs, 1)
    if args.scheduler == "CosineAnnealingLR":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=args.min_lr)
    elif args.scheduler == "ReduceLROnPlateau":
        if args.warmup_epochs:
            raise UsageError("--warmup_epochs cannot be combined with --scheduler ReduceLROnPlateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=args.factor, patience=args.patience,
                                                          min_lr=args.min_lr)
    elif args.scheduler == "MultiStepLR":
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestone_list, gamma=args.gamma)
    elif args.scheduler == "ConstantLR":
        sched = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise UsageError(f"--scheduler {args.scheduler!r} is not one of CosineAnnealingLR, ReduceLROnPlateau, "
                         "MultiStepLR, ConstantLR")
    if not args.warmup_epochs:
        return sched
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (args.warmup_epochs + 1),
                                               total_iters=args.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, sched], milestones=[args.warmup_epochs])


# ---------------------------------------------------------------------------------------------------- trainer

class Trainer:
    """Everything one run needs. Use as a context manager: ``with Trainer(args) as t: t.fit()``."""

    def __init__(self, args, progress=True):
        self.args = args
        self.progress = progress
        self.dir = run_dir(args.name)
        self.device = distributed.setup(choose_device(args.device))
        self.main = distributed.is_main()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.precision = Precision.choose(self.device, args.amp, args.channels_last)
        self._prepare_run_dir()
        try:
            self._set_up()
        except BaseException:
            if self.main and not args.resume:  # a new run that fails before training leaves no folder behind
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.started = time.time()

    def _set_up(self):
        """Split, loaders, network (resumed or --init weights), loss, optimizer and schedule."""
        args = self.args
        self.dataset_dir = self._dataset_dir()
        self.split = self._load_or_make_split()
        self.train_loader, self.val_loader = self._build_loaders()
        seed_everything(args.seed)
        self.net = build_model(args.arch, output_channels(args), args.input_channels,
                               args.deep_supervision).to(self.device)
        self.net = self.precision.prepare(self.net)
        self.criterion = build_criterion(args)
        self.optimizer = build_optimizer(args, self.net.parameters(), fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(args, self.optimizer)
        self.start_epoch, self.best_iou, self.best_epoch, self.stale_epochs = 0, -1.0, 0, 0
        self.log = pd.DataFrame(columns=LOG_COLUMNS)
        if args.resume:
            self._load_checkpoint()
        elif args.init:
            self._load_init_weights()
        self.model = self._wrap_model(self.net)

    def __enter__(self):
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        distributed.cleanup()
        if exc_type is KeyboardInterrupt and self.main:
            done = getattr(self, "saved_epoch", self.start_epoch)
            if done:
                print(f"\nstopped during epoch {done + 1}; {self.dir}/last.pth holds epoch {done}. "
                      f"Continue with: python train.py --resume {self.args.name}", flush=True)
            else:
                print("\nstopped during epoch 1, before any epoch was saved; start again with --overwrite",
                      flush=True)
        return False

    # ----------------------------------------------------------------------------------------- setting up

    def _prepare_run_dir(self):
        a = self.args
        if self.main:
            if a.resume:
                if not os.path.isfile(os.path.join(self.dir, "last.pth")):
                    raise UsageError(f"--resume {a.name}: {self.dir}/last.pth not found (the run saved no epoch "
                                     "yet); start it again with --overwrite")
            elif os.path.isdir(self.dir) and os.listdir(self.dir):
                if not a.overwrite:
                    raise UsageError(f"{self.dir} already holds a run; pass --resume to continue it, --overwrite to "
                                     "replace it, or choose another --name")
                shutil.rmtree(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            save_run_config(a, os.path.join(self.dir, "config.yml"))
        distributed.barrier()

    def _dataset_dir(self):
        path = os.path.join(INPUTS_DIR, self.args.dataset)
        if self.args.dataset == "synthetic" and self.main:
            from synthetic import ensure_synthetic

            ensure_synthetic(path)
        distributed.barrier()
        return path

    def _load_or_make_split(self):
        a = self.args
        ids = list_ids(self.dataset_dir, a.img_ext, a.mask_ext, a.num_classes)
        path = os.path.join(self.dir, "split.csv")
        if a.resume and os.path.isfile(path):
            split = read_split(path)
            missing = sorted(set(split["img_id"]) - set(ids))
            if missing:
                raise DataError(f"{path} names ids that are no longer in {self.dataset_dir}: {', '.join(missing[:3])}")
            return split
        if len(ids) < 3:
            raise DataError(f"{self.dataset_dir} has {len(ids)} samples; at least 3 are needed to train and validate")
        split = make_split(ids, a.val_size, a.test_size, a.split_seed)
        if self.main:
            with atomic_write(path) as f:
                split.to_csv(f, index=False)
        return split

    def ids(self, part):
        return self.split.loc[self.split["split"] == part, "img_id"].tolist()

    def make_eval_loader(self, ids):
        return make_eval_loader(self.args, self.dataset_dir, ids, self.device, self._cache)

    def _build_loaders(self):
        a = self.args
        train_ids = self.ids("train")
        world = distributed.world_size()
        if len(train_ids) // world < a.batch_size:
            raise UsageError(f"--batch_size {a.batch_size} is larger than the {len(train_ids)} training images"
                             f"{f' per process ({world} processes)' if world > 1 else ''}; the last incomplete "
                             "batch is dropped, so no step would run: lower --batch_size")
        decoded = decoded_bytes(self.dataset_dir, train_ids, a.img_ext)
        self._cache = a.cache and decoded < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
        self.on_device = train_on_device(a.loader, self._cache, decoded, self.device)
        transform = None if self.on_device else train_transform(a.input_h, a.input_w, a.crop_size, a.scale_jitter,
                                                                a.color_jitter, a.greyscale, a.invert)
        data = Dataset(train_ids, self.dataset_dir, a.img_ext, a.mask_ext, a.num_classes, a.input_channels,
                       transform, seed=a.seed, cache=self._cache or self.on_device, borders=a.borders)
        if a.crop_size:
            _check_crop(data, a.crop_size)
        if a.balance:
            sampler = WeightedDistributedSampler(self._balance_weights(data), world, distributed.rank(), a.seed)
        else:
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=distributed.rank(),
                                                          shuffle=True, seed=a.seed)
        if self.on_device:
            augment = BatchAugment(a.input_h, a.input_w, a.crop_size, a.scale_jitter, a.color_jitter, a.greyscale,
                                   a.invert)
            train_loader = DeviceLoader(DeviceImages(data.cached, a.input_channels, self.device), train_ids, augment,
                                        sampler, a.batch_size, a.seed)
        else:
            train_loader = torch.utils.data.DataLoader(
                data, batch_size=a.batch_size, sampler=EpochSampler(sampler), num_workers=a.num_workers,
                drop_last=True, pin_memory=self.device.type == "cuda", persistent_workers=a.num_workers > 0)
        return train_loader, self.make_eval_loader(self.ids("val"))

    def _balance_weights(self, data):
        """--balance: sampling weights of the training images by kind; says how often each kind is drawn."""
        kinds = np.asarray(data.modalities())
        weights = balance_weights(kinds, self.args.balance)
        if self.main:
            drawn = ", ".join(f"{(kinds == k).sum()} {k} images drawn {weights[kinds == k].sum() / weights.sum():.0%} "
                              "of the time" for k in MODALITIES if (kinds == k).any())
            print(f"--balance {self.args.balance:g}: {drawn}", flush=True)
        return weights

    def _load_init_weights(self):
        """--init NAME or PATH: copy those weights into the new network (fine-tuning)."""
        init = self.args.init
        path = init_weights_path(init)
        if not os.path.isfile(path):
            raise UsageError(f"--init {init}: no such .pth file, and no run with {path}; give a run name from models/ "
                             "or a weights file")
        weights = load_checkpoint(path, self.device)
        weights = weights.get("model", weights)  # a last.pth holds the weights under "model"
        expected = self.net.state_dict()
        missing, unknown = set(expected) - set(weights), set(weights) - set(expected)
        if missing or unknown or any(weights[k].shape != v.shape for k, v in expected.items()):
            differs = (f"{len(missing)} of this network's {len(expected)} tensors missing, {len(unknown)} unknown"
                       if missing or unknown else "tensor shapes differ")
            raise DataError(f"--init {init}: {path} holds a different network ({differs}); use the --arch, "
                            "--deep_supervision, --input_channels, --num_classes and --borders of the run it comes "
                            "from")
        self.net.load_state_dict(weights)

    def _wrap_model(self, net):
        model = net
        if distributed.is_initialized():
            if self.args.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.args.compile:
            model = torch.compile(model, mode=None if self.args.compile == "default" else self.args.compile)
        return model

    # ------------------------------------------------------------------------------------------- checkpoints

    def _checkpoint(self, epoch):
        """Everything to resume after ``epoch`` (1-based, completed): tensors and plain types only."""
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "epoch": epoch, "best_iou": self.best_iou, "best_epoch": self.best_epoch,
                "stale_epochs": self.stale_epochs, "torch_rng": torch.get_rng_state()}

    def _load_checkpoint(self):
        path = os.path.join(self.dir, "last.pth")
        ckpt = load_checkpoint(path, self.device)
        try:
            self.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise DataError(f"{path} does not match this run's flags ({str(e).splitlines()[0][:120]}); resume with "
                            "the run's own settings or start again with --overwrite") from None
        torch.set_rng_state(ckpt["torch_rng"].cpu())  # map_location may have moved it to the GPU
        self.start_epoch = ckpt["epoch"]
        self.best_iou, self.best_epoch, self.stale_epochs = ckpt["best_iou"], ckpt["best_epoch"], ckpt["stale_epochs"]
        log_path = os.path.join(self.dir, "log.csv")
        if os.path.isfile(log_path):
            log = pd.read_csv(log_path)
            self.log = log[log["epoch"] <= self.start_epoch].reset_index(drop=True)

    def _save_epoch(self, epoch, row, improved):
        if not self.main:
            return
        self.log = pd.concat([self.log.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
        if improved:
            atomic_torch_save(self.net.state_dict(), os.path.join(self.dir, "model.pth"))
        with atomic_write(os.path.join(self.dir, "log.csv")) as f:
            self.log[LOG_COLUMNS].to_csv(f, index=False)
        from plot import plot_runs

        plot_runs([self.log], [self.args.name], os.path.join(self.dir, "curves.png"))
        # last.pth is written last: it is the commit point. Stopped before it, --resume redoes this epoch and
        # drops its row from log.csv, so the log never misses an epoch.
        atomic_torch_save(self._checkpoint(epoch), os.path.join(self.dir, "last.pth"))
        self.saved_epoch = epoch

    # --------------------------------------------------------------------------------------------- the loop

    def fit(self):
        """Train from start_epoch to --epochs, validating, logging and checkpointing after every epoch."""
        a = self.args
        if self.main:
            counts = " / ".join(f"{len(self.ids(p))} {p}" for p in ("train", "val", "test") if self.ids(p))
            print(f"{a.name}: {a.arch}{' + deep supervision' if a.deep_supervision else ''}, {a.loss}, "
                  f"{counts} images, on {self.device} "
                  f"({self.precision.describe()}; "
                  f"{'batches augmented on the device' if self.on_device else f'{a.num_workers} loader workers'}"
                  f"{f', {distributed.world_size()} processes' if distributed.world_size() > 1 else ''})"
                  f"{f', resuming after epoch {self.start_epoch}' if self.start_epoch else ''}", flush=True)
        for epoch in range(self.start_epoch, a.epochs):
            if epoch > 0 and 0 <= a.early_stopping <= self.stale_epochs:  # as the seed: at least one epoch
                if self.main:
                    print(f"early stopping: no better val IoU for {self.stale_epochs} epochs", flush=True)
                break
            self.run_epoch(epoch)

    def train_epoch(self, epoch, max_steps=None):
        """The training half of :meth:`run_epoch` (bench/speed.py times exactly this): seeds the epoch, trains
        on the training loader (at most ``max_steps`` steps) and returns dict(loss, iou)."""
        a = self.args
        torch.manual_seed(a.seed + epoch)
        self.train_loader.sampler.set_epoch(epoch)
        desc = f"epoch {epoch + 1}/{a.epochs}"
        try:
            return train_one_epoch(self.model, self.train_loader, self.criterion, self.optimizer, self.precision,
                                   desc=desc, progress=self.progress and self.main, max_steps=max_steps,
                                   classes=a.num_classes)
        except NonFiniteLoss as e:
            kept = f"{self.dir}/last.pth still holds epoch {epoch}" if epoch else "no epoch was saved"
            raise UserError(f"the loss became NaN or infinite at epoch {epoch + 1}, step {e.step + 1}; {kept}. "
                            "Try a lower --lr (start again with --overwrite: a resumed run keeps its saved learning "
                            f"rate), --amp fp32{f' (with --resume {a.name})' if epoch else ''}, or check the data"
                            ) from None

    def run_epoch(self, epoch):
        """Train and validate epoch ``epoch`` (0-based), step the schedule, and save everything."""
        a = self.args
        t0 = time.time()
        lr = self.optimizer.param_groups[0]["lr"]
        train = self.train_epoch(epoch)
        if a.precise_bn:
            recalibrate_batchnorm(self.net, self.train_loader, self.precision, a.precise_bn)
        distributed.broadcast_buffers(self.net)
        val = evaluate(self.model, self.val_loader, self.criterion, self.precision, desc="val",
                       progress=self.progress and self.main, classes=a.num_classes)
        if a.scheduler == "ReduceLROnPlateau":
            self.scheduler.step(val["loss"])
        else:
            self.scheduler.step()
        improved = val["iou"] > self.best_iou
        if improved:
            self.best_iou, self.best_epoch, self.stale_epochs = val["iou"], epoch + 1, 0
        else:
            self.stale_epochs += 1
        row = {"epoch": epoch + 1, "lr": lr, "loss": train["loss"], "iou": train["iou"], "val_loss": val["loss"],
               "val_iou": val["iou"], "val_dice": val["dice"], "val_iou_mean": val["iou_mean"],
               "val_dice_mean": val["dice_mean"], "seconds": round(time.time() - t0, 2)}
        self._save_epoch(epoch + 1, row, improved)
        if self.main:
            print(f"epoch {epoch + 1}/{a.epochs}  lr {lr:.2e}  loss {train['loss']:.4f}  iou {train['iou']:.4f}  "
                  f"val_loss {val['loss']:.4f}  val_iou {val['iou']:.4f}  val_dice {val['dice']:.4f}  "
                  f"({row['seconds']:.1f}s){'  *best' if improved else ''}", flush=True)
        return row

    def print_summary(self):
        """The end-of-run summary: best epoch and scores, time, where the files are; test scores if any."""
        if not self.main or not len(self.log):
            return
        best = self.log.loc[self.log["epoch"] == self.best_epoch].iloc[0]
        lines = [f"done: {len(self.log)} epochs in {time.time() - self.started:.0f}s "
                 f"(this session) on {self.device}",
                 f"best epoch {self.best_epoch}: val IoU {best['val_iou']:.4f} (pooled), "
                 f"{best['val_iou_mean']:.4f} (mean per image), val Dice {best['val_dice']:.4f}"]
        if self.args.test_size:
            self.net.load_state_dict(load_checkpoint(os.path.join(self.dir, "model.pth"), self.device))
            test = evaluate(self.model, self.make_eval_loader(self.ids("test")), self.criterion, self.precision,
                            desc="test", progress=False, classes=self.args.num_classes)
            lines.append(f"test split (never used for choices): IoU {test['iou']:.4f} (pooled), "
                         f"{test['iou_mean']:.4f} (mean per image), Dice {test['dice']:.4f}")
        lines.append(f"files: {self.dir}/ (log.csv, curves.png, model.pth, last.pth); "
                     f"evaluate with: python val.py --name {self.args.name}")
        print("\n".join(lines), flush=True)


def _check_crop(data, crop_size):
    """Crop training needs every image at least crop_size on each side (all are checked when cached)."""
    indices = range(len(data)) if data.cached else [0]
    for i in indices:
        h, w = data.load(i)[0].shape[:2] if not data.cached else data.cached[i][0].shape[:2]
        if min(h, w) < crop_size:
            path = data.layout.image(data.img_ids[i])
            raise UsageError(f"--crop_size {crop_size} is larger than image {path} ({h}x{w}); use a --crop_size "
                             f"of at most {min(h, w) // 16 * 16}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def load_checkpoint(path, device):
    """torch.load with weights_only=True: tensors and plain types only. A file that would need arbitrary code
    to load (a pickle with classes or functions) is refused with a clear message and never executed. A file with a
    ``<path>.sha256`` beside it (the bundled model) must match that checksum."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: has the run saved weights yet? (train it first)")
    if os.path.isfile(path + ".sha256"):
        check_sha256(path)
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
        text = str(e).strip()
        if text.startswith("Weights only load failed"):  # keep torch's reason, not its advice about its API
            body = text.partition("\n")[2].split("Check the documentation")[0].split("WeightsUnpickler error:")[-1]
            reason = ("it holds something other than tensors and plain types (which could run code) or is damaged "
                      f"({' '.join(body.split())[:100]})")
        else:
            reason = f"it is damaged or not a PyTorch checkpoint ({text.splitlines()[0][:100] if text else type(e)})"
        raise DataError(f"refusing to load {path}: {reason}; only load weights saved by this toolkit or from a "
                        "source you trust") from None


def check_sha256(path):
    """Compare ``path``'s SHA-256 with the first word of ``path``.sha256; a DataError when they differ."""
    with open(path + ".sha256") as f:
        words = f.read().split()
    if sha256_file(path) != (words[0].lower() if words else ""):
        raise DataError(f"refusing to load {path}: its SHA-256 differs from {path}.sha256 (damaged or replaced); "
                        "restore it with git checkout, or delete the .sha256 file only if you made the weights "
                        "yourself")


def load_run(name, device, prune=None):
    """models/<name> (or the bundled pretrained/<name>): (config Namespace, model in eval mode on ``device``).
    --prune needs NestedUNet + DS."""
    cfg = load_run_config(name)
    if prune is not None and not (cfg.arch == "NestedUNet" and cfg.deep_supervision):
        raise UsageError(f"--prune needs a NestedUNet trained with deep supervision; {name} is {cfg.arch} "
                         f"{'with' if cfg.deep_supervision else 'without'} deep supervision")
    path = os.path.join(saved_run_dir(name), "model.pth")
    weights = load_checkpoint(path, device)
    model = build_model(cfg.arch, output_channels(cfg), cfg.input_channels, cfg.deep_supervision).to(device)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        raise DataError(f"{path} does not match the run's config.yml ({str(e).splitlines()[0][:120]})") from None
    return cfg, model.eval()
