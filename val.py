"""Evaluate a trained run on its validation split (or its test split, or another dataset) and write what it
predicted.

    python val.py --name dsb2018_96_NestedUNet_wDS
    python val.py --name dsb2018_96_NestedUNet_wDS_3way --split test --tta     # a run trained with --test_size
    python val.py --name dsb2018_full_UNet_crop256 --dataset dsb2018_test_full     # every image of a test set
    python val.py --name mine_fold0 --ensemble mine_fold1 mine_fold2 --split test  # the folds' mean probability

With ``--dataset`` every image of inputs/<dataset>/ is scored, at the run's evaluation size (resized for a run
trained on resized images, the image's own size for a crop-trained run: in windows when its forward pass exceeds the
memory budget, inference.WindowedNetwork), and the outputs go to
outputs/<name>_on_<dataset>/, never over the run's own validation outputs (``--split test``: outputs/<name>_test/;
with ``--ensemble``, outputs/<name>_ensemble_test/ and outputs/<name>_ensemble_on_<dataset>/).
Each evaluation's outputs replace the folder as a whole once complete, so its files never mix with an earlier one's;
its evaluation.yml says what was scored, and a default folder that holds another evaluation (run r's --split test and
a run named r_test share outputs/r_test) is refused instead of replaced.

Reads models/<name>/config.yml, model.pth and split.csv (a note when the images it scores are not the files whose
SHA-256 it recorded); prints pooled IoU, mean per-image IoU and mean per-image Dice; writes
outputs/<name>/<class>/<id>.png (probability x 255, 8-bit PNG; runs trained with --borders True also
borders/<id>.png), scores.csv (one row per image, worst first, with its kind: fluorescence,
stained or bright-field, see dataset.image_modality; for a run of several classes the IoU and Dice of each class
after their means; when the dataset has instance labels (labels/, or a StarDist or Cellpose label-image layout, see
layouts.find_layout), the instance scores of the nuclei split by --separation (metrics.nucleus_scores: the DSB2018
score ``dsb``, F1 at IoU 0.5, panoptic quality ``pq``...; the DSB2018 score of the other ways printed beside it)),
overlays/<id>.png (image | truth | prediction | errors; class 0's) and summary.png.

With ``--tune`` it writes no outputs: it scores a grid of post-processings on the run's validation split (tuning.py)
and writes the best to models/<name>/postprocessing.yml, the run's defaults from then on (config.post_processing).
"""
import os

from config import (OUTPUTS_DIR, TUNED_FILE, add_amp_arg, add_device_arg, add_ensemble_arg, add_separation_args,
                    check_object_filters, load_run_config, post_processing, prediction_settings, run_dir,
                    run_lock_file, saved_run_dir)
from files import check_replaceable, written_alone
from utils import ArgumentParser, UsageError, at_least, check_run_name, file_extension, path_arg, run_cli


def build_parser():
    p = ArgumentParser(prog="val.py",
                       description="Evaluate models/<name>/model.pth on the run's own split. When the dataset "
                                   "has instance labels (labels/ or label images), also the DSB2018 instance score "
                                   "of the nuclei that --separation, --min_size and --min_confidence make (the other "
                                   "separations printed beside it).")
    p.add_argument("--name", required=True, help="run name: a folder in models/, or nuclei (the bundled model)")
    add_ensemble_arg(p)
    p.add_argument("--split", default=None, choices=["val", "test", "train"],
                   help="which ids of split.csv (default val)")
    p.add_argument("--dataset", type=path_arg, default=None,
                   help="score every image of inputs/<dataset>/ (or of a folder path) instead: a dataset the run was "
                        "not trained on, e.g. the test set that preprocess_dsb2018.py makes from stage1_test")
    p.add_argument("--img_ext", default=None, type=file_extension,
                   help="image file extension (default: the run's), e.g. .tif for a --dataset stored otherwise than "
                        "the run's training data")
    p.add_argument("--mask_ext", default=None, type=file_extension,
                   help="mask or label image file extension (default: the run's)")
    p.add_argument("--tta", action="store_true", help="average the four flips (test-time augmentation)")
    p.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: run only the sub-network up to head X0,L")
    add_separation_args(p)
    add_device_arg(p)
    add_amp_arg(p)
    p.add_argument("--batch_size", type=at_least(1), default=None,
                   help="default: the run's batch size (a crop-trained run scores whole images, one at a time)")
    p.add_argument("--num_workers", type=at_least(0), default=0, help="DataLoader workers")
    p.add_argument("--output", type=path_arg, default=None, help="folder for the outputs, replaced as a whole (default "
                                                  "outputs/<name>; outputs/<name>_test for --split test, "
                                                  "outputs/<name>_on_<dataset> for --dataset)")
    p.add_argument("--no_overlays", action="store_true", help="skip overlays/ and summary.png")
    p.add_argument("--tune", action="store_true",
                   help="instead: choose the --separation and --min_confidence of the best mean DSB2018 score on "
                        "the run's validation split, from a fixed grid (--min_size stays 3), kept only when its gain "
                        "per image has a 95 %% interval above 0 (else the defaults), and write them to "
                        f"models/<name>/{TUNED_FILE}, where val.py and predict.py take them as the run's defaults")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def output_folder(name, split, dataset, output, ensemble=()):
    """--output, else outputs/<name> for the validation split, outputs/<name>_<split> for another split and
    outputs/<name>_on_<dataset> for another dataset (<name>_ensemble for --name's run averaged with others): one
    evaluation's files never mix with another's."""
    if output:
        return output
    name += "_ensemble" if ensemble else ""
    if dataset is not None:
        return os.path.join(OUTPUTS_DIR, f"{name}_on_{os.path.basename(os.path.normpath(dataset))}")
    return os.path.join(OUTPUTS_DIR, name if split in (None, "val") else f"{name}_{split}")


