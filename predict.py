"""Segment new images with a trained run: masks, probabilities, overlays and one label per nucleus.

    python predict.py --name dsb2018_96_NestedUNet_wDS --input my_images/ --output predictions/
    python predict.py --name dsb2018_96_NestedUNet_wDS --input a.tif b.png --output out/ --instances --overlay

Every image keeps its original size in the outputs (inference.py: resized for a run trained on resized images,
whole or in blended windows within a memory budget for a crop-trained run). plane_outputs.py writes them, a stack's
page by page as its planes come, and gathers the rows and nuclei of the planes; predict_notes.py words what is printed
beside them.

Images may be grey, RGB, RGBA (alpha dropped) or 16-bit, as PNG/TIFF/JPEG/BMP; they are read and normalised
exactly as in training. For each image ``<id>`` (its file name without the extension) the output folder gets::

    <id>.png             the mask, 0/255, original size
    <id>_prob.png        --save_prob: the probability x 255 (8-bit)
    <id>_overlay.png     --overlay: the image with the outlines of the predicted nuclei
    <id>_instances.png   --instances: 16-bit labels, 0 background, nuclei 1..N
    <id>_rois.zip        --rois (implies --instances): each nucleus as an ImageJ ROI named by its label, for Fiji's
                         ROI Manager (rois.py)
    <id>.geojson         --geojson (implies --instances): each nucleus as a GeoJSON detection named by its label, for
                         QuPath's File > Import objects (geojson_objects.py)
    objects.csv          --instances: one row per nucleus (measurements.py: image, plane, t, z, label, area,
                         centroid, bounding box with bbox_max exclusive, intensity (of each channel with --channel),
                         shape, confidence)
    images.csv           --instances: one row per image predicted, also one without nuclei (measurements.py: image,
                         plane, t, z, size, scale, foreground of class 0, its nuclei and their mean and median area,
                         the pixel size; then those areas in square micrometres)
    prediction.yml       what made the outputs (prediction_record): the run, the SHA-256 of its weights and of its
                         config.yml, the command and its --input, the toolkit's git commit, the settings, how many
                         images were predicted and left out. It is the last prediction's, written at its end; one
                         that stops before its end leaves none, so that no record passes for the files it mixes.
                         Predictions that share a folder (an array job's shards without --instances) leave the
                         record of the one that ended last, naming its --input only.
    .predict_finished/   while a prediction runs: a record of each image whose files are all written, its rows
                         included (finished_images.py), so that ``--resume`` goes on with a prediction that stopped;
                         removed at its end.

A TIFF stack (time points, z planes or pages; image_files.tiff_layout) is segmented plane by plane, each plane
as an image of its own, and gives ImageJ TIFF stacks instead, one page per plane: ``<id>.tif``,
``<id>_prob.tif``, ``<id>_overlay.tif`` (RGB), ``<id>_instances.tif`` (each plane's nuclei numbered 1..N on their
own: no tracking between planes), and one ``<id>_rois.zip`` and ``<id>.geojson`` (each nucleus named
``<plane>-<label>``, at its plane);
objects.csv's and images.csv's ``plane`` counts from 0 (0 for every 2D image), objects.csv's ``t`` and ``z`` give its
time point and z plane. ``--stitch_z IOU`` links the nuclei of a stack's z planes instead (instances.link_planes): a
nucleus that overlaps one of the plane before with an intersection over union of at least IOU takes its label, so
that ``image``, ``t`` and ``label`` name one nucleus in 3D in all of these outputs (each time point's numbered 1..N).
``--track IOU`` links the nuclei of a time-lapse's time points the same way, so that ``image`` and ``label`` name one
nucleus through time (a track; one that appears, or splits, starts a new one).
``--pixel_size UM``, or else a TIFF's own ImageJ or OME calibration (image_files.tiff_pixel_size), gives both tables'
``pixel_size_um`` and objects.csv's area and lengths in micrometres (``_um2``, ``_um``; empty without a pixel
size), and calibrates the TIFF stacks written.
``--channel K`` reads channel K of multi-channel images (a TIFF's C axis, or a colour of RGB) as a grey image, and
objects.csv measures their nuclei in every channel c too (``mean_intensity_c<c>``, ``integrated_intensity_c<c>``;
empty for an image without channel c, such as a grey one), e.g. nuclei on DAPI in channel 0, a marker in channel 1.

Runs with several classes write ``<id>_class<c>.png`` (and ``_prob``) per class; instances use class 0. A run
trained with ``--borders True`` also predicts where nuclei touch; ``--separation borders`` splits nuclei there.
"""
import math
import os
import shlex
import sys
import time
from contextlib import ExitStack, nullcontext, suppress
from datetime import datetime, timezone
from functools import partial

import numpy as np
import yaml

from config import (add_amp_arg, add_device_arg, add_ensemble_arg, add_separation_args, check_object_filters,
                    load_run_config, post_processing, prediction_settings, saved_run_dir)
from files import atomic_write, check_output_folder, remove_killed_writes, written_alone
from finished_images import finished_count, forget_finished, json_ready, read_finished, record_finished
from image_files import (CELLPOSE_NOT_IMAGES, PIXEL_SIZES, TIFF_EXTS, TiffHeader, nucleus_channel, read_planes,
                         tiff_header)
from instances import AUTO_SCALE_BAND, auto_scale, border_map, median_diameter, nucleus_areas, split_instances
from measurements import TABLES, image_row, object_rows, write_tables
from plane_outputs import MOST_LABELS, Gathered, objects_table, output_name, plane_grid, write_image
from predict_notes import (closing_notes, grey_channel_note, holds_outputs, left_out_error, noted_when_stopped,
                           nothing_predicted_error, pixel_size_warnings, replaced_rows_note, resumed_note, stitch_notes,
                           stitched_line, summary_line, tiff_notes, track_notes, tracked_line)
