"""One training run: data split and loaders, model, optimizer and schedule, the epoch loop, logs and checkpoints.

train.py is its command line; bench/speed.py drives the same class. Every file in models/<name>/ is written
atomically (temporary file, then os.replace), only by the main process, so a crash, Ctrl-C or a signal that ends a
job leaves each file either in its old or its new complete version. The folder is created only once the run is set up.
"""
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import torch

import distributed
from archs import build_model
from checkpoints import (atomic_torch_save, load_init_weights, load_training_state, save_training_state,
                         saved_progress)
from config import (INPUTS_DIR, best_after, init_weights_path, is_bundled_name, output_channels, run_dir, run_lock_file,
                    save_run_config, schedule_note, stops_early, track_best, unused_flags_note)
from dataset import (AUGMENTATION_FLAGS, MODALITIES, Dataset, EpochSampler, WeightedDistributedSampler,
                     balance_weights, eval_loader, mostly_foreground_note, multi_object_ids_note, quiet_worker,
                     reading_of, spread_sample, train_transform)
from device_data import COLOUR_P, JITTER, BatchAugment, DeviceImages, DeviceLoader
from engine import (NonFiniteLoss, Precision, choose_device, evaluate, fit_threads_to_cpus, recalibrate_batchnorm,
                    seed_everything, train_one_epoch)
from files import atomic_imwrite, atomic_write, interrupts_held, locked, remove_killed_writes
from image_files import (PAGES_AS_COLOURS, TIFF_EXTS, decoded_size, image_to_float, pages_as_colours,
                         tiff_header)
from inference import whole_image_network
from layouts import find_layout, images_left_out, list_ids, nucleus_diameter
from losses import build_loss
from optim import build_optimizer, build_scheduler, cosine_parts, fused_update, step_scheduler
from plot import plot_runs
from splits import (changed_images_note, held_out_seen_in_training, load_or_make_split, split_ids, unlisted_note,
                    with_fingerprints)
from synthetic import ensure_synthetic
from utils import DataError, UsageError, UserError, first_few, ram, stop_signals_as_interrupts
from visualize import BATCH_SHOWN, batch_picture

BATCH_PICTURE = "train_batch.png"
CURVES_SHARE = 0.05  # at most this share of a run's time goes to redrawing curves.png after its epochs


