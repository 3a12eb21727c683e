"""val.py --tune: the post-processing (separation x --min_confidence, a fixed grid) that gives a run's own validation
images the best mean DSB2018 score, written to models/<name>/postprocessing.yml, which val.py and predict.py then take
as that run's defaults (config.post_processing). --min_size stays the default: it counts pixels at the size the nuclei
are separated at, which predict.py --scale and a run trained on resized images change (config.TUNED_KEYS).

The network runs once. Each image's nuclei are separated once per separation with no filter: a filter only drops
whole objects, and the IoU of a predicted nucleus with a true one depends on those two alone, so every combination's
score follows from each object's size, mean probability and best IoU with a true nucleus, without separating again.
"""
import os
from datetime import datetime, timezone

import numpy as np
import yaml

from config import SEPARATIONS, TUNED_FILE, TUNED_KEYS, choose_separation, object_filters, run_dir
from layouts import read_instance_labels
from evaluation import MIN_IMAGES_FOR_INTERVAL, SEPARATION_NAMES, bootstrap_interval
from files import atomic_write
from image_files import resize_labels
from inference import host_probabilities
from instances import border_map, mean_probability, split_instances
from metrics import object_iou, true_positives
from utils import BatchedThreads, progress_bar

CONFIDENCES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)  # MIN_CONFIDENCE and LovaszHingeLoss's 0 among them


def grid_separations(borders):
    """The separations to try: 'borders' only for a run trained with --borders True."""
    return [m for m in SEPARATIONS if m != "borders" or borders]


def image_objects(prob, border, truth, methods):
    """One image's objects for the grid: (its number of true nuclei, {method: float [3, N]}: for each of the N
    objects of ``method`` without filters, its best IoU with a true nucleus, its area (pixels) and its mean
    probability). prob float [H, W] in [0, 1], border the border map [H, W] or None, truth int [H, W] instance
    labels."""
    objects = {}
    for method in methods:
        labels = split_instances(prob, method, min_size=0, min_confidence=0, border=border)
        iou = object_iou(truth, labels)
        best = iou.max(0) if len(iou) else np.zeros(iou.shape[1])
        objects[method] = np.stack([best, np.bincount(labels.ravel(), minlength=iou.shape[1] + 1)[1:],
                                    mean_probability(labels, prob)])
    return len(np.unique(truth[truth > 0])), objects


def filtered_score(n_true, objects, min_size, min_confidence):
    """The DSB2018 score (metrics.dsb_score) of one image's nuclei after the filters --min_size ``min_size`` and
    --min_confidence ``min_confidence``: ``objects`` float [3, N] of
    :func:`image_objects` (a true and a predicted nucleus match at IoU > 0.5 or more, one to one, so each object's best
    IoU is all that counts), ``n_true`` its true nuclei."""
    best, area, confidence = objects
    keep = (area >= max(min_size, 1)) & ((confidence >= min_confidence) if min_confidence > 0 else True)
    n_pred = int(np.count_nonzero(keep))
    if n_true == 0 and n_pred == 0:
        return 1.0
    matched = true_positives(best[None, keep])
    return float((matched / (n_true + n_pred - matched)).mean())


class ObjectCollector:
    """``engine.evaluate``'s ``on_batch`` for val.py --tune: each image's objects (:func:`image_objects`) for
    ``methods``, its true nuclei read from ``labels`` {img_id: (label file, image file)} (every scored image has
    them) and resized to the probabilities' size; the mask classes K come first among the channels (``classes``), a
    border channel after them. The work runs in threads as evaluation.ImageWriter's does; use it as a context
    manager."""

    def __init__(self, classes, labels, methods, workers=None, buffer_mb=256):
        self.classes, self.labels, self.methods = classes, labels, methods
        self.images = []
        self.jobs = BatchedThreads(self._keep, buffer_mb, workers, desc="nuclei to tune on")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.jobs.close()

    def __call__(self, meta, images, logits, masks, scores):
        for img_id, prob in zip(meta["img_id"], host_probabilities(logits)):
            self.jobs.submit(self._objects, img_id, prob, nbytes=prob.nbytes)

    def _objects(self, img_id, prob):
        """:func:`image_objects` of one image; prob float [K(+1), H, W] in [0, 1]."""
        truth = resize_labels(read_instance_labels(*self.labels[img_id]), prob.shape[1:])
        return image_objects(prob[0], border_map(prob, self.classes), truth, self.methods)

    def _keep(self, objects):
        self.images.append(objects)

    def results(self):
        """Wait for the images still being separated; returns [(n_true, {method: objects})], one per image."""
        self.jobs.flush()
        return self.images


