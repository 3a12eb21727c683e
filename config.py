"""train.py's flags, YAML recipes (``--config``) and the saved ``models/<name>/config.yml``; the nucleus-splitting
flags that val.py and predict.py share.

The flag names and defaults are those of pytorch-nested-unet's train.py, so old command lines keep working;
the additions are listed in the README. No torch here (the slow import): ``--help`` must answer at once.
"""
import argparse
import difflib
import math
import os
import re
import shlex
from collections.abc import Hashable
from typing import NamedTuple

import yaml

from files import atomic_write, sha256_file
from image_files import MAX_PIXELS, MOST_BLUR, MOST_PHOTONS, NORMALIZATIONS
from utils import (AMP_MODES, ArgumentParser, DataError, UsageError, amp_mode, bool_or_auto, check_new_run_name,
                   check_run_name, compile_mode, device_name, file_extension, integer, path_arg, str2bool, usable_cpus)

# Nucleus separation (instances.py) and its object filters: the flags' choices and defaults, chosen on validation
# images (docs/results.md, "How the post-processing defaults were chosen"). Kept here, not in instances.py, so that
# --help answers without importing SciPy and scikit-image.
SEPARATIONS = ("watershed", "cc", "borders")
MIN_SIZE = 3  # pixels
MIN_CONFIDENCE = 0.85  # mean probability of an object
# val.py --tune's choice for one run, in its folder: that run's defaults (post_processing). Not --min_size: it counts
# pixels at the size the nuclei are separated at, which --scale and a run trained on resized images change
TUNED_FILE = "postprocessing.yml"
TUNED_KEYS = ("separation", "min_confidence")

MODELS_DIR = "models"
# the model that ships with the toolkit (pretrained/<name>/: config.yml, model.pth and its .sha256, a model card)
CODE_DIR = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_DIR = os.path.join(CODE_DIR, "pretrained")
INPUTS_DIR = "inputs"
OUTPUTS_DIR = "outputs"
EVALUATION_FILE = "evaluation.yml"  # val.py's record, in its output folder, of what it scored (evaluation.py)
# The choices of the flags, here so that --help answers without importing torch; the modules that implement them
# (archs.ARCHS, losses.LOSSES, optim.build_optimizer and build_scheduler) use the same names (tests/test_archs.py and
# tests/test_losses.py check that the lists agree).
ARCHS = ("UNet", "NestedUNet")
DEEP_SUPERVISION_ARCHS = ("NestedUNet",)  # the networks with several heads; the others refuse --deep_supervision True
LOSSES = ("BCEDiceLoss", "LovaszHingeLoss", "BCEWithLogitsLoss")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
SGD_MOMENTUM = 0.9  # the seed's default
INPUT_SIZE = 96  # the seed's --input_w and --input_h
SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau", "MultiStepLR", "ConstantLR")
LOADERS = ("auto", "device", "workers")  # where training batches are augmented (dataset.py / device_data.py)
# flags of one invocation, not of the run
SKIPPED_IN_CONFIG = ("help", "version", "config", "resume", "auto_resume", "overwrite", "debug")
# What --resume may change: the length, how the run is executed, its name (a run folder moved to another name) and
# where its dataset is (moved to another disk or machine; split.csv checks that its ids are the same). Every other
# flag is restored from last.pth and config.yml (the optimizer's state holds the learning rate, the schedule its own
# length, split.csv the split), so a new value would be written to config.yml without being used.
CHANGEABLE_ON_RESUME = ("name", "dataset", "epochs", "early_stopping", "device", "amp", "channels_last", "compile",
                        "sync_bn", "num_workers", "loader", "cache", "precise_bn")


def build_train_parser(exit_on_error=True):
    """The argparse parser of train.py; every option has a default that ``--help`` shows. With
    ``exit_on_error=False`` a bad value raises argparse.ArgumentError instead of exiting (YAML files)."""
    p = ArgumentParser(
        prog="train.py", exit_on_error=exit_on_error,
        description="Train a UNet or UNet++ (NestedUNet) on inputs/<dataset>/images + masks/<class>/.")
    p.add_argument("--config", type=path_arg, default=None,
                   help="YAML recipe (e.g. configs/seed_dsb2018_96_NestedUNet_wDS.yml); "
                   "flags given on the command line override it")
    p.add_argument("--name", default=None,
                   help="run name; default <dataset>_<arch>_wDS|woDS; files go to models/<name>/")
    p.add_argument("--epochs", default=100, type=integer, help="number of epochs")
    p.add_argument("-b", "--batch_size", default=16, type=integer,
                   help="batch size per process (with torchrun, the effective batch is this times the world size)")
    _add_model_args(p.add_argument_group("model"))
    _add_data_args(p.add_argument_group("data"))
    _add_optimizer_args(p.add_argument_group("optimizer"))
    _add_scheduler_args(p.add_argument_group("scheduler"))
    _add_run_args(p.add_argument_group("run"))
    return p


def _add_model_args(g):
    """The network and its loss."""
    g.add_argument("--arch", "-a", default="NestedUNet", choices=ARCHS, help="the network")
    g.add_argument("--deep_supervision", default=False, type=str2bool, help="NestedUNet's 4 heads (True/False)")
    g.add_argument("--input_channels", default=3, type=integer, help="image channels the network takes")
    g.add_argument("--num_classes", default=1, type=integer, help="output channels = mask class folders")
    g.add_argument("--borders", default=False, type=str2bool,
                   help="also learn where touching nuclei meet (one more output channel, made from the instance "
                        "labels inputs/<dataset>/labels/<id>.png) and split nuclei along it (True/False)")
    g.add_argument("--input_w", default=INPUT_SIZE, type=integer, help="resize width (multiple of 16; not with "
                                                                       "--crop_size)")
    g.add_argument("--input_h", default=INPUT_SIZE, type=integer, help="resize height (multiple of 16; not with "
                                                                       "--crop_size)")
    g.add_argument("--loss", default="BCEDiceLoss", choices=LOSSES, help="the loss on the logits")
    g.add_argument("--init", default=None, type=os.path.expanduser,
                   help="fine-tune: start from the weights of run NAME (models/NAME/model.pth) or of a .pth file, "
                        "with a fresh optimizer and schedule; the network flags must match")