from geojson_objects import nucleus_features
from rois import nucleus_rois
from utils import (ArgumentParser, BatchedThreads, DataError, UsageError, check_run_name, check_utf8_names, first_few,
                   float_or_auto, path_arg, printable_path, progress_bar, run_cli)
from visualize import draw_outlines, to_bgr

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
# Cellpose's outputs beside an image <id>: _cp_masks before _masks, whose ending it shares
CELLPOSE_OUTPUTS = ("_cp_masks", "_cp_output", "_outlines", "_dP") + CELLPOSE_NOT_IMAGES
PREDICTION_FILE = "prediction.yml"
# prediction.yml's pixel_size without --pixel_size: where each image's came from (images.csv holds them)
PIXEL_SIZE_READ = "each TIFF's own calibration, none for other images (images.csv: each image's)"


def build_parser():
    p = ArgumentParser(prog="predict.py",
                       description="Segment images (files or folders) with models/<name>/model.pth.")
    g = p.add_argument_group("what to segment")
    g.add_argument("--name", required=True, help="run name: a folder in models/, or nuclei (the bundled model)")
    add_ensemble_arg(g)
    g.add_argument("--input", type=path_arg, required=True, nargs="+", metavar="PATH",
                   help=f"image files and/or folders (their {'/'.join(e[1:] for e in IMAGE_EXTS)} files, any case)")
    g.add_argument("--output", type=path_arg, required=True, metavar="DIR",
                   help="folder for the outputs (created if needed)")
    g.add_argument("--resume", action="store_true",
                   help="go on with a prediction into --output that stopped before its end (Ctrl-C, a signal, a "
                        "batch job's time limit): the images it finished, unchanged since, are not predicted again, "
                        "and the tables get every image's rows; it needs the same run and flags. With no stopped "
                        "prediction there, every image is predicted (one command for a requeued job)")
    g.add_argument("--channel", type=int, default=None, metavar="K",
                   help="the nucleus channel of multi-channel images (0-based; RGB: 0 red, 1 green, 2 blue), read as "
                        "a grey image (grey images are read as they are); needed for TIFFs with other than 1 or 3 "
                        "channels. --instances then measures the nuclei in every channel (objects.csv's _c<c> "
                        "columns)")
    g.add_argument("--pixel_size", type=float, default=None, metavar="UM",
                   help="micrometres per pixel of every input, for objects.csv's _um columns and the TIFF stacks' "
                        "calibration; default: each TIFF's own ImageJ or OME calibration where it has one (square "
                        "pixels), none for other images (their _um columns empty)")
    g = p.add_argument_group("what to write besides the masks")
    g.add_argument("--instances", action="store_true",
                   help="also write <id>_instances.png (16-bit labels) and objects.csv, and count the nuclei of "
                        "each image in images.csv")
    g.add_argument("--rois", action="store_true",
                   help="also write <id>_rois.zip: each nucleus as an ImageJ ROI enclosing exactly its pixels, named "
                        "by its label in objects.csv, for Fiji's ROI Manager (implies --instances)")
    g.add_argument("--geojson", action="store_true",
                   help="also write <id>.geojson: each nucleus as a GeoJSON detection enclosing exactly its pixels, "
                        "named by its label in objects.csv, for QuPath's File > Import objects (implies --instances)")
    g.add_argument("--overlay", action="store_true", help="also write <id>_overlay.png (outlines on the image)")
    g.add_argument("--save_prob", action="store_true", help="also write <id>_prob.png (probability x 255)")
    g = p.add_argument_group("how the masks and nuclei are made")
    g.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is a nucleus")
    add_separation_args(g)
    g.add_argument("--scale", type=float_or_auto, default=1.0,
                   help="crop-trained runs: predict each image resized by this factor, so that its nuclei have the "
                        "size the run was trained on (e.g. 0.5 for nuclei twice as wide as in training); auto = "
                        "predict each image as it is, and again resized when its nuclei are more than "
                        f"{AUTO_SCALE_BAND:g} times as wide or as narrow as the run's training nuclei")
    g.add_argument("--stitch_z", type=float, default=None, metavar="IOU",
                   help="with --instances: a nucleus of a z-stack's plane continues the one of the plane before that "
                        "it overlaps with at least this intersection over union (above 0, at most 1; e.g. 0.5; one to "
                        "one, best first), so that <id>_instances.tif, objects.csv and the ROIs give it one label "
                        "through z (each time point numbered 1..N); default: each plane's nuclei numbered on their "
                        "own")
    g.add_argument("--track", type=float, default=None, metavar="IOU",
                   help="with --instances: a nucleus of a time-lapse's time point continues the one of the time point "
                        "before that it overlaps with at least this intersection over union (above 0, at most 1; "
                        "e.g. 0.3 for nuclei that move less than their radius between frames), so that it keeps one "
                        "label through time (a track: one that appears, or a daughter after a division, starts a new "
                        "one; no gaps are closed); 2D time-lapses; default: each time point's nuclei numbered on "
                        "their own")
    g.add_argument("--tta", action="store_true", help="average the four flips (test-time augmentation)")
    g.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: run only the sub-network up to head X0,L")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--tile", type=int, default=0,
                   help="crop-trained runs: images with more than tile^2 pixels are predicted in tile x tile windows "
                        "(a multiple of 16); 0 = the largest that fits the memory budget, so a whole image whenever "
                        "it fits")
    g.add_argument("--overlap", type=int, default=64,
                   help="crop-trained runs: pixels shared by neighbouring windows (at most half a window sized from "
                        "the budget)")
    g.add_argument("--batch_size", type=int, default=4,
                   help="windows per forward pass (a run trained on resized images predicts one image at a time)")
    add_device_arg(g)
    add_amp_arg(g)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def check_args(args):
    args.instances = args.instances or args.rois or args.geojson
    for other in args.ensemble:
        check_run_name(other, "--ensemble")
    if args.tile < 0 or args.tile % 16:
        raise UsageError(f"--tile {args.tile} must be 0 (from the memory budget) or a positive multiple of 16")
    if args.overlap < 0:
        raise UsageError(f"--overlap {args.overlap} must be at least 0")
    if args.scale != "auto" and not 0.05 <= args.scale <= 20:
        raise UsageError(f"--scale {args.scale} must be between 0.05 and 20 (1 = the image as it is)")
    if args.channel is not None and args.channel < 0:
        raise UsageError(f"--channel {args.channel} must be 0 or more (0 = the first channel)")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not 0 < args.threshold < 1:
        raise UsageError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.stitch_z is not None and not 0 < args.stitch_z <= 1:
        raise UsageError(f"--stitch_z {args.stitch_z:g} must be an intersection over union above 0 and at most 1 "
                         "(e.g. 0.5)")
    if args.stitch_z is not None and not args.instances:
        raise UsageError("--stitch_z links the nuclei of --instances through the z planes: add --instances")
    if args.track is not None and not 0 < args.track <= 1:
        raise UsageError(f"--track {args.track:g} must be an intersection over union above 0 and at most 1 (e.g. 0.3)")
    if args.track is not None and not args.instances:
        raise UsageError("--track links the nuclei of --instances through the time points: add --instances")
    if args.pixel_size is not None and not PIXEL_SIZES[0] <= args.pixel_size <= PIXEL_SIZES[1]:
        raise UsageError(f"--pixel_size {args.pixel_size:g} must be micrometres per pixel between {PIXEL_SIZES[0]:g} "
                         f"and {PIXEL_SIZES[1]:g} (e.g. 0.325), or left out to read each TIFF's calibration")
    shaping = [flag for flag, given in (("--separation", args.separation is not None),
                                        ("--min_size", args.min_size is not None),
                                        ("--min_confidence", args.min_confidence is not None)) if given]
    if shaping and not (args.instances or args.scale == "auto"):  # --scale auto measures the nuclei it finds
        several = len(shaping) > 1
        raise UsageError(f"{' and '.join(shaping)} shape{'' if several else 's'} the nuclei of --instances (and "
                         f"of --scale auto); the mask does not depend on {'them' if several else 'it'}: add "
                         "--instances")
    check_output_folder(args.output)
    same = [p for p in args.input if os.path.isdir(p) and os.path.realpath(p) == os.path.realpath(args.output)]
    if same:  # the masks would lie among the images, and the next run would read them as images
        raise UsageError(f"--output {args.output} is the --input folder {same[0]}; write the outputs to a folder of "
                         "their own (a subfolder is fine)")


