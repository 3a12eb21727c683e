"""What predict.py tells the user besides its files: the notes on how inputs are read (TIFF axes, calibration,
what --stitch_z and --track leave out), the summary line it ends with and the lines after it, and the notes on what
its --output folder holds (files of an earlier prediction, rows replaced, a prediction stopped or resumed).

Each function returns its text ('' or [] when there is nothing to say), or the DataError to raise, and predict.py
prints it; noted_when_stopped prints its note itself, as a prediction stops.
"""
import io
import os
import re
import sys
from contextlib import contextmanager

import numpy as np
import pandas as pd
from PIL import Image

from finished_images import finished_count
from image_files import PAGES_AS_COLOURS, TIFF_EXTS, one_hue_ramp, pages_as_colours
from instances import auto_scale, median_diameter
from measurements import TABLES, foreground_note
from plane_outputs import plane_grid
from utils import DataError, first_few, printable_path

GREY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "F"}  # PIL's modes of images OpenCV decodes to one channel
SCORES_FILE = "scores.csv"  # score.py's default output, beside the predictions it scored


def grey_channel_note(files, headers, channel):
    """The note on a --channel ``channel`` that picks nothing: every one of ``files`` is grey as its header says (a
    TIFF of one channel, ``headers``: their image_files.TiffHeader; another image in a grey mode of PIL, or indexed
    with a LUT's palette, :func:`lut_palette`), and a grey image is read as it is. '' when any may have several
    channels (a file PIL cannot open, or will not: over its MAX_IMAGE_PIXELS, is read by OpenCV, and named if it
    cannot be), or is a stack (:func:`tiff_notes` says that --channel does not apply to its planes)."""
    if channel is None:
        return ""
    for path, header in zip(files, headers):
        if path.lower().endswith(TIFF_EXTS):
            if header.channels != 1 or header.plane_axes:
                return ""
            continue
        try:
            with Image.open(path) as image:
                if image.mode not in GREY_MODES and not lut_palette(image):
                    return ""
        except (OSError, ValueError, Image.DecompressionBombError):  # the last: over PIL's pixel limit, not OpenCV's
            return ""
    return (f"note: --channel {channel}: {'every input is a grey image' if len(files) > 1 else 'the input is grey'} "
            "(one channel), read as it is; no effect here")


def lut_palette(image):
    """Whether a PIL image is an indexed PNG whose palette is one colour ramped up from black (an 8-bit image saved
    from Fiji with a LUT, grey or not): image_files.decode_planes reads its indices, one grey channel."""
    palette = image.getpalette() if image.mode == "P" else None
    return palette is not None and one_hue_ramp(np.asarray(palette, np.uint8).reshape(-1, 3))


def tiff_notes(files, headers, channel):
    """A line for each TIFF read otherwise than its header might suggest: 3 or 4 pages without ImageJ or OME axes
    read as the colours of one image (channels-first RGB is common; a short stack saved without axes looks the
    same), 3 channels on a C axis read as RGB when no ``channel`` is chosen (fluorescence channels, unlike RGB
    samples on an S axis), 3 or 4 samples stored before the rows (planar RGB, as tifffile writes an array [3 or 4,
    H, W] without axes), planes under 16 pixels on a side (axes most likely lost), and the series after the first
    (positions or scenes), which are not read. Files that get the same note share its line."""
    notes = {}  # note -> its files: a folder of a thousand alike TIFFs gives one line, not a thousand
    for f, header in zip(files, headers):
        if pages_as_colours(header):
            notes.setdefault(f"{PAGES_AS_COLOURS}; save it as an ImageJ or OME TIFF with its axes to segment the "
                             "pages one by one", []).append(f)
        if header.channel_axis == "C" and header.channels == 3 and channel is None:
            notes.setdefault("has 3 channels (axis C): read as the colours of one RGB image, as train.py reads it; "
                             "for a run trained on the nucleus channel alone, give it with --channel (0 to 2)",
                             []).append(f)
        if channel is not None and header.channels == 1 and header.plane_axes:
            notes.setdefault(f"has no channel axis: its planes (axes {header.plane_axes}) are segmented one by one "
                             "and --channel does not apply; if they are channels, save it as an ImageJ or OME TIFF "
                             "with a C axis", []).append(f)
        if header.channel_axis == "S" and header.channels_first:
            notes.setdefault(f"stores {header.channels} samples before its rows (planar RGB): read as the colours of "
                             "one image; if they are the planes of a stack, save it as an ImageJ or OME TIFF with its "
                             "axes", []).append(f)
        if 0 < min(header.plane_size) < 16:
            (height, width), planes = header.plane_size, int(np.prod(header.plane_shape or (1,)))
            notes.setdefault(f"is read as {planes} plane(s) of {height}x{width} pixels, too small to hold a nucleus: "
                             "was it saved without its axes? (an array [H, W, 2] written without them reads as H "
                             "planes)", []).append(f)
        if header.series > 1:
            notes.setdefault(f"holds {header.series} series (positions or scenes): only the first is segmented; "
                             "save each series as a file of its own", []).append(f)
    return [f"note: {named[0]} {note}" + (f" (the same for {len(named) - 1} more file{'s' * (len(named) > 2)}: "
                                          f"{first_few(named[1:])})" if len(named) > 1 else "")
            for note, named in notes.items()]