def _add_data_args(g):
    """The dataset, its split and the augmentation."""
    g.add_argument("--dataset", type=path_arg, default="dsb2018_96",
                   help="folder under inputs/ (or a folder's path); 'synthetic' is "
                                                           "generated on first use")
    g.add_argument("--img_ext", default=".png", type=file_extension, help="image file extension")
    g.add_argument("--mask_ext", default=".png", type=file_extension, help="mask file extension")
    g.add_argument("--val_size", default=0.2, type=float, help="fraction of ids in the validation split")
    g.add_argument("--test_size", default=0.0, type=float,
                   help="fraction held out as a test split never used for any choice (0 = the seed's 2-way split)")
    g.add_argument("--split_seed", default=41, type=integer, help="random_state of the split (41 as in the seed)")
    g.add_argument("--folds", default=0, type=integer,
                   help="cross-validation: deal the ids (less the --test_size part) into this many folds and validate "
                        "on fold --fold, training on the others (--val_size is then unused); train one run per fold, "
                        "--fold 0 to K-1, and every id is validated once (0 = off)")
    g.add_argument("--fold", default=0, type=integer, help="with --folds K: the fold that validates, 0 to K-1")
    g.add_argument("--split_file", type=path_arg, default=None,
                   help="a CSV with columns img_id,split (train/val/test) to use instead of a random split: your own "
                        "assignment, e.g. one that keeps whole experiments or image kinds out of training; "
                        "--val_size, --test_size and --split_seed are then ignored; ids it lacks are not used")
    g.add_argument("--crop_size", default=0, type=integer,
                   help="train on random crops of this size at full resolution and validate on whole images "
                        "(0 = resize everything to input_h x input_w as the seed does)")
    g.add_argument("--normalization", default="fixed", choices=NORMALIZATIONS,
                   help="how an image's values become [0, 1] before the network (in training, val.py and predict.py "
                        "alike): fixed = 8-bit / 255 and 16-bit by its min and max; percentile = each "
                        "image stretched from its 1st to its 99.8th percentile (CSBDeep/StarDist's normalize); "
                        "percentile_dark = the same, and images with a bright background inverted")
    g.add_argument("--scale_jitter", default=0.0, type=float,
                   help="random rescale by 1 +- this (before the crop, or the resize)")
    g.add_argument("--nucleus_diameter", default=0.0, type=float,
                   help="crop-trained runs: the median diameter in pixels of the training split's nuclei, which "
                        "predict.py --scale auto resizes images towards; 0 = measured from the training split at start")
    g.add_argument("--color_jitter", default=True, type=str2bool, help="colour/brightness/contrast jitter")
    g.add_argument("--stain_jitter", default=0.0, type=float,
                   help="probability of re-staining a training image as H&E with a random stain matrix and intensity "
                        "(albumentations' HEStain; RGB runs, --loader workers): bright-field images then look like the "
                        "stained kinds")
    g.add_argument("--greyscale", default=0.0, type=float,
                   help="probability of turning a training image grey (stain colours then matter less)")
    g.add_argument("--invert", default=0.0, type=float,
                   help="probability of inverting a training image (1 - x: dark nuclei on a bright background look "
                        "like fluorescence)")
    g.add_argument("--shot_noise", default=0.0, type=float, metavar="PHOTONS",
                   help="replace half the training images by the shot noise of a camera that collected few photons: "
                        "x -> Poisson(x n) / n, n (photons at the value 1) log-uniform in [PHOTONS, 1000] per image "
                        "(low-light images; docs/results.md, robustness); 0 = off")
    g.add_argument("--blur", default=0.0, type=float, metavar="SIGMA",
                   help="defocus half the training images: a Gaussian blur of sigma (pixels of the training image) "
                        "uniform in [0, SIGMA] per image, before the shot noise (out-of-focus images; "
                        "docs/results.md, robustness); 0 = off")
    g.add_argument("--balance", default=0.0, type=float,
                   help="draw training images of the rarer kinds (fluorescence, stained, bright-field) more often: "
                        "weight n^-balance, n = training images of that kind (0 = uniform, 1 = each kind equally "
                        "often, up to 10: the rarer kinds more often than the common ones)")
    g.add_argument("--cache", default=True, type=str2bool,
                   help="decode every image once into memory when the dataset fits (under a quarter of RAM, "
                        "shared by torchrun's processes on the machine and, where they are spawned (macOS, "
                        "Windows), by the loader workers)")
    g.add_argument("--loader", default="auto", choices=LOADERS,
                   help="device: keep the decoded training set as one tensor on the training device and augment whole "
                        "batches there (no worker processes); workers: albumentations in DataLoader workers; auto: "
                        "device when the images are cached (--cache) and not --stain_jitter'd, the cache and the "
                        "device's copy of it together fit a quarter of the RAM, and on a GPU the copy also fits a "
                        "quarter of its free memory")
    g.add_argument("--num_workers", default=min(4, usable_cpus()), type=integer,
                   help="DataLoader worker processes (the seed's 4, capped at the CPUs this process may use)")


def _add_optimizer_args(g):
    """The optimizer."""
    g.add_argument("--optimizer", default="SGD", choices=OPTIMIZERS, help="the optimizer")
    g.add_argument("--lr", "--learning_rate", default=1e-3, type=float, help="initial learning rate")
    g.add_argument("--momentum", default=SGD_MOMENTUM, type=float, help="SGD momentum")
    g.add_argument("--weight_decay", default=1e-4, type=float, help="weight decay")
    g.add_argument("--nesterov", default=False, type=str2bool, help="SGD Nesterov momentum")


def _add_scheduler_args(g):
    """The learning-rate schedule and when to stop."""
    g.add_argument("--scheduler", default="CosineAnnealingLR", choices=SCHEDULERS,
                   help="the learning-rate schedule, stepped once per epoch")
    g.add_argument("--min_lr", default=1e-5, type=float,
                   help="the lowest learning rate: CosineAnnealingLR's last, ReduceLROnPlateau's floor")
    g.add_argument("--warmup_epochs", default=0, type=integer,
                   help="linear learning-rate warm-up epochs before the scheduler")
    g.add_argument("--factor", default=0.1, type=float, help="ReduceLROnPlateau factor")
    g.add_argument("--patience", default=2, type=integer, help="ReduceLROnPlateau patience (epochs)")
    g.add_argument("--milestones", default="1,2", type=str,
                   help="MultiStepLR epochs, comma-separated (counted after --warmup_epochs)")
    g.add_argument("--gamma", default=2 / 3, type=float, help="MultiStepLR factor")
    g.add_argument("--precise_bn", default=0, type=integer,
                   help="before each validation, recompute the BatchNorm statistics as the average over this many "
                        "training batches (0: PyTorch's running averages); steadies validation when batches differ "
                        "a lot, as in crop training on mixed image types")
    g.add_argument("--freeze_bn", default=False, type=str2bool,
                   help="fine-tuning (--init): keep every BatchNorm layer's running statistics as the weights it "
                        "starts from have them (their scale and shift still train), and skip --precise_bn; for a "
                        "small set of one image kind, whose own statistics differ from those the weights were fitted "
                        "to (True/False)")
    g.add_argument("--early_stopping", default=-1, type=integer, help="stop after this many epochs without a better "
                   "val IoU (-1 = never)")