# ------------------------------------------------------------------------------------------------ the inputs

def list_images(paths, output=None):
    """Files and folders -> image paths in the order given (a folder: its image files sorted, not recursive),
    duplicates removed. A folder's subfolders are named in a note, but for ``output`` (--output, which may be a
    subfolder of an input folder: its masks are not images to segment).

    A path that does not exist, or a folder without images, is a DataError naming it.
    """
    found = []
    for path in paths:
        if os.path.isdir(path):
            subfolders = sorted(f for f in os.listdir(path) if os.path.isdir(os.path.join(path, f))
                                and not f.startswith(".") and not (output and os.path.isdir(output) and
                                                                   os.path.samefile(os.path.join(path, f), output)))
            if subfolders:
                subfolders = [printable_path(f) for f in subfolders]
                print(f"note: the subfolders of {printable_path(path)} are not searched ({', '.join(subfolders[:3])}"
                      f"{' ...' if len(subfolders) > 3 else ''}); give them as --input too")
            # a broken link counts, so that reading it names it among the files left out
            names = [f for f in os.listdir(path) if not f.startswith(".") and not os.path.isdir(os.path.join(path, f))]
            files = sorted(os.path.join(path, f) for f in names if f.lower().endswith(IMAGE_EXTS))
            others = [printable_path(f) for f in names if not f.lower().endswith(IMAGE_EXTS)]
            if others:
                print(f"note: {printable_path(path)}: {len(others)} file{'s' * (len(others) != 1)} not named like "
                      f"{'/'.join(e[1:] for e in IMAGE_EXTS)} images left out ({first_few(others)}); give one as "
                      "--input to try reading it")
            if not files:
                raise DataError(f"--input {path}: the folder holds no {'/'.join(e[1:] for e in IMAGE_EXTS)} images")
            companions = cellpose_companions(files)
            if companions:
                print(f"note: {printable_path(path)}: {len(companions)} Cellpose label, flow or output file"
                      f"{'s' * (len(companions) != 1)} beside {'their images' if len(companions) != 1 else 'its image'}"
                      f" left out ({first_few([printable_path(os.path.basename(f)) for f in companions])}); give one "
                      "as --input to segment it")
            left_out = set(companions)
            found += [f for f in files if f not in left_out]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise DataError(f"--input {path}: no such file or folder")
    check_utf8_names(found)
    unique = {}
    for f in found:
        unique.setdefault(os.path.abspath(f), f)
    return list(unique.values())


def cellpose_companions(files):
    """The files of a folder's image ``files`` that Cellpose keeps beside the image <id>_img or <id> (layouts.py's
    Cellpose layouts, and what Cellpose writes there: <id>_cp_masks, _cp_output, _outlines, _flows, _dP): label
    images, flows and pictures, which segmented as images would give nonsense nuclei under names like a label
    image's."""
    stems = {os.path.splitext(os.path.basename(f))[0] for f in files}
    companions = []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        image = next((stem[:-len(end)] for end in CELLPOSE_OUTPUTS if stem.endswith(end)), None)
        if image is not None and {image, image + "_img"} & stems:
            companions.append(f)
    return companions


