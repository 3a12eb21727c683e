"""Nuclei of another size than the training set's: what predict.py --scale gives back.

    python bench/scale.py --name nuclei --factors 0.5,2,3 --limit 30

Validation images of a crop-trained run (the first ``--limit`` ids of its split.csv, from the run's dataset; or
with ``--dataset`` the images of another dataset, such as the test set), resized by each factor (images linearly,
or by area when shrinking; label images by nearest neighbour), so that their nuclei are that many times as wide as
the network learned, as at another magnification. Each is predicted as it is, with ``--scale 1/factor``, with the
scale a user would read off predict.py (the median diameter of the training split's nuclei over the median
diameter predict.py prints for these images as they are: instances.median_diameter), and with ``--scale auto``
(each image on its own: predict.auto_scaled). Prediction is inference.Predictor, predict.py's path, and
predict.segment for the nuclei with the run's default separation; the scores, against the resized labels: pooled
and mean IoU of the mask, and the DSB2018 score (metrics.dsb_score). Factor 1 is the images as they are. Prints a
table, then as the last line one JSON object with every figure.
"""
import json
import os
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cv2  # noqa: E402  (after the path set-up above)
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoints import load_run  # noqa: E402
from config import (INPUTS_DIR, add_amp_arg, add_device_arg, load_run_config, post_processing,  # noqa: E402
                    saved_run_dir)
from dataset import MODALITIES, image_modality, reading_of  # noqa: E402
from layouts import nucleus_diameter  # noqa: E402
from engine import choose_device  # noqa: E402
from evaluation import evaluation_ids  # noqa: E402
from image_files import NEAREST, decode_image, read_label_image  # noqa: E402
from inference import Predictor  # noqa: E402
from metrics import dsb_score  # noqa: E402
from instances import median_diameter, nucleus_areas  # noqa: E402
from predict import auto_scaled, segment  # noqa: E402
from splits import read_split, split_ids  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402


HOWS = ("as_is", "scaled", "read_off", "auto")  # how each resized image is predicted (module docstring)


def build_parser():
    p = ArgumentParser(prog="bench/scale.py",
                       description="Scores of a crop-trained run on validation images resized by each factor, "
                                   "predicted as they are and with --scale 1/factor.")
    p.add_argument("--factors", default="0.5,2,3", help="comma-separated resize factors of the images")
    add_sample_args(p, "a crop-trained run (a folder in models/, or nuclei)", 30, "--factors 1")
    return p