def pixel_size_warnings(files, headers):
    """One line naming the TIFFs whose calibration was there but gave no pixel size (image_files.tiff_pixel_size),
    with the first one's problem: a folder of a thousand alike TIFFs gives one line, not a thousand; [] for none."""
    named = [(f, header.pixel_size_problem) for f, header in zip(files, headers) if header.pixel_size_problem]
    if not named:
        return []
    more = [f for f, _ in named[1:]]
    others = f" (also {len(more)} more file{'s' * (len(more) > 1)}: {first_few(more)})" if more else ""
    return [f"warning: {named[0][0]}: {named[0][1]}: no pixel size read{others}, their _um columns are left empty; "
            "give --pixel_size UM"]


def resumed_note(finished, recorded, total, out_dir):
    """The note of a --resume into ``out_dir`` that found ``finished`` of the ``total`` images finished by a stopped
    prediction, of ``recorded`` images with a record there (the others' inputs changed since, or outputs gone)."""
    others = recorded - finished
    unused = (f"; {others} more had a record there that did not hold (an input file changed since: another path, "
              "size or time; an output file gone; a record cut short): predicted again") if others else ""
    if not finished:
        return (f"note: --resume: {os.path.join(out_dir, '')} held no image finished by a stopped prediction{unused}; "
                "all predicted now")
    return (f"note: --resume: {finished} of the {total} images were finished by the stopped prediction, "
            f"{total - finished} predicted now{unused}")


def nothing_predicted_error(left_out, total):
    """The DataError when none of ``total`` files could be predicted, the first of their errors ``left_out`` named."""
    return DataError(left_out[0] if len(left_out) == 1 else f"none of the {total} files could be predicted: "
                     f"{left_out[0]}")


def output_stems(name):
    """The image ids that a file of predict.py's outputs (module docstring) can belong to: 'a_class1_prob.png' ->
    {'a_class1_prob', 'a_class1', 'a'} (an id may itself end like a suffix), 'a_rois.zip' -> {'a'}, 'a.geojson' ->
    {'a'}; set() for other files."""
    stem, ext = os.path.splitext(name)
    if ext == ".zip":  # only the ROIs: a_rois.png is image a_rois's mask, and a_rois.zip no output of image a_rois
        return {stem[:-len("_rois")]} if stem.endswith("_rois") else set()
    if ext == ".geojson":
        return {stem}
    if ext not in (".png", ".tif"):
        return set()
    kind = re.sub(r"(_prob|_instances|_overlay)$", "", stem)
    return {stem, kind, re.sub(r"_class\d+$", "", kind)}


def holds_outputs(out_dir, ids):
    """True when ``out_dir`` holds objects.csv, images.csv or anything named like an output of one of the images
    ``ids`` (:func:`output_stems`)."""
    ids = set(ids)
    return any(n in TABLES or output_stems(n) & ids for n in os.listdir(out_dir))