def check_tune_args(args):
    """--tune: a UsageError for a flag it cannot take, and for a run that is not the user's own."""
    if args.dataset is not None or args.split not in (None, "val"):
        flag = "--dataset" if args.dataset is not None else f"--split {args.split}"
        raise UsageError(f"{flag}: --tune chooses on the run's validation split alone (chosen on test images, their "
                         "score would no longer be an honest one; on training images, the network knows them)")
    given = [flag for flag, value in (("--separation", args.separation), ("--min_size", args.min_size),
                                      ("--min_confidence", args.min_confidence), ("--output", args.output),
                                      ("--prune", args.prune)) if value is not None]
    given += ["--tta"] * args.tta + ["--no_overlays"] * args.no_overlays
    if given:
        raise UsageError(f"{' and '.join(given)}: --tune chooses the separation and filters for the network as "
                         f"val.py and predict.py run it by default, and writes only models/<name>/{TUNED_FILE}; "
                         f"leave {'them' if len(given) > 1 else 'it'} out")
    load_run_config(args.name)  # no run of that name: said before a lock file is made for it
    if saved_run_dir(args.name) != run_dir(args.name):
        raise UsageError(f"--tune writes into the run's folder, and {args.name} is the bundled model (pretrained/"
                         f"{args.name}, part of the toolkit), whose defaults were chosen on its validation split; to "
                         f"tune for your images, fine-tune it on them (train.py --init {args.name} --name <run>) and "
                         "tune that run")


def check_ensemble_args(args):
    """--ensemble: a UsageError for --tune, and for a split of the runs' own dataset other than the test split, whose
    images some of the runs trained on."""
    if args.tune:
        raise UsageError("--ensemble: --tune chooses the post-processing of one run, on its own validation split; "
                         "leave one of them out")
    if args.dataset is None and args.split != "test":
        split = args.split or "val"
        raise UsageError(f"--ensemble: the {split} split of run {args.name} holds images that other runs trained on "
                         "(the other folds' runs train on each fold's validation images); score the ensemble on "
                         "--split test (runs trained with the same --test_size and --split_seed) or on --dataset <set>")
    for other in args.ensemble:
        check_run_name(other, "--ensemble")


def main(argv):
    args = build_parser().parse_args(argv)
    check_object_filters(args.min_size, args.min_confidence)  # before the heavy imports
    check_run_name(args.name)  # before it names a folder
    if args.ensemble:
        check_ensemble_args(args)
    if args.tune:
        check_tune_args(args)
        # as train.py holds it: the weights cannot change while they are tuned for
        with written_alone(run_dir(args.name), "--name", run_lock_file(args.name)):
            return evaluate_into(args, None)
    out_dir = output_folder(args.name, args.split, args.dataset, args.output, args.ensemble)
    check_replaceable(out_dir, "--output", "scores.csv", "an output folder of val.py")
    # One val.py at a time writes a folder: the one that ended last would replace the other's outputs, also those of
    # another evaluation that check_same_evaluation refuses to replace
    with written_alone(out_dir, "--output"):
        return evaluate_into(args, out_dir)