def choose(images, name, cfg):
    """The grid's best for run ``name`` (config ``cfg``) on ``images`` (:meth:`ObjectCollector.results`), at the
    default --min_size, and whether it is kept: {'best': {separation, min_confidence}, 'chosen': the best when the
    95 % bootstrap interval of its gain over the defaults per image lies above 0 (at least MIN_IMAGES_FOR_INTERVAL
    images), else the defaults, 'defaults': the two as config.post_processing has them without a tuned file,
    'scores': {(separation, min_confidence): mean DSB2018 score}, 'gains': float [N], each image's score with the best
    minus with the defaults, 'interval': that interval (None with fewer images, or when the defaults are the best),
    'grid': the values tried}. Of combinations that tie, the one that keeps most of the defaults is the best (the
    defaults themselves first), then the first in the grid's order.

    The best of 21 combinations on these very images follows them: where some images reverse its gain (0 within the
    interval), it did not hold on other images of the same kind (docs/results.md, "Per run: val.py --tune")."""
    grid = {"separation": grid_separations(cfg.borders), "min_confidence": list(CONFIDENCES)}
    filters = object_filters(loss=cfg.loss)
    defaults = {"separation": choose_separation(None, cfg.borders, name), "min_confidence": filters["min_confidence"]}
    combinations = [(m, c) for m in grid["separation"] for c in grid["min_confidence"]]
    per_image = {(m, c): np.array([filtered_score(n_true, objects[m], filters["min_size"], c)
                                   for n_true, objects in images])
                 for m, c in progress_bar(combinations, desc="grid", unit="combination", leave=False)}
    scores = {c: float(s.mean()) for c, s in per_image.items()}
    default = tuple(defaults[k] for k in TUNED_KEYS)
    best = max(scores, key=lambda c: (scores[c], sum(v == d for v, d in zip(c, default))))
    gains = per_image[best] - per_image[default]
    interval = bootstrap_interval(gains) if best != default and len(images) >= MIN_IMAGES_FOR_INTERVAL else None
    kept = best if interval is not None and interval[0] > 0 else default
    return {"best": dict(zip(TUNED_KEYS, best)), "chosen": dict(zip(TUNED_KEYS, kept)), "defaults": defaults,
            "scores": scores, "gains": gains, "interval": interval, "grid": grid}


def write_choice(name, choice, images, weights_sha256):
    """models/<name>/postprocessing.yml (atomically): the chosen two (:func:`choose`), the grid's best, the scores of
    the defaults, the choice and the best, the interval of the best's gain, the number of validation ``images``, the
    date, the grid, and the SHA-256 of the weights it was chosen for (config.tuned_post_processing ignores it for
    others); returns its path."""
    chosen, defaults, scores, best = choice["chosen"], choice["defaults"], choice["scores"], choice["best"]
    record = {**chosen,
              "dsb": {"tuned": scores[tuple(chosen.values())], "defaults": scores[tuple(defaults.values())],
                      "best": scores[tuple(best.values())]},
              "best": best, "best_gain_interval": list(choice["interval"]) if choice["interval"] else None,
              "defaults": defaults, "val_images": images, "weights_sha256": weights_sha256,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "grid": choice["grid"]}
    path = os.path.join(run_dir(name), TUNED_FILE)
    with atomic_write(path) as f:
        yaml.safe_dump(record, f, sort_keys=False)
    return path


def describe(settings):
    """'watershed, min_confidence 0.85' of {separation, min_confidence}."""
    return f"{settings['separation']}, min_confidence {settings['min_confidence']:g}"


def tuning_table(title, choice, images, path):
    """The lines val.py --tune prints: the defaults' score, the best of each separation, the grid's best with the
    interval of its gain, and what was chosen (:func:`choose`) and why."""
    scores, defaults, chosen, best = choice["scores"], choice["defaults"], choice["chosen"], choice["best"]
    default_score, best_score = scores[tuple(defaults.values())], scores[tuple(best.values())]
    lines = [f"{title}: post-processing tuned on validation, mean DSB2018 score of the {images} images for each of "
             f"{len(scores)} combinations:",
             f"  defaults                         {describe(defaults):32} {default_score:.4f}"]
    for method in choice["grid"]["separation"]:
        top = max((c for c in scores if c[0] == method), key=scores.get)
        lines.append(f"  best with {SEPARATION_NAMES[method]:22} {describe(dict(zip(TUNED_KEYS, top))):32} "
                     f"{scores[top]:.4f}")
    if best == defaults:
        lines.append("  chosen: the defaults, the best of the grid")
    elif choice["interval"] is None:
        lines.append(f"  best: {describe(best)}, {best_score - default_score:+.4f} over the defaults on only "
                     f"{images} images, too few to tell a gain from chance (at least {MIN_IMAGES_FOR_INTERVAL}): "
                     "chosen: the defaults")
    else:
        low, high = choice["interval"]
        lines.append(f"  best: {describe(best)}, {best_score - default_score:+.4f} over the defaults (95 % interval of "
                     f"the gain per image, bootstrap over the {images} images: {low:+.4f} to {high:+.4f})")
        lines.append(f"  chosen: {describe(best)}: it gains on nearly every image" if chosen == best else
                     "  chosen: the defaults: 0 lies within that interval, and such gains did not hold on other "
                     "images of the same kind (docs/results.md)")
    lines.append(f"  wrote {path}: val.py and predict.py use its choice for this run where no flag says otherwise")
    return "\n".join(lines)