def _add_run_args(g):
    """Device, precision, seeds, resuming."""
    add_device_arg(g)
    g.add_argument("--seed", default=0, type=integer, help="seed of weights, shuffling and augmentation")
    add_amp_arg(g)
    g.add_argument("--channels_last", default="auto", type=bool_or_auto,
                   help="channels_last memory format: auto (on, except for fp32 training on a CPU), True or False")
    g.add_argument("--compile", default=False, type=compile_mode,
                   help="torch.compile the model (slow start): True, or a mode such as reduce-overhead (CUDA graphs "
                        "for the fixed-shape training step) or max-autotune")
    g.add_argument("--sync_bn", default=False, type=str2bool, help="SyncBatchNorm across processes under torchrun")
    g.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue models/<name>/last.pth; give the run name here or with --name (default: a new run)")
    g.add_argument("--auto_resume", action="store_true",
                   help="one command for every start of a requeued batch job: continue models/<name>/last.pth when "
                        "it is there (this command's flags and --config must agree with the run's settings), else "
                        "start the run (again, when it saved no epoch); a run that has finished says so and exits 0")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    g.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice (YAML would keep the last one without a word), and
    keeping each value's text as written (null aside) for train.py's parser to read as it reads the command line:
    YAML's own guesses turn the name ``no`` into False, ``012`` into 10 (octal) and the dataset ``0001`` into 1."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith(":null")]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a YAML list or mapping as a key: super() refuses it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_config(path, parser, label=None):
    """Load a YAML recipe with yaml.safe_load's loader (:class:`RecipeLoader`) and parse its values with train.py's
    own parser: {flag: value}.

    Each ``key: value`` is read as the command-line flag ``--key=value`` (its text as written; null as the flag's
    default), so a recipe accepts exactly what the command line does. Errors name the file as ``label``
    (default '--config <path>'; a run's own config.yml is named by its path alone).
    """
    label = label or f"--config {path}"
    if os.path.isdir(path):
        raise UsageError(f"{label}: is a folder; give the recipe's .yml file")
    if not os.path.isfile(path):
        shipped = os.path.join(CODE_DIR, path)  # a recipe of configs/, run from another folder
        raise UsageError(f"{label}: file not found" + (f"; the recipes ship beside the scripts: --config "
                                                       f"{shlex.quote(shipped)}"
                                                       if not os.path.isabs(path) and os.path.isfile(shipped) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=RecipeLoader) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{label}: not valid YAML ({yaml_error_text(e)})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text; save it as UTF-8") from None
    if not isinstance(data, dict):
        raise UsageError(f"{label}: expected 'flag: value' lines, got a {type(data).__name__}")
    dests = {o[2:]: a.dest for a in parser._actions if a.dest not in SKIPPED_IN_CONFIG
             for o in a.option_strings if o.startswith("--")}  # every long name: lr and learning_rate alike
    unknown = sorted(str(k) for k in data if k not in dests)
    of_one_command = [k for k in unknown if k in SKIPPED_IN_CONFIG]
    if of_one_command:
        raise UsageError(f"{label}: {', '.join(of_one_command)}: a flag of one command, not of a recipe; "
                         "give it on the command line")
    if unknown:
        raise UsageError(f"{label}: unknown keys {', '.join(closest_flag(k, dests) for k in unknown)}; see python "
                         "train.py --help")
    names = {}
    for k in data:
        names.setdefault(dests[k], []).append(k)
    twice = next((keys for keys in names.values() if len(keys) > 1), None)
    if twice:
        raise UsageError(f"{label}: {' and '.join(twice)} set the same flag; keep one")
    # an empty split_file is how earlier versions saved "none" in a run's config.yml
    data = {k: v for k, v in data.items() if v is not None and not (dests[k] == "split_file" and v == "")}
    # milestones as a YAML list ([30, 60]) is written as the command line writes it: 30,60
    argv = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) and dests[k] == 'milestones' else v}"
            for k, v in data.items()]
    try:
        parsed = build_train_parser(exit_on_error=False).parse_args(argv)
    except argparse.ArgumentError as e:
        raise UsageError(f"{label}: {e}") from None
    return {dests[k]: getattr(parsed, dests[k]) for k in data}