def stopped_note(out_dir, ids, held_earlier):
    """The note ('' for none) for a prediction of the images ``ids`` stopped before its end in ``out_dir``: how many
    it finished, and that --resume goes on with it; with ``held_earlier`` (the folder held outputs of an earlier
    prediction of these images, :func:`holds_outputs`) that the images not finished have the earlier one's files,
    and so do the tables there (written only at the end)."""
    done = finished_count(out_dir, ids)
    resume = f"the same command with --resume predicts the {len(ids) - done} not finished and writes the tables"
    if not held_earlier:
        return f"note: stopped with {done} of {len(ids)} images finished; {resume}" if done else ""
    tables = [n for n in TABLES if os.path.isfile(os.path.join(out_dir, n))]
    held = f" ({' and '.join(tables)} {'are' if len(tables) > 1 else 'is'} the earlier one's)" if tables else ""
    return (f"note: {os.path.join(out_dir, '')} held outputs of an earlier prediction of these images, and this one "
            f"stopped before its end with {done} of {len(ids)} images finished: it may now mix the two{held}; "
            f"{resume}, or predict all the images again")


def earlier_outputs_note(args, files, ids, written):
    """A note naming the files in ``args.output`` that an earlier prediction wrote for these images and this one
    did not (not in ``written``, :func:`predict.output_files` of the images predicted: an image left out now,
    ``<id>_instances.png``, objects.csv and images.csv when --instances is left out now, a .png where a .tif stack is
    written now, ``<id>_class<c>.png`` of a run with other classes, and score.py's scores.csv of an earlier
    prediction), which would pass for this one's; '' when there are none. The input files themselves are never
    named."""
    written = set(written) | (set(TABLES) if args.instances else set())
    inputs, ids = {os.path.abspath(f) for f in files}, set(ids)
    earlier = [n for n in sorted(os.listdir(args.output)) if n not in written and (n in TABLES or
               n == SCORES_FILE or output_stems(n) & ids) and os.path.isfile(os.path.join(args.output, n))
               and os.path.abspath(os.path.join(args.output, n)) not in inputs]
    if not earlier:
        return ""
    return (f"note: {os.path.join(args.output, '')} also holds {len(earlier)} file{'s' * (len(earlier) > 1)} of an "
            f"earlier prediction that this one did not write: {', '.join(earlier[:3])}"
            f"{' ...' if len(earlier) > 3 else ''}; remove them, or predict into a new --output")


def replaced_rows_note(out_dir, ids, tables):
    """Before the ``tables`` (objects.csv, images.csv) in ``out_dir`` are replaced: a note naming the images of an
    earlier prediction whose rows they held and this one's will not (those not in ``ids``), or '' when there are none
    (or no readable file)."""
    named, others = [], set()
    for name in tables:
        try:
            # no missing-value words: images named NA, null or None (pandas 2.0 added it) are read as the names
            earlier = pd.read_csv(os.path.join(out_dir, name), usecols=["image"], dtype=str,
                                  keep_default_na=False)["image"]
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if set(earlier) - set(ids):
            named.append(name)
            others |= set(earlier) - set(ids)
    if not others:
        return ""
    others = sorted(others)
    return (f"note: {os.path.join(out_dir, '')}{' and '.join(named)} held the rows of {len(others)} other image"
            f"{'s' * (len(others) > 1)} of an earlier prediction ({', '.join(others[:3])}{' ...' * (len(others) > 3)})"
            f"; {'they now hold' if len(named) > 1 else 'it now holds'} this prediction's only (their other files "
            "stay)")


def pandas_ids_note(columns):
    """A note when pandas' read_csv with its defaults would lose ids of an image column of the tables (``columns``,
    the ids each holds): 0001 read as the number 1, or 1 as 1.0 beside a missing one; NA, null or nan as missing.
    With the arguments that keep them; '' otherwise (1, 2, ... read as the numbers they are)."""
    changed = {}
    for ids in columns:
        read = pd.read_csv(io.StringIO(pd.DataFrame({"image": ids}).to_csv(index=False)))["image"]
        changed.update((i, f"{i} as {'missing' if pd.isna(r) else r}") for i, r in zip(ids, read)
                       if pd.isna(r) or str(r) != i)
    if not changed:
        return ""
    shown = sorted(changed.values())
    return (f"note: pandas.read_csv with its defaults reads these image ids as other values ({', '.join(shown[:3])}"
            f"{' ...' * (len(shown) > 3)}); read objects.csv and images.csv with dtype={{'image': str}}, "
            "keep_default_na=False, na_values=['']")