def tiff_headers(files):
    """The image_files.TiffHeader of each file (the defaults for an image that is not a TIFF): plane axes "T",
    "Z", "TZ", ... for a TIFF stack, from the headers alone, so that the output names are known before any image
    is read."""
    return [tiff_header(f) if f.lower().endswith(TIFF_EXTS) else TiffHeader() for f in files]


def image_ids(files, out_dir, stacks):
    """The output id of each file (its name without the extension); two inputs with one id (also one that differs
    only in upper/lower case, which a Mac's or Windows' disk does not tell apart), or an output that would
    overwrite an input (``<id>.png``, or ``<id>.tif`` for a stack; the same file under another case too), are
    UsageErrors."""
    ids = {}
    for f, stack in zip(files, stacks):
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem.casefold() in ids:  # even when their outputs differ (a .png and a .tif stack), objects.csv's rows
            held = ids[stem.casefold()]  # would mix
            raise UsageError(f"{held[1]} and {f} have one id, {held[0]}" + (f" / {stem}" if held[0] != stem else "") +
                             ", for their outputs and objects.csv; rename one, or predict them into different "
                             "--output folders")
        ids[stem.casefold()] = (stem, f)
        mask_path = os.path.abspath(os.path.join(out_dir, stem + (".tif" if stack else ".png")))
        if mask_path == os.path.abspath(f) or same_file(mask_path, f):
            raise UsageError(f"--output {out_dir} would overwrite the input {f}; choose another --output folder")
    return [stem for stem, _ in ids.values()]