def yaml_error_text(error):
    """A YAML parse error in one line, with where it is: 'line 2, column 1: found character '\\t' that cannot
    start any token' (the problem's mark, else the context's; its first line when it has neither)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    if mark is None or problem is None:
        return str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def default_run_name(args):
    """The seed's naming: <dataset>_<arch>_wDS or _woDS (the dataset folder's own name when --dataset is a path)."""
    dataset = os.path.basename(os.path.normpath(args.dataset))
    fold = f"_fold{args.fold}" if args.folds else ""  # each fold's run a folder of its own
    return f"{dataset}_{args.arch}_{'wDS' if args.deep_supervision else 'woDS'}{fold}"


def parse_train_args(argv):
    """Parse train.py's command line (with ``--config`` merged underneath) and check sizes and names. With
    --auto_resume, ``args.resume`` is True when the run it names has a models/<name>/last.pth to continue."""
    parser = build_train_parser()
    first, _ = parser.parse_known_args(argv)
    if first.auto_resume and (first.resume or first.overwrite):
        raise UsageError("--auto_resume continues the run when models/<name>/last.pth is there and starts it "
                         f"otherwise; leave out {'--resume' if first.resume else '--overwrite'}")
    if first.config and first.resume:  # the recipe's epochs would silently extend the run, its other values clash
        raise UsageError(f"--resume continues a run with its own saved settings (models/<name>/config.yml); leave "
                         f"out --config {first.config} (more epochs: --epochs N)")
    recipe = read_yaml_config(first.config, parser) if first.config else {}
    parser.set_defaults(**recipe)
    name = None  # of the saved run this command continues
    if first.resume:
        name = resume_name(first)
    elif first.auto_resume:
        name = auto_resume_name(parser.parse_args(argv))
    if name:
        # A resumed run starts from its saved flags; the recipe's and this command line's (e.g. more --epochs) win,
        # and are checked as changes.
        how = f"--resume {name}" if first.resume else "--auto_resume"
        saved = os.path.join(run_dir(name), "config.yml")
        if not os.path.isfile(saved):
            hint = ("it holds the run's settings beside its last.pth: restore it" if first.auto_resume else
                    "is the run name right? (runs are in models/)")
            raise UsageError(f"{how}: {saved} not found; {hint}")
        saved_values = read_yaml_config(saved, parser, saved)
        parser.set_defaults(**{**saved_values, **recipe, "name": name})
    args = parser.parse_args(argv)
    args.resume = bool(name)
    try:
        if name:
            check_unchanged_on_resume(args, saved_values, name, how)
        check_dataset_name(args.dataset)  # before the run name made from it
        given = args.name is not None
        args.name = check_run_name(args.name if given else default_run_name(args))
        if not args.resume:  # before the size checks: a crop run's --input_w need not be a multiple of 16
            check_size_flags_used(args, argv)
        check_train_args(args)
        check_how_it_runs(args)
        if not args.resume:
            check_new_run_name(args.name, given)
            check_new_run_args(args)
        if args.init == "":
            raise UsageError("--init is empty; give a run name or a .pth file (or leave it out to start from "
                             "scratch)")
        if args.init and not args.resume:
            check_init_outside_run(args.init, args.name)
    except UsageError as e:
        raise UsageError(f"{e}{recipe_note(e, recipe, argv, first.config)}") from None
    return args


def resume_name(first):
    """The run that --resume NAME (or --resume --name NAME) continues, checked as a plain name."""
    name = first.resume if isinstance(first.resume, str) else first.name
    if not name:
        raise UsageError("--resume needs the run name: --resume NAME (or --resume --name NAME)")
    if first.name and first.name != name:
        raise UsageError(f"--resume {name} and --name {first.name} disagree; give the run name once")
    return check_run_name(name, "--resume" if isinstance(first.resume, str) else "--name")


def auto_resume_name(args):
    """--auto_resume: the name of the run that ``args`` (parsed as a new run) names, when models/<name>/last.pth is
    there to continue; None when the run is to be started."""
    name = check_run_name(args.name if args.name is not None else default_run_name(args))
    return name if os.path.isfile(os.path.join(MODELS_DIR, name, "last.pth")) else None


def check_how_it_runs(args):
    """Combinations of the flags that a resumed run may change (CHANGEABLE_ON_RESUME), checked for new and resumed
    runs alike."""
    if args.early_stopping < -1:
        raise UsageError(f"--early_stopping {args.early_stopping}: give a number of epochs (0 or more), or -1 to "
                         "train all --epochs")
    if args.loader == "device" and not args.cache:
        raise UsageError("--loader device keeps the decoded training set in memory, so --cache False cannot apply; "
                         "give --loader workers (or auto) with --cache False")


def recipe_note(error, recipe, argv, config):
    """Where a flag error's value came from when a recipe was given: ' (set in --config <recipe>)' when the flag
    the error names was set by the recipe (``recipe``: its values) and not by the command line ``argv`` (under any
    of its spellings), '' when the command line set it, ' (on the command line or in --config <recipe>)' for an
    error that names no flag first; '' without a recipe."""
    if not config:
        return ""
    named = re.match(r"--(\w+)", str(error))
    if not named:
        return f" (on the command line or in --config {config})"
    return f" (set in --config {config})" if named.group(1) in recipe and named.group(1) not in given_flags(argv) \
        else ""


def saved_setting_note(error, args, argv):
    """Where the flag that a resumed run's set-up error names came from, when it was not on the command line
    ``argv`` (nor set by the recipe of --config, as a requeued --auto_resume job gives it) but kept from the run's
    config.yml: ' (kept from models/<name>/config.yml; give --<flag> for this machine)'. A run moved to another
    machine keeps the --device and --amp it started with, and the error would otherwise name a flag the user never
    typed; '' otherwise."""
    named = re.match(r"--(\w+)", str(error))
    if not (args.resume and named and named.group(1) in CHANGEABLE_ON_RESUME
            and named.group(1) not in given_flags(argv)):
        return ""
    if args.config and named.group(1) in read_yaml_config(args.config, build_train_parser()):
        return ""
    return f" (kept from {run_dir(args.name)}/config.yml; give --{named.group(1)} for this machine)"


def fit_saved_workers(args, argv):
    """A resumed run's --num_workers kept from its config.yml (not given on the command line ``argv`` nor by the
    recipe of --config) that exceeds the CPUs this process may use (a run moved from a larger machine) is lowered to
    them, as a new run's default would be: the workers only load batches, whose augmentation is seeded per image,
    so the numbers stay the same. Returns the note that says so, '' when nothing changed."""
    saved, cpus = args.num_workers, usable_cpus()
    if not args.resume or saved <= cpus or "num_workers" in given_flags(argv) or \
            (args.config and "num_workers" in read_yaml_config(args.config, build_train_parser())):
        return ""
    args.num_workers = cpus
    return (f"note: --num_workers {saved}, kept from {run_dir(args.name)}/config.yml, is more than the {cpus} "
            f"CPU{'s' * (cpus != 1)} this process may use here: {cpus} loader worker{'s' * (cpus != 1)} (give "
            "--num_workers to choose)")


def given_flags(argv):
    """The dests of the flags that the command line ``argv`` sets, under any of their spellings."""
    unset = object()
    parser = build_train_parser()
    parser.set_defaults(**{a.dest: unset for a in parser._actions})
    return {k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v is not unset}


def check_size_flags_used(args, argv):
    """--input_w/--input_h given on the command line beside --crop_size would be ignored without a word (a crop run
    trains on crops at full resolution and validates on whole images), so a new run is refused; a recipe's get a
    note (:func:`unused_flags_note`)."""
    unused = [f for f in ("input_w", "input_h") if f in given_flags(argv)]
    if args.crop_size and unused:
        raise UsageError(f"--{unused[0]} is not used with --crop_size {args.crop_size} (training crops are taken at "
                         f"full resolution and validation sees whole images); leave --{' and --'.join(unused)} out, "
                         "or give --crop_size 0 to train on resized images")


def check_init_outside_run(init, name):
    """--init must not be the run being started: its folder is written over, and a run of a bundled model's name
    (``--init nuclei --name nuclei``) would afterwards stand for the weights it started from. Checked when a run
    starts only, not when a finished run's config.yml is read."""
    if init == name and init_is_run(init) and is_bundled_name(init):
        raise UsageError(f"--init {init} --name {name}: the new run would take the place of the run it starts from "
                         f"(models/{name}/ wins over pretrained/{name}/); give the new run another --name")
    if os.path.abspath(init_weights_path(init)).startswith(os.path.abspath(run_dir(name)) + os.sep):
        raise UsageError(f"--init {init} lies in models/{name}/, the folder of the run being started; give the new "
                         "run another --name")


# The flags of an --init run that the fine-tuning run must share (its weights' shapes, and the images they expect)
INIT_FLAGS = ("arch", "deep_supervision", "input_channels", "num_classes", "normalization")


def check_unchanged_on_resume(args, saved_values, name, how):
    """A resumed run keeps its settings: only the flags in CHANGEABLE_ON_RESUME may differ from its config.yml
    (a flag it does not hold, written as null or by an older version, had its default). ``how``: the flag that
    resumes it (--resume NAME or --auto_resume), for the message, which starts with the flag that differs (so that
    :func:`recipe_note` can say when a recipe set it)."""
    defaults = vars(build_train_parser().parse_args([]))
    saved = {k: saved_values.get(k, v) for k, v in defaults.items() if k not in SKIPPED_IN_CONFIG}
    changed = [k for k, v in saved.items() if k not in CHANGEABLE_ON_RESUME and getattr(args, k) != v]
    if changed:
        k = changed[0]
        fresh = [f for f in changed if f in INIT_FLAGS or (f == "borders" and args.borders)]
        then = (f"{', '.join('--' + f for f in fresh)} change{'s' if len(fresh) == 1 else ''} the network or the "
                "images it expects, so --init cannot carry its weights over either: train a new run from scratch"
                if fresh else
                f"To train on with other settings, start a new run from its weights: --init {name} --name <new name>")
        if k in ("folds", "fold"):  # --init from another fold's run would train on this fold's validation images
            then = f"Each fold trains a run of its own, from scratch: give this one --name {name}_fold{args.fold}"
        raise UsageError(f"--{k} {getattr(args, k)} differs from the run's {saved[k]}; {how} continues "
                         f"{run_dir(name)} with its settings (only --epochs, --early_stopping and how it runs, such "
                         f"as --device or --num_workers, may change). {then}")