def diameter_note(found, trained, scale):
    """The summary's note on the nuclei's median diameter ``found`` (pixels): with a hint to try the --scale that
    sizes them as in training when the images were predicted as they are and the nuclei are far from the ``trained``
    diameter (0: unknown). One scale for the folder, as val.py's hint says: --scale auto judges each image alone,
    and its noise cost the bundled model's validation images 0.014 DSB2018 (docs/results.md)."""
    note = f", median diameter {found:.0f} px"
    fix = auto_scale(found, trained) if trained else 1.0
    if scale == 1 and fix != 1:
        note += f" (the run learned {trained:.0f} px: try --scale {fix:.2g}, or --scale auto for mixed magnifications)"
    return note


def none_kept_note(foreground, min_size, min_confidence):
    """The summary's note when no object was kept although the masks have ``foreground`` (fraction of pixels): the
    filters that are on dropped them all (a barely trained network's objects fall below --min_confidence), so
    --scale auto had nothing to measure either; '' when there is no foreground or no filter is on."""
    on = [f"--min_confidence {min_confidence:g}"] * bool(min_confidence) + [f"--min_size {min_size}"] * bool(min_size)
    tries = ["--min_confidence 0"] * bool(min_confidence) + ["a smaller --min_size"] * bool(min_size)
    if not (foreground and on):
        return ""
    return f" (the filter{'s' * (len(on) > 1)} {' and '.join(on)} dropped every one: try {' or '.join(tries)})"


def sizing(scale, scales):
    """How the images were sized, for the summary line: --scale ``scale`` and the scale of each plane."""
    if scale != "auto":
        return "full size" if scale == 1 else f"scaled by {scale:g}"
    rescaled = sorted({f"{s:.2g}" for s in scales if s != 1}, key=float)
    by = f" by {rescaled[0]}" + (f"-{rescaled[-1]}" if len(rescaled) > 1 else "") if rescaled else ""
    return f"--scale auto: {sum(s != 1 for s in scales)} of {len(scales)} rescaled{by}"


def stitch_notes(files, headers, stitch_z):
    """The notes naming the ``files`` (``headers``: their :func:`predict.tiff_headers`) whose z planes --stitch_z
    ``stitch_z`` (None: off) does not link, predicted as without it: 2D images and time-lapses, and stacks whose z
    planes are not in ImageJ's order (:func:`plane_outputs.stack_layout` makes them one T axis); [] for none."""
    unlinked = [(f, header) for f, header in zip(files, headers) if plane_grid(header, 1)[1] == 1]  # count: T alone
    if stitch_z is None:
        return []
    # pages with no T or Z axis (tifffile's Q or I: saved without ImageJ or OME metadata, as numpy arrays often are)
    # may well be z planes: the user is told how to mark them rather than that they are none
    unmarked = [f for f, header in unlinked if header.plane_axes and not set(header.plane_axes) & set("TZ")]
    flat = [f for f, header in unlinked if "Z" not in header.plane_axes and f not in unmarked]
    # a time point's z planes are then not next to each other, and objects.csv numbers its planes as time points
    shuffled = [f"{f} (axes {header.plane_axes})" for f, header in unlinked if "Z" in header.plane_axes]
    notes = [f"note: --stitch_z links nuclei through z planes, and {first_few(flat)} ha{'ve' if len(flat) > 1 else 's'}"
             " none (a 2D image, a time-lapse or a single z plane): predicted as without it"] if flat else []
    if unmarked:
        notes.append(f"note: --stitch_z links nuclei through z planes, and the pages of {first_few(unmarked)} have no "
                     "axes (no ImageJ or OME metadata): predicted as without it, each page a time point of its own "
                     "(for a z-stack, save it with a Z axis: Fiji's Image > Properties, or tifffile.imwrite(path, "
                     "stack, imagej=True, metadata={'axes': 'ZYX'}))")
    if shuffled:
        notes.append(f"note: --stitch_z links the z planes of a stack whose planes are in ImageJ's order (time points, "
                     f"then z planes in each); {first_few(shuffled)} ha{'ve' if len(shuffled) > 1 else 's'} them in "
                     "another order: predicted as without it, each plane a time point of its own (save it from Fiji "
                     "as an ImageJ hyperstack to link them)")
    return notes


