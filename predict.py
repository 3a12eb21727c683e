"""Segment new images with a trained run: masks, probabilities, overlays and one label per nucleus.

    python predict.py --name dsb2018_96_NestedUNet_wDS --input my_images/ --output predictions/
    python predict.py --name dsb2018_96_NestedUNet_wDS --input a.tif b.png --output out/ --instances --overlay

Every image keeps its original size in the outputs. A run trained on resized images (``--crop_size 0``, the
seed's way) sees each image resized to its input_h x input_w, and the probability is resized back (linear).
A run trained on crops predicts at full resolution: the whole image at once (padded to a multiple of 16)
whenever its forward pass fits the memory budget (a quarter of the free RAM, half of a GPU's free memory), else
overlapping windows, as large as the budget allows (or ``--tile`` x ``--tile``), blended with a weight that falls
off linearly over ``--overlap`` pixels towards each window edge, normalised by the summed weights, so there are
no seams.

Images may be grey, RGB, RGBA (alpha dropped) or 16-bit, as PNG/TIFF/JPEG/BMP; they are read and normalised
exactly as in training. For each image ``<id>`` (its file name without the extension) the output folder gets::

    <id>.png             the mask, 0/255, original size
    <id>_prob.png        --save_prob: the probability x 255 (8-bit)
    <id>_overlay.png     --overlay: the image with the outlines of the predicted nuclei
    <id>_instances.png   --instances: 16-bit labels, 0 background, nuclei 1..N
    objects.csv          --instances: one row per nucleus (area, centroid, bounding box; bbox_max is exclusive)

Runs with several classes write ``<id>_class<c>.png`` (and ``_prob``) per class; instances use class 0. A run
trained with ``--borders True`` also predicts where nuclei touch; ``--separation borders`` splits nuclei there.
"""
import argparse
import os

from config import add_amp_arg, add_separation_args
from utils import ArgumentParser, run_cli

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
OBJECT_COLUMNS = ["image", "label", "area", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y",
                  "bbox_max_x"]
OUTLINE = (0, 255, 255)  # BGR yellow