def dataset_folder(dataset):
    """The folder of a dataset given as a name in inputs/ (first) or as a folder path; ./<name> is the current
    folder's, also when inputs/<name> exists (:func:`in_current_folder`)."""
    named = os.path.join(INPUTS_DIR, dataset)
    return dataset if os.path.isdir(dataset) and (in_current_folder(dataset) or not os.path.isdir(named)) else named


def in_current_folder(dataset):
    """Whether ``dataset`` is written as a path of the current folder (./mine): a path, never a name in inputs/."""
    return dataset.replace("\\", "/").startswith("./")


def check_dataset_name(dataset):
    """--dataset names a folder in inputs/, or is the absolute path of a dataset elsewhere; a relative path that
    leaves inputs/ ('..'), means the current folder's (inputs/<name>) or a folder elsewhere (./<name> too, when
    inputs/<name> is another) is a UsageError with the name or the absolute path to give."""
    if ".." in dataset.replace("\\", "/").split("/") and not os.path.isabs(dataset):
        raise UsageError(f"--dataset {dataset}: give the name of a folder in {INPUTS_DIR}/, or the absolute path of a "
                         "dataset elsewhere")
    if ((in_current_folder(dataset) or not os.path.isdir(os.path.join(INPUTS_DIR, dataset))) and dataset != "synthetic"
            and os.path.isdir(dataset)):
        name = os.path.basename(os.path.normpath(dataset))
        if os.path.dirname(os.path.abspath(dataset)) == os.path.abspath(INPUTS_DIR):
            raise UsageError(f"--dataset {dataset}: give the name of a folder in {INPUTS_DIR}/, not a path "
                             f"(--dataset {name})")
        # the run records --dataset as given, and val.py or --resume run from another folder would read another one
        named = os.path.join(INPUTS_DIR, name)
        other = f"--dataset {name} for {named}" if os.path.isdir(named) else f"move or link it to {named}"
        raise UsageError(f"--dataset {dataset} is not in {INPUTS_DIR}/: give its absolute path (--dataset "
                         f"{os.path.abspath(dataset)}) or {other}")