class Trainer:
    """Everything one run needs. Use as a context manager: ``with Trainer(args) as t: t.fit()``."""

    def __init__(self, args, progress=True):
        self.args, self.progress = args, progress
        self.dir = run_dir(args.name)
        self.device = distributed.setup(choose_device(args.device))
        fit_threads_to_cpus()
        self.main = distributed.is_main()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.precision = Precision.choose(self.device, args.amp, args.channels_last)
        if args.sync_bn and distributed.is_initialized() and self.device.type != "cuda":
            raise UsageError("--sync_bn True: SyncBatchNorm synchronises BatchNorm across CUDA GPUs only; pass "
                             "--sync_bn False on the CPU")
        # every process, or the others hang
        check_run_folder(self.dir, args.name, args.resume, args.overwrite, args.auto_resume)
        self.dataset_dir = dataset_folder(args.dataset, self.main, args.name if args.resume else None)
        self.split = self._load_split()
        for note in (schedule_note(args), unused_flags_note(args)):
            if note:
                self._say(note)
        self.train_loader, self.on_device, self.cache = self._train_loader()
        batches = len(self.train_loader)
        if args.precise_bn > batches and not args.freeze_bn:  # a few images: recalibrate_batchnorm stops at the end
            self._say(f"note: --precise_bn {args.precise_bn}: an epoch has {batches} batch{'es' * (batches > 1)} of "
                      f"{args.batch_size}, so BatchNorm's statistics come from those {batches * args.batch_size} "
                      f"{'crops' if args.crop_size else 'images'} before each validation; --precise_bn 0 keeps "
                      "PyTorch's running averages (--freeze_bn True with --init: those of its weights)")
        self.val_loader = self.make_eval_loader(self.ids("val"))
        shards_with_nuclei = torch.tensor(float(self.val_loader.dataset.has_foreground()), device=self.device)
        if not distributed.reduce_sum(shards_with_nuclei).item():  # under DDP each process holds a shard
            self._say("note: every validation mask is empty, so val IoU reads 1 for an epoch that predicts nothing "
                      "and 0 otherwise and cannot choose the best epoch; give a --split_file whose validation images "
                      "have nuclei")
        seed_everything(args.seed)
        net = build_model(args.arch, output_channels(args), args.input_channels, args.deep_supervision)
        self.net = self.precision.prepare(net.to(self.device))
        self.criterion = build_loss(args.loss, border_after=args.num_classes if args.borders else None)
        self.optimizer = build_optimizer(args.optimizer, self.net.parameters(), args.lr, args.momentum, args.nesterov,
                                         args.weight_decay, fused=fused_update(args.optimizer, self.device.type))
        self.scheduler = build_scheduler(args.scheduler, self.optimizer, args.epochs, args.warmup_epochs, args.min_lr,
                                         args.factor, args.patience, args.milestone_list, args.gamma)
        self.start_epoch, self.best = 0, best_after([])
        self.log = pd.DataFrame()
        # curves.png: the log rows it shows, when it was drawn and what that took (a drawing's usual second, until
        # one is timed: a short run draws it once, at its end)
        self.curves = {"rows": None, "at": time.time(), "cost": 1.0}
        if args.resume:
            self._resume()
        elif args.init:
            self._start_from_init()
        # frozen BatchNorm layers use their saved statistics, the same in every process: nothing to synchronise
        self.model = wrap_model(self.net, self.device, args.sync_bn and not args.freeze_bn, args.compile)
        self.val_model = whole_image_network(self.model, args, self.device, probe=self.net,
                                             progress=self.progress and self.main)
        if self.main:  # set up without an error: now the run folder may be written
            if args.crop_size and not args.nucleus_diameter:  # recorded for predict.py --scale auto
                self._measure_nucleus_diameter()
            if is_bundled_name(args.name) and not args.resume:
                self._say(f"note: models/{args.name} takes the place of the bundled run pretrained/{args.name} for "
                          f"predict.py and val.py --name {args.name}; remove it to use the bundled one again")
            self._create_run_folder()
        distributed.barrier()
        self.started = time.time()

    def __enter__(self):
        self._signals = ExitStack()
        self._signals.enter_context(stop_signals_as_interrupts())
        return self

    def __exit__(self, exc_type, exc, tb):
        worker_died = exc_type is RuntimeError and str(exc).startswith("DataLoader worker")
        if worker_died:
            # PyTorch's SIGCHLD handler raises this again whenever another child process ends; first stop it
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.main and exc_type is not None:
            self._redraw_curves_of_saved_epochs()
        self._signals.close()
        # the loaders' workers end now, through their own exit (which removes their pymp-* folders in TMPDIR), not
        # at the interpreter's exit, where multiprocessing ends them with SIGTERM and quiet_worker's os._exit
        self.train_loader = self.val_loader = None
        distributed.cleanup(finished=exc_type is None)
        self._restore_replaced_run()
        if exc_type is KeyboardInterrupt and self.main:
            print(f"\nstopped during epoch {self._where_to_go_on()}", flush=True)
        if worker_died and self.main:
            # the kernel's out-of-memory killer picks a loader worker first: say so, not a traceback
            raise UserError(f"a data loader {str(exc)[len('DataLoader '):].strip().rstrip('.')} (out of memory?) "
                            f"during epoch {self._where_to_go_on(' --num_workers 0')}") from None
        if exc_type is torch.cuda.OutOfMemoryError and self.main:
            # a batch too large for the GPU: the same flags run out again, and --batch_size is the run's own
            raise UserError(f"{self.device} ran out of memory during epoch {self._where_to_go_on()}. Unless other "
                            "processes held its memory, a batch is too large for it: start again (--overwrite) with "
                            "a smaller --batch_size or --crop_size") from None
        return False

    def _where_to_go_on(self, flags=""):
        """'N; <what was saved>. <the command that continues>' for a run stopped during epoch N."""
        done = getattr(self, "saved_epoch", self.start_epoch)
        if not done:
            kept = f"; {self.dir} holds the run it was to replace again" if getattr(self, "restored", False) else ""
            again = f"the same command{' and' * bool(flags)}" if self.args.auto_resume else "--overwrite"
            return f"1, before any epoch was saved{kept}; start again with {again}{flags}"
        return (f"{done + 1}; {self.dir}/last.pth holds epoch {done}. Continue with: python train.py --resume "
                f"{shlex.quote(self.args.name)}{flags}")

    # --------------------------------------------------------------------------------------------- the loop

    def fit(self):
        """Train from start_epoch to --epochs. Each epoch: train -> recalibrate BatchNorm -> evaluate -> schedule
        -> log -> checkpoint."""
        a = self.args
        self._say(run_header(self.args, self.split, self.device, self.precision, self.on_device, self.start_epoch))
        for epoch in range(self.start_epoch, a.epochs):
            if epoch > 0 and stops_early(self.best, a.early_stopping):  # as the seed: at least one epoch
                stale = self.best["stale_epochs"]
                self._say(f"early stopping after epoch {epoch}: {stale} epoch{'s' * (stale != 1)} without a better "
                          f"val IoU (--early_stopping {a.early_stopping})")
                break
            started, lr = time.time(), self.optimizer.param_groups[0]["lr"]
            train = self.train_epoch(epoch, on_first_batch=self._batch_picture_writer(epoch)
                                     if epoch == self.start_epoch and self.main else None)
            if a.precise_bn and not a.freeze_bn:
                recalibrate_batchnorm(self.net, self.train_loader, self.precision, a.precise_bn,
                                      progress=self.progress and self.main)
            distributed.broadcast_buffers(self.net)
            val = evaluate(self.val_model, self.val_loader, self.criterion, self.precision, desc="val",
                           progress=self.progress and self.main, classes=a.num_classes)
            if not math.isfinite(val["loss"]):  # weights that diverged at the epoch's last steps: never saved
                raise self._diverged(epoch, f"the validation loss became NaN or infinite after epoch {epoch + 1}'s "
                                            "training (its weights diverged)")
            step_scheduler(self.scheduler, val["loss"])
            improved = track_best(self.best, epoch + 1, val["iou"])
            row = log_row(epoch + 1, lr, train, val, time.time() - started, self.device, self.precision)
            self._save_epoch(epoch + 1, row, improved)
            self._redraw_curves()
            self._say(epoch_line(row, a.epochs, improved))
        self._redraw_curves(now=True)

    def train_epoch(self, epoch, max_steps=None, on_first_batch=None):
        """The training part of an epoch (bench/speed.py times exactly this): seeds the epoch, trains on the
        training loader (at most ``max_steps`` steps; engine.train_one_epoch's ``on_first_batch``) and returns
        dict(loss, iou)."""
        a = self.args
        torch.manual_seed(a.seed + epoch)
        self.train_loader.sampler.set_epoch(epoch)
        try:
            return train_one_epoch(self.model, self.train_loader, self.criterion, self.optimizer, self.precision,
                                   desc=f"epoch {epoch + 1}/{a.epochs}", progress=self.progress and self.main,
                                   max_steps=max_steps, classes=a.num_classes, freeze_bn=a.freeze_bn,
                                   on_first_batch=on_first_batch)
        except NonFiniteLoss as e:
            raise self._diverged(epoch, f"the loss became NaN or infinite at epoch {epoch + 1}, step {e.step + 1}") \
                from None

    def _batch_picture_writer(self, epoch):
        """engine.train_one_epoch's ``on_first_batch`` for epoch ``epoch``: writes its first batch as the network
        gets it (visualize.batch_picture) to train_batch.png, to check that the masks outline the nuclei and what
        the augmentation makes of the images."""
        def write(images, masks, meta):
            b, _, h, w = images.shape
            shown = f"{min(b, BATCH_SHOWN)} of its {b} samples" if b > BATCH_SHOWN else f"its {b} samples"
            title = f"{self.args.name}: epoch {epoch + 1}'s first batch as the network gets it, {shown}, {h}x{w}"
            atomic_imwrite(os.path.join(self.dir, BATCH_PICTURE),
                           batch_picture(images, masks, meta["img_id"], self.args.num_classes, title))
        return write

    def _diverged(self, epoch, what):
        """The UserError for a run that diverged in epoch ``epoch`` (counted from 0; nothing of it saved): ``what``
        happened, what is kept, what to try."""
        a = self.args
        kept = f"{self.dir}/last.pth still holds epoch {epoch}" if epoch else "no epoch was saved"
        resume = f" (with --resume {shlex.quote(a.name)})" if epoch else ""
        return UserError(f"{what}; {kept}. Try a lower --lr or --weight_decay (start again with --overwrite: a "
                         f"resumed run keeps its saved learning rate), --amp fp32{resume}, or check the data")

    def _redraw_curves(self, now=False):
        """Redraw curves.png from the log when it lags behind, ``now`` or once the time since its last drawing is
        1 / CURVES_SHARE times what that drawing took: matplotlib takes about a second, longer than a GPU's epoch of
        a 96x96 recipe."""
        due = now or time.time() - self.curves["at"] >= self.curves["cost"] / CURVES_SHARE
        if self.main and due and len(self.log) and self.curves["rows"] != len(self.log):
            started = time.time()
            # held: PyTorch's SIGCHLD handler (a loader worker ended) raising inside matplotlib's first import of its
            # renderer surfaces as an ImportError, not as the worker's end that the run reports in one line
            with interrupts_held():
                plot_runs([self.log], [self.args.name], os.path.join(self.dir, "curves.png"))
            self.curves = {"rows": len(self.log), "at": time.time(), "cost": time.time() - started}

    def _redraw_curves_of_saved_epochs(self):
        """At a stop or an error: curves.png of the saved epochs (log.csv's), unless a second Ctrl-C or an error (a full
        disk) cuts it short: the stop or error under way is what the user is told of, the run folder's cleanup must
        go on, atomic_write leaves the older picture and plot.py --name redraws it."""
        try:
            self._redraw_curves(now=True)
        except (KeyboardInterrupt, Exception):
            pass

    def _save_epoch(self, epoch, row, improved):
        """Append ``row`` to log.csv, save model.pth when ``improved``, then last.pth (curves.png: _redraw_curves)."""
        if not self.main:
            return
        log = pd.concat([self.log.dropna(axis=1, how="all"), pd.DataFrame([row])], ignore_index=True)
        with interrupts_held():  # a Ctrl-C here takes effect once the epoch's files all agree
            if improved:
                atomic_torch_save(self.net.state_dict(), os.path.join(self.dir, "model.pth"))
            with atomic_write(os.path.join(self.dir, "log.csv")) as f:
                log.to_csv(f, index=False)
            # last.pth is written last: it is the commit point. A crash before it: --resume redoes this epoch and
            # drops its row from log.csv, so the log never misses an epoch.
            save_training_state(os.path.join(self.dir, "last.pth"), self.net, self.optimizer, self.scheduler,
                                self.precision.scaler, epoch, self.best)
            self.saved_epoch, self.log = epoch, log
            if os.path.isdir(replaced_run_dir(self.dir)):  # the new run has an epoch: the one it replaces may go
                shutil.rmtree(replaced_run_dir(self.dir))

    def print_summary(self):
        """The end-of-run summary: best epoch and its scores, time, where the files are, what to run next."""
        if not self.main or not len(self.log):
            return
        best = self.log.loc[self.log["epoch"] == self.best["best_epoch"]].iloc[0]
        name = shlex.quote(self.args.name)  # pasted into a shell
        held = len(self.ids("test"))
        test = (f"\nthe test split ({held} image{'s' * (held != 1)}) was kept out of every choice; score it once, "
                f"at the end: python val.py --name {name} --split test") if self.ids("test") else ""
        seconds, now = time.time() - self.started, len(self.log) - self.start_epoch
        took = f"in {seconds:.0f}s" if not self.start_epoch else f"({now} of them in {seconds:.0f}s after resuming)"
        self._say(f"done: {len(self.log)} epoch{'s' if len(self.log) > 1 else ''} {took} on {self.device}\n"
                  f"best epoch {self.best['best_epoch']}: val IoU {best['val_iou']:.4f} (pooled), "
                  f"{best['val_iou_mean']:.4f} (mean per image), val Dice {best['val_dice']:.4f}\n"
                  f"files: {self.dir}/ (log.csv, curves.png, train_batch.png, model.pth, last.pth); evaluate with: "
                  f"python val.py --name {name}{test}")

    # ----------------------------------------------------------------------------------------- setting up

    def ids(self, part):
        return split_ids(self.split, part)

    def make_eval_loader(self, ids):
        a = self.args
        return eval_loader(self.dataset_dir, ids, reading_of(a), (a.input_h, a.input_w, a.crop_size), a.batch_size,
                           a.num_workers, pin_memory=self.device.type == "cuda", cache=self.cache)

    def _load_split(self):
        """The run's split of the dataset's ids (splits.load_or_make_split), after a note on the files left out (first:
        it explains a mask without its image) and, for a new run's --split_file, one on the images it does not list; a
        new run's with the SHA-256 of its val and test images, a resumed one's with a note when they differ from it."""
        args = self.args
        left_out = images_left_out(self.dataset_dir, args.img_ext)
        if left_out:
            self._say(left_out)
        ids = list_ids(self.dataset_dir, args.img_ext, args.mask_ext, args.num_classes)
        split = load_or_make_split(os.path.join(self.dir, "split.csv"), self.dataset_dir, ids, args.resume,
                                   args.val_size, args.test_size, args.split_seed, args.split_file, args.folds,
                                   args.fold)
        unlisted = unlisted_note(split, f"--split_file {args.split_file}", self.dataset_dir, ids) \
            if args.split_file and not args.resume else ""
        if unlisted:
            self._say(unlisted)
        if not self.main:  # only the main process writes split.csv and prints notes
            return split
        image_path = find_layout(self.dataset_dir, args.img_ext, args.mask_ext).image
        if not args.resume:
            return with_fingerprints(split, image_path)
        changed = changed_images_note(split, split_ids(split, "val") + split_ids(split, "test"), "val/test",
                                      image_path, self.dataset_dir, "the val scores it logs from now on are of these "
                                      "files, not of the images of the epochs log.csv holds so far")
        if changed:
            self._say(changed)
        return split

    def _measure_nucleus_diameter(self):
        """Set ``args.nucleus_diameter`` to the training images' median nucleus diameter (pixels, 2 decimals;
        layouts.nucleus_diameter), with a note when their labels hold no nuclei (0: none recorded)."""
        args = self.args
        args.nucleus_diameter = round(nucleus_diameter(self.dataset_dir, self.ids("train"), args.img_ext,
                                                       args.mask_ext), 2)
        if not args.nucleus_diameter:
            self._say(f"note: the training images' label images in {self.dataset_dir} hold no nuclei (stale "
                      "labels beside the masks?), so no nucleus diameter is recorded: predict.py --scale auto "
                      "will need --nucleus_diameter D given here")

    def _train_loader(self):
        """(the training loader, whether it augments on the device, whether images are cached: --cache and the
        training set fits a quarter of the RAM, shared by torchrun's processes on this machine):
        device_data.DeviceLoader or a DataLoader over albumentations in workers (--loader), shuffled or --balance'd by
        DDP-aware samplers."""
        a, train_ids, world = self.args, self.ids("train"), distributed.world_size()
        if len(train_ids) // world < a.batch_size:
            shared = f" per process ({len(train_ids)} for {world} processes)" if world > 1 else ""
            raise UsageError(f"--batch_size {a.batch_size} is larger than the {len(train_ids) // world} training "
                             f"images{shared}; the last incomplete batch is dropped, so no step would run: lower "
                             "--batch_size")
        cached, copied = decoded_bytes(self.dataset_dir, train_ids, a.img_ext, a.mask_ext, output_channels(a),
                                       a.input_channels)
        # every process on this machine caches the whole training set, and makes its own copy
        quarter = ram()[0] / 4 / distributed.local_world_size()
        cache = a.cache and cached < quarter
        # the scaled copy is made while the cache still holds the images (in RAM on a GPU too, before it moves)
        on_device = train_on_device(a.loader, cache and not a.stain_jitter and cached + copied < quarter, copied,
                                    self.device)
        if cache and not on_device and a.num_workers and multiprocessing.get_start_method() != "fork":
            # spawned loader workers (macOS, Windows; Linux from Python 3.14) each unpickle their own copy of the
            # cache, where forked ones share its pages
            cache = cached * (1 + a.num_workers) < quarter
        augment = {flag: getattr(a, flag) for flag in AUGMENTATION_FLAGS}
        transform = None if on_device else train_transform(**augment, stain_jitter=a.stain_jitter)
        data = Dataset(train_ids, self.dataset_dir, transform=transform, seed=a.seed, cache=cache or on_device,
                       **reading_of(a))
        if a.crop_size:
            check_crop(data, a.crop_size)
        check_foreground(data)
        weights = self._balance_weights(data) if a.balance else np.ones(len(data))
        if self.main:
            fixed = a.normalization == "fixed"
            crops = len(train_ids) // world // a.batch_size * a.batch_size * world  # drop_last, in every process
            draws = crops * weights / weights.sum()  # each image's crops per epoch, on average
            for note in (mostly_foreground_note(data, "the training masks"), min_max_note(data) if fixed else "",
                         dim_images_note(data) if a.color_jitter else "",
                         multi_object_ids_note(data, "the training label images"), channels_note(data),
                         crop_coverage_note(data, a.crop_size, a.scale_jitter, a.epochs, draws) if a.crop_size else ""):
                if note:
                    self._say(note)
        if a.balance:
            sampler = WeightedDistributedSampler(weights, world, distributed.rank(), a.seed)
        else:
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=distributed.rank(),
                                                          shuffle=True, seed=a.seed)
        if on_device:
            images = DeviceImages(data.cached, a.input_channels, self.device, a.normalization,
                                  progress=self.progress and self.main)
            return DeviceLoader(images, train_ids, BatchAugment(**augment), sampler, a.batch_size, a.seed), True, cache
        return torch.utils.data.DataLoader(
            data, batch_size=a.batch_size, sampler=EpochSampler(sampler), num_workers=a.num_workers, drop_last=True,
            pin_memory=self.device.type == "cuda", persistent_workers=a.num_workers > 0,
            worker_init_fn=quiet_worker), False, cache

    def _balance_weights(self, data):
        """--balance: sampling weights of the training images by kind; says how often each kind is drawn when there
        are several."""
        kinds = np.asarray(data.modalities())
        weights = balance_weights(kinds, self.args.balance)
        if len(set(kinds)) > 1:  # one kind (most users' own images, under the fine-tuning recipe's 0.5) is drawn 100 %
            self._say(f"--balance {self.args.balance:g}: " + ", ".join(
                f"{(kinds == k).sum()} {k} images drawn {weights[kinds == k].sum() / weights.sum():.0%} of the time"
                for k in MODALITIES if (kinds == k).any()))
        return weights

    def _resume(self):
        """--resume: the network, optimizer, schedule and scaler of last.pth, and log.csv up to its epoch."""
        lengths = [part.T_max for part in cosine_parts(self.scheduler)]
        self.start_epoch, self.best = load_training_state(os.path.join(self.dir, "last.pth"), self.net,
                                                          self.optimizer, self.scheduler, self.precision.scaler,
                                                          self.device)
        # A run given more --epochs stretches its cosine from the current rate to --min_lr over the new length;
        # the saved length would make the rate climb back up after the old last epoch.
        for part, length in zip(cosine_parts(self.scheduler), lengths):
            part.T_max = length
        if self.start_epoch >= self.args.epochs:
            at_min = ("; they would train at --min_lr, where its cosine schedule has ended: to train at a higher "
                      f"rate, start a new run with --init {self.args.name} --name <new name>") if lengths else ""
            raise UsageError(f"--resume {self.args.name}: the run has already trained its {self.start_epoch} epochs; "
                             f"pass a larger --epochs to train on (e.g. --epochs {self.start_epoch + 10}){at_min}")
        if stops_early(self.best, self.args.early_stopping):
            stale = self.best["stale_epochs"]
            raise UsageError(f"--resume {self.args.name}: --early_stopping {self.args.early_stopping} would stop it "
                             f"at once ({stale} epoch{'s' * (stale != 1)} since its best val IoU); pass a larger "
                             "--early_stopping (or -1, off) to train on")
        log_path = os.path.join(self.dir, "log.csv")
        if not os.path.isfile(log_path):
            raise DataError(f"--resume {self.args.name}: {log_path} not found; a resumed run continues its log "
                            "(restore it, or start again with --overwrite)")
        try:
            log = pd.read_csv(log_path)
        except pd.errors.EmptyDataError:
            log = pd.DataFrame()
        logged = set(log["epoch"]) if "epoch" in log else set()
        # a log copied before last.pth (a run folder copied while it trained) would leave a gap that print_summary
        # and val.py's "epoch N of M" look the best epoch up in
        unlogged = [e for e in range(1, self.start_epoch + 1) if e not in logged]
        if unlogged:
            raise DataError(f"--resume {self.args.name}: {log_path} lacks {len(unlogged)} of the "
                            f"{self.start_epoch} epochs that last.pth holds (the first: {unlogged[0]}; a log older "
                            "than last.pth, copied while the run trained?); restore the log.csv saved with last.pth, "
                            "or start again with --overwrite")
        self.log = log[log["epoch"] <= self.start_epoch].reset_index(drop=True)
        exported = sorted(f for f in os.listdir(self.dir) if f.endswith(".onnx"))
        if exported:
            self._say(f"note: {', '.join(exported)} in {self.dir} {'was' if len(exported) == 1 else 'were'} exported "
                      "before this training resumed; run export.py again after it")

    def _create_run_folder(self):
        """models/<name>/ with config.yml and split.csv (a new run replaces an old folder with --overwrite). A resumed
        run's folder loses the temporary files that a save cut off by a killed process left. A symlinked run folder
        stays a link: its target is what is replaced."""
        real, replaced = os.path.realpath(self.dir), replaced_run_dir(self.dir)
        if os.path.isdir(replaced):  # left by a process killed after this folder's run saved an epoch
            shutil.rmtree(replaced)
        # kept until this run has saved an epoch; --auto_resume starts a run that saved no epoch again in its folder
        # (nothing there to keep, and a folder set aside by a killed job would stop the next one)
        if not (self.args.resume or self.args.auto_resume) and os.path.isdir(real):
            os.rename(real, replaced)
        try:
            os.makedirs(real, exist_ok=True)
            remove_killed_writes(real)
            save_run_config(self.args, os.path.join(real, "config.yml"))
            with atomic_write(os.path.join(real, "split.csv")) as f:
                self.split.to_csv(f, index=False)
        except BaseException:
            self._restore_replaced_run()
            raise

    def _restore_replaced_run(self):
        """A run that stops before saving an epoch gives back the folder it was to --overwrite: nothing is lost to a
        Ctrl-C or an error right after a start with the wrong flags."""
        real, replaced = os.path.realpath(self.dir), replaced_run_dir(self.dir)
        if self.main and not getattr(self, "saved_epoch", 0) and os.path.isdir(replaced):
            with interrupts_held():
                shutil.rmtree(real, ignore_errors=True)
                os.rename(replaced, real)
            self.restored = True

    def _start_from_init(self):
        """--init: the network's weights from that run or file; a note when its border channel is left out, and one
        naming this run's val/test images that it trained on (by its split.csv)."""
        a = self.args
        note = load_init_weights(self.net, a.init, self.device, a)
        if note:
            self._say(f"--init {a.init}: {note}")
        seen = held_out_seen_in_training(self.split, init_weights_path(a.init))
        if seen:
            fix = "; to hold them out, give --split_file with val/test images it did not train on"
            if a.split_file:
                fix = ""
            elif a.folds:  # --split_file is refused beside --folds; a run of the same fold trained on none of them
                fix = (f"; to hold them out, --init a run of --fold {a.fold} (same --folds, --test_size, --split_seed, "
                       "dataset)")
            self._say(f"note: {len(seen)} of this run's {len(self.ids('val') + self.ids('test'))} val/test images are "
                      f"named like training images of --init {a.init} (e.g. {first_few(seen, 1)}): if they are the "
                      f"same images, their scores overstate{fix}")

    def _say(self, text):
        if self.main:
            print(text, flush=True)


