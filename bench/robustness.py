"""How a run holds up against what microscopes and users' exports do to images: scores on degraded images.

    python bench/robustness.py --name nuclei --limit 0

The validation images of a run (the first ``--limit`` ids of its split.csv, from the run's dataset; or with
``--dataset`` another dataset's), each degraded at two or three severities as a microscope or an export degrades
it (the functions below say how; the labels are never changed), predicted as predict.py predicts them
(inference.Predictor, predict.segment with the run's post-processing) and scored as bench/scale.py scores them:
pooled and mean IoU of the mask and the DSB2018 score, also by image kind (dataset.image_modality of the image as
it was). Each row also gives the mean absolute change a degradation made to the network's input (the image after
the run's --normalization, in [0, 1]): "none" means the model saw exactly the undegraded images, whose
probabilities are then reused, not computed again. Prints a table, then as the last line one JSON object with
every figure.
"""
import hashlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cv2  # noqa: E402  (after the path set-up above)
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from config import load_run_config  # noqa: E402
from image_files import decode_image  # noqa: E402
from inference import Predictor  # noqa: E402
from scale import add_sample_args, load_samples, score  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402

CAMERA_OFFSET = 100  # counts a scientific camera adds to every pixel so that its read noise is never clipped at 0
TWELVE_BITS = 4095


def top_of(image):
    """The largest value ``image``'s type holds (255 for uint8, 65535 for uint16), or its maximum for a float one."""
    return np.iinfo(image.dtype).max if image.dtype.kind in "ui" else float(image.max())


def stored(values, like):
    """float values [H, W, C] rounded and clipped into ``like``'s integer type, as a camera or a file stores them (a
    float image: as they are, float32)."""
    if like.dtype.kind not in "ui":
        return values.astype(np.float32)
    return np.clip(np.rint(values), 0, np.iinfo(like.dtype).max).astype(like.dtype)


def through_file(image, ext, params=()):
    """``image`` [H, W, C] (RGB) written to a file of type ``ext`` with cv2.imwrite's ``params`` and read back as
    predict.py reads it (image_files.decode_image)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image" + ext)
        if not cv2.imwrite(path, image[:, :, ::-1] if image.shape[2] == 3 else image, list(params)):
            raise UsageError(f"OpenCV cannot write a {image.dtype} image as {ext}")
        return decode_image(path)


def identity(image, _, rng):
    """The image as it is (a check: its row must be the undegraded one)."""
    return image


def shot_noise(image, photons, rng):
    """Fewer photons (a shorter exposure, a weaker lamp, a dimmer stain): the brightest pixel collects ``photons``
    photons on average and every pixel the Poisson count of its share, which the camera stores as it is."""
    return stored(rng.poisson(image.astype(np.float64) * (photons / max(float(image.max()), 1e-12))), image)


def defocus(image, sigma, rng):
    """The focal plane missed: the image blurred by a Gaussian of ``sigma`` pixels."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    return stored(blurred.reshape(image.shape), image)  # OpenCV drops a single channel's axis


def vignetting(image, corner, rng):
    """Uneven illumination (a lamp or an objective that lights the field's centre best): the image multiplied by a
    smooth radial fall-off, 1 at the centre and ``corner`` at the corners (quadratic in the distance)."""
    height, width = image.shape[:2]
    y, x = np.mgrid[:height, :width]
    r2 = ((y - (height - 1) / 2) ** 2 + (x - (width - 1) / 2) ** 2) / (((height - 1) / 2) ** 2 + ((width - 1) / 2) ** 2)
    return stored(image * (1 - (1 - corner) * r2)[:, :, None], image)


def background_ramp(image, fraction, rng):
    """Uneven background (out-of-focus light, autofluorescence, a tilted field): a ramp added across the image, 0 at
    its left edge and ``fraction`` of the image's 99.8th percentile at its right, stored in 16 bits so that
    nothing clips (a float image: as floats)."""
    ramp = np.linspace(0, fraction * float(np.percentile(image, 99.8)), image.shape[1])
    return stored(image.astype(np.float64) + ramp[None, :, None],
                  image if image.dtype.kind == "f" else image.astype(np.uint16))