def check_train_args(args):
    """Reject sizes and counts that cannot work, naming the flag: what every run's settings must pass, a saved
    run's config.yml too (:func:`read_run_config`)."""
    for flag in ("epochs", "batch_size", "input_channels", "num_classes", "input_w", "input_h"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be a positive number, got {getattr(args, flag)}")
    for flag in ("input_w", "input_h", "crop_size"):
        if getattr(args, flag) % 16:
            raise UsageError(f"--{flag} {getattr(args, flag)} must be a multiple of 16 (the network halves the "
                             "size four times)")
    if args.input_w * args.input_h > MAX_PIXELS:  # every image is resized to it: OpenCV could not even allocate it
        raise UsageError(f"--input_w {args.input_w} and --input_h {args.input_h}: images resized to "
                         f"{args.input_w}x{args.input_h} would have more than the {MAX_PIXELS} pixels OpenCV handles "
                         "in one image; give the size the run trains on, such as 96 or 256")
    for flag in ("crop_size", "num_workers", "warmup_epochs", "precise_bn"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    if args.folds and not 0 <= args.test_size < 1:  # the folds validate, not --val_size (unused, unchecked)
        raise UsageError(f"--test_size {args.test_size}: the test part must be at least 0 and below 1; --folds "
                         f"{args.folds} deals the rest into folds")
    if not args.folds and (not 0 < args.val_size < 1 or not 0 <= args.test_size < 1
                           or args.val_size + args.test_size >= 1):
        raise UsageError(f"--val_size {args.val_size} and --test_size {args.test_size}: the validation part must be "
                         "above 0 (the best epoch is chosen on it), the test part at least 0, and their sum below 1")
    if args.folds < 0 or args.folds == 1 or not 0 <= args.fold < max(args.folds, 1):
        raise UsageError(f"--folds {args.folds} --fold {args.fold}: --folds is 0 (off) or the number of folds, at "
                         "least 2, and --fold the one that validates, 0 to --folds - 1")
    if args.deep_supervision and args.arch not in DEEP_SUPERVISION_ARCHS:
        raise UsageError(f"{args.arch} has no deep supervision; use --arch {' or '.join(DEEP_SUPERVISION_ARCHS)} or "
                         "--deep_supervision False")
    if args.warmup_epochs and args.scheduler == "ReduceLROnPlateau":
        raise UsageError("--warmup_epochs cannot be combined with --scheduler ReduceLROnPlateau")
    if args.stain_jitter and (args.input_channels != 3 or args.loader == "device"):
        raise UsageError("--stain_jitter re-stains RGB images in the loader workers: it needs --input_channels 3 and "
                         "--loader workers or auto")
    try:
        args.milestone_list = [int(m) for m in str(args.milestones).split(",") if m.strip()]
    except ValueError:
        raise UsageError(f"--milestones {args.milestones!r} must be comma-separated epochs such as 30,60") from None


def check_new_run_args(args):
    """What a run being started must pass besides :func:`check_train_args`: its number flags (those of the optimizer
    and schedule it uses) finite and in range (a negative --min_lr or --gamma would train with a negative learning
    rate without a word), and combinations that would fail later. Not applied to saved runs, which older versions
    may have started with values outside these ranges (:func:`check_how_it_runs` is)."""
    rules = {
        "lr": (lambda v: v > 0, "above 0"),
        "weight_decay": (lambda v: v >= 0, "0 or more"),
        "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"),
        "split_seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"),
        "balance": (lambda v: 0 <= v <= 10, "between 0 (uniform) and 10 (1: each kind equally often)"),
        "input_channels": (lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
        "nucleus_diameter": (lambda v: v >= 0, "0 (measured) or a diameter in pixels"),
        "scale_jitter": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "shot_noise": (lambda v: v == 0 or 1 <= v <= MOST_PHOTONS, f"0 (off) or a photon count from 1 to "
                                                                    f"{MOST_PHOTONS}"),
        "blur": (lambda v: 0 <= v <= MOST_BLUR, f"0 (off) or a Gaussian sigma in pixels up to {MOST_BLUR}"),
        **{flag: (lambda v: 0 <= v <= 1, "a probability between 0 and 1") for flag in ("greyscale", "invert",
                                                                                         "stain_jitter")},
    }
    if args.scheduler in ("CosineAnnealingLR", "ReduceLROnPlateau"):
        rules["min_lr"] = (lambda v: 0 <= v <= args.lr, f"between 0 and --lr {args.lr} (the schedule's lowest "
                                                        "learning rate)")
    if args.scheduler == "ReduceLROnPlateau":
        rules.update(factor=(lambda v: 0 < v < 1, "between 0 and 1"), patience=(lambda v: v >= 0, "0 or more"))
    if args.scheduler == "MultiStepLR":
        rules["gamma"] = (lambda v: 0 < v <= 1, "in (0, 1] (MultiStepLR's factor)")
    if args.optimizer == "SGD":
        rules["momentum"] = (lambda v: 0 <= v < 1, "in [0, 1)")
    for flag, (allowed, what) in rules.items():
        value = getattr(args, flag)
        if not (math.isfinite(value) and allowed(value)):
            raise UsageError(f"--{flag} must be {what}, got {value}")
    if args.scheduler == "MultiStepLR" and not args.milestone_list:
        raise UsageError(f"--milestones {args.milestones!r}: MultiStepLR needs at least one epoch to lower the rate "
                         "at, such as 30,60 (a constant rate: --scheduler ConstantLR)")
    if args.scheduler == "MultiStepLR" and any(m < 1 for m in args.milestone_list):
        raise UsageError(f"--milestones {args.milestones!r}: epochs count from 1")
    if args.greyscale and args.input_channels == 1:
        raise UsageError("--greyscale turns colour images grey, and --input_channels 1 reads every image grey "
                         "already; leave --greyscale out")
    if args.freeze_bn and not args.init:
        raise UsageError("--freeze_bn True keeps the BatchNorm statistics of the weights a run starts from, which "
                         "from scratch are untrained (mean 0, variance 1); give --init RUN, or --freeze_bn False")
    if args.folds and args.split_file:
        raise UsageError(f"--folds {args.folds} deals the ids into folds and --split_file {args.split_file} gives the "
                         "split itself: give one of them (a fold split of your own: a --split_file per fold)")
    if args.nesterov and args.optimizer == "SGD" and args.momentum == 0:
        raise UsageError("--nesterov True needs a --momentum above 0")
    if args.batch_size == 1 and (args.crop_size or min(args.input_w, args.input_h)) == 16:
        raise UsageError("16-pixel images in batches of 1 leave BatchNorm one value per channel at the network's "
                         "1x1 bottom; use images of 32 or more, or --batch_size 2 or more")


def schedule_note(args):
    """A note when the learning-rate schedule does not fit in --epochs: a warm-up that never reaches --lr, or
    MultiStepLR milestones at or after the last epoch (the rate is never lowered at them); '' otherwise. Not an
    error: a short trial run of a long recipe (--epochs 1) is a fair thing to do."""
    notes = []
    if args.warmup_epochs >= args.epochs:
        notes.append(f"--warmup_epochs {args.warmup_epochs} is not shorter than --epochs {args.epochs}: the learning "
                     f"rate stays below --lr {args.lr} for the whole run")
    late = [m for m in args.milestone_list if args.warmup_epochs + m >= args.epochs]
    if args.scheduler == "MultiStepLR" and late:
        notes.append(f"--milestones {','.join(map(str, late))} fall at or after the last epoch (counted after "
                     f"--warmup_epochs {args.warmup_epochs}, of --epochs {args.epochs}): the rate is not lowered "
                     "there")
    return "; ".join(f"note: {n}" for n in notes)


# The schedule flags and the --scheduler choices that read them; the others leave them without effect
SCHEDULER_FLAGS = {"min_lr": ("CosineAnnealingLR", "ReduceLROnPlateau"), "factor": ("ReduceLROnPlateau",),
                   "patience": ("ReduceLROnPlateau",), "milestones": ("MultiStepLR",), "gamma": ("MultiStepLR",)}


def unused_flags_note(args):
    """A note naming flags set away from their defaults that the run's other flags leave without effect (SGD's
    --momentum and --nesterov beside Adam or AdamW; a schedule's flags beside another --scheduler; --val_size,
    --test_size and --split_seed beside --split_file, --val_size beside --folds; --nucleus_diameter, which
    predict.py --scale reads, without --crop_size; a recipe's --input_h/--input_w with --crop_size); '' otherwise.
    Not an error: the seed's config.yml files hold momentum beside Adam, and a recipe's schedule or split may be
    replaced on the command line."""
    notes = []
    sgd = [f"--momentum {args.momentum:g}"] * (args.momentum != SGD_MOMENTUM) + ["--nesterov True"] * args.nesterov
    if args.optimizer != "SGD" and sgd:
        notes.append(f"{' and '.join(sgd)}: SGD's, not {args.optimizer}'s; no effect here")
    defaults = build_train_parser()

    def set_away(flag):  # from its default; --milestones compared as the epochs it names
        if flag == "milestones":
            return args.milestone_list != [int(m) for m in defaults.get_default(flag).split(",")]
        return getattr(args, flag) != defaults.get_default(flag)

    changed = [f for f in SCHEDULER_FLAGS if args.scheduler not in SCHEDULER_FLAGS[f] and set_away(f)]
    for users in dict.fromkeys(SCHEDULER_FLAGS[f] for f in changed):  # grouped by the schedules that read them
        flags = " and ".join(f"--{f} {args.milestones if f == 'milestones' else format(getattr(args, f), 'g')}"
                             for f in changed if SCHEDULER_FLAGS[f] == users)
        owners = " and ".join(f"{u}'s" for u in users)
        notes.append(f"{flags}: {owners}, not {args.scheduler}'s; no effect here")
    split = [f for f in ("val_size", "test_size", "split_seed") if set_away(f)]
    if args.split_file and split:
        notes.append(f"{' and '.join(f'--{f} {getattr(args, f):g}' for f in split)}: --split_file "
                     f"{args.split_file} gives the split; no effect here")
    elif args.folds and "val_size" in split:
        notes.append(f"--val_size {args.val_size:g}: --folds {args.folds} validates on fold --fold {args.fold}; no "
                     "effect here")
    if args.nucleus_diameter and not args.crop_size:
        notes.append(f"--nucleus_diameter {args.nucleus_diameter:g}: for a --crop_size run (predict.py --scale reads "
                     "it); no effect here")
    if args.crop_size and (args.input_h, args.input_w) != (INPUT_SIZE, INPUT_SIZE):
        notes.append(f"--input_h/--input_w {args.input_h}x{args.input_w}: for a run on resized images; no effect with "
                     f"--crop_size {args.crop_size}")
    return "; ".join(f"note: {n}" for n in notes)


def init_is_run(init):
    """Whether --init names a run (models/<name> or pretrained/<name>) rather than a weights file: a path ends in
    .pth, has a folder (or is . or ..), or exists."""
    return not (init.endswith(".pth") or os.sep in init or init in (".", "..") or os.path.isfile(init))


def init_weights_path(init):
    """--init NAME or PATH -> the weights file: a path as given, else the model.pth of run NAME
    (:func:`saved_run_dir`)."""
    return os.path.join(saved_run_dir(init), "model.pth") if init_is_run(init) else init


def output_channels(args):
    """The network's output channels: one per mask class, then the touching-border channel with --borders."""
    return args.num_classes + int(args.borders)


def run_dir(name):
    """models/<name>, after checking that name is a plain name, that it is no link to a missing folder, and that this
    user may read the folder if it exists."""
    path = os.path.join(MODELS_DIR, check_run_name(name))
    # a run shared as a link to a share that is not mounted would look absent ("train it first"), and a new run of that
    # name would create the link's target path, a folder that the mounted share later hides
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(f"{path} is a link to {os.readlink(path)}, which is not there (a share not mounted, or a run "
                        f"moved?); mount or restore it, or remove the link {path}")
    # another user's private run (their umask 077 in a shared project folder) would look absent ("no run named ...,
    # train it first"), and a new run of that name would then fail on the folder
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{path} is a run folder this user may not read; its owner can share it (chmod -R g+rX "
                        f"{path}), or name another run")
    return path


def run_lock_file(name):
    """models/.<name>.lock: held by the train.py that trains run ``name`` (trainer.run_lock), and by an export.py
    that writes into its folder, so that neither writes there while the other does."""
    return os.path.join(MODELS_DIR, f".{check_run_name(name)}.lock")


def track_best(best, epoch, val_iou):
    """Update ``best`` (dict best_iou, best_epoch, stale_epochs) with this epoch's val IoU; True when it improved
    (a NaN never does). Here, not in trainer.py, so that runs.py judges a run's state as train.py does, without
    torch."""
    improved = val_iou > best["best_iou"]
    best.update({"best_iou": val_iou, "best_epoch": epoch, "stale_epochs": 0} if improved else
                {"stale_epochs": best["stale_epochs"] + 1})
    return improved


def best_after(val_ious):
    """The :func:`track_best` dict after epochs 1, 2, ... of val IoU ``val_ious`` (none: a run's start, best_iou -1,
    below any IoU)."""
    best = {"best_iou": -1.0, "best_epoch": 0, "stale_epochs": 0}
    for epoch, val_iou in enumerate(val_ious, 1):
        track_best(best, epoch, val_iou)
    return best


def stops_early(best, early_stopping):
    """True once ``early_stopping`` epochs (--early_stopping; -1 off) have passed without a better val IoU."""
    return 0 <= early_stopping <= best["stale_epochs"]


def saved_run_dir(name):
    """The folder of a trained run to load: models/<name>, or the bundled pretrained/<name> when models/ has no run
    of that name (a run of your own wins)."""
    own = run_dir(name)
    if not os.path.isfile(os.path.join(own, "config.yml")) and is_bundled_name(name):
        return os.path.join(PRETRAINED_DIR, name)
    return own


def derived_files_dir(name):
    """Where files made from run ``name`` go (export.py's model.onnx, plot.py's curves.png): models/<name>/, or
    outputs/<name>_files/ for the bundled run, since pretrained/ is part of the repository, a models/<name>/ folder
    would take the bundled run's place, and outputs/<name>/ is val.py's, replaced by every evaluation."""
    return os.path.join(OUTPUTS_DIR, f"{name}_files") if saved_run_dir(name) != run_dir(name) else run_dir(name)


def is_bundled_name(name):
    """True when pretrained/<name>/ holds a bundled run (a run trained under that name hides it)."""
    return os.path.isfile(os.path.join(PRETRAINED_DIR, name, "config.yml"))


def save_run_config(args, path):
    """Write the run's flags as plain YAML, UTF-8 (only the flags; derived values are left out; a name such as
    'Zellkern_ä' stays readable, not an escape)."""
    keys = [a.dest for a in build_train_parser()._actions if a.dest not in SKIPPED_IN_CONFIG]
    with atomic_write(path, encoding="utf-8") as f:
        yaml.safe_dump({k: getattr(args, k) for k in keys}, f, sort_keys=False, allow_unicode=True)


def closest_flag(key, flags):
    """``key``, with ' (did you mean F?)' naming the one of ``flags`` closest to it (difflib), when one is close."""
    close = difflib.get_close_matches(key, flags, n=1, cutoff=0.75)
    return f"{key} (did you mean {close[0]}?)" if close else key


def run_name_suggestion(name, bundled=True):
    """' (did you mean X?)' naming the run in models/ (or, with ``bundled``, the bundled run in pretrained/) whose
    name is closest to ``name`` (difflib, ignoring case), or '' when none is close."""
    runs = {}
    for folder, what in ((PRETRAINED_DIR, ", the bundled model"), (MODELS_DIR, ""))[not bundled:]:
        if os.path.isdir(folder):
            runs.update({n: what for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, "config.yml"))})
    lowered = {n.lower(): n for n in runs}
    close = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.75)
    return f" (did you mean {lowered[close[0]]}{runs[lowered[close[0]]]}?)" if close else ""


