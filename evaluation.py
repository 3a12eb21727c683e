"""What val.py scores and writes for each image a run evaluates: probability PNGs, per-image IoU/Dice with the
image's kind, DSB2018 instance scores where instance labels exist, overlays; then scores.csv, summary.png and the
printed summary; and val.py's steps that read the images to score and write what they scored.

Scores are those of engine.evaluate (one step function for every loop); this module only turns each batch into
files and table rows.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd
import yaml
from scipy.special import ndtr, stdtrit

from config import EVALUATION_FILE, INPUTS_DIR, dataset_folder, load_run_config, saved_run_dir
from dataset import MODALITIES, eval_loader, mostly_foreground_note, multi_object_ids_note
from layouts import find_layout, images_left_out, list_ids, nucleus_diameter, read_instance_labels
from files import atomic_imwrite, atomic_write, folder_replaced_when_done
from splits import changed_images_note, read_split, split_ids
from image_files import decode_image, denormalize, resize_labels
from inference import host_probabilities
from instances import auto_scale, border_map
from metrics import separation_scores
from utils import BatchedThreads, DataError, UsageError, first_few, progress_bar, usable_cpus
from visualize import overlay_panel, to_bgr, write_summary

MIN_IMAGES_FOR_INTERVAL = 10  # fewer images resample to intervals too narrow to mean anything
# measured on DSB2018 (field_print dot product, then pixel correlation): stage1_test's 4 fields of stage1_train reach
# at least 0.9997 and 0.9988; the closest other pair of one size of the two sets 0.39 and 0.33; one embryo imaged
# twice within stage1_train (20b20ab0, cb4df20a), its nuclei moved, 0.978 and 0.937: not one picture
FIELD_PRINT_MATCH, FIELD_MATCH = 0.95, 0.98
# what val.py prints for each separation (config.SEPARATIONS), in the order the DSB2018 scores follow the chosen one
SEPARATION_NAMES = {"cc": "connected components", "watershed": "watershed", "borders": "learned borders"}


def evaluation_ids(name, split, dataset, cfg, reading):
    """(dataset folder, ids to score, what they are, those of them the run trained on): the ``split`` ids (default
    val) of run ``name``'s split.csv, or with ``dataset`` every image of that folder (inputs/<dataset>, or a folder
    path, of any layout). ``cfg``: the run's flags; ``reading``: the img_ext, mask_ext and num_classes to read the
    images with."""
    run_dataset = cfg.dataset
    if dataset is not None:
        if split is not None:
            raise UsageError("--split picks ids of the run's own dataset; with --dataset every image is scored, so "
                             "give one of the two")
        folder = dataset_folder(dataset)  # of any layout
        ids = list_ids(folder, reading["img_ext"], reading["mask_ext"], reading["num_classes"])
        if os.path.realpath(folder) == os.path.realpath(os.path.join(INPUTS_DIR, run_dataset)):
            split_file = os.path.join(saved_run_dir(name), "split.csv")
            trained = set(split_ids(read_split(split_file), "train")) if os.path.isfile(split_file) else set()
            return (folder, ids, f"all of {folder}, the run's own dataset: its training images included",
                    [i for i in ids if i in trained])
        copies = training_copies(name, cfg, folder, ids, reading)
        if copies is None:  # a run handed over without its dataset: these may well be its training images
            return folder, ids, (f"all of {folder} (not compared with the run's training images: that needs its "
                                 f"split.csv and its dataset {os.path.join(INPUTS_DIR, run_dataset)} as trained)"), []
        return folder, ids, f"all of {folder}" + (f", {len(copies)} of them the run's training images" if copies
                                                  else " (not trained on)"), copies
    split = split or "val"
    run = saved_run_dir(name)
    if not os.path.isfile(os.path.join(run, "split.csv")):
        raise UsageError(f"{run}/split.csv not found: val.py scores the run's {split} split as written there; to "
                         "score every image of a dataset instead, give --dataset <set>")
    ids = split_ids(read_split(os.path.join(run, "split.csv")), split)
    if not ids:
        raise UsageError(f"{run}/split.csv has no '{split}' ids (train with --test_size for a test split)")
    folder = os.path.join(INPUTS_DIR, run_dataset)
    if not os.path.isdir(folder):
        how = {"synthetic": "python synthetic.py"}.get(run_dataset, "put it back, link it there, or prepare it again "
                                                                   "(DSB2018: python preprocess_dsb2018.py --help)")
        raise DataError(f"run {name} was trained on {folder}, which is not there: {how}; or score another dataset "
                        "with --dataset <set>")
    images = find_layout(folder, reading["img_ext"], reading["mask_ext"]).image_ids()
    if not images:  # another extension, most likely: list_ids names the folder and the extensions it holds
        list_ids(folder, reading["img_ext"], reading["mask_ext"], reading["num_classes"])
    missing = sorted(set(ids) - images)
    if missing:  # found now, not by the loader after part of the evaluation
        raise DataError(f"{len(missing)} of the {len(ids)} {split} images in {run}/split.csv "
                        f"{'is' if len(missing) == 1 else 'are'} not in {folder}, e.g. {first_few(missing)}: prepare "
                        "that dataset again in full, or score another with --dataset <set>")
    return folder, ids, f"{split} split", []


def changed_images(name, cfg, folder, ids, layout, split):
    """A note when images of ``folder`` (``layout``) that run ``name`` scores (``ids``: its ``split`` split, or with
    ``split`` None every image) are not the files whose SHA-256 its split.csv recorded (splits.changed_images_note);
    '' when they are, when it recorded none, or when ``folder`` is not the run's dataset (``cfg``: its flags)."""
    path = os.path.join(saved_run_dir(name), "split.csv")
    own = os.path.realpath(folder) == os.path.realpath(os.path.join(INPUTS_DIR, cfg.dataset))
    if not (own and os.path.isfile(path)):
        return ""
    meaning = (f"the scores are of these files, not of the run's {split} images" if split else
               "the scores are of these files, and the run's training images may not be among them")
    return changed_images_note(read_split(path), ids, split or "val/test", layout.image, folder, meaning)


