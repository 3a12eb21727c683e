"""How often predict.py --track keeps a nucleus in one track: a time-lapse made of a labelled image.

    python bench/track.py --name nuclei --dataset dsb2018_full --images <id>,<id>,...

Each image (grey) and its label image are shifted by ``--shift`` (rows, columns) pixels a frame over ``--frames``
frames (np.roll), so that every nucleus moves as a whole and its true identity is known in each frame. The
time-lapse goes through ``predict.py --instances --track IOU`` (the run's own separation and filters). A true
nucleus is *found* in a frame when a predicted nucleus covers most of its covered pixels there, and *kept* when that
predicted label is one and the same in every frame. Nuclei that touch the image's edge in some frame (np.roll
wraps them to the other side) are left out. Prints a line per image and one for all, then one JSON object with
every figure.
"""
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  (after the path set-up above)
import tifffile  # noqa: E402

import predict  # noqa: E402
from config import dataset_folder  # noqa: E402
from image_files import decode_image  # noqa: E402
from layouts import find_layout  # noqa: E402
from utils import ArgumentParser, UsageError, run_cli  # noqa: E402


def build_parser():
    p = ArgumentParser(prog="bench/track.py", description="Tracks of predict.py --track on a labelled image moved "
                                                          "frame by frame, against the nuclei's true identities.")
    p.add_argument("--name", default="nuclei", help="the run that predicts (a folder in models/, or nuclei)")
    p.add_argument("--dataset", default="dsb2018_full", help="a dataset with instance labels (inputs/<dataset>)")
    p.add_argument("--images", required=True, help="comma-separated ids of the images to move")
    p.add_argument("--frames", type=int, default=10, help="frames of the time-lapse")
    p.add_argument("--shift", default="1,2", help="rows,columns a nucleus moves a frame")
    p.add_argument("--iou", type=float, default=0.3, help="predict.py --track's intersection over union")
    p.add_argument("--device", default="auto", help="predict.py --device")
    return p


def moved(array, frames, shift):
    """``array`` [H, W] rolled by ``shift`` (rows, columns) times each frame's index: [frames, H, W]."""
    return np.stack([np.roll(array, (t * shift[0], t * shift[1]), axis=(0, 1)) for t in range(frames)])


def kept_tracks(truth, tracked):
    """Of the true nuclei of ``truth`` [T, H, W] (labels, 0 background) that touch no image edge in any frame: how
    many, how many are found in every frame (the predicted label covering most of their covered pixels there), and
    how many of those keep one predicted label of ``tracked`` [T, H, W] through all frames."""
    edges = np.zeros(truth.shape[1:], bool)
    edges[[0, -1], :] = edges[:, [0, -1]] = True
    touching = set(np.unique(truth[:, edges])) | {0}
    inside = [k for k in np.unique(truth) if k not in touching]
    found = kept = 0
    for k in inside:
        labels = []
        for t in range(len(truth)):
            covered = tracked[t][(truth[t] == k) & (tracked[t] > 0)]
            labels.append(int(np.bincount(covered).argmax()) if covered.size else 0)
        found += all(labels)
        kept += all(labels) and len(set(labels)) == 1
    return len(inside), found, kept


def track_image(args, layout, img_id, shift):
    """Image ``img_id`` of ``layout`` moved into a time-lapse and predicted with --track: :func:`kept_tracks`'s
    (nuclei, found, kept) and the number of tracks predicted."""
    if layout.labels(img_id) is None:
        raise UsageError(f"--images: {img_id} has no instance labels in {layout.dataset_dir}; give ids that have them")
    image = decode_image(layout.image(img_id))
    truth = moved(layout.read_labels(img_id), args.frames, shift)
    lapse = moved(image[..., 0] if image.ndim == 3 else image, args.frames, shift)
    with tempfile.TemporaryDirectory() as folder:
        tifffile.imwrite(os.path.join(folder, "lapse.tif"), lapse, imagej=True, metadata={"axes": "TYX"})
        predict.main(["--name", args.name, "--input", os.path.join(folder, "lapse.tif"), "--output",
                      os.path.join(folder, "out"), "--instances", "--track", str(args.iou), "--device", args.device])
        tracked = tifffile.imread(os.path.join(folder, "out", "lapse_instances.tif"))
    return (*kept_tracks(truth, tracked), int(len(np.unique(tracked)) - 1))


def main(argv):
    args = build_parser().parse_args(argv)
    shift = tuple(int(s) for s in args.shift.split(","))
    layout = find_layout(dataset_folder(args.dataset))
    rows = {}
    for img_id in args.images.split(","):
        rows[img_id] = dict(zip(("nuclei", "found_in_every_frame", "kept_one_track", "tracks"),
                                track_image(args, layout, img_id, shift)))
        print(f"{img_id}: {rows[img_id]}")
    total = {key: sum(row[key] for row in rows.values()) for key in next(iter(rows.values()))}
    print(f"{total['nuclei']} nuclei away from the edges, {total['found_in_every_frame']} found in all {args.frames} "
          f"frames, {total['kept_one_track']} of those kept one track through all of them")
    summary = {"bench": "track", "run": args.name, "frames": args.frames, "shift": shift, "iou": args.iou,
               "images": rows, "all": total}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