def load_run_config(name, flag="--name"):
    """Read the run's config.yml (models/<name>/ or the bundled pretrained/<name>/) as a recipe is read
    (:func:`read_yaml_config`), check its keys, and return an argparse Namespace. ``flag``: the one that named the
    run, for the message when there is none."""
    path = os.path.join(saved_run_dir(name), "config.yml")
    if not os.path.isfile(path):
        raise UsageError(f"no run named {name!r}: {path} not found{run_name_suggestion(name)} (train it first, or "
                         f"check {flag})")
    return read_run_config(path)


# The keys the original pytorch-nested-unet's train.py writes to config.yml; this toolkit writes more.
ORIGINAL_KEYS = {"name", "epochs", "batch_size", "arch", "deep_supervision", "input_channels", "num_classes",
                 "input_w", "input_h", "loss", "dataset", "img_ext", "mask_ext", "optimizer", "lr", "momentum",
                 "weight_decay", "nesterov", "scheduler", "min_lr", "factor", "patience", "milestones", "gamma",
                 "early_stopping", "num_workers"}


def read_run_config(path):
    """A run's config.yml at ``path``, read as :func:`load_run_config` reads it: an argparse Namespace. A run of
    the original pytorch-nested-unet (:data:`ORIGINAL_KEYS`, all of them) is refused: its weights expect inputs
    scaled its way."""
    parser = build_train_parser()
    values = read_yaml_config(path, parser, path)
    if set(values) == ORIGINAL_KEYS:  # before the checks: the original took values this toolkit refuses
        raise UsageError(f"{path} is the original pytorch-nested-unet's config.yml (its keys, none of this "
                         "toolkit's): its weights expect that code's input scaling (albumentations' Normalize, then "
                         "/ 255), which this toolkit does not make, so they would segment wrongly here; train the "
                         "model again here with the same flags")
    args = parser.parse_args([])
    for k, v in values.items():
        setattr(args, k, v)
    try:
        check_train_args(args)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return args


def add_device_arg(p):
    """--device, as train.py, val.py, predict.py and bench/ take it."""
    p.add_argument("--device", default="auto", type=device_name,
                   help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def add_amp_arg(p):
    """--amp, as train.py, val.py, predict.py and bench/ take it (engine.Precision.choose resolves it)."""
    p.add_argument("--amp", default="auto", type=amp_mode, metavar="{" + ",".join(AMP_MODES) + "}",
                   help="precision: auto = bf16 autocast on a CUDA GPU that has it (else fp16 + GradScaler) and on a "
                        "CPU with native bf16 (AMX or AVX512-BF16; else fp32); True/False mean auto/fp32")


def add_ensemble_arg(p):
    """val.py's and predict.py's --ensemble (ensemble.py)."""
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="also these runs: the mean of their and --name's probabilities (the other folds' runs of a "
                        "--folds cross-validation, as nnU-Net predicts); they must read images alike; the separation "
                        "and filters are then the defaults or the flags given")