def add_sample_args(p, run, limit, as_is):
    """The flags that choose the run (``run`` says which kind), its images (``limit``: --limit's default; ``as_is``:
    the flag that scores them as they are), the device and the precision; read by :func:`load_samples`."""
    p.add_argument("--name", required=True, help=run)
    p.add_argument("--limit", type=int, default=limit, help="the first this many validation images (0: all)")
    p.add_argument("--dataset", default=None,
                   help="every image of inputs/<dataset>/ instead of the run's validation split (one it was not "
                        f"trained on, with labels/), e.g. the test set; {as_is} scores it as it is")
    add_device_arg(p)
    add_amp_arg(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


class Samples(NamedTuple):
    """What :func:`load_samples` loads: the images scored and how they are predicted."""
    ids: list
    part: str  # what the images are (evaluation.evaluation_ids)
    originals: list  # [(img_id, image [H, W, C] as decoded, labels int32 [H, W])]
    kinds: list  # the kind of each image (dataset.image_modality)
    device: object
    cfg: object
    model: object
    options: dict  # predict.segment's keywords: predict.py's post-processing for the run


def load_samples(args, cfg):
    """The first ``args.limit`` validation images of run ``args.name`` (config ``cfg``; or of ``args.dataset``) with
    their instance labels, and the run loaded on ``args.device`` (:class:`Samples`); a UsageError when the images
    have no labels/."""
    folder, ids, part, _ = evaluation_ids(args.name, None, args.dataset, cfg, reading_of(cfg))
    ids = ids[:args.limit or None]
    labels_dir = os.path.join(folder, "labels")
    if not os.path.isdir(labels_dir):
        raise UsageError(f"{labels_dir} does not exist: the DSB2018 score needs the instance labels of "
                         f"{folder} (python preprocess_dsb2018.py --img_size 0)")
    device = choose_device(args.device)
    cfg, model = load_run(args.name, device)
    post = post_processing(args.name, cfg)  # predict.py's, the run's own where val.py --tune chose them
    options = dict(num_classes=cfg.num_classes, threshold=0.5, save_prob=False, overlay=False,
                   separation=post.separation, filters=post.filters)
    originals = [(i, decode_image(os.path.join(folder, "images", i + cfg.img_ext)),
                  read_label_image(os.path.join(labels_dir, i + ".png"))) for i in ids]
    return Samples(ids, part, originals, [image_modality(image) for _, image, _ in originals], device, cfg, model,
                   options)


def resized(image, labels, factor):
    """image [H, W, C] and labels int32 [H, W] resized by ``factor`` (at least 16 pixels a side)."""
    height, width = labels.shape
    size = (max(16, round(width * factor)), max(16, round(height * factor)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    labels = cv2.resize(labels.astype(np.int32), size, interpolation=NEAREST)  # int32: ids exact
    return image.reshape(size[1], size[0], -1), labels


def score(predictor, samples, options, kinds, trained=None):
    """Pooled IoU, mean IoU, mean DSB2018 score of ``predictor`` on samples [(img_id, image, labels)], the mean IoU
    and DSB2018 score of each image kind (``kinds``: the kind of each sample, dataset.image_modality), and the
    median diameter of all the nuclei it found (0 when it found none); with ``trained`` (the training nuclei's
    diameter) each image as predict.py --scale auto predicts it, and how many of them it rescaled."""
    inter = union = rescaled = 0
    ious, dsbs, areas = [], [], []
    for img_id, image, labels in samples:
        image = predictor.as_input(image)
        prob, nuclei = predictor.predict(image), None
        if trained:
            prob, scale, nuclei = auto_scaled(predictor, image, prob, trained, options["threshold"],
                                              options["separation"], options["filters"])
            rescaled += scale != 1
        arrays, found = segment(img_id, image, prob, **options, nuclei=nuclei)
        mask, truth = arrays[""] > 0, labels > 0
        i, u = int((mask & truth).sum()), int((mask | truth).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u else 1.0)
        dsbs.append(dsb_score(labels, found))
        areas.append(nucleus_areas(found))
    by_kind = {k: {"images": kinds.count(k), **{name: float(np.mean([v for v, kk in zip(values, kinds) if kk == k]))
                                                for name, values in (("iou_mean", ious), ("dsb", dsbs))}}
               for k in MODALITIES if k in kinds}
    return {"iou": inter / max(union, 1), "iou_mean": float(np.mean(ious)), "dsb": float(np.mean(dsbs)),
            "diameter": median_diameter(np.concatenate(areas)), "by_kind": by_kind,
            **({"rescaled": rescaled} if trained else {})}


def main(argv):
    args = build_parser().parse_args(argv)
    try:
        factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        raise UsageError(f"--factors {args.factors}: give numbers separated by commas, e.g. 0.5,2,3") from None
    if args.limit < 0 or min(factors) <= 0:
        raise UsageError("--limit must be 0 (all) or more and every factor above 0")
    cfg = load_run_config(args.name)
    if not cfg.crop_size:
        raise UsageError(f"{args.name} was trained on resized images; bench/scale.py needs a crop-trained run")
    ids, part, originals, kinds, device, cfg, model, options = load_samples(args, cfg)
    split = read_split(os.path.join(saved_run_dir(args.name), "split.csv"))
    trained = cfg.nucleus_diameter or nucleus_diameter(os.path.join(INPUTS_DIR, cfg.dataset), split_ids(split, "train"),
                                                       cfg.img_ext, cfg.mask_ext)
    rows = []
    for factor in tqdm(factors, desc="factors", dynamic_ncols=True):
        samples = [(i, *resized(image, labels, factor)) for i, image, labels in originals]
        row, scales = {"factor": factor}, {"as_is": 1.0, "scaled": 1 / factor}
        for how in HOWS:
            if how == "read_off":  # what predict.py printed for the images as they are (none found: nothing to read)
                found = row["as_is"]["diameter"]
                scales[how] = trained / found if found else 1.0
            if how == "scaled" and factor == 1:  # the same as "as_is"
                row[how] = row["as_is"]
                continue
            scores = score(Predictor(model, cfg, device, amp=args.amp, scale=scales.get(how, 1.0)), samples, options,
                           kinds, trained if how == "auto" else None)
            row[how] = {**({"scale": round(scales[how], 4)} if how in scales else {}),
                        **{k: (round(v, 4) if k != "by_kind" else v) for k, v in scores.items()}}
        rows.append(row)
    print(f"{args.name}: {len(ids)} images ({part}) resized by each factor, on {device} "
          f"({Predictor(model, cfg, device, amp=args.amp).precision.describe()}); separation {options['separation']}; "
          f"training nuclei {trained:.1f} px across (median)")
    print(f"{'factor':>6}  {'as they are: IoU pooled / mean, DSB2018':>40}  {'--scale 1/factor':>24}  "
          f"{'--scale read off (S)':>30}  {'--scale auto':>35}")
    for r in rows:
        cells = [f"{r[h]['iou']:.4f} / {r[h]['iou_mean']:.4f}, {r[h]['dsb']:.3f}" for h in HOWS]
        print(f"{r['factor']:>6g}  {cells[0]:>40}  {cells[1]:>24}  {cells[2]:>22} ({r['read_off']['scale']:.2f})  "
              f"{cells[3]:>22} ({r['auto']['rescaled']} rescaled)")
        for kind, of_kind in r["as_is"]["by_kind"].items():  # the four ways in the same order
            cells = [f"{r[h]['by_kind'][kind]['iou_mean']:.4f}, {r[h]['by_kind'][kind]['dsb']:.3f}" for h in HOWS]
            print(f"{'':>6}  {kind} ({of_kind['images']} images), mean IoU, DSB2018: {' | '.join(cells)}")
    result = {"name": args.name, "images": len(ids), "of": part, "device": str(device),
              "trained_diameter": round(trained, 2), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