def track_notes(files, headers, track):
    """The notes on the ``files`` (``headers``: their :func:`predict.tiff_headers`) whose nuclei --track ``track``
    (None: off) does not link, predicted as without it: 2D images, and z-stacks (--stitch_z links those); and on
    those whose pages have no axes, linked as time points though they may be z planes; [] for none."""
    if track is None:
        return []
    flat = [f for f, header in zip(files, headers) if not header.plane_axes]
    z_stacks = [f for f, header in zip(files, headers) if plane_grid(header, 1)[1] > 1]
    unmarked = [f for f, header in zip(files, headers) if header.plane_axes and not set(header.plane_axes) & set("TZ")]
    notes = []
    if flat:
        notes.append(f"note: --track links nuclei through the time points of a time-lapse, and {first_few(flat)} "
                     f"ha{'ve' if len(flat) > 1 else 's'} none (a 2D image): predicted as without it")
    if z_stacks:
        notes.append(f"note: --track links the time points of 2D time-lapses, and {first_few(z_stacks)} "
                     f"ha{'ve' if len(z_stacks) > 1 else 's'} z planes: predicted as without it (--stitch_z links "
                     "the nuclei of each time point's z planes)")
    if unmarked:
        notes.append(f"note: the pages of {first_few(unmarked)} have no axes (no ImageJ or OME metadata): --track "
                     "links them as time points (for a z-stack, save it with a Z axis: Fiji's Image > Properties, or "
                     "tifffile.imwrite(path, stack, imagej=True, metadata={'axes': 'ZYX'}))")
    return notes


def tracked_line(track, stacks, objects):
    """The line after the summary with --track ``track``: how many tracks each of the ``stacks`` (the ids of the
    time-lapses predicted) holds (``objects``, the objects table, labels linked)."""
    if not stacks:
        return f"--track {track:g}: no time-lapse was predicted, no nuclei linked"
    counts = objects[objects["image"].isin(stacks)].groupby("image")["label"].nunique().reindex(stacks, fill_value=0)
    return (f"--track {track:g}: {counts.sum()} tracks in {len(stacks)} time-lapse{'s' * (len(stacks) > 1)} "
            f"({first_few([f'{i}: {n}' for i, n in counts.items()])}); objects.csv's image and label name each one")


def stitched_line(stitch_z, stacks, objects):
    """The line after the summary with --stitch_z ``stitch_z``: how many nuclei in 3D each of the ``stacks`` (the
    ids of those predicted with several z planes) holds, each time point's counted on its own (``objects``, the
    objects table, labels linked)."""
    if not stacks:
        return f"--stitch_z {stitch_z:g}: no stack with several z planes was predicted, no nuclei linked"
    linked = objects[objects["image"].isin(stacks)]
    counts = linked.groupby(["image", "t"])["label"].nunique().groupby("image").sum().reindex(stacks, fill_value=0)
    return (f"--stitch_z {stitch_z:g}: {counts.sum()} nuclei in 3D in {len(stacks)} z-stack{'s' * (len(stacks) > 1)} "
            f"({first_few([f'{i}: {n}' for i, n in counts.items()])}); objects.csv's image, t and label name each "
            "one")


def predicted_foreground_note(rows, files, ids):
    """A note ('' for none) when the masks predicted mark more than measurements.MOSTLY_FOREGROUND of their pixels
    (``rows``: the measurements.image_row of each plane, a stack's planes averaged; ``files`` the images read, by
    their ``ids``), naming how many images and the fullest: the network marks the nuclei it learned, bright on a dark
    background in most training sets, so that dark nuclei on a light background (bright-field, stains) or an
    inverted image come out as nuclei over the background, with no error."""
    planes = {}
    for row in rows:
        planes.setdefault(row.image, []).append(row.foreground)
    named = dict(zip(ids, files))
    return foreground_note([float(np.mean(shares)) for shares in planes.values()],
                           [printable_path(named[img_id]) for img_id in planes], "the predicted masks",
                           "the network marks nuclei as it learned them, so dark nuclei on a light background "
                           "(bright-field, stained) or an inverted image may come out as nuclei over the background: "
                           "look at the masks; for such images use a run trained on them, or trained with "
                           "--normalization percentile_dark", each=True)