def same_file(a, b):
    """True when paths ``a`` and ``b`` both exist and are one file (also under another case on a Mac's disk)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (a broken link is named when it is read)
        return False


def output_suffixes(num_classes, save_prob, instances, overlay, rois=False, geojson=False):
    """The file-name suffixes of the outputs of one image (module docstring), as :func:`segment` names them."""
    classes = [""] if num_classes == 1 else [f"_class{c}" for c in range(num_classes)]
    suffixes = [c + p for c in classes for p in ["", "_prob"][:1 + save_prob]]
    return suffixes + ["_instances"] * instances + ["_overlay"] * overlay + ["_rois"] * rois + ["_geojson"] * geojson


def output_files(files, ids, stacks, suffixes):
    """{output file name: the input that writes it}. Two inputs that would write one file ('x' and 'x_prob' with
    --save_prob) are a UsageError: one output would silently replace the other."""
    written = {}
    for f, img_id, stack in zip(files, ids, stacks):
        for suffix in suffixes:
            name = output_name(img_id, suffix, stack)
            if name in written:
                raise UsageError(f"{written[name]} and {f} would both write {name}; rename one, or predict them into "
                                 "different --output folders")
            written[name] = f
    return written


# ---------------------------------------------------------------------------------------------- the outputs

def segment(img_id, image, prob, num_classes, threshold, save_prob, separation, filters, overlay, rois=False,
            geojson=False, nuclei=None, plane=0, planes=(1, 1)):
    """The outputs of image ``img_id`` (or of one plane of it): image as read, float32 [H, W, C] in [0, 1]; prob
    float32 [K(+1), H, W] in [0, 1] (a channel after the classes is the learned border map).

    Returns (arrays, labels): arrays maps each output's file-name suffix to its picture: "" (``_class<c>`` per
    class for several classes) the mask, uint8 0/255 [H, W]; with ``save_prob`` ``_prob`` the probability x 255;
    with a ``separation`` ``_instances``, the nuclei of class 0 (instances.split_instances with ``filters``, the
    min_size / min_confidence keywords), uint16 [H, W]; with ``rois`` (and a separation) ``_rois``, their ImagejRois
    (rois.nucleus_rois, at ``plane`` of a stack of ``planes`` (T, Z)); with ``geojson`` ``_geojson``, their GeoJSON
    Features (geojson_objects.nucleus_features, placed alike); with ``overlay`` ``_overlay``, the outlines on
    the image, BGR uint8 [H, W, 3]. labels: int32 [H, W], or None without a separation. ``nuclei``: the labels that
    split_instances already gave for this ``prob`` with the same separation and filters (--scale auto), reused.
    """
    masks = prob[:num_classes] > threshold
    arrays, labels = {}, None
    for c in range(num_classes):
        suffix = "" if num_classes == 1 else f"_class{c}"
        arrays[suffix] = masks[c].astype(np.uint8) * 255
        if save_prob:
            arrays[suffix + "_prob"] = np.round(np.clip(prob[c], 0, 1) * 255).astype(np.uint8)
    if separation:
        labels = nuclei if nuclei is not None else \
            split_instances(prob[0], separation, threshold=threshold, border=border_map(prob, num_classes), **filters)
        if labels.max() > MOST_LABELS:
            raise DataError(f"image {img_id}: {labels.max()} nuclei do not fit a 16-bit label image; predict it in "
                            "parts (crop it into smaller images)")
        arrays["_instances"] = labels.astype(np.uint16)
        if rois:
            arrays["_rois"] = nucleus_rois(labels, plane, planes)
        if geojson:
            arrays["_geojson"] = nucleus_features(labels, plane, planes)
    if overlay:
        arrays["_overlay"] = draw_outlines(to_bgr(image), masks[0], labels=labels)
    return arrays, labels


def predict_plane(source, plane, scale, image, prob, options, out_dir, nuclei=None, raw=None, channel=None,
                  on_finished=None):
    """The job run in a thread for each plane of ``source`` = (img_id, its number of planes, its TiffHeader),
    predicted at ``scale``: :func:`segment` (``nuclei`` as there), and for a 2D image (``out_dir`` given) its files,
    then ``on_finished(img_id, [its row], [its objects table] or [])`` (in the thread, beside the network's work).
    ``raw``: the plane as read [H, W, C] with every channel, whose intensity the objects table measures (with a
    separation; measurements.object_rows with --channel ``channel``). Returns
    (source, arrays or None once written, its measurements.image_row, objects table or None, None), or (source, None,
    None, None, the message) when the plane cannot be used (a DataError: the file is left out, the others go on);
    the TiffHeader's pixel size gives the measurements in micrometres."""
    img_id, count, header = source
    pixel_size, planes = header.pixel_size, plane_grid(header, count)
    try:
        arrays, labels = segment(img_id, image, prob, **options, nuclei=nuclei, plane=plane, planes=planes)
    except DataError as e:
        return source, None, None, None, str(e)
    table = object_rows(img_id, plane, labels, raw, prob[0], pixel_size, channel, planes) if labels is not None \
        else None
    row = image_row(img_id, plane, prob, options["threshold"], scale, table, pixel_size, planes)
    if out_dir is not None:
        write_image(out_dir, img_id, arrays)
        arrays = None
        if on_finished:
            on_finished(img_id, [row], [] if table is None else [table])
    return source, arrays, row, table, None


def auto_scaled(predictor, image, prob, trained_diameter, threshold, separation, filters):
    """--scale auto for one image, float32 [H, W, C] in [0, 1], whose probabilities as it is are ``prob`` [K, H, W]:
    its nuclei (``separation`` with ``filters``) measured, and the image predicted again resized by
    instances.auto_scale when they are far from ``trained_diameter`` pixels across. Returns (probabilities at the
    image's size, the scale used, the nuclei measured when they are those of the probabilities returned, else
    None)."""
    border = border_map(prob, predictor.cfg.num_classes)
    labels = split_instances(prob[0], separation, threshold=threshold, border=border, **filters)
    scale = auto_scale(median_diameter(nucleus_areas(labels)), trained_diameter)
    if scale == 1:
        return prob, scale, labels
    return predictor.predict(image, scale), scale, None


def probabilities(predictor, image, threshold, filters, auto=None):
    """Image float32 [H, W, C] in [0, 1] -> (probabilities float32 [K, H, W] in [0, 1] at its size, the scale used,
    the nuclei measured or None): at the predictor's --scale, or with ``auto`` (as :func:`predict_all` takes it) as
    :func:`auto_scaled` sizes it."""
    prob = predictor.predict(image)
    if not auto:
        return prob, predictor.scale, None
    return auto_scaled(predictor, image, prob, auto[0], threshold, auto[1], filters)


def predict_all(predictor, files, ids, headers, out_dir, num_classes, threshold, save_prob=False,
                separation=None, filters=None, overlay=False, channel=None, auto=None, rois=False, stitch_z=None,
                geojson=False, on_finished=None, track=None):
    """Predict every file into ``out_dir``: the masks (and probabilities with ``save_prob``), the nuclei when a
    ``separation`` is given (with ``filters``; their ImageJ ROIs with ``rois``, their GeoJSON objects with
    ``geojson``), the outlines with ``overlay``;
    PNGs for a 2D image, TIFF stacks for a stack (``headers``: each file's :func:`tiff_headers` entry, its plane
    axes), each plane predicted as an image of its own, read from its page when each plane is one page
    (image_files.read_planes), and its outputs written into their pages as they come
    (:class:`plane_outputs.Gathered`); ``channel`` picks the channel the network reads (image_files.nucleus_channel);
    ``auto`` = (the run's training nucleus diameter, separation) for --scale auto (:func:`auto_scaled`); ``stitch_z``
    (an IoU) links the nuclei of a stack's z planes, ``track`` (an IoU) those of a time-lapse's time points
    (:meth:`plane_outputs.Gathered.link`). The per-plane work
    (:func:`predict_plane`) runs in threads after every 256 MB of predictions (utils.BatchedThreads); each image
    whose files are all written is handed to ``on_finished`` (by its job, or for a stack by
    :class:`plane_outputs.Gathered`).
    A file that cannot be read or used (a DataError) is left out, and the others are predicted.
    Returns (the measurements.image_row of each plane predicted, objects table or None, the errors of the files left
    out)."""
    options = dict(num_classes=num_classes, threshold=threshold, save_prob=save_prob, separation=separation,
                   filters=filters, overlay=overlay, rois=rois, geojson=geojson)
    gathered, left_out = Gathered(out_dir, stitch_z, on_finished, track), []
    bar = progress_bar(total=len(files), desc="predict", unit="img")

    def leave_out(img_id, error, planes_left):
        """Leave out a file at one of its planes, inside the handler of its ``error``: the planes before it go too."""
        left_out.append(error)
        gathered.drop(img_id, sys.exc_info())
        bar.update(planes_left)

    try:
        with bar, BatchedThreads(gathered.add, desc="write") as jobs:
            for path, img_id, header in zip(files, ids, headers):
                with ExitStack() as reading:  # a stack read page by page keeps its file open until its last plane
                    try:
                        planes = reading.enter_context(read_planes(path, channel))
                    except DataError as e:
                        leave_out(img_id, str(e), 1)
                        continue
                    bar.total += len(planes) - 1
                    for plane in range(len(planes)):
                        if img_id in gathered.dropped:  # by a job of an earlier plane: the rest would go for nothing
                            bar.update(len(planes) - plane)
                            break
                        try:
                            raw = planes[plane]
                        except DataError as e:  # a page read now is damaged or holds NaN: the message names the file
                            leave_out(img_id, str(e), len(planes) - plane)
                            break
                        image = predictor.as_input(nucleus_channel(raw, channel))
                        try:
                            prob, scale, nuclei = probabilities(predictor, image, threshold, filters, auto)
                        except DataError as e:  # an image too large for the memory available: the others go on
                            leave_out(img_id, f"{path}: {e}", len(planes) - plane)
                            break
                        # a copy: a view would hold a stack read whole until the jobs run; every channel, which
                        # objects.csv measures
                        measured = raw.copy() if separation else None
                        jobs.submit(predict_plane, (img_id, len(planes), header), plane, scale, image, prob, options,
                                    None if header.plane_axes else out_dir, nuclei, measured, channel, on_finished,
                                    nbytes=image.nbytes + prob.nbytes + sum(a.nbytes for a in (nuclei, measured)
                                                                            if a is not None))
                        bar.update()
            jobs.flush()
    except BaseException:
        gathered.drop_unfinished()
        raise
    rows, table = gathered.results(objects=separation is not None)
    return rows, table, left_out + gathered.errors


def with_finished(rows, objects, finished, ids):
    """The image rows and objects table (None without --instances) of the images predicted now and of those that a
    stopped prediction ``finished`` (finished_images.read_finished), in the order of ``ids``, as one prediction of
    them all gives them."""
    if not finished:
        return rows, objects
    order = {img_id: i for i, img_id in enumerate(ids)}
    rows = sorted(rows + [row for kept, _ in finished.values() for row in kept], key=lambda row: order[row.image])
    tables = [table for _, table in finished.values() if table is not None] + [objects] * (objects is not None)
    if not tables:
        return rows, None
    table = objects_table(tables)
    return rows, table.iloc[np.argsort(table["image"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)


def check_flags_for_run(args, cfg):
    """Refuse the flags that the loaded run cannot serve (its size, windows)."""
    windowed = [f"--{f}" for f in ("scale", "tile", "overlap") if getattr(args, f) != build_parser().get_default(f)]
    if windowed and not cfg.crop_size:
        flag = windowed[0]
        raise UsageError(f"{flag}: run {args.name} was trained on images resized to {cfg.input_h}x{cfg.input_w}, "
                         f"and predicts every image at that size; {flag} is for runs trained on crops")
    if args.tile and args.overlap >= args.tile:
        raise UsageError(f"--overlap {args.overlap} must be less than --tile ({args.tile})")


def output_settings(args, cfg, predictor, epoch, separation, filters):
    """The settings that change predict.py's outputs: config.prediction_settings' keys as val.py's evaluation.yml
    has them (the model's ``epoch``: evaluation.model_epoch; the ``separation`` and ``filters`` null where no nuclei
    are made), then predict.py's own."""
    shaped = args.instances or args.scale == "auto"  # without either, no nuclei are made
    settings = prediction_settings(epoch, predictor.precision.describe(), args.tta, args.prune,
                                   separation if shaped else None, filters if shaped else dict.fromkeys(filters))
    settings.update(threshold=args.threshold, scale=args.scale)
    if args.scale == "auto":
        settings["training_diameter"] = float(cfg.nucleus_diameter)
    crop = bool(cfg.crop_size)  # a run trained on resized images predicts each image whole at its training size
    settings.update(input_size=None if crop else [cfg.input_h, cfg.input_w],
                    tile=int(predictor.tile) if crop else None, overlap=int(predictor.overlap) if crop else None,
                    channel=args.channel,
                    pixel_size=args.pixel_size if args.pixel_size is not None else PIXEL_SIZE_READ, amp=args.amp,
                    instances=args.instances, rois=args.rois, geojson=args.geojson, stitch_z=args.stitch_z,
                    track=args.track, save_prob=args.save_prob, overlay=args.overlay)
    return settings


def prediction_record(args, argv, settings, platform, weights, rows, left_out, resumed):
    """What prediction.yml holds: the run, and ``weights`` = (the folder it was loaded from, checkpoints.made_by:
    the SHA-256 of its weights and config.yml and the toolkit's version, and the runs averaged with it by --ensemble
    as ensemble.members_record gives them), taken as it was loaded; the command
    (``argv``, after python and this script's path, to paste in the working directory) and the --input it covered,
    when and with what; the :func:`output_settings`; how many images and planes (``rows``) were predicted, of them
    how many images a stopped prediction had finished (``resumed``, with --resume), and the errors of the files
    ``left_out``; ``platform``: {'torch': its version, 'device': the device used}."""
    folder, hashes, members = weights
    return {"run": args.name, "run_folder": os.path.realpath(folder), **hashes, **ensemble_entries(args, members),
            # the script's own path: run from another folder (one that holds models/), "predict.py" names no file
            "command": shlex.join(["python", os.path.realpath(__file__), *argv]),
            "working_directory": os.getcwd(), "input": [os.path.abspath(p) for p in args.input],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **platform, "settings": settings,
            "predicted": {"images": len({row.image for row in rows}), "planes": len(rows),
                          **({"finished_before_resume": resumed} if args.resume else {})},
            "left_out": {"files": len(left_out), "errors": left_out}}


# ------------------------------------------------------------------------------------------- the steps of main

def read_inputs(args):
    """The images of --input (:func:`list_images`), their :func:`tiff_headers` (--pixel_size, when given, in place of
    each file's own calibration) and output ids (:func:`image_ids`), after printing the notes on how some will be read
    (predict_notes: grey_channel_note, after which --channel is None, tiff_notes, pixel_size_warnings, stitch_notes,
    track_notes; a --pixel_size that nothing written uses). Returns (files, headers, ids), three lists in the order
    of the files; raises the DataError or UsageError of those functions."""
    files = list_images(args.input, args.output)
    headers = tiff_headers(files)
    if args.pixel_size is not None:  # the flag's size replaces each file's own, and what kept it from one
        headers = [header._replace(pixel_size=args.pixel_size, pixel_size_problem="") for header in headers]
        if not (args.instances or any(header.plane_axes for header in headers)):
            print(f"note: --pixel_size {args.pixel_size:g}: for --instances' objects.csv and images.csv and the "
                  "calibration of the TIFF stacks written, and none of these inputs is a stack; no effect here (add "
                  "--instances)")
    ids = image_ids(files, args.output, [header.plane_axes for header in headers])
    grey = grey_channel_note(files, headers, args.channel)
    if grey:
        print(grey)
        args.channel = None  # picks nothing: the summary line and prediction.yml then name no channel
    for note in tiff_notes(files, headers, args.channel) + pixel_size_warnings(files, headers) + \
            stitch_notes(files, headers, args.stitch_z) + track_notes(files, headers, args.track):
        print(note)
    return files, headers, ids


def auto_scale_diameter(name, cfg, measure):
    """--scale auto: the training nucleus diameter (pixels) of run ``name`` that the images' nuclei are sized to, as
    its config ``cfg`` records it; a run that records none (0: trained before train.py recorded it) gets it from
    ``measure(name, cfg)`` (evaluation.training_diameter, passed in as it imports torch), with a note. A recorded
    value that is no diameter (NaN, negative), or none recorded nor measured, is a UsageError naming the fix."""
    if not cfg.nucleus_diameter >= 0:  # NaN or negative: no image's nuclei would ever be far from it
        raise UsageError(f"--scale auto: run {name}'s config.yml holds nucleus_diameter {cfg.nucleus_diameter}, "
                         "not a diameter in pixels; give the diameter there (0: measured from its training images), "
                         "or give --scale FACTOR")
    if cfg.nucleus_diameter:
        return cfg.nucleus_diameter
    diameter = measure(name, cfg)
    if not diameter:
        raise UsageError(f"--scale auto: run {name} records no training nucleus diameter (trained before "
                         "train.py recorded it, or its training labels held no nuclei) and its training images are "
                         "not there to measure it; give --scale FACTOR, or the diameter in its config.yml as "
                         "nucleus_diameter")
    print(f"note: run {name} records no training nucleus diameter; measured now from its training "
          f"images: {diameter:.1f} px")
    return diameter


def check_ensemble_scale(args, diameter, measure):
    """--scale auto with --ensemble: a UsageError when a run averaged with --name's learned nuclei of another size
    (its training diameter as :func:`auto_scale_diameter` gives it, more than instances.AUTO_SCALE_BAND times
    --name's ``diameter`` or less than 1 / AUTO_SCALE_BAND of it): the images are sized for --name's run, and that
    run would see its nuclei at a size it never learned."""
    for other in args.ensemble:
        theirs = auto_scale_diameter(other, load_run_config(other, "--ensemble"), measure)
        if not diameter / AUTO_SCALE_BAND <= theirs <= diameter * AUTO_SCALE_BAND:
            raise UsageError(f"--scale auto: run {other} learned nuclei {theirs:.1f} px across, run {args.name} "
                             f"{diameter:.1f} px, and the images are sized for --name's run alone; give --scale "
                             "FACTOR, or average runs trained on nuclei of one size")


def ensemble_entries(args, members):
    """prediction.yml's record of the runs averaged with --name's (--ensemble): their names, and ``members``
    (ensemble.members_record: each one's epoch and SHA-256s) as ensemble_weights; {} for --name's run alone."""
    return {"ensemble": args.ensemble, "ensemble_weights": members} if args.ensemble else {}


def resume_match(args, cfg, weights, settings):
    """What an image's record of being finished must match for --resume to keep it (JSON-ready): the run, the
    ``weights`` = (the hashes of its weights, config and toolkit: checkpoints.made_by, those of the runs --ensemble
    averages with it: ensemble.members_record) and the :func:`output_settings`
    ``settings``; windows sized from the memory budget as the flags asked (the budget is another on the node a
    requeued job lands on, and the windows already differ from image to image with it)."""
    hashes, members = weights
    return json_ready({"run": args.name, **hashes, **ensemble_entries(args, members), **settings,
                       **({"tile": 0, "overlap": args.overlap} if not args.tile and cfg.crop_size else {})})


def outputs_by_image(written, files, ids):
    """{image id: the names of its output files}, from ``written`` (:func:`output_files`, {name: input file}) and
    the input ``files`` with their ``ids``."""
    source_id = dict(zip(files, ids))
    outputs = {img_id: [] for img_id in ids}
    for name, source in written.items():
        outputs[source_id[source]].append(name)
    return outputs


def output_lock(args):
    """The context that holds --output while this prediction writes it: one predict.py --instances at a time writes
    a folder, as objects.csv and images.csv would hold the rows of the one that ended last. Without --instances,
    none: jobs that share a folder (an array job's shards of one image set) write their images' own files. The lock
    file is hidden, as --input skips it. Entering it raises a UsageError while another process holds it."""
    return written_alone(args.output, "--output", os.path.join(args.output, ".predict.lock")) if args.instances \
        else nullcontext()


def images_to_predict(args, ids, sources, outputs, recorded):
    """Which of the images ``ids`` this prediction into --output predicts, and what it keeps of a prediction that
    stopped there: with --resume the images it finished (finished_images.read_finished of ``sources``, {id: input
    file}, ``outputs``, {id: its output names}, and their record ``recorded``, :func:`resume_match`); without it none,
    with a note when that prediction had finished some. The records of the images predicted now are removed.
    Returns (todo, the indices into ``ids`` to predict; finished, {id: (its image rows, its objects table or None)};
    the note on the resume to print at the end, '' without --resume)."""
    if args.resume:
        was_recorded = finished_count(args.output, ids)
        finished = read_finished(args.output, sources, outputs, recorded)
    else:
        forgotten = finished_count(args.output, ids)
        if forgotten:
            print(f"note: a prediction that stopped in {os.path.join(args.output, '')} had finished {forgotten} "
                  "of these images; this one predicts them all again (--resume would have gone on with it)")
        finished = {}
    todo = [i for i, img_id in enumerate(ids) if img_id not in finished]
    # the records of the images predicted now go (with --resume: an input changed since, an output gone), so
    # that one stopped again counts as finished only those it then has
    forget_finished(args.output, [ids[i] for i in todo])
    resumed = resumed_note(len(finished), was_recorded, len(ids), args.output) if args.resume else ""
    return todo, finished, resumed


def remove_stale_files(out_dir):
    """Remove from ``out_dir`` what would mislead before a prediction writes it: the temporary files of writes that
    a kill cut short (files.remove_killed_writes) and an earlier prediction's prediction.yml."""
    remove_killed_writes(out_dir)
    with suppress(FileNotFoundError):  # an earlier prediction's would pass for a stopped one's mixed files
        os.remove(os.path.join(out_dir, PREDICTION_FILE))


def write_results(args, ids, rows, objects, record):
    """The files written into --output once the images ``ids`` are predicted: with --instances objects.csv and
    images.csv (the image ``rows`` and the ``objects`` table; measurements.write_tables), then ``record``
    (:func:`prediction_record`) as prediction.yml. Returns the note on the images of an earlier prediction whose
    rows the replaced tables held (:func:`predict_notes.replaced_rows_note`, read before they are replaced), ''
    for none."""
    replaced_rows = ""
    if args.instances:
        replaced_rows = replaced_rows_note(args.output, ids, TABLES)
        write_tables(args.output, rows, objects)
    with atomic_write(os.path.join(args.output, PREDICTION_FILE)) as f:
        yaml.safe_dump(record, f, sort_keys=False, allow_unicode=True,
                       width=math.inf)  # the command on one line, to copy
    return replaced_rows


def main(argv):
    """predict.py with the command-line flags ``argv``: prints the notes and the summary line; returns {"images",
    "planes", "seconds", "scales": each plane's}. A file left out is a DataError at the end (exit code 1)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    check_object_filters(args.min_size, args.min_confidence)  # before the heavy imports
    files, headers, ids = read_inputs(args)
    # Heavy imports only now, so that --help and flag errors answer at once.
    import torch

    from checkpoints import made_by
    from engine import choose_device, fit_threads_to_cpus
    from ensemble import load_models, members_record
    from evaluation import model_epoch, training_diameter
    from inference import Predictor

    device = choose_device(args.device)
    fit_threads_to_cpus()
    platform = {"torch": str(torch.__version__),
                "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")}
    cfg, model = load_models(args.name, args.ensemble, device, args.prune)
    weights, epoch = (saved_run_dir(args.name), made_by(args.name), members_record(args.ensemble)), \
        model_epoch(args.name)
    check_flags_for_run(args, cfg)
    auto = args.scale == "auto"
    if auto:
        cfg.nucleus_diameter = auto_scale_diameter(args.name, cfg, training_diameter)
        check_ensemble_scale(args, cfg.nucleus_diameter, training_diameter)
    written = output_files(files, ids, [header.plane_axes for header in headers],
                           output_suffixes(cfg.num_classes, args.save_prob, args.instances, args.overlay, args.rois,
                                           args.geojson))
    post = post_processing(args.name, cfg, args.separation, args.min_size, args.min_confidence, args.ensemble)
    if post.note:
        print(post.note)
    separation, filters = post.separation, post.filters
    predictor = Predictor(model, cfg, device, args.tile or None, args.overlap, args.batch_size, args.prune, args.tta,
                          args.amp, 1.0 if auto else args.scale)
    settings = output_settings(args, cfg, predictor, epoch, separation, filters)
    recorded = resume_match(args, cfg, weights[1:], settings)
    sources = dict(zip(ids, files))
    os.makedirs(args.output, exist_ok=True)
    with output_lock(args):
        remove_stale_files(args.output)
        todo, finished, resumed = images_to_predict(args, ids, sources, outputs_by_image(written, files, ids),
                                                    recorded)
        # the tables, or files of an image not finished by a stopped prediction (also with --resume: a folder of an
        # earlier prediction, its inputs changed since), are an earlier prediction's that one stopped now mixes in
        held_earlier = holds_outputs(args.output, [ids[i] for i in todo])
        started = time.time()
        with noted_when_stopped(args.output, ids, held_earlier):
            rows, objects, left_out = predict_all(
                predictor, [files[i] for i in todo], [ids[i] for i in todo], [headers[i] for i in todo], args.output,
                cfg.num_classes, args.threshold, args.save_prob, separation if args.instances else None, filters,
                args.overlay, args.channel, (cfg.nucleus_diameter, separation) if auto else None, args.rois,
                args.stitch_z, args.geojson, partial(record_finished, args.output, recorded, sources), args.track)
        rows, objects = with_finished(rows, objects, finished, ids)
        if not rows:
            raise nothing_predicted_error(left_out, len(files))
        replaced_rows = write_results(args, ids, rows, objects, prediction_record(
            args, argv, settings, platform, weights, rows, left_out, len(finished)))
        forget_finished(args.output, ids)
        notes = closing_notes(args, files, ids, written, rows, objects, resumed, replaced_rows)
    seconds = time.time() - started
    print(summary_line(args, cfg, predictor, device, len(files) - len(left_out), rows, seconds, objects, post.label(),
                       filters))
    predicted = {row.image for row in rows}
    if args.stitch_z is not None:
        print(stitched_line(args.stitch_z, [i for i, header in zip(ids, headers) if plane_grid(header, 1)[1] > 1
                                            and i in predicted], objects))
    if args.track is not None:
        print(tracked_line(args.track, [i for i, header in zip(ids, headers) if header.plane_axes
                                        and plane_grid(header, 1)[1] == 1 and i in predicted], objects))
    for note in notes:
        if note:
            print(note)
    if left_out:
        raise left_out_error(left_out, len(files), args.output)
    return {"images": len(files), "planes": len(rows), "seconds": seconds, "scales": [row.scale for row in rows]}


if __name__ == "__main__":
    run_cli(main)