def training_copies(name, cfg, folder, ids, reading):
    """The ``ids`` of ``folder`` whose image is one of run ``name``'s training images (its split.csv; its flags
    ``cfg`` say where they are): the one of the same id, pixel for pixel, in another folder, layout, file type or bit
    depth (:func:`same_picture`), or one of any id showing the same field at another contrast or size
    (:func:`same_field`). None when they cannot be compared: the run has no split.csv, or its dataset is not in
    inputs/ or no longer in a layout it reads."""
    split, run_folder = os.path.join(saved_run_dir(name), "split.csv"), os.path.join(INPUTS_DIR, cfg.dataset)
    if not (os.path.isfile(split) and os.path.isdir(run_folder)):
        return None
    try:
        theirs = find_layout(run_folder, cfg.img_ext, cfg.mask_ext)
    except DataError:  # its error would name the run's folder, not the one being scored, and stop that evaluation
        return None
    ours = find_layout(folder, reading["img_ext"], reading["mask_ext"])
    trained = sorted(set(split_ids(read_split(split), "train")) & theirs.image_ids())
    if not (trained and ids):
        return []
    # DSB2018's stage1_test holds 4 fields of stage1_train stretched to other contrasts, under other ids, and
    # inputs/dsb2018_96 is dsb2018_full resized: only a comparison with every training image, of any size, finds
    # them, by thumbnails first (all pairs in one product) since a full one per pair costs too much
    prints = field_prints([theirs.image(j) for j in trained] + [ours.image(i) for i in ids])
    close = prints[len(trained):] @ prints[:len(trained)].T >= FIELD_PRINT_MATCH
    named, copies = set(trained), []
    for i, candidates in zip(ids, close):
        if i not in named and not candidates.any():
            continue
        image = decode_image(ours.image(i))
        if (i in named and same_picture(decode_image(theirs.image(i)), image)) or any(
                same_field(decode_image(theirs.image(trained[k])), image) for k in np.flatnonzero(candidates)):
            copies.append(i)
    return copies


def field_prints(paths):
    """:func:`field_print` of each image file of ``paths``, float [N, 1024], read in threads (OpenCV's decoding runs
    beside Python) under a progress bar: many thousand training images take a while."""
    with ThreadPoolExecutor(usable_cpus()) as pool:
        prints = pool.map(lambda path: field_print(decode_image(path)), paths)
        return np.stack(list(progress_bar(prints, total=len(paths), desc="looking for training images", unit="img",
                                          leave=False)))


def field_print(image):
    """A decoded image [H, W, C] -> its grey 32x32 area thumbnail [1024], zero mean and unit length (zeros for a flat
    image): two pictures of one field at other contrasts give a dot product near 1, other fields far less."""
    small = cv2.resize(image.astype(np.float32).mean(2), (32, 32), interpolation=cv2.INTER_AREA).ravel()
    small -= small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 0 else small