# ------------------------------------------------------------------------------------------ the epoch's parts

def log_row(epoch, lr, train, val, seconds, device, precision):
    """One row of log.csv: epoch, lr, the training loss and IoU, every validation score (prefixed val_), seconds,
    then where the epoch trained: the device type and the precision (engine.Precision.label). A run resumed on
    another machine may train its later epochs in another precision or memory format (``--amp auto``)."""
    return {"epoch": epoch, "lr": lr, "loss": train["loss"], "iou": train["iou"],
            **{f"val_{k}": v for k, v in val.items()}, "seconds": round(seconds, 2), "device": device.type,
            "precision": precision.label()}


def epoch_line(row, epochs, improved):
    """What train.py prints after an epoch."""
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  loss {row['loss']:.4f}  iou {row['iou']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_iou {row['val_iou']:.4f}  val_dice {row['val_dice']:.4f}  "
            f"({row['seconds']:.1f}s){'  *best' if improved else ''}")


# --------------------------------------------------------------------------------------------- setting up

def run_header(a, split, device, precision, on_device, start_epoch):
    """The line train.py prints before the first epoch: the network, the split, the device and how it runs."""
    counts = " / ".join(f"{len(split_ids(split, p))} {p}" for p in ("train", "val", "test") if split_ids(split, p))
    workers = f"{a.num_workers} loader worker{'s' * (a.num_workers != 1)}"
    loader = "batches augmented on the device" if on_device else workers
    processes = f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    resuming = f", resuming after epoch {start_epoch}" if start_epoch else f", from --init {a.init}" if a.init else ""
    frozen = ""
    if a.freeze_bn:
        skipped = f" (--precise_bn {a.precise_bn} skipped)" if a.precise_bn else ""
        frozen = f"; BatchNorm frozen at the statistics of --init {a.init}{skipped}"
    return (f"{a.name}: {a.arch}{' + deep supervision' if a.deep_supervision else ''}, {a.loss}, {counts} images, "
            f"on {device} ({precision.describe()}; {loader}{processes}){resuming}{frozen}")