def add_separation_args(p):
    """val.py's and predict.py's --separation, --min_size and --min_confidence: how a predicted mask becomes
    nuclei (resolved by :func:`post_processing`)."""
    p.add_argument("--separation", default=None, choices=SEPARATIONS,
                   help="how touching nuclei are split: watershed on the distance transform, the learned borders of "
                        "a run trained with --borders True, or plain connected components (default: borders for a "
                        "run trained with --borders True, else watershed; for it and --min_confidence, the run's own "
                        f"where val.py --tune chose them on its validation split: models/<name>/{TUNED_FILE})")
    p.add_argument("--min_size", type=integer, default=None,
                   help=f"drop objects smaller than this many pixels (default: {MIN_SIZE})")
    p.add_argument("--min_confidence", type=float, default=None,
                   help=f"drop objects whose mean probability is below this; 0 keeps all (default: {MIN_CONFIDENCE}, "
                        "or 0 for a run trained with LovaszHingeLoss, whose sigmoid is a margin, not a probability)")


def check_object_filters(min_size, min_confidence):
    """A UsageError naming the flag unless --min_size >= 0 and 0 <= --min_confidence < 1 (None: the default)."""
    if min_size is not None and min_size < 0:
        raise UsageError(f"--min_size must not be negative, got {min_size}")
    if min_confidence is not None and not 0 <= min_confidence < 1:
        raise UsageError(f"--min_confidence must be at least 0 and below 1, got {min_confidence}")


def object_filters(min_size=None, min_confidence=None, loss=None):
    """The keyword arguments of instances.split_instances for --min_size and --min_confidence (checked by
    :func:`check_object_filters`).

    ``min_size`` None is MIN_SIZE; ``min_confidence`` None is MIN_CONFIDENCE, except for a run trained with ``loss``
    LovaszHingeLoss: the hinge pushes its logits to the margin 1, so its nuclei have a mean sigmoid of about
    sigmoid(1) = 0.73, and the filter, chosen on BCE-trained networks, would drop every one of them. There it is
    off."""
    if min_confidence is None:
        min_confidence = 0.0 if loss == "LovaszHingeLoss" else MIN_CONFIDENCE
    return {"min_size": MIN_SIZE if min_size is None else min_size, "min_confidence": min_confidence}


def prediction_settings(epoch, precision, tta, prune, separation, filters):
    """The settings that change what a run's network and nuclei give, under the keys that val.py's evaluation.yml
    and predict.py's prediction.yml share: the model's ``epoch`` (evaluation.model_epoch; 'model.pth' when its log does
    not say), the ``precision`` (engine.Precision.describe), --tta, --prune, the ``separation`` and the object
    ``filters`` (:func:`object_filters`: min_size, min_confidence)."""
    return {"model": epoch or "model.pth", "precision": precision, "tta": tta, "prune": prune,
            "separation": separation, **filters}


def choose_separation(requested, borders, name):
    """The --separation for run ``name`` (``borders``: trained with --borders True): ``requested``, or when that
    is None 'borders' for a borders run and 'watershed' for the others (docs/results.md). A UsageError when
    borders are asked of a run without them."""
    if requested == "borders" and not borders:
        raise UsageError(f"--separation borders needs a run trained with --borders True; {name} was not")
    return requested or ("borders" if borders else "watershed")


class PostProcessing(NamedTuple):
    """How a run's predicted masks become nuclei (:func:`post_processing`)."""
    separation: str
    filters: dict  # object_filters' keywords
    # 'separation, min_confidence 0.5 tuned on validation': those of them that val.py --tune chose ('' for none); the
    # separation's value is beside it wherever this is printed
    tuned: str
    note: str  # a line to print about the run's postprocessing.yml ('' for none)

    def label(self):
        """'watershed', or 'watershed; separation, min_confidence 0.5 tuned on validation': for a summary line."""
        return f"{self.separation}; {self.tuned}" if self.tuned else self.separation


def post_processing(name, cfg, separation=None, min_size=None, min_confidence=None, ensemble=()):
    """The post-processing of run ``name`` (its config ``cfg``) for val.py and predict.py: each flag that is given
    (not None), else the value val.py --tune chose for this run (:func:`tuned_post_processing`; not --min_size),
    else the default (:func:`choose_separation`, :func:`object_filters`). Averaged with the runs ``ensemble``
    (--ensemble), the defaults: a choice tuned for one run's probabilities is not the ensemble's (a note says so)."""
    if ensemble:
        alone = [run for run in (name, *ensemble) if os.path.isfile(os.path.join(saved_run_dir(run), TUNED_FILE))]
        tuned, note = {}, (f"note: --ensemble: the separation and --min_confidence that val.py --tune chose for run "
                           f"{alone[0]} alone are not used; the ensemble takes the defaults, or the flags given"
                           if alone else "")
    else:
        tuned, note = tuned_post_processing(name, cfg.borders)
    default = {"separation": choose_separation(None, cfg.borders, name),
               "min_confidence": object_filters(loss=cfg.loss)["min_confidence"]}
    given = {"separation": separation, "min_size": min_size, "min_confidence": min_confidence}
    # a tuning that kept a default changes nothing, and is not said to
    used = {k: v for k, v in tuned.items() if given[k] is None and v != default[k]}
    chosen = {**given, **used}
    return PostProcessing(choose_separation(chosen["separation"], cfg.borders, name),
                          object_filters(chosen["min_size"], chosen["min_confidence"], cfg.loss),
                          ", ".join(k if k == "separation" else f"{k} {v}" for k, v in used.items()) +
                          " tuned on validation" if used else "", note)


def tuned_post_processing(name, borders):
    """({separation, min_confidence} that val.py --tune chose for run ``name`` (``borders``: trained with
    --borders True), a note): read from the run folder's postprocessing.yml; ({}, '') without one, and ({}, a note)
    when it was chosen for other weights than the run's model.pth now (trained on since: --resume, or a new run of
    the name). A file that holds no such choice is a DataError naming it."""
    folder = saved_run_dir(name)
    path = os.path.join(folder, TUNED_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            tuned = yaml.safe_load(f)
    except FileNotFoundError:
        return {}, ""
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}): make it again with python val.py --name {name} "
                        "--tune, or remove it") from None

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(tuned, dict) and tuned.get("separation") in SEPARATIONS
            and (borders or tuned["separation"] != "borders")
            and number(tuned.get("min_confidence")) and 0 <= tuned["min_confidence"] < 1
            and isinstance(tuned.get("weights_sha256"), str)):
        raise DataError(f"{path} holds no post-processing that val.py --tune chose for run {name}: make it again "
                        f"with python val.py --name {name} --tune, or remove it")
    if tuned["weights_sha256"] != sha256_file(os.path.join(folder, "model.pth")):
        return {}, (f"note: {path} was chosen for other weights than the run's model.pth now (trained on since); "
                    f"ignored: the default post-processing applies until python val.py --name {name} --tune")
    return {k: tuned[k] for k in TUNED_KEYS}, ""