def build_parser():
    p = ArgumentParser(prog="predict.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Segment images (files or folders) with models/<name>/model.pth.")
    p.add_argument("--name", required=True, help="run name (a folder in models/)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help=f"image files and/or folders (their {'/'.join(e[1:] for e in IMAGE_EXTS)} files, any case)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the outputs (created if needed)")
    p.add_argument("--tile", type=int, default=0,
                   help="crop-trained runs: images with more than tile^2 pixels are predicted in tile x tile windows "
                        "(a multiple of 16); 0 = the largest that fits the memory budget, so a whole image whenever "
                        "it fits")
    p.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbouring windows")
    p.add_argument("--tta", action="store_true", help="average the four flips (test-time augmentation)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is a nucleus")
    p.add_argument("--save_prob", action="store_true", help="also write <id>_prob.png (probability x 255)")
    p.add_argument("--overlay", action="store_true", help="also write <id>_overlay.png (outlines on the image)")
    p.add_argument("--instances", action="store_true",
                   help="also write <id>_instances.png (16-bit labels) and objects.csv")
    add_separation_args(p)
    p.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: run only the sub-network up to head X0,L")
    p.add_argument("--batch_size", type=int, default=4, help="windows (or resized images) per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_amp_arg(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def check_args(args):
    from utils import UsageError

    if args.tile < 0 or args.tile % 16:
        raise UsageError(f"--tile {args.tile} must be 0 (from the memory budget) or a positive multiple of 16")
    if args.tile and not 0 <= args.overlap < args.tile:
        raise UsageError(f"--overlap {args.overlap} must be at least 0 and less than --tile ({args.tile})")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not 0 < args.threshold < 1:
        raise UsageError(f"--threshold must be between 0 and 1, got {args.threshold}")


# ------------------------------------------------------------------------------------------------ the inputs

def list_images(paths):
    """Files and folders -> sorted image paths (folders: their image files, not recursive), duplicates removed.

    A path that does not exist, or a folder without images, is a DataError naming it.
    """
    from utils import DataError

    found = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
                           and os.path.isfile(os.path.join(path, f)))
            if not files:
                raise DataError(f"--input {path}: the folder holds no {'/'.join(e[1:] for e in IMAGE_EXTS)} images")
            found += files
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise DataError(f"--input {path}: no such file or folder")
    unique = {}
    for f in found:
        unique.setdefault(os.path.abspath(f), f)
    return list(unique.values())


def image_ids(files, out_dir):
    """The output id of each file (its name without the extension); two inputs with one id, or an output that
    would overwrite an input, are UsageErrors."""
    from utils import UsageError

    ids = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem in ids:
            raise UsageError(f"{ids[stem]} and {f} would both write {stem}.png; predict them into different --output "
                             "folders")
        ids[stem] = f
        mask_path = os.path.abspath(os.path.join(out_dir, stem + ".png"))
        if mask_path == os.path.abspath(f):
            raise UsageError(f"--output {out_dir} would overwrite the input {f}; choose another --output folder")
    return list(ids)


# ---------------------------------------------------------------------------------------------- the network

def blend_weights(height, width, overlap):
    """Weight map float32 [height, width] for blending windows: 1 inside, falling linearly to 1/(overlap+1) at
    the edges over ``overlap`` pixels. Always > 0, so every pixel of the image gets a defined average."""
    import numpy as np

    def ramp(n):
        i = np.arange(n)
        return np.minimum(np.minimum(i + 1, n - i), overlap + 1) / (overlap + 1)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


def window_starts(size, tile, overlap):
    """Start offsets of windows of length min(tile, size) covering 0..size with at least ``overlap`` shared."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def forward_bytes_per_pixel(model, channels, device):
    """Upper bound of the memory one input pixel costs in a forward pass: the bytes of every layer's output on
    a small probe input, per pixel (inference frees most of them; the bound is safe)."""
    import torch

    total = [0]

    def count(module, inputs, output):
        outputs = output if isinstance(output, (list, tuple)) else [output]
        total[0] += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, channels, 64, 64, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total[0] / (64 * 64)


def memory_budget(device):
    """Bytes prediction may use: half of a GPU's free memory, a quarter of the available RAM on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 4


def tile_for_budget(bytes_per_pixel, budget):
    """The side of the largest square window (a multiple of 16, at least 64) whose forward pass fits ``budget``."""
    return max(64, int((budget / max(bytes_per_pixel, 1.0)) ** 0.5) // 16 * 16)


class Predictor:
    """Probabilities for whole images: float32 [K, H, W] in [0, 1] at the image's own size.

    ``predict(image)`` takes the image as training sees it before normalisation: float32 [H, W, C] in [0, 1]
    (:func:`dataset.image_to_float`). ``tile`` None sizes the windows from the memory budget
    (:func:`memory_budget`), so an image is predicted whole whenever it fits; ``amp`` is --amp
    (engine.Precision.choose).
    """

    def __init__(self, model, cfg, device, tile=None, overlap=64, batch_size=4, prune=None, tta=False, amp="auto"):
        from engine import Precision

        self.model, self.cfg, self.device = model, cfg, device
        self.overlap, self.batch_size = overlap, batch_size
        self.prune, self.tta = prune, tta
        self.precision = Precision.choose(device, amp)
        self.model = self.precision.prepare(model)
        if tile is None:
            per_pixel = forward_bytes_per_pixel(self.model, cfg.input_channels, device)
            budget = memory_budget(device)
            tile = tile_for_budget(per_pixel, budget)
            self.batch_size = max(1, min(batch_size, int(budget // (per_pixel * tile * tile))))
        self.tile = tile

    def probabilities(self, batch):
        """Normalised batch [B, C, h, w] (numpy float32) -> probabilities [B, K, h, w] (numpy float32)."""
        import torch

        from engine import forward

        x = torch.from_numpy(batch).to(self.device)
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.precision.autocast():
            out = forward(self.model, x, prune=self.prune, tta=self.tta)
        if isinstance(out, list):
            out = out[-1]
        return torch.sigmoid(out.float()).cpu().numpy()

    def run_batches(self, pieces):
        """Pieces [C, h, w] of one size -> their probabilities, ``batch_size`` at a time."""
        import numpy as np

        out = []
        for i in range(0, len(pieces), self.batch_size):
            out.append(self.probabilities(np.stack(pieces[i:i + self.batch_size])))
        return [o for chunk in out for o in chunk]

    def normalise(self, image):
        import numpy as np

        from dataset import NORM_MEAN, NORM_STD

        return np.ascontiguousarray(((image - NORM_MEAN) / NORM_STD).transpose(2, 0, 1), dtype=np.float32)

    def predict(self, image):
        """float32 [H, W, C] in [0, 1] -> probabilities float32 [K, H, W] in [0, 1], the image's own size."""
        import cv2
        import numpy as np

        height, width = image.shape[:2]
        if not self.cfg.crop_size:  # trained on resized images: predict at the training size, resize back
            small = cv2.resize(image, (self.cfg.input_w, self.cfg.input_h), interpolation=cv2.INTER_LINEAR)
            prob = self.run_batches([self.normalise(small.reshape(small.shape[0], small.shape[1], -1))])[0]
            return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in prob])
        x = self.normalise(image)
        if height * width <= self.tile * self.tile:
            return self.run_batches([x])[0]
        return self.predict_tiled(x)

    def predict_tiled(self, x):
        """Normalised image [C, H, W] -> probabilities [K, H, W] from blended overlapping windows."""
        import numpy as np

        _, height, width = x.shape
        th, tw = min(self.tile, height), min(self.tile, width)
        weight = blend_weights(th, tw, self.overlap)
        corners = [(y, x0) for y in window_starts(height, self.tile, self.overlap)
                   for x0 in window_starts(width, self.tile, self.overlap)]
        from config import output_channels

        total = np.zeros((output_channels(self.cfg), height, width), np.float32)
        weights = np.zeros((height, width), np.float32)
        for i in range(0, len(corners), self.batch_size):
            chunk = corners[i:i + self.batch_size]
            probs = self.probabilities(np.stack([x[:, y:y + th, x0:x0 + tw] for y, x0 in chunk]))
            for (y, x0), p in zip(chunk, probs):
                total[:, y:y + th, x0:x0 + tw] += p * weight
                weights[y:y + th, x0:x0 + tw] += weight
        return total / weights


# ------------------------------------------------------------------------------------------------ the outputs

def display_image(image):
    """float [H, W, C] in [0, 1] -> uint8 BGR [H, W, 3] for drawing."""
    import cv2
    import numpy as np

    img = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)


def draw_outlines(image_bgr, mask, labels=None):
    """The image with the outline of each object (``labels``, int [H, W]) or of the mask (bool [H, W])."""
    import cv2
    import numpy as np

    out = image_bgr.copy()
    if labels is not None:
        from skimage.segmentation import find_boundaries

        out[find_boundaries(labels, mode="inner")] = OUTLINE
        return out
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, OUTLINE, 1)
    return out


def object_rows(img_id, labels):
    """regionprops_table of a label image -> DataFrame with OBJECT_COLUMNS (bbox_max exclusive)."""
    import pandas as pd
    from skimage.measure import regionprops_table

    table = regionprops_table(labels, properties=("label", "area", "centroid", "bbox"))
    frame = pd.DataFrame({
        "image": img_id, "label": table["label"], "area": table["area"].astype(int),
        "centroid_y": table["centroid-0"], "centroid_x": table["centroid-1"],
        "bbox_min_y": table["bbox-0"], "bbox_min_x": table["bbox-1"],
        "bbox_max_y": table["bbox-2"], "bbox_max_x": table["bbox-3"]})
    return frame[OBJECT_COLUMNS]


def write_outputs(args, out_dir, img_id, image, prob, num_classes, filters):
    """Write every requested file for one image; returns (foreground fraction, objects table or None).

    prob: float32 [K, H, W] in [0, 1]; its first ``num_classes`` channels are the mask classes, a channel after
    them (runs trained with --borders True) the touching borders. filters: the min_size / min_confidence
    keyword arguments of instances.split_instances (instances.object_filters).
    """
    import numpy as np

    from instances import split_instances
    from utils import DataError, atomic_imwrite

    masks = prob[:num_classes] > args.threshold
    for c in range(num_classes):
        suffix = "" if num_classes == 1 else f"_class{c}"
        atomic_imwrite(os.path.join(out_dir, f"{img_id}{suffix}.png"), masks[c].astype(np.uint8) * 255)
        if args.save_prob:
            atomic_imwrite(os.path.join(out_dir, f"{img_id}{suffix}_prob.png"),
                           np.round(np.clip(prob[c], 0, 1) * 255).astype(np.uint8))
    labels, objects = None, None
    if args.instances:
        labels = split_instances(prob[0], args.separation, threshold=args.threshold,
                                 **filters,
                                 border=prob[num_classes] if prob.shape[0] > num_classes else None)
        if labels.max() > 65535:
            raise DataError(f"{img_id}: {labels.max()} objects do not fit a 16-bit label image")
        atomic_imwrite(os.path.join(out_dir, f"{img_id}_instances.png"), labels.astype(np.uint16))
        objects = object_rows(img_id, labels)
    if args.overlay:
        atomic_imwrite(os.path.join(out_dir, f"{img_id}_overlay.png"),
                       draw_outlines(display_image(image), masks[0], labels))
    return float(masks[0].mean()), objects


def main(argv):
    args = build_parser().parse_args(argv)
    check_args(args)
    from instances import choose_separation, object_filters

    filters = object_filters(args.min_size, args.min_confidence)
    files = list_images(args.input)
    ids = image_ids(files, args.output)
    import time

    import pandas as pd
    from tqdm import tqdm

    from dataset import decode_image, image_to_float
    from trainer import load_run
    from utils import atomic_write, choose_device

    device = choose_device(args.device)
    cfg, model = load_run(args.name, device, args.prune)
    args.separation = choose_separation(args.separation, cfg.borders, args.name)
    predictor = Predictor(model, cfg, device, args.tile or None, args.overlap, args.batch_size, args.prune, args.tta,
                          args.amp)
    os.makedirs(args.output, exist_ok=True)
    started = time.time()
    fractions, tables, pixels = [], [], 0
    for path, img_id in zip(tqdm(files, desc="predict", unit="img", dynamic_ncols=True), ids):
        image = image_to_float(decode_image(path), cfg.input_channels)
        prob = predictor.predict(image)
        fraction, objects = write_outputs(args, args.output, img_id, image, prob, cfg.num_classes, filters)
        fractions.append(fraction)
        pixels += image.shape[0] * image.shape[1]
        if objects is not None and len(objects):
            tables.append(objects)
    objects_note = ""
    if args.instances:
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=OBJECT_COLUMNS)
        with atomic_write(os.path.join(args.output, "objects.csv")) as f:
            table.to_csv(f, index=False, float_format="%.2f")
        objects_note = f", {len(table)} objects ({args.separation}) in objects.csv"
    seconds = time.time() - started
    how = "resized to %dx%d" % (cfg.input_h, cfg.input_w) if not cfg.crop_size else \
        f"full size, windows up to {predictor.tile}x{predictor.tile}"
    print(f"{args.name}: {len(files)} images ({pixels / 1e6:.2f} Mpx, {how}"
          f"{', TTA' if args.tta else ''}{f', pruned at L={args.prune}' if args.prune else ''}) in {seconds:.1f}s on "
          f"{device} ({predictor.precision.describe()}); mean foreground {100 * sum(fractions) / len(fractions):.1f}%{objects_note}; "
          f"files in {args.output}/")
    return {"images": len(files), "seconds": seconds}


if __name__ == "__main__":
    run_cli(main)