def camera_offset(image, _, rng):
    """A 12-bit camera's image in a 16-bit file (what microscope software saves): the values spread over 12 bits
    (times 15 for an 8-bit image: a gain that keeps the levels exact) plus the camera's offset of 100 counts,
    written as a 16-bit PNG and read back. Percentile normalisation should undo it (input change: none). 8-bit
    images only (main refuses others: a 16-bit image has its camera's range already)."""
    gain = (TWELVE_BITS - CAMERA_OFFSET) // top_of(image)
    return through_file(stored(image * float(gain) + CAMERA_OFFSET, image.astype(np.uint16)), ".png")


def saturation(image, gain, rng):
    """Over-exposure (too much gain or exposure time): the image multiplied ``gain`` times as much as would bring
    its 99.8th percentile (percentile normalisation's top) to the largest value its type holds, and clipped there,
    so that everything brighter than 1/gain of that top flattens: the brightest nuclei first."""
    top = float(np.percentile(image, 99.8))
    return stored(np.minimum(image * (gain * top_of(image) / max(top, 1e-12)), top_of(image)), image)


def jpeg(image, quality, rng):
    """An image emailed or exported for a slide: saved as an 8-bit JPEG of ``quality`` (OpenCV's, 4:2:0 colour) and
    read back (a 16-bit image first scaled from its minimum and maximum to 8 bits, as a viewer exports it)."""
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = stored((image - low) * (255 / max(high - low, 1e-12)), np.zeros(1, np.uint8))
    return through_file(image, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, quality))


def hot_pixels(image, fraction, rng):
    """Hot pixels (a camera's defective or cosmic-ray-hit pixels): ``fraction`` of the pixels, drawn at random, at
    the largest value the image's type holds, in every channel."""
    out = image.copy()
    height, width = image.shape[:2]
    where = rng.choice(height * width, size=max(1, round(fraction * height * width)), replace=False)
    out.reshape(height * width, -1)[where] = top_of(image)
    return out


def sixteen_bit(image, multiplier, rng):
    """An 8-bit image handed over as 16 bits: its values times ``multiplier`` (1: the values kept, as Fiji's 8-bit
    to 16-bit conversion keeps them; 257: stretched to the 16-bit range, as most converters do) in a 16-bit PNG,
    read back."""
    return through_file(stored(image * float(multiplier), image.astype(np.uint16)), ".png")


# name -> (function, [(severity as the table names it, the function's parameter)])
DEGRADATIONS = {
    "identity": (identity, [("-", None)]),
    "shot_noise": (shot_noise, [("30 photons", 30), ("10 photons", 10)]),
    "defocus": (defocus, [("sigma 1 px", 1), ("sigma 2 px", 2), ("sigma 4 px", 4)]),
    "vignetting": (vignetting, [("50 % at corners", 0.5), ("25 % at corners", 0.25)]),
    "background_ramp": (background_ramp, [("0 to 50 % of p99.8", 0.5)]),
    "camera_offset": (camera_offset, [("12 bits + 100", None)]),
    "saturation": (saturation, [("gain 2 over p99.8", 2), ("gain 4 over p99.8", 4)]),
    "jpeg": (jpeg, [("quality 50", 50), ("quality 20", 20)]),
    "hot_pixels": (hot_pixels, [("0.01 %", 1e-4), ("0.1 %", 1e-3)]),
    "sixteen_bit": (sixteen_bit, [("values kept", 1), ("x 257", 257)]),
}
DEFAULT = [name for name in DEGRADATIONS if name != "identity"]


class Remembered:
    """A Predictor that keeps the network inputs of the last images it was given (``inputs``) and gives the
    probabilities it gave for an input (bit for bit) while ``remembering`` was on without running the network again:
    a degradation that leaves the inputs as they were costs nothing."""

    def __init__(self, predictor):
        self.predictor, self.known, self.remembering, self.inputs = predictor, {}, True, []

    def as_input(self, image):
        x = self.predictor.as_input(image)
        self.inputs.append(x)
        return x

    def predict(self, image):
        key = (image.shape, hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest())
        if key in self.known:
            return self.known[key]
        prob = self.predictor.predict(image)
        if self.remembering:
            self.known[key] = prob
        return prob