def replaced_run_dir(path):
    """models/.<name>.replaced (beside the target of a symlinked run folder): where --overwrite keeps the old run of
    ``path`` until the new one saves an epoch."""
    head, name = os.path.split(os.path.realpath(path))
    return os.path.join(head, f".{name}.replaced")


def check_run_folder(path, name, resume, overwrite, auto_resume):
    """Before any work: a resumed run needs its last.pth; a new one an empty place, --overwrite, or with
    ``auto_resume`` (--auto_resume) a run that saved no epoch; no run is left aside by an --overwrite that was
    killed before it saved an epoch."""
    if os.path.isdir(replaced_run_dir(path)) and not os.path.isfile(os.path.join(path, "last.pth")):
        raise UsageError(f"{replaced_run_dir(path)} holds the run that an --overwrite of {name}, killed before it "
                         f"saved an epoch, was to replace: move it back to {path} (or remove it) first")
    if overwrite and resume:
        raise UsageError(f"--resume {name} continues the run and --overwrite starts it again; give one of the two")
    # the old run is removed once the new one saves its first epoch: fail now, not then, leaving it set aside where
    # every later --resume and --overwrite of the name would fail to remove it again
    if overwrite and os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--overwrite {name}: this user may not remove the files in {path} (another user's run); its "
                         "owner can remove it, or choose another --name")
    weights = os.path.isfile(os.path.join(path, "model.pth"))
    if resume:
        if not os.path.isfile(os.path.join(path, "last.pth")):
            why = ("it was removed, or the run was killed while it saved its first epoch; start a new run from its "
                   f"weights with --init {shlex.quote(name)} --name <new name>, or this one again with --overwrite"
                   if weights else "the run saved no epoch yet; start it again with --overwrite")
            raise UsageError(f"--resume {name}: {path}/last.pth, which resuming needs, is not there: {why}")
    elif os.path.isdir(path) and os.listdir(path) and not overwrite:
        if os.path.isfile(os.path.join(path, "last.pth")):
            raise UsageError(f"{path} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                             "or choose another --name")
        if weights:
            # --auto_resume cannot tell a run killed while it saved epoch 1 from a finished one whose last.pth was
            # removed, so it never trains over the weights: one run by hand decides
            replace = "run this command once with --overwrite instead of --auto_resume" if auto_resume else \
                "pass --overwrite"
            raise UsageError(f"{path} already holds a run (without the last.pth that --resume needs); {replace} to "
                             f"replace it, or choose another --name (--init {name} starts from its weights)")
        if not auto_resume:
            raise UsageError(f"{path} holds a run that saved no epoch (it stopped in epoch 1); pass --overwrite to "
                             "start it again, or choose another --name")


@contextmanager
def run_lock(name):
    """One train.py at a time per run name: held around the whole run (models/.<name>.lock), so that a second one (a
    new run of that name, --overwrite, --resume) is refused before it touches the folder; two would mix their files,
    or one would delete the other's; an export.py into the folder holds it too (config.run_lock_file). Under torchrun
    the main process (rank 0) holds it."""
    if distributed.launched_rank() != 0:
        yield
        return
    with locked(run_lock_file(name)) as holder:
        if holder is not None:
            by = f" (pid {holder})" if holder else ""
            raise UsageError(f"models/{name} is being trained or exported by another process{by}; wait for it to end, "
                             "or choose another --name")
        yield


def completion_note(args):
    """--auto_resume of a saved run: a line saying that it is complete, when its last.pth has trained all --epochs or
    --early_stopping has ended it; '' when it has epochs left to train. Read before any set-up, so that a requeued
    job of a finished run ends at once, and the same way in every process of torchrun."""
    epoch, best = saved_progress(os.path.join(run_dir(args.name), "last.pth"))
    if epoch >= args.epochs:
        why = f"it has trained its {epoch} epoch{'s' * (epoch != 1)} (--epochs {args.epochs})"
    elif stops_early(best, args.early_stopping):
        why = f"early stopping ended it after epoch {epoch} (--early_stopping {args.early_stopping})"
    else:
        return ""
    return f"{run_dir(args.name)} is complete: {why}; nothing left to train"


def dataset_folder(dataset, main, resume=None):
    """inputs/<dataset>; the built-in 'synthetic' set is generated there on first use (by the main process).
    ``resume``: the name of the run being resumed, whose dataset must be there (a DataError naming it if not)."""
    path = os.path.join(INPUTS_DIR, dataset)
    if resume and dataset != "synthetic" and not os.path.isdir(path):
        raise DataError(f"--resume {resume}: the dataset {path} is not there: put it back (or link it there), or "
                        "give --dataset with the folder's name or path now (the same images)")
    if dataset == "synthetic" and main:
        ensure_synthetic(path)
    distributed.barrier()
    return path


def decoded_bytes(dataset_dir, ids, img_ext, mask_ext, classes, input_channels):
    """(bytes of the training cache, bytes of device_data.DeviceImages' copy) of the images ``ids``, from every
    image file's header (image_files.decoded_size): the cache holds each image as stored and its ``classes`` uint8
    masks (--borders' included), the copy ``input_channels`` of it (uint8 when every image is uint8, else float16)
    and the masks again. Every file counts: the first 8 images of the sorted ids stood for all of them before, and a
    set whose first ids are small crops of its large fields was cached and copied into memory many times their
    size."""
    layout = find_layout(dataset_dir, img_ext, mask_ext)
    sizes = [decoded_size(layout.image(i)) for i in ids]
    height, width, channels, itemsize = np.array([(h, w, c, dtype.itemsize) for h, w, c, dtype in sizes],
                                                 dtype=np.float64).reshape(-1, 4).T
    pixels = height * width
    # DeviceImages keeps uint8 images as bytes alone: a TIFF's int8 or bool (also 1 byte) is scaled to float16
    copy_bytes = 1 if all(dtype == np.uint8 for *_, dtype in sizes) else 2
    return (pixels * (channels * itemsize + classes)).sum(), pixels.sum() * (copy_bytes * input_channels + classes)


def train_on_device(loader, fits, copied, device):
    """--loader: True to keep the training set on ``device`` and augment batches there (device_data.py). auto does
    so when the images are cached and ``fits`` (--cache True, and the cache and its scaled copy together fit a
    quarter of the RAM) and, on a GPU, the ``copied`` bytes also fit a quarter of its free memory."""
    if loader != "auto":
        return loader == "device"
    if device.type != "cuda":
        return fits
    return fits and copied < torch.cuda.mem_get_info(device)[0] / 4


def check_crop(data, crop_size):
    """Crop training needs every image at least crop_size on each side: all are checked, from their files' headers
    (image_files.decoded_size; a run without the cache checked its first image alone, and padded the others)."""
    for img_id, (h, w, *_) in zip(data.img_ids, data.stored_sizes):
        if min(h, w) < crop_size:
            largest = min(h, w) // 16 * 16
            fix = (f"use a --crop_size of at most {largest}" if largest else
                   "leave it out of the training images (--split_file), or train on resized images (no --crop_size)")
            raise UsageError(f"--crop_size {crop_size} is larger than image {data.layout.image(img_id)} ({h}x{w}); "
                             f"{fix}")


def crop_coverage_note(data, crop_size, scale_jitter, epochs, draws):
    """A note ('' for none) on the training image that the run's crops show least of, when they leave most of it
    unseen: each epoch draws ``draws`` [N] crops of the N images on average (about one each, whatever an image's
    size), so a user's one large annotated image among small ones gets as few crops as each of them. A crop rescaled
    by s (uniform in 1 +- ``scale_jitter``) shows (crop_size / s)^2 of the image's pixels, crop_size^2 / (1 -
    scale_jitter^2) on average, and crops at random places overlap, so ``epochs`` of them show about
    1 - exp(-their pixels / the image's) of it: 32 % of a 2048x2048 image for 24 crops of 256 under
    --scale_jitter 0.2, where 29 % was counted (the largest crops side by side gave 59 %, and no note). The sizes
    come from the files' headers, so a run without the cache gets the note too."""
    sizes = np.array([size[:2] for size in data.stored_sizes], dtype=np.float64)
    areas = sizes[:, 0] * sizes[:, 1]
    covered = 1 - np.exp(-epochs * draws * crop_size ** 2 / (1 - scale_jitter ** 2) / areas)
    i = int(covered.argmin())
    if covered[i] >= 1 / 3:  # the walk-through's 12-epoch CPU recipe shows 43 % of DSB2018's largest, rare images
        return ""
    h, w = sizes[i].astype(int)
    return (f"note: each epoch takes about one {crop_size}x{crop_size} crop of each training image, whatever its "
            f"size: {data.layout.image(data.img_ids[i])} ({h}x{w}, {areas[i] / crop_size ** 2:.0f} crops' worth) gets "
            f"about {epochs * draws[i]:.0f} in --epochs {epochs}, which show about {covered[i]:.0%} of its pixels; "
            "cut images much larger than --crop_size into tiles about its size (each tile then gets a crop per epoch), "
            "or give more --epochs")


def check_foreground(data):
    """Refuse a training set whose masks are all empty: nothing to learn, and every score would read 0."""
    if data.has_foreground():
        return
    path = data.layout.nuclei_file(data.img_ids[0])
    raise DataError(f"every training mask is empty (none has a pixel above 0; the first is {path}): a mask marks "
                    "nuclei with values above 0 on a background of 0; check that --dataset names the folder with "
                    "your masks")


def min_max_note(data):
    """A note ('' for none) when the training images are not all 8-bit: --normalization fixed scales all but 8-bit
    ones by their own minimum and maximum, where one hot or saturated pixel darkens all the rest, and 8-bit ones
    beside them by 1/255, so the same brightness differs between the two kinds. Every image's type is read from its
    file's header (image_files.decoded_size): 16 evenly spaced images, decoded, missed a few 16-bit ones among many
    8-bit ones."""
    types = {}
    for img_id, (*_, dtype) in zip(data.img_ids, data.stored_sizes):
        types.setdefault(dtype, img_id)
    byte, wide = np.dtype(np.uint8), [t for t in types if t != np.uint8]
    if not wide:
        return ""
    image = data.layout.image(types[wide[0]])
    if byte in types:  # scaled two ways: a dim 8-bit image stays dim, its 16-bit twin is stretched
        return (f"note: the training images mix 8-bit and {wide[0]} ones (e.g. {data.layout.image(types[byte])} "
                f"and {image}), and --normalization fixed divides the 8-bit ones by 255 but stretches the others "
                "from their own minimum to their maximum, so one brightness reads differently in the two; "
                "--normalization percentile scales every image alike")
    return (f"note: the training images are {wide[0]} (e.g. {image}), and "
            "--normalization fixed scales each by its own minimum and maximum, so one hot or saturated pixel darkens "
            "the rest of its image; --normalization percentile (the bundled model's) is not thrown off by a few")


def dim_images_note(data, samples=16, share=0.05):
    """A note ('' for none) when the colour jitter would often turn the training images (up to ``samples`` of them
    spread over the set, dataset.spread_sample; scaled as the network gets them) black where their nuclei are: with
    probability COLOUR_P / 2 it adds a brightness shift b, uniform in [-JITTER, JITTER] of full scale, then clips to
    [0, 1], so an image whose brightest 1 % lies at p < JITTER is black there in about COLOUR_P / 2 * (JITTER - p) /
    (2 * JITTER) of its draws (8-bit exports of dim fluorescence under --normalization fixed), while its mask still
    holds nuclei. Said when that share, averaged over the images, reaches ``share``."""
    picked = spread_sample(len(data), samples)
    brightest = np.array([np.percentile(image_to_float((data.cached[i] if data.cached else data.load(i))[0],
                                                       data.input_channels, data.normalization).max(axis=2), 99)
                          for i in picked])
    blackened = COLOUR_P / 2 * np.clip(JITTER - brightest, 0, None) / (2 * JITTER)
    if blackened.mean() < share:
        return ""
    dimmest = int(brightest.argmin())
    image = data.layout.image(data.img_ids[picked[dimmest]])
    return (f"note: the training images are dim (the brightest 1% of {image} lies at {brightest[dimmest]:.2f} of full "
            f"scale), and the colour jitter's brightness shift of up to -{JITTER} clips about {blackened.mean():.0%} "
            "of the training samples to black where their masks hold nuclei; --normalization percentile stretches "
            "every image to full scale first (the bundled model's), --color_jitter False leaves the brightness alone")


def channels_note(data, samples=16):
    """A note ('' for none) when a training image (up to ``samples`` of them spread over the set) is a
    TIFF of 3 channels on a C axis (an ImageJ hyperstack or OME TIFF of fluorescence channels, unlike RGB samples):
    it is read as the colours of one RGB image, as 2 or 4 such channels are refused, whether or not the nuclei are
    what the user meant the network to see; or of 3 or 4 pages without axes (image_files.pages_as_colours), read as
    colours too, though they may be a short stack's planes (predict.py's note on them says the same)."""
    picked = spread_sample(len(data), samples)
    for i in picked:
        path = data.layout.image(data.img_ids[i])
        header = tiff_header(path) if path.lower().endswith(TIFF_EXTS) else None
        if header is not None and header.channel_axis == "C" and header.channels == 3:
            return (f"note: the training image {path} has 3 channels on a C axis (fluorescence channels, not RGB): "
                    "it is read as the colours of one RGB image; to train on the nucleus channel alone, save it "
                    "alone (Fiji: Image > Color > Split Channels)")
        if header is not None and pages_as_colours(header):
            return (f"note: the training image {path} {PAGES_AS_COLOURS}; if its pages are a stack's planes, save "
                    "each as an image of its own (training reads one 2D image per file), and if they are channels, "
                    "the nucleus channel alone")
    return ""


def wrap_model(net, device, sync_bn, compile_mode):
    """The module the steps call: ``net`` under DDP (with SyncBatchNorm if asked) when launched by torchrun, then
    torch.compile'd with ``compile_mode`` (False: not compiled)."""
    model = net
    if distributed.is_initialized():
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if compile_mode:
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    return model