def same_field(a, b):
    """Whether two decoded images [H, W, C] show one field, whatever their contrast and size: their grey pixels'
    correlation is at least :data:`FIELD_MATCH`, for two sizes at half the smaller one's."""
    a, b = (x.astype(np.float64).mean(2) for x in (a, b))
    if a.shape != b.shape:
        # both averaged down: a copy resized without antialiasing (preprocess_dsb2018.py's INTER_LINEAR) keeps its
        # aliasing, which at the smaller size alone took some DSB2018 fields to a correlation of 0.97
        size = (max(1, min(a.shape[1], b.shape[1]) // 2), max(1, min(a.shape[0], b.shape[0]) // 2))
        a, b = (cv2.resize(x, size, interpolation=cv2.INTER_AREA) for x in (a, b))
    a, b = a.ravel(), b.ravel()
    return a.std() > 0 and b.std() > 0 and np.corrcoef(a, b)[0, 1] >= FIELD_MATCH


def same_picture(a, b):
    """Whether two decoded images [H, W, C] are one picture: the same values, or the same fraction of their integer
    types' range (an 8-bit image saved as 16-bit, x 257), a grey one stored in one channel or three equal ones."""
    a, b = (x[:, :, :1] if (x == x[:, :, :1]).all() else x for x in (a, b))
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    if a.dtype.kind != "u" or b.dtype.kind != "u":
        return False
    # exact in uint64 for types up to 32 bits: a / max_a == b / max_b
    return np.array_equal(a.astype(np.uint64) * np.iinfo(b.dtype).max, b.astype(np.uint64) * np.iinfo(a.dtype).max)


def evaluation_record(name, split, dataset, folder, ensemble=()):
    """What an evaluation scored, as evaluation.yml in its output folder records it: the run (and the runs
    ``ensemble`` averaged with it, --ensemble) and the split ('val' by default), or with --dataset every image of that
    folder (:func:`dataset_key`; a run's own split stays the same evaluation when its dataset folder moves)."""
    run = {"run": name, **({"ensemble": list(ensemble)} if ensemble else {})}
    if dataset is None:
        return {**run, "split": split or "val"}
    return {**run, "split": "every image", "dataset": dataset_key(folder)}


def dataset_key(folder):
    """The dataset ``folder`` as evaluation.yml records it: resolved, and relative to the current folder when it lies
    in it (inputs/<name>), so that a checkout moved or copied elsewhere, outputs/ and inputs/ with it, holds the same
    evaluations; a path recorded absolute inside the current folder (older versions) gives the same key."""
    real, here = os.path.realpath(folder), os.path.realpath(os.curdir)
    return os.path.relpath(real, here) if os.path.commonpath([real, here]) == here else real


def describe_evaluation(record):
    """'run r (test split)' or 'run r (every image of /data/test)' for a message."""
    split = record.get("split")
    what = f"every image of {record.get('dataset')}" if split == "every image" else f"{split} split"
    ensemble = record.get("ensemble")
    runs = f"runs {', '.join(map(str, [record.get('run'), *ensemble]))}" if isinstance(ensemble, list) else \
        f"run {record.get('run')}"
    return f"{runs} ({what})"


def check_same_evaluation(out_dir, record):
    """A default output folder is replaced only by the evaluation it holds (its evaluation.yml): the folders of two
    can share a name (run r's --split test and a run named r_test both give outputs/r_test), and one would
    silently replace the other. A folder without the file (older, or unreadable) is replaced, and so is the same
    evaluation made with other settings (its ``settings`` key)."""
    try:
        with open(os.path.join(out_dir, EVALUATION_FILE)) as f:
            held = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return
    if isinstance(held, dict) and isinstance(held.get("dataset"), str):
        held["dataset"] = dataset_key(held["dataset"])
    if isinstance(held, dict) and {key: held.get(key) for key in {*record, "ensemble"}} != {"ensemble": None, **record}:
        raise UsageError(f"{out_dir} holds the evaluation of {describe_evaluation(held)}, not of "
                         f"{describe_evaluation(record)}; give --output to write this one elsewhere, or remove that "
                         "folder")


def write_evaluation_record(folder, record, settings, made):
    """evaluation.yml in ``folder``: ``record`` (:func:`evaluation_record`), what ``made`` it (checkpoints.made_by:
    the SHA-256 of the run's weights and config.yml, the toolkit's version) and, under ``settings``, how it was
    scored (config.prediction_settings), so that a folder of outputs says which command made it."""
    with open(os.path.join(folder, EVALUATION_FILE), "w") as f:  # inside the folder replaced when complete
        yaml.safe_dump({**record, **made, "settings": settings}, f, sort_keys=False)


def separation_order(chosen, borders):
    """The separations to score, ``chosen`` first; 'borders' only for a run trained with --borders True."""
    methods = [m for m in SEPARATION_NAMES if m != "borders" or borders]
    methods.insert(0, methods.pop(methods.index(chosen)))
    return methods


class ImageWriter:
    """``engine.evaluate``'s ``on_batch``: per image, writes ``<out_dir>/<class>/<id>.png`` (probability x 255;
    ``borders/`` for the border channel), the overlay (unless ``overlays`` is False) and a row of scores.

    classes: the mask classes K (a channel after them is the learned border map); labels: {img_id: (label file,
    image file)} of the images with instance labels (layouts.read_instance_labels), scored by each of ``methods``
    (instances.split_instances with ``filters``): the DSB2018 score of each, and the first one's
    metrics.nucleus_scores in the row.

    The per-image work (instance separation, PNG encoding) runs in threads after every ``buffer_mb`` MB of
    predictions (utils.BatchedThreads, ``workers`` threads); rows keep the order of the images. Use it as a context
    manager, so that an error or Ctrl-C stops the threads.
    """

    def __init__(self, out_dir, classes, labels, methods, filters, overlays=True, workers=None, buffer_mb=256):
        self.out_dir, self.classes, self.labels = out_dir, classes, labels
        self.methods, self.filters, self.overlays = methods, filters, overlays
        self.rows, self.dsb = [], {m: [] for m in methods}
        self.jobs = BatchedThreads(self._keep, buffer_mb, workers, desc="scores and PNGs")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.jobs.close()

    def __call__(self, meta, images, logits, masks, scores):
        """meta {'img_id': [B], 'kind': [B]} (dataset.eval_loader with kinds), images [B, C, H, W] normalised, logits
        [B, K(+1), H, W], masks [B, K(+1), H, W] in {0, 1}, scores the (iou [B, K], dice [B, K]) of each image's K
        mask classes that engine.evaluate computed."""
        probs = host_probabilities(logits)
        ious, dices = (s.cpu().numpy() for s in scores)
        images = images.float().cpu().numpy().transpose(0, 2, 3, 1) if self.overlays else [None] * len(probs)
        truths = masks[:, 0].cpu().numpy() > 0
        for i, (img_id, kind) in enumerate(zip(meta["img_id"], meta["kind"])):
            self.jobs.submit(self._write_image, img_id, kind, probs[i], images[i], truths[i], ious[i], dices[i],
                             nbytes=probs[i].nbytes + truths[i].nbytes +
                             (images[i].nbytes if self.overlays else 0))

    def _write_image(self, img_id, kind, prob, image, truth, iou, dice):
        """One image's files and (row, {method: DSB2018 score}); kind its image kind, prob float [K(+1), H, W] in
        [0, 1], image normalised [H, W, C] (None without overlays), truth bool [H, W] (class 0), iou and dice float
        [K] its classes' scores (the row's iou and dice: their mean; with K > 1 also each, iou_class<c>)."""
        k = self.classes
        for c in range(prob.shape[0]):
            atomic_imwrite(os.path.join(self.out_dir, str(c) if c < k else "borders", img_id + ".png"),
                           np.round(prob[c] * 255).astype(np.uint8))
        row, dsb = {"img_id": img_id, "iou": float(iou.mean()), "dice": float(dice.mean()), "kind": kind}, {}
        if img_id in self.labels:  # the instance scores at the evaluated size
            truth_labels = resize_labels(read_instance_labels(*self.labels[img_id]), prob.shape[1:])
            scores = separation_scores(prob[0], truth_labels, self.methods, border=border_map(prob, k),
                                       **self.filters)
            row.update(scores[self.methods[0]])
            dsb = {m: s["dsb"] for m, s in scores.items()}
        if k > 1:
            for c in range(k):
                row.update({f"iou_class{c}": float(iou[c]), f"dice_class{c}": float(dice[c])})
        if image is not None:
            atomic_imwrite(os.path.join(self.out_dir, "overlays", img_id + ".png"),
                           overlay_panel(to_bgr(denormalize(image)), truth, prob[0]))
        return row, dsb

    def _keep(self, result):
        """Keep an image's row and scores: ``result`` = (row, {method: DSB2018 score})."""
        row, dsb = result
        self.rows.append(row)
        for method, score in dsb.items():
            self.dsb[method].append(score)

    def write_table(self, title):
        """Wait for the images still being written, then write scores.csv (worst IoU first) and, with overlays,
        summary.png under ``title``; returns the table."""
        self.jobs.flush()
        table = pd.DataFrame(self.rows).sort_values("iou", kind="stable").reset_index(drop=True)
        with atomic_write(os.path.join(self.out_dir, "scores.csv")) as f:
            table.to_csv(f, index=False, float_format="%.6f")
        if self.overlays:
            write_summary(os.path.join(self.out_dir, "overlays"), table, os.path.join(self.out_dir, "summary.png"),
                          title, classes=self.classes)
        return table

    def dsb_means(self):
        """{method: mean DSB2018 score over the labelled images}, empty when none has labels."""
        return {m: float(np.mean(v)) for m, v in self.dsb.items() if v}


def model_epoch(name):
    """'epoch N of M' for run ``name``'s model.pth: the first epoch of its log.csv with the highest val IoU (the one
    train.py keeps), of the M epochs logged so far (fewer than --epochs while it still trains); '' without a log
    that says."""
    try:
        log = pd.read_csv(os.path.join(saved_run_dir(name), "log.csv"))
        best = int(log["epoch"][log["val_iou"].idxmax()])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, TypeError, ValueError):
        return ""
    return f"epoch {best} of {int(log['epoch'].max())}"


def summary(title, scores, table, dsb, out_dir, overlays, trained=(), tuned=""):
    """The lines val.py prints: pooled and per-image IoU/Dice, IoU by image kind, DSB2018 scores (after them the
    filters ``tuned`` on validation: config.PostProcessing.tuned), their intervals, the scores without the images
    ``trained`` on (ids), worst image (with several classes: by the mean of its classes, and the worst of each
    class)."""
    per_kind = table.groupby("kind")["iou"].agg(["size", "mean"])
    by_kind = ", ".join(f"{k} {per_kind['mean'][k]:.4f} ({per_kind['size'][k]})" for k in MODALITIES
                        if k in per_kind.index)
    lines = [f"{title}:",
             f"  IoU  {scores['iou']:.4f} pooled   {scores['iou_mean']:.4f} mean per image",
             f"  Dice {scores['dice']:.4f} pooled   {scores['dice_mean']:.4f} mean per image",
             *by_class_line(scores),
             f"  mean IoU by image kind (images): {by_kind}"]
    if dsb:
        lines.append(f"  DSB2018 score {', '.join(f'{v:.4f} ({SEPARATION_NAMES[m]})' for m, v in dsb.items())}, "
                     f"mean over the {table['dsb'].notna().sum()} images with instance labels" +
                     (f"; {tuned}" if tuned else ""))
        lines += matched_nuclei_lines(table[table["dsb"].notna()], next(iter(dsb)))
    lines += interval_line(table, next(iter(dsb), None))
    lines += untrained_line(table, trained, next(iter(dsb), None))
    classes = scored_classes(table)
    if classes:
        worst = [table[f"iou_class{c}"].idxmin() for c in classes]
        lines.append("  worst image by class: " + ", ".join(
            f"{c} {table['img_id'][i]} (IoU {table[f'iou_class{c}'][i]:.3f})" for c, i in zip(classes, worst)))
    mean = ", the mean of its classes" if classes else ""
    lines.append(f"  worst image {table['img_id'][0]} (IoU {table['iou'][0]:.3f}{mean}); files in "
                 f"{os.path.join(out_dir, '')} (scores.csv, {'overlays/, summary.png, ' if overlays else ''}"
                 "probability PNGs per class)")
    return "\n".join(lines)


def matched_nuclei_lines(table, separation=None):
    """The summary's lines on the nuclei matched at IoU 0.5 of a ``table`` (scores.csv's rows with instance scores,
    metrics.nucleus_scores) whose nuclei ``separation`` made (None: made elsewhere): F1, precision, recall and PQ
    (means per image), and the nuclei found."""
    how = f" ({SEPARATION_NAMES[separation]})" if separation else ""
    return [f"  at IoU 0.5{how}: F1 {table['f1'].mean():.4f}, precision {table['precision'].mean():.4f}, recall "
            f"{table['recall'].mean():.4f} (means per image); {table['tp'].sum()} of {table['true_nuclei'].sum()} "
            f"true nuclei found, {table['fp'].sum()} false positives",
            f"  PQ {table['pq'].mean():.4f} (panoptic quality: F1 x SQ, the matched nuclei's mean IoU, "
            f"{table['sq'].mean():.4f}; means per image)"]


def interval_line(table, separation):
    """['  95 % interval ... IoU lo-hi, DSB2018 lo-hi'] for the per-image means of ``table`` (scores.csv's rows; the
    dsb column is ``separation``'s, None for nuclei made elsewhere): how far the mean of as many other images of the
    same kinds might fall, to weigh a difference between two runs against; for fewer than MIN_IMAGES_FOR_INTERVAL
    images a line saying that there is none (a few images' means, printed to 4 decimals, read as exact)."""
    n = len(table)
    if n < MIN_IMAGES_FOR_INTERVAL:
        return [f"  no 95 % interval of the means: {n} image{'s are' if n != 1 else ' is'} too few for one (at least "
                f"{MIN_IMAGES_FOR_INTERVAL}); another image of the same kind could move them far"]
    low, high = bootstrap_interval(table["iou"].to_numpy())
    parts = [f"IoU {low:.3f}-{high:.3f}"]
    dsb = table["dsb"].dropna().to_numpy() if "dsb" in table else []
    if len(dsb) >= MIN_IMAGES_FOR_INTERVAL:
        low, high = bootstrap_interval(dsb)
        # score.py's nuclei were made elsewhere, by no separation of ours
        detail = (SEPARATION_NAMES.get(separation, "") + labelled(len(dsb), n)).lstrip(", ")
        parts.append(f"DSB2018{f' ({detail})' if detail else ''} {low:.3f}-{high:.3f}")
    return [f"  95 % interval of the means per image (bootstrap over the {n} images): {', '.join(parts)}"]


def untrained_line(table, trained, separation):
    """['  without the N training images (M): IoU x mean per image, DSB2018 y (separation); they are a, b, c']
    for a ``table`` (scores.csv's rows; its dsb column is ``separation``'s) of which the ids ``trained`` are images
    the run trained on; [] when none are, or all: the scores of the images the run had not seen."""
    seen = table["img_id"].isin(set(trained))
    unseen = table[~seen]
    if len(unseen) in (0, len(table)):
        return []
    dsb = unseen["dsb"].dropna() if "dsb" in unseen else []
    dsb_text = f", DSB2018 {dsb.mean():.4f} ({SEPARATION_NAMES[separation]}{labelled(len(dsb), len(unseen))})" \
        if len(dsb) else ""
    trained_count = len(table) - len(unseen)
    return [f"  without the {trained_count} training image{'s' * (trained_count != 1)} ({len(unseen)}): IoU "
            f"{unseen['iou'].mean():.4f} mean per image{dsb_text}; they are {first_few(table['img_id'][seen], 1)}"]


def labelled(scored, images):
    """', over the N with instance labels' when a DSB2018 figure is of fewer images (``scored``) than the ``images``
    its line counts, else ''."""
    return f", over the {scored} with instance labels" if scored < images else ""


def bootstrap_interval(values, level=0.95, draws=2000, seed=0):
    """The expanded percentile bootstrap interval (low, high) of the mean of ``values`` (float [N], N >= 2): the
    central share of the means of ``draws`` resamples of N values with replacement (a fixed ``seed``: the same scores
    print the same interval), that share widened from ``level`` as a Student t interval of N - 1 degrees of freedom
    is (Hesterberg's small-sample correction: a plain percentile interval is a normal one, sqrt((N - 1) / N) too
    narrow). From 10 of the bundled model's 134 validation IoUs, the plain 95 % interval held the mean of all 134 in
    84 % of draws, this one in 89 %; from 134 images it is about 1 % wider than the plain one."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    n = len(values)
    chunk = max(1, 2 ** 22 // n)  # resampled indices of at most 32 MiB at a time
    means = np.concatenate([values[rng.integers(0, n, (min(chunk, draws - start), n))].mean(1)
                            for start in range(0, draws, chunk)])
    tail = ndtr(-math.sqrt(n / (n - 1)) * stdtrit(n - 1, 1 - (1 - level) / 2)) * 100
    return tuple(float(v) for v in np.percentile(means, [tail, 100 - tail]))


def scored_classes(names):
    """The classes c ('0', '1', ...) of the iou_class<c> among ``names`` (a scores dict's keys or scores.csv's
    columns); [] for a run of one class, which has none."""
    return [k[len("iou_class"):] for k in names if k.startswith("iou_class")]


def by_class_line(scores):
    """['  IoU / Dice by class (pooled): 0 x / y, 1 ...'] for a run of several classes (metrics.SegmentationMeter's
    iou_class<c>), [] for one class."""
    classes = scored_classes(scores)
    if not classes:
        return []
    return ["  IoU / Dice by class (pooled): " +
            ", ".join(f"{c} {scores[f'iou_class{c}']:.4f} / {scores[f'dice_class{c}']:.4f}" for c in classes)]


def training_diameter(name, cfg):
    """The median nucleus diameter (pixels) of run ``name``'s training images: the one its config.yml records, or
    for a run trained before train.py recorded it, measured now from the training ids of its split.csv in its
    dataset (layouts.nucleus_diameter, as train.py measures it); 0.0 when neither can be had."""
    if cfg.nucleus_diameter:
        return cfg.nucleus_diameter
    split, folder = os.path.join(saved_run_dir(name), "split.csv"), os.path.join(INPUTS_DIR, cfg.dataset)
    if not (os.path.isfile(split) and os.path.isdir(folder)):
        return 0.0
    try:
        return round(nucleus_diameter(folder, split_ids(read_split(split), "train"), cfg.img_ext, cfg.mask_ext), 2)
    except DataError:  # the dataset changed since: nothing to measure by
        return 0.0


def size_hint(dataset_dir, ids, reading, trained):
    """The line val.py adds when the nuclei of images ``ids`` (from their labels or masks: layouts.nucleus_diameter)
    are far from the ``trained`` diameter of a crop-trained run (instances.auto_scale): their median diameter and
    the predict.py --scale that sizes them as in training. "" when they are close."""
    found = nucleus_diameter(dataset_dir, ids, reading["img_ext"], reading["mask_ext"])
    scale = auto_scale(found, trained)
    if scale == 1:
        return ""
    return (f"  nuclei here are {found:.0f} px across (median), the run learned {trained:.0f} px: predict.py "
            f"--scale {scale:.2g} (or --scale auto) sizes them as in training")


# ------------------------------------------------------------------------------------- val.py's steps

def scored_images(args, cfg, reading, out_dir):
    """The images that run ``args.name`` (config ``cfg``) is scored on (:func:`evaluation_ids`: its --split, or
    every image of --dataset, read as ``reading``, dataset.reading_of's), after printing the notes on them: the files
    of --dataset left out (layouts.images_left_out), the images that are not the files the run's split.csv recorded
    (:func:`changed_images`). Returns (dataset_dir, ids, part: the words that name them, trained: the ids of the
    run's training images among them (with --ensemble, of any of the runs'), layout: layouts.find_layout's, record:
    :func:`evaluation_record`'s). Raises a UsageError when the default ``out_dir`` holds another evaluation
    (:func:`check_same_evaluation`), and the DataErrors of those functions."""
    dataset_dir, ids, part, trained = evaluation_ids(args.name, args.split, args.dataset, cfg, reading)
    own = len(trained)
    for other in args.ensemble:  # the images of their own split, and their training images
        their_dir, their_ids, _, their_trained = evaluation_ids(other, args.split, args.dataset,
                                                                load_run_config(other), reading)
        if sorted(their_ids) != sorted(ids) or os.path.realpath(their_dir) != os.path.realpath(dataset_dir):
            shared = len(set(their_ids) & set(ids)) if os.path.realpath(their_dir) == os.path.realpath(dataset_dir) \
                else 0
            raise UsageError(f"--ensemble: run {other}'s {args.split} split is not run {args.name}'s ({len(their_ids)} "
                             f"images of {their_dir}, against {len(ids)} of {dataset_dir}; {shared} in both); train "
                             "the runs with the same --test_size and --split_seed, or score them on --dataset <set>")
        trained += [i for i in their_trained if i not in trained]
    if len(trained) > own:  # part counts --name's run's training images alone; the summary's line, the runs' all
        part += f"; {len(trained)} trained on by one of the runs"
    left_out = images_left_out(dataset_dir, reading["img_ext"]) if args.dataset is not None else ""
    if left_out:
        print(left_out)
    record = evaluation_record(args.name, args.split, args.dataset, dataset_dir, args.ensemble)
    if not (args.output or args.tune):
        check_same_evaluation(out_dir, record)
    layout = find_layout(dataset_dir, reading["img_ext"], reading["mask_ext"])
    changed = changed_images(args.name, cfg, dataset_dir, ids, layout,
                             None if args.dataset is not None else args.split or "val")
    if changed:
        print(changed)
    return dataset_dir, ids, part, trained, layout, record


def instance_labels(args, cfg, ids, layout, dataset_dir, reading):
    """The instance labels of the images ``ids`` of ``dataset_dir`` ({id: (labels path, image path)}, from
    ``layout``, layouts.find_layout's), which the DSB2018 score and a --borders run's border target need. A --borders
    run (``cfg``) with images without labels scores the masks alone, for every image, with a note: then {} and
    ``reading`` (dataset.reading_of's) without borders. --tune needs labels for every image: a DataError otherwise.
    Returns (labels, reading)."""
    labels = {i: (path, layout.image(i)) for i, path in zip(ids, map(layout.labels, ids)) if path is not None}
    if args.tune and len(labels) < len(ids):
        missing = [i for i in ids if i not in labels]
        raise DataError(f"--tune scores the DSB2018 score of the nuclei, which needs instance labels, and "
                        f"{len(missing)} of the {len(ids)} validation images of {args.name} have none in "
                        f"{dataset_dir} (e.g. {missing[0]}): give the dataset labels/ (or label images), then tune")
    if cfg.borders and len(labels) < len(ids):  # the border target comes from the labels: score the masks alone
        print(f"note: {len(ids) - len(labels)} of {len(ids)} images have no instance labels in {dataset_dir}: the "
              "masks alone are scored, for every image (no border or DSB2018 score; the border PNGs are written)")
        return {}, {**reading, "borders": False}
    return labels, reading


def scoring_loader(args, cfg, dataset_dir, ids, reading):
    """The DataLoader of the images ``ids`` of ``dataset_dir`` at the run's evaluation size (dataset.eval_loader,
    read as ``reading``; batches of --batch_size, else the run's), after printing the notes on their masks: every one
    empty (pooled scores that read 1 or 0), and for --dataset most pixels foreground or a label id that marks
    separate objects (dataset.mostly_foreground_note, dataset.multi_object_ids_note)."""
    loader = eval_loader(dataset_dir, ids, reading, (cfg.input_h, cfg.input_w, cfg.crop_size),
                         args.batch_size or cfg.batch_size, args.num_workers, kinds=True)
    data = loader.dataset
    if not data.has_foreground():
        print(f"note: every mask of {'these' if len(ids) > 1 else 'this'} {len(ids)} image{'s' * (len(ids) > 1)} is "
              "empty: pooled IoU and Dice read 1 for a network that finds nothing and 0 for one that finds anything "
              "(are these the right masks?)")
    elif args.dataset is not None:  # the run's own images were checked when it trained
        for note in (mostly_foreground_note(data, f"the masks of {dataset_dir}"),
                     multi_object_ids_note(data, f"the label images of {dataset_dir}")):
            if note:
                print(note)
    return loader


def score_and_write(out_dir, cfg, post, labels, overlays, evaluate_with, title, evaluation_yml):
    """Score every image (``evaluate_with(on_batch)``, engine.evaluate) and write the outputs into ``out_dir``,
    which they replace as a whole when complete (files.folder_replaced_when_done): the probability PNGs, the nuclei
    of the ``post`` processing (config.post_processing) scored against the instance ``labels``, the ``overlays`` and
    summary.png (titled ``title``), scores.csv (:class:`ImageWriter`) and evaluation.yml of ``evaluation_yml`` =
    (record, settings, made), as :func:`write_evaluation_record` takes them. Returns (the scores, scores.csv's
    table, the DSB2018 means by separation, {} without labels)."""
    folder = os.path.realpath(out_dir)  # a symbolic link's folder is replaced, not the link
    # the outputs of one evaluation replace the folder as a whole when complete
    with folder_replaced_when_done(folder) as tmp, \
            ImageWriter(tmp, cfg.num_classes, labels, separation_order(post.separation, cfg.borders), post.filters,
                        overlays=overlays) as writer:
        scores = evaluate_with(writer)
        table = writer.write_table(title)  # summary.png's title, without the precision to fit its width
        write_evaluation_record(tmp, *evaluation_yml)
    return scores, table, writer.dsb_means()


def print_size_hint(name, cfg, dataset_dir, ids, reading):
    """For a crop-trained run ``name``: the hint (:func:`size_hint`) when the nuclei of the images ``ids`` of
    ``dataset_dir`` are far from the size it was trained on, which predict.py --scale corrects."""
    trained = training_diameter(name, cfg) if cfg.crop_size else 0.0
    if trained:
        hint = size_hint(dataset_dir, ids, reading, trained)
        if hint:
            print(hint)