def summary_line(args, cfg, predictor, device, done, rows, seconds, objects, separation, filters):
    """The one line predict.py ends with: what was predicted (``rows``, the ImageRow of each plane), how, how long,
    what was found, where."""
    size = sizing(args.scale, [row.scale for row in rows])
    planes, megapixels = len(rows), sum(row.height * row.width for row in rows) / 1e6
    foreground = float(np.mean([row.foreground for row in rows]))
    found = "" if objects is None else f", {len(objects)} object{'s' * (len(objects) != 1)} ({separation}) in " \
        "objects.csv" + \
        (diameter_note(median_diameter(objects["area"]), cfg.nucleus_diameter, args.scale) if len(objects) else
         none_kept_note(foreground, **filters))
    empty = sum(row.nuclei == 0 for row in rows)
    table = "" if objects is None else \
        f"; a row per {'plane' if planes > done else 'image'} in images.csv ({empty} with no nuclei)"
    how = f"resized to {cfg.input_h}x{cfg.input_w}" if not cfg.crop_size else \
        f"{size}, windows up to {predictor.tile}x{predictor.tile}"
    stacked = (f", {planes} planes in all" if planes > done else "") + \
        (f", channel {args.channel}" if args.channel is not None else "")
    runs = f" + {len(args.ensemble)} run{'s' * (len(args.ensemble) > 1)}" if args.ensemble else ""
    return (f"{args.name}{runs}: {done} image{'s' if done > 1 else ''} ({megapixels:.2f} Mpx{stacked}, {how}"
            f"{', TTA' if args.tta else ''}{f', pruned at L={args.prune}' if args.prune else ''}) in {seconds:.1f}s on "
            f"{device} ({predictor.precision.describe()}); mean foreground "
            f"{'of class 0 ' if cfg.num_classes > 1 else ''}{100 * foreground:.1f}%{found}{table}; "
            f"files in {os.path.join(args.output, '')}")


def left_out_error(left_out, total, out_dir):
    """The DataError predict.py ends with when files were left out: ``left_out`` their errors (the first 5 named),
    of ``total`` files, the others predicted into ``out_dir``."""
    return DataError(f"{len(left_out)} of {total} files were left out (the others are in "
                     f"{os.path.join(out_dir, '')}): " + "; ".join(left_out[:5]) +
                     (f"; and {len(left_out) - 5} more" if len(left_out) > 5 else ""))


@contextmanager
def noted_when_stopped(out_dir, ids, held_earlier):
    """The block that predicts the images ``ids`` into ``out_dir``: on Ctrl-C, prints :func:`stopped_note` (what the
    folder now holds, and that --resume goes on) to stderr before the KeyboardInterrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        stopped = stopped_note(out_dir, ids, held_earlier)
        if stopped:
            print(stopped, file=sys.stderr)
        raise


def closing_notes(args, files, ids, written, rows, objects, resumed, replaced_rows):
    """The notes printed after the summary line, in their order ('' for each that has nothing to say): ``resumed``
    (:func:`predict.images_to_predict`'s), masks that are mostly foreground (:func:`predicted_foreground_note`),
    files of an earlier prediction in --output that this one did not write (:func:`earlier_outputs_note`;
    ``written``, {output name: input file}, of the images predicted, those of the image ``rows``), ``replaced_rows``
    (:func:`predict.write_results`'), and with --instances image ids that pandas reads as other values
    (:func:`pandas_ids_note`; ``objects``, the objects table)."""
    source_id = dict(zip(files, ids))
    predicted = {row.image for row in rows}  # a file left out now wrote nothing: its earlier outputs are named
    return [resumed, predicted_foreground_note(rows, files, ids),
            earlier_outputs_note(args, files, ids, {n: f for n, f in written.items() if source_id[f] in predicted}),
            replaced_rows,
            pandas_ids_note([list(dict.fromkeys(row.image for row in rows)), objects["image"].unique()])
            if args.instances else ""]