def build_parser():
    p = ArgumentParser(prog="bench/robustness.py",
                       description="Scores of a run on its validation images degraded as microscopes and exports "
                                   "degrade images (noise, defocus, uneven light, offsets, saturation, JPEG, hot "
                                   "pixels, bit depth).")
    p.add_argument("--degradations", default=",".join(DEFAULT),
                   help=f"comma-separated, of {', '.join(DEGRADATIONS)} (identity: a check)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random degradations (shot noise, hot pixels)")
    add_sample_args(p, "a run (a folder in models/, or nuclei)", 0, "--degradations identity")
    return p


def degrade(originals, function, parameter, seed):
    """originals [(img_id, image, labels)] with each image degraded by ``function`` at ``parameter`` (each image its
    own random draws, the same for every degradation: ``seed`` and its place in the list)."""
    return [(i, function(image, parameter, np.random.default_rng([seed, n])), labels)
            for n, (i, image, labels) in enumerate(originals)]


def input_change(before, after):
    """The mean over the images of the mean absolute change (float) of the network's input, in [0, 1], from each
    image's input [H, W, C] in ``before`` to its degraded copy's in ``after``: 0.0 only when every input is exactly
    as it was."""
    return float(np.mean([np.abs(a - b).mean() for b, a in zip(before, after)]))


def main(argv):
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.degradations.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEGRADATIONS]
    if unknown or not names:
        raise UsageError(f"--degradations {args.degradations}: give some of {', '.join(DEGRADATIONS)}, separated "
                         "by commas (the images as they are are always scored first)")
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    ids, part, originals, kinds, device, cfg, model, options = load_samples(args, load_run_config(args.name))
    wide = next(((i, image.dtype) for i, image, _ in originals if image.dtype != np.uint8), None)
    eight_bit_only = [n for n in ("camera_offset", "sixteen_bit") if n in names]
    if eight_bit_only and wide:
        raise UsageError(f"--degradations {eight_bit_only[0]}: image {wide[0]} is {wide[1]}, and camera_offset and "
                         "sixteen_bit put 8-bit images into 16 bits; leave them out of --degradations")
    predictor = Remembered(Predictor(model, cfg, device, amp=args.amp))
    plans = [(name, *level) for name in names for level in DEGRADATIONS[name][1]]
    rows = []
    for name, severity, parameter in tqdm([("none", "-", None)] + plans, desc="degradations", dynamic_ncols=True):
        samples = originals if name == "none" else degrade(originals, DEGRADATIONS[name][0], parameter, args.seed)
        predictor.inputs = []
        scores = score(predictor, samples, options, kinds)
        if name == "none":  # only the undegraded images' inputs and probabilities are worth keeping
            predictor.remembering, undegraded = False, predictor.inputs
        rows.append({"degradation": name, "severity": severity,
                     "input_change": input_change(undegraded, predictor.inputs),
                     **{k: round(scores[k], 4) for k in ("iou", "iou_mean", "dsb")}, "by_kind": scores["by_kind"]})
    base = rows[0]
    print(f"{args.name}: {len(ids)} images ({part}), each degraded as bench/robustness.py says, on {device} "
          f"({predictor.predictor.precision.describe()}); {cfg.normalization} normalisation; separation "
          f"{options['separation']}")
    print(f"{'degradation':<16} {'severity':<20} {'IoU pooled':>10} {'IoU mean':>9} {'DSB2018':>8} {'vs none':>7} "
          f"{'input change':>12}")
    for r in rows:
        change = f"{r['input_change']:.4f}" if r["input_change"] else "none"
        print(f"{r['degradation']:<16} {r['severity']:<20} {r['iou']:>10.4f} {r['iou_mean']:>9.4f} {r['dsb']:>8.3f} "
              f"{r['dsb'] - base['dsb']:>+7.3f} {change:>12}")
    print("by image kind, mean IoU / DSB2018, undegraded and at each degradation's most severe level:")
    worst = [base] + [r for r, after in zip(rows[1:], rows[2:] + [None])
                      if after is None or after["degradation"] != r["degradation"]]
    for r in worst:
        cells = [f"{kind} ({of_kind['images']}) {of_kind['iou_mean']:.4f} / {of_kind['dsb']:.3f}"
                 for kind, of_kind in r["by_kind"].items()]
        print(f"{r['degradation']:<16} {r['severity']:<20} {' | '.join(cells)}")
    result = {"name": args.name, "images": len(ids), "of": part, "device": str(device), "seed": args.seed,
              "normalization": cfg.normalization, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