def evaluate_into(args, out_dir):
    """Score run ``args.name`` as the flags say, write the outputs into ``out_dir`` (replaced as a whole when
    complete) and print the summary; returns the scores (engine.evaluate's, and the DSB2018 means). With --tune,
    returns the choice of :func:`tune` instead."""
    # Heavy imports only now, so that --help and flag errors answer at once.
    from checkpoints import made_by
    from dataset import reading_of
    from engine import Precision, choose_device, evaluate, fit_threads_to_cpus
    from ensemble import load_models, members_record
    from evaluation import (instance_labels, model_epoch, print_size_hint, score_and_write, scored_images,
                            scoring_loader, summary)
    from inference import whole_image_network
    from losses import build_loss

    device = choose_device(args.device)
    fit_threads_to_cpus()
    cfg, model = load_models(args.name, args.ensemble, device, args.prune)
    epoch = model_epoch(args.name)  # with the weights: a train.py of the run may save a better epoch meanwhile
    if cfg.crop_size and (args.batch_size or 1) > 1:  # whole images differ in size: dataset.eval_loader's batches of 1
        print(f"note: --batch_size {args.batch_size}: run {args.name} was trained on crops and is scored on whole "
              "images, one at a time; no effect here")
    made = {**made_by(args.name), **({"ensemble_weights": members_record(args.ensemble)} if args.ensemble else {})}
    if not args.tune:  # a damaged postprocessing.yml must not stop the --tune that replaces it
        post = post_processing(args.name, cfg, args.separation, args.min_size, args.min_confidence, args.ensemble)
        if post.note:
            print(post.note)
    reading = {**reading_of(cfg), "img_ext": args.img_ext or cfg.img_ext, "mask_ext": args.mask_ext or cfg.mask_ext}
    dataset_dir, ids, part, trained, layout, record = scored_images(args, cfg, reading, out_dir)
    labels, reading = instance_labels(args, cfg, ids, layout, dataset_dir, reading)
    loader = scoring_loader(args, cfg, dataset_dir, ids, reading)
    precision = Precision.choose(device, args.amp)
    criterion = build_loss(cfg.loss, border_after=cfg.num_classes if cfg.borders else None)
    network = whole_image_network(precision.prepare(model), cfg, device)  # in windows when an image exceeds memory
    what, how = title_parts(args, cfg, epoch, part, len(ids))

    def evaluate_with(on_batch):
        """engine.evaluate of the network over every image, each batch handed to ``on_batch``."""
        return evaluate(network, loader, criterion, precision, desc="eval", prune=args.prune, tta=args.tta,
                        on_batch=on_batch, classes=cfg.num_classes)

    if args.tune:
        return tune(args.name, cfg, labels, made["weights_sha256"], f"{what}, {precision.describe()}{how}",
                    evaluate_with)
    shaped = bool(labels)  # nuclei are made and scored against instance labels only
    if not shaped and separation_flags(args):
        print(f"note: {' and '.join(separation_flags(args))}: no image scored here has instance labels in "
              f"{dataset_dir}, so no nuclei are made or scored (IoU and Dice score the masks alone); no effect here")
    # as predict.py's prediction.yml without --instances: no nuclei were made, by no separation or filters
    evaluation_yml = (record, prediction_settings(epoch, precision.describe(), args.tta, args.prune,
                                                  post.separation if shaped else None,
                                                  post.filters if shaped else dict.fromkeys(post.filters)), made)
    scores, table, dsb = score_and_write(out_dir, cfg, post, labels, not args.no_overlays, evaluate_with,
                                         what + how, evaluation_yml)
    print(summary(f"{what}, {precision.describe()}{how}", scores, table, dsb, out_dir, not args.no_overlays,
                  trained, post.tuned))
    print_size_hint(args.name, cfg, dataset_dir, ids, reading)
    if dsb:
        scores.update(dsb=float(table["dsb"].mean()), **{f"dsb_{m}": v for m, v in dsb.items()},
                      f1=float(table["f1"].mean()), pq=float(table["pq"].mean()))
    return scores


def separation_flags(args):
    """The flags that shape the nuclei given on the command line, as '--separation cc', '--min_size 50', ..."""
    return [f"--{flag} {value:g}" if isinstance(value, (int, float)) else f"--{flag} {value}"
            for flag, value in (("separation", args.separation), ("min_size", args.min_size),
                                ("min_confidence", args.min_confidence)) if value is not None]


def title_parts(args, cfg, epoch, part, count):
    """The summary's title in two parts, (what, how): what was scored, "<run> (<epoch>, <part>, <count> images" (and
    the size, for a run trained on resized images), and how, the flip TTA and the pruning, then ")"; the printed
    title puts the precision between them, summary.png's leaves it out to fit its width."""
    size = f" at {cfg.input_h}x{cfg.input_w}" if not cfg.crop_size else ""  # where the scores and nuclei were taken
    runs = f" + {len(args.ensemble)} run{'s' * (len(args.ensemble) > 1)}" if args.ensemble else ""
    epoch = epoch and not args.ensemble and f"{epoch}, "  # the runs' epochs: evaluation.yml's ensemble_weights
    what = f"{args.name}{runs} ({epoch or ''}{part}, {count} image{'s' * (count != 1)}{size}"
    how = (", flip TTA" if args.tta else "") + (f", pruned at L={args.prune}" if args.prune else "") + ")"
    return what, how


def tune(name, cfg, labels, weights_sha256, title, evaluate_with):
    """val.py --tune: run the network once over the validation images (``evaluate_with(on_batch)``, engine.evaluate),
    score the grid on their instance ``labels`` (tuning.py), write models/<name>/postprocessing.yml for the weights
    of ``weights_sha256`` and print the table under ``title``; returns tuning.choose's choice."""
    from tuning import ObjectCollector, choose, grid_separations, tuning_table, write_choice

    with ObjectCollector(cfg.num_classes, labels, grid_separations(cfg.borders)) as collector:
        evaluate_with(collector)
        images = collector.results()
    choice = choose(images, name, cfg)
    path = write_choice(name, choice, len(images), weights_sha256)
    print(tuning_table(title, choice, len(images), path))
    return choice


if __name__ == "__main__":
    run_cli(main)
