"""The training layouts on disk, and a torch Dataset over them.

Five layouts (:class:`Layout`); the first is the one pytorch-nested-unet used::

    inputs/<dataset>/images/<id><img_ext>
    inputs/<dataset>/masks/<class>/<id><mask_ext>     # class folders 0, 1, ... one per output channel
    inputs/<dataset>/labels/<id>.png                   # optional 16-bit instance labels (0 = background)

    inputs/<dataset>/images/<id><img_ext>             # label images (StarDist's layout): one integer per nucleus,
    inputs/<dataset>/labels/<id><mask_ext>            # 0 = background; or masks/<id><mask_ext>, no class folders

    inputs/<dataset>/<id>_img<img_ext>                # Cellpose's layout: image and label image side by side
    inputs/<dataset>/<id>_masks<mask_ext>             # (or <id><img_ext> + <id>_masks<mask_ext>, Cellpose's own
                                                      # training folders; its <id>_flows files are left out)

    inputs/<dataset>/images/<id><img_ext>             # ImageJ ROIs (Fiji's ROI Manager, predict.py --rois): one
    inputs/<dataset>/rois/<id>.zip                    # area ROI per nucleus (or <id>_rois.zip, or one <id>.roi),
                                                      # drawn as label images by rois.roi_labels

    inputs/<dataset>/images/<id><img_ext>             # GeoJSON objects (QuPath's export, predict.py --geojson):
    inputs/<dataset>/geojson/<id>.geojson             # one polygon per nucleus, drawn as label images by
                                                      # geojson_objects.geojson_labels

With label images the binary mask (one class) is every labelled pixel, and the labels serve the instance score and
``--borders``. The files are read by image_files.py (PNG/JPEG/BMP with OpenCV, TIFF with tifffile).

With ``borders=True`` (train.py --borders True) the labels are required: each sample gets one more target
channel after the classes, the pixels where two nuclei touch (:func:`instances.touching_borders`).

Images are scaled to [0, 1] as image_files.image_to_float says (``normalization``: fixed, percentile or
percentile_dark); the network then sees ``(x - 0.5) / 0.25`` (:func:`normalize`), applied once. Resizing uses
linear interpolation for images and nearest for masks (image_files.NEAREST, aligned with the linear one), so
targets stay hard.
"""
import bisect
import difflib
import multiprocessing
import os
import re
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

import distributed
from geojson_objects import GEOJSON_FILE, geojson_labels
from image_files import (CELLPOSE_NOT_IMAGES, JPEG_EXTS, NEAREST, decode_image, image_to_float, multi_object_ids,
                         normalize, read_label_image, read_mask)
from rois import ROI_FILES, roi_labels
from instances import median_diameter, nucleus_areas, touching_borders
from measurements import foreground_note
from utils import (NEAR_NAMES, STOP_SIGNALS, DataError, UsageError, check_utf8_names, first_few, near_names,
                   printable_path, progress_bar, usable_cpus)


# ----------------------------------------------------------------------------------------- listing a dataset

def _ids_in(folder, ext, any_case=False):
    """The ids of the files <id><ext> in ``folder`` (not hidden, not folders; a broken link counts, so that
    reading it names it); with ``any_case`` ``ext`` in upper or lower case (.GEOJSON: a fixed ending, no flag's)."""
    def ending(f):
        return f[len(f) - len(ext):].lower() if any_case else f[len(f) - len(ext):]

    files = [f for f in os.listdir(folder) if len(f) > len(ext) and ending(f) == (ext.lower() if any_case else ext)
             and not f.startswith(".") and not os.path.isdir(os.path.join(folder, f))]
    check_utf8_names(os.path.join(folder, f) for f in files)
    return {f[: -len(ext)] for f in files}


def with_ending(folder, img_id, endings):
    """The path of the file <img_id><ending> in ``folder`` for the first of ``endings`` (lower case) that one has,
    the ending in any case (Windows tools save .ZIP, .GEOJSON); None when none has."""
    for ending in endings:  # the usual names first, without listing the folder
        if os.path.isfile(os.path.join(folder, img_id + ending)):
            return os.path.join(folder, img_id + ending)
    names = os.listdir(folder)
    for ending in endings:
        found = [f for f in names if f[:len(img_id)] == img_id and f[len(img_id):].lower() == ending]
        if found:
            return os.path.join(folder, found[0])
    return None


class Layout:
    """Where the files of sample ``img_id`` are in a dataset folder of one of the five layouts (module docstring):
    ``kind`` is 'masks', 'labels' (label images in ``label_dir``), 'rois' (ImageJ ROI sets in ``label_dir``),
    'geojson' (GeoJSON objects in ``label_dir``) or 'cellpose' (images named <id>``img_suffix``, '_img' or '')."""

    def __init__(self, dataset_dir, kind, img_ext=".png", mask_ext=".png", label_dir=None, img_suffix="_img"):
        self.dataset_dir, self.kind, self.img_ext, self.mask_ext = dataset_dir, kind, img_ext, mask_ext
        self.label_dir, self.img_suffix = label_dir, img_suffix

    def image(self, img_id):
        if self.kind == "cellpose":
            return os.path.join(self.dataset_dir, f"{img_id}{self.img_suffix}{self.img_ext}")
        return os.path.join(self.dataset_dir, "images", img_id + self.img_ext)

    def mask(self, img_id, c):
        """The binary mask of class ``c`` ('masks' layout only)."""
        return os.path.join(self.dataset_dir, "masks", str(c), img_id + self.mask_ext)

    def nuclei_file(self, img_id):
        """The file that marks the nuclei of ``img_id``: its class-0 mask in the 'masks' layout, else its labels."""
        return self.mask(img_id, 0) if self.kind == "masks" else self.labels(img_id)

    def labels(self, img_id):
        """The instance label image of ``img_id``, or None (a 'masks' dataset without labels/<id>.png)."""
        if self.kind == "cellpose":
            return os.path.join(self.dataset_dir, f"{img_id}_masks{self.mask_ext}")
        if self.kind == "labels":
            return os.path.join(self.label_dir, img_id + self.mask_ext)
        if self.kind == "rois":
            return with_ending(self.label_dir, img_id, ROI_FILES) or os.path.join(self.label_dir, img_id + ".zip")
        if self.kind == "geojson":
            return with_ending(self.label_dir, img_id, (GEOJSON_FILE,)) or \
                os.path.join(self.label_dir, img_id + GEOJSON_FILE)
        path = os.path.join(self.dataset_dir, "labels", img_id + ".png")
        return path if os.path.isfile(path) else None

    def read_labels(self, img_id, shape=None):
        """The instance labels of ``img_id`` -> int32 [H, W] (:func:`read_instance_labels`; ``shape`` its image's
        (H, W) when known)."""
        return read_instance_labels(self.labels(img_id), self.image(img_id), shape)

    def roi_files(self):
        """{id: [its ROI files' names]} of the files in the 'rois' layout's folder: <id>_rois.zip, <id>.zip or
        <id>.roi (:data:`rois.ROI_FILES`), the id an image's where one matches, else the name's stem."""
        images, files = self.image_ids(), {}
        for name in sorted(os.listdir(self.label_dir)):
            stems = [name[:-len(e)] for e in ROI_FILES if name.lower().endswith(e) and not name.startswith(".")]
            if stems:
                files.setdefault(next((s for s in stems if s in images), stems[-1]), []).append(name)
        return files

    def image_ids(self):
        if self.kind == "cellpose":
            ids = _ids_in(self.dataset_dir, f"{self.img_suffix}{self.img_ext}")
            return ids if self.img_suffix else {i for i in ids if not i.endswith(CELLPOSE_NOT_IMAGES)}
        return _ids_in(os.path.join(self.dataset_dir, "images"), self.img_ext)


def find_layout(dataset_dir, img_ext=".png", mask_ext=".png"):
    """The :class:`Layout` of ``dataset_dir``: class folders under masks/ make the 'masks' layout; label images in
    labels/ (no masks/) or directly in masks/ the 'labels' layout; a rois/ or geojson/ folder (no masks/ nor labels/)
    'rois' or 'geojson';
    <id>_img files (or without images/, any images) beside <id>_masks files Cellpose's."""
    img_dir, mask_dir = os.path.join(dataset_dir, "images"), os.path.join(dataset_dir, "masks")
    if not os.path.isdir(img_dir):
        files = os.listdir(dataset_dir) if os.path.isdir(dataset_dir) else []
        if files and _ids_in(dataset_dir, f"_img{img_ext}"):
            return Layout(dataset_dir, "cellpose", img_ext, mask_ext)
        cellpose = sorted({f.rsplit("_img", 1)[1] for f in files if "_img." in f and not f.startswith(".")})
        if not cellpose and files and _ids_in(dataset_dir, f"_masks{mask_ext}"):
            return Layout(dataset_dir, "cellpose", img_ext, mask_ext, img_suffix="")
        masks = sorted({f.rsplit("_masks", 1)[1] for f in files if "_masks." in f and not f.startswith(".")})
        other_masks = f" and --mask_ext {masks[0]}" if len(masks) == 1 and masks[0] != mask_ext else ""
        hint = (f"; found Cellpose-style <name>_img{cellpose[0]} files: pass --img_ext {cellpose[0]}{other_masks}"
                if cellpose else
                f"; found Cellpose-style <name>_masks{masks[0]} files: pass --mask_ext {masks[0]} (and the images' "
                "--img_ext)" if masks else "")
        raise DataError(f"dataset folder {img_dir} not found: run preprocess_dsb2018.py, use --dataset synthetic, "
                        f"or lay out your data as in the README ('Your own data'){hint}")
    labels_dir = os.path.join(dataset_dir, "labels")
    for kind, what in (("rois", "ImageJ ROIs"), ("geojson", "GeoJSON objects")):
        folder = os.path.join(dataset_dir, kind)
        if os.path.isdir(folder):
            other = [d for d in (mask_dir, labels_dir, os.path.join(dataset_dir, "geojson")) if os.path.isdir(d)
                     and d != folder]
            if other:  # which one the user meant cannot be told
                raise DataError(f"{dataset_dir} holds both {what} ({kind}/) and {os.path.basename(other[0])}/: give "
                                "each image one kind of annotation; move the other folder out")
            return Layout(dataset_dir, kind, img_ext, mask_ext, folder)
    if os.path.isdir(mask_dir) and _ids_in(mask_dir, mask_ext):
        classes = sorted(d for d in os.listdir(mask_dir) if d.isdigit() and os.path.isdir(os.path.join(mask_dir, d)))
        if classes:  # which one the user meant cannot be told
            raise DataError(f"{mask_dir} holds both class folders ({', '.join(classes)}) and {mask_ext} files "
                            f"({first_few(sorted(_ids_in(mask_dir, mask_ext)))}): masks go in masks/<class>/<id>, "
                            "label images directly in masks/<id>; move the other kind out")
        return Layout(dataset_dir, "labels", img_ext, mask_ext, mask_dir)
    if not os.path.isdir(mask_dir) and os.path.isdir(labels_dir):
        return Layout(dataset_dir, "labels", img_ext, mask_ext, labels_dir)
    return Layout(dataset_dir, "masks", img_ext, mask_ext)


def _check_pairs(ids, other_ids, other_dir, what, ext, flag, name_suffix="", img_ext=".png"):
    """Raise a DataError when the images (<id>``img_ext``) and their masks or labels in ``other_dir`` (named
    <id>``name_suffix````ext``) do not pair up."""
    if not other_ids:
        hint = _extension_hint(other_dir, flag) or f"; give every image its {what} there, named like it (<id>{ext})"
        raise DataError(f"no {ext} {what}s in {other_dir}{hint}")
    if ids - other_ids:
        n = len(ids - other_ids)
        files = [f for f in os.listdir(other_dir) if not f.startswith(".")]
        twins = near_names([i + name_suffix + ext for i in ids - other_ids], files)
        unpaired = sorted(set(files) - {i + name_suffix + ext for i in ids & other_ids})
        hint = f" (found {first_few(twins)}: {NEAR_NAMES})" if twins else \
            _nearest_name_hint(sorted(ids - other_ids), unpaired, what, ext,
                               # a flag changes every name: it serves when none pairs now
                               flag if not name_suffix and not ids & other_ids else "", name_suffix, img_ext)
        raise DataError(f"{n} image{' has' if n == 1 else 's have'} no {what} in {other_dir}: "
                        f"{first_few(ids - other_ids)}; give every image its {what}, named like the image{hint}")
    if other_ids - ids:
        n = len(other_ids - ids)
        raise DataError(f"{n} {what}{' has' if n == 1 else 's have'} no image in {other_dir}: "
                        f"{first_few(other_ids - ids)}; give every {what} its image, named like it")


# The image ids (the first, sorted) whose nearest name by difflib a pairing error looks for: each compares it with every
# name in the folder
NEAREST_TRIES = 20


def _zero_padding_free(name):
    """``name`` with every number written without leading zeros: '001.png' -> '1.png'."""
    return re.sub(r"\d+", lambda number: str(int(number.group())), name)


def _nearest_name_hint(missing, unpaired, what, ext, flag, name_suffix="", img_ext=".png"):
    """' (nearest unpaired <what>: F for image I: the fix)' for the first of the image ids ``missing`` (sorted) that
    has a file of ``unpaired`` (the names in the folder that pair with no image) named nearly as it: its name and more
    ('a_mask.png', 'a.ome.tif' for a.tif, 'a.tiff'), its name less an ending of the image's ('a.tif' for a.ome.tif),
    the same numbers zero-padded otherwise ('001.png' for 1.png), else the nearest by difflib among the first
    :data:`NEAREST_TRIES` ids; ``flag`` the flag of the other files' extension ('' where a flag cannot serve:
    Cellpose's <id>_masks names, or some files pair already); '' when none is near. Each id is looked up, not
    compared with every name: a dataset of thousands of images, all named otherwise than their masks, took minutes."""
    def separated(rest):  # 'a' + '_mask.png' is a's; '1' + '0.png' is 10's, not 1's
        return bool(rest) and not rest[0].isalnum()

    unpaired, tail = sorted(unpaired), name_suffix + ext
    stems = {}  # the names <stem><name_suffix><ext> by their stem, in sorted order
    for name in unpaired:
        if name.endswith(tail) and len(name) > len(tail):
            stems.setdefault(name[:-len(tail)], []).append(name)
    for img_id in missing:
        wanted, head = img_id + tail, img_id + name_suffix
        longer = []  # its name and more: the names from head on in sorted order, while they start with it
        for name in unpaired[bisect.bisect_left(unpaired, head):]:
            if not name.startswith(head):
                break
            if separated(name[len(head):]):
                longer.append(name)
        shorter = [name for cut in range(1, len(img_id)) if separated(img_id[cut:])  # a.tif for image a.ome.tif
                   for name in stems.get(img_id[:cut], [])]
        if not longer and not shorter:
            continue
        name = min(longer + shorter)  # the first in sorted order, as the names were searched
        if name in longer:
            rest = name[len(head):]
            if rest.startswith(".") and flag:  # a longer or other extension: a.ome.tif, a.tiff
                fix = f"pass {flag} {rest} if they all end so, or rename it to {wanted}"
            elif rest.endswith(ext):  # a.tif: a_mask.tif
                fix = f"rename it to {wanted}, and the others alike, without {rest[:-len(ext)]!r}"
            else:
                fix = f"rename it to {wanted}"
        else:
            extra = img_id[len(name) - len(tail):]
            fix = (f"pass --img_ext {extra}{img_ext} if the images all end so, or rename it to {wanted}"
                   if extra.startswith(".") and flag else f"rename it to {wanted}")
        return f" (nearest unpaired {what}: {name} for image {img_id}: {fix})"
    padded = {}
    for name in unpaired:
        padded.setdefault(_zero_padding_free(name), name)
    for img_id in missing:
        wanted = img_id + tail
        if _zero_padding_free(wanted) in padded:
            return (f" (nearest unpaired {what}: {padded[_zero_padding_free(wanted)]} for image {img_id}: the numbers "
                    f"are zero-padded otherwise; rename it to {wanted}, and the others alike)")
    for img_id in missing[:NEAREST_TRIES]:
        wanted = img_id + tail
        close = difflib.get_close_matches(wanted, unpaired, n=1, cutoff=0.6)
        if close:
            return f" (nearest unpaired {what}: {close[0]} for image {img_id}: rename it to {wanted} if it is its)"
    return ""


def _extension_hint(folder, flag):
    """'; found .tif files: pass --img_ext .tif' for the file extensions in ``folder`` ('' when it has none)."""
    found = sorted({os.path.splitext(f)[1] for f in os.listdir(folder) if os.path.splitext(f)[1]})
    if not found:
        return ""
    return f"; found {', '.join(found)} files: pass " + (f"{flag} {found[0]}" if len(found) == 1 else
                                                          f"{flag} with one of them")


def _mask_extension_too(layout, mask_ext):
    """' and --mask_ext .tif (...)' when the masks or label images of ``layout`` are all of one other type than
    ``mask_ext`` too, so that the error about the images' type names both flags at once; else ''."""
    masks = os.path.join(layout.dataset_dir, "masks")
    folder = layout.label_dir if layout.kind == "labels" else os.path.join(masks, "0")
    if layout.kind == "masks" and not os.path.isdir(folder):  # label images of another type than --mask_ext
        folder = masks  # directly in masks/ are not found as such, so that layout reads as 'masks'
    if layout.kind in ("cellpose", "rois", "geojson") or not os.path.isdir(folder):
        return ""
    found = {os.path.splitext(f)[1] for f in os.listdir(folder) if not f.startswith(".")} - {""}
    if len(found) != 1 or mask_ext in found:
        return ""
    return f" and --mask_ext {found.pop()} (the type of the files in {folder})"


def images_left_out(dataset_dir, img_ext):
    """A note naming the files in ``dataset_dir``/images/ that are not ``<id><img_ext>`` (another type, or .PNG
    for .png), which no run reads; '' when there are none."""
    folder = os.path.join(dataset_dir, "images")
    other = sorted(printable_path(f) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if not f.endswith(img_ext) and not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    if not other:
        return ""
    return (f"note: {len(other)} file{'s are' if len(other) > 1 else ' is'} in {folder} without the extension "
            f"{img_ext} and left out: {first_few(other)} (one --img_ext for all images)")


def list_ids(dataset_dir, img_ext=".png", mask_ext=".png", num_classes=1):
    """Check the layout under ``dataset_dir`` and return the sorted sample ids.

    Raises DataError/UsageError naming the folder or ids when the folder is missing or empty, an image has
    no mask, a mask has no image, or the number of class folders differs from ``num_classes``.
    """
    layout = find_layout(dataset_dir, img_ext, mask_ext)
    img_dir = os.path.join(dataset_dir, "images") if layout.kind != "cellpose" else dataset_dir
    ids = layout.image_ids()
    if not ids:
        raise DataError(f"no {img_ext} images in {img_dir}{_extension_hint(img_dir, '--img_ext')}"
                        f"{_mask_extension_too(layout, mask_ext)}")
    if layout.kind != "masks":
        if num_classes != 1:
            raise UsageError(f"--num_classes {num_classes}: a dataset of label images ({dataset_dir}) has one class, "
                             "the nuclei; use --num_classes 1")
        if layout.kind == "rois":
            check_roi_files(layout, ids)
        elif layout.kind == "geojson":
            check_geojson_files(layout, ids)
        elif layout.kind == "cellpose":
            label_ids = _ids_in(dataset_dir, f"_masks{mask_ext}")
            _check_pairs(ids, label_ids, dataset_dir, "<id>_masks label image", mask_ext, "--mask_ext", "_masks",
                         img_ext)
        else:
            _check_pairs(ids, _ids_in(layout.label_dir, mask_ext), layout.label_dir, "label image", mask_ext,
                         "--mask_ext", img_ext=img_ext)
        return sorted(ids)
    mask_dir = os.path.join(dataset_dir, "masks")
    if not os.path.isdir(mask_dir):
        raise DataError(f"mask folder {mask_dir} not found: masks go in masks/<class>/<id>{mask_ext} (or label "
                        f"images in labels/<id>{mask_ext})")
    class_dirs = sorted((d for d in os.listdir(mask_dir) if os.path.isdir(os.path.join(mask_dir, d))
                         and not d.startswith(".")), key=lambda d: (len(d), d))  # numeric order: 0, 1, ..., 10
    expected = [str(c) for c in range(num_classes)]
    if not class_dirs:
        raise DataError(f"no class folders in {mask_dir}: masks go in masks/0/<id>{mask_ext} (label images in "
                        f"masks/<id>{mask_ext}){_extension_hint(mask_dir, '--mask_ext')}")
    if class_dirs != [str(c) for c in range(len(class_dirs))]:
        raise DataError(f"{mask_dir} holds the class folders {class_dirs}; name them 0, 1, ... (one per class, "
                        "masks/0/<id> for nuclei alone)")
    if class_dirs != expected:
        raise UsageError(f"{mask_dir} holds the class folders {class_dirs}, but a run with --num_classes "
                         f"{num_classes} reads {expected}: the dataset and the run need the same classes (to train "
                         f"on these: --num_classes {len(class_dirs)})")
    for c in expected:
        folder = os.path.join(mask_dir, c)
        _check_pairs(ids, _ids_in(folder, mask_ext), folder, "mask", mask_ext, "--mask_ext", img_ext=img_ext)
    return sorted(ids)


def check_roi_files(layout, ids):
    """Pair the images ``ids`` of a 'rois' ``layout`` with their ROI files, and decode each once, printing its notes
    (rois.roi_labels): a DataError names an image without ROIs, ROIs without an image, two ROI files of one image or
    a file that cannot be used."""
    files, folder = layout.roi_files(), layout.label_dir
    twice = {i: names for i, names in files.items() if len(names) > 1}
    if twice:
        img_id, names = next(iter(sorted(twice.items())))
        raise DataError(f"image {img_id} has {len(names)} ROI files in {folder}: {', '.join(names)}; keep one")
    strays = [files[i][0] for i in set(files) - set(ids)]
    # a set saved under another name (Fiji's default RoiSet.zip, a copy's "<id> (1).zip") is the one an image lacks
    found = f"; found {first_few(strays)}, named as no image: one set per image, named as it" if strays else ""
    for missing, what, fix in ((set(ids) - set(files), "image{s} without ImageJ ROIs", f"give each image its ROI set, "
                                "saved from Fiji's ROI Manager as <id>.zip (More > Save...; an image without nuclei: "
                                f"an empty zip file){found}"),
                               (set(files) - set(ids), "ROI file{s} without an image",
                                "name each ROI set as its image, <id>.zip, <id>_rois.zip or <id>.roi")):
        if missing:
            names = [files[i][0] for i in missing] if what.startswith("ROI") else missing
            raise DataError(f"{len(missing)} {what.format(s='s' * (len(missing) > 1))} in {folder}: "
                            f"{first_few(sorted(names))}; {fix}")
    for img_id in progress_bar(sorted(ids), desc="ImageJ ROIs", unit="img", leave=False, disable=len(ids) < 200):
        for note in roi_labels(layout.labels(img_id), decode_image(layout.image(img_id)).shape[:2])[1]:
            print(note)


def check_geojson_files(layout, ids):
    """Pair the images ``ids`` of a 'geojson' ``layout`` with their <id>.geojson files, and decode each once,
    printing its notes (geojson_objects.geojson_labels): a DataError names an image without objects, objects without
    an image or a file that cannot be used."""
    folder, found = layout.label_dir, _ids_in(layout.label_dir, GEOJSON_FILE, any_case=True)
    for missing, what, fix in ((set(ids) - found, "image{s} without GeoJSON objects",
                                f"give each image its {GEOJSON_FILE} file, exported from QuPath as <id>{GEOJSON_FILE} "
                                "(File > Export objects as GeoJSON; an image without nuclei: "
                                '{"type": "FeatureCollection", "features": []})'),
                               (found - set(ids), "GeoJSON file{s} without an image",
                                f"name each as its image, <id>{GEOJSON_FILE}")):
        if missing:
            names = sorted(missing) if what.startswith("image") else sorted(i + GEOJSON_FILE for i in missing)
            raise DataError(f"{len(missing)} {what.format(s='s' * (len(missing) > 1))} in {folder}: "
                            f"{first_few(names)}; {fix}")
    for img_id in progress_bar(sorted(ids), desc="GeoJSON", unit="img", leave=False, disable=len(ids) < 200):
        for note in geojson_labels(layout.labels(img_id), decode_image(layout.image(img_id)).shape[:2])[1]:
            print(note)


def read_instance_labels(path, image_path, shape=None):
    """The instance labels in ``path`` -> int32 [H, W] (0 = background): a label image (image_files.read_label_image),
    or an ImageJ ROI set (rois.ROI_FILES) or GeoJSON objects (<id>.geojson) drawn at the size of its image
    ``image_path`` (``shape`` (H, W) when known) by rois.roi_labels or geojson_objects.geojson_labels, their notes
    left to :func:`check_roi_files` and :func:`check_geojson_files`."""
    if path.lower().endswith(ROI_FILES):
        return roi_labels(path, shape or decode_image(image_path).shape[:2])[0].astype(np.int32)
    if path.lower().endswith(GEOJSON_FILE):
        return geojson_labels(path, shape or decode_image(image_path).shape[:2])[0].astype(np.int32)
    return read_label_image(path)


def nucleus_diameter(dataset_dir, ids, img_ext=".png", mask_ext=".png"):
    """The median diameter in pixels (instances.median_diameter) of the nuclei of samples ``ids``: from their
    instance labels, or where a sample has none from the connected components of its class-0 mask (touching nuclei
    then count as one). 0.0 when there are no nuclei. Every file is read: a bar shows it for 200 samples or more
    (train.py's start and val.py's end for a crop-trained run; 3000 label images of 1000 x 1000 take about 20 s)."""
    layout = find_layout(dataset_dir, img_ext, mask_ext)
    areas = []
    for img_id in progress_bar(ids, desc="nucleus sizes", unit="img", leave=False, disable=len(ids) < 200):
        path = layout.labels(img_id)
        if path is None:
            labels = cv2.connectedComponents((read_mask(layout.mask(img_id, 0)) > 0).astype(np.uint8))[1]
        else:
            labels = layout.read_labels(img_id)
        areas.append(nucleus_areas(labels))
    return median_diameter(np.concatenate(areas)) if areas else 0.0


# ------------------------------------------------------------------------------------------------ transforms

def check_labels(layout, ids):
    """--borders needs instance labels for every id; raise a DataError naming the missing ones."""
    missing = [i for i in ids if layout.labels(i) is None]
    if missing:
        raise DataError(f"--borders True needs instance labels {layout.dataset_dir}/labels/<id>.png (16-bit, "
                        f"0 = background, 1..N one per nucleus; preprocess_dsb2018.py writes them); missing for "
                        f"{len(missing)} of {len(ids)} images, e.g. {first_few(missing)}; without them train with "
                        "--borders False")


# train.py's flags that train_transform and device_data.BatchAugment both take, by these names: the trainer passes
# them to whichever loader --loader picks (on a CPU with the images cached, BatchAugment), so an augmentation that
# only one of the two draws does nothing in the other's runs (tests/test_device_data.py checks both take these).
AUGMENTATION_FLAGS = ("input_h", "input_w", "crop_size", "scale_jitter", "color_jitter", "greyscale", "invert",
                      "shot_noise", "blur")


def train_transform(input_h, input_w, crop_size=0, scale_jitter=0.0, color_jitter=True, greyscale=0.0, invert=0.0,
                    shot_noise=0.0, blur=0.0, stain_jitter=0.0):
    """Augmentation for training (albumentations 2.x): resize or random crop, the eight flips/rotations, jitter.

    With ``crop_size`` > 0 the image keeps its resolution and a random crop_size x crop_size window is taken
    (reflect-padded when the image is smaller); otherwise it is resized to input_h x input_w as in the seed.
    ``scale_jitter`` s rescales by a random factor in [1 - s, 1 + s] first. ``blur`` sigma (> 0): half the images
    defocused (:class:`Defocus`) after the flips; ``shot_noise`` photons (> 0): half the images made low-light
    (:class:`ShotNoise`) after that (optics before the camera), both before any colour change. ``greyscale`` and
    ``invert`` are the probabilities of turning the image grey (3 channels of OpenCV's grey) and of inverting it
    (1 - x), in that order, after the colour jitter. ``stain_jitter`` is the probability of re-staining an RGB
    image as H&E with a random preset stain matrix and intensity (A.HEStain), before the colour jitter; it runs in
    the loader workers alone (train.py picks them for it), every other augmentation also in
    device_data.BatchAugment (AUGMENTATION_FLAGS). Each transform draws from a seed of its own (:class:`DrawnApart`).
    """
    from augment import A, Defocus, DrawnApart, ShotNoise  # albumentations: imported only now (augment.py)
    size = []
    if scale_jitter > 0:
        size.append(A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if crop_size:
        size += [A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_REFLECT_101),
                 A.RandomCrop(crop_size, crop_size)]
    else:
        size.append(A.Resize(input_h, input_w, mask_interpolation=NEAREST))
    colour = [Defocus(blur)] if blur else []
    if shot_noise:
        colour.append(ShotNoise(shot_noise))
    if stain_jitter:
        colour.append(A.HEStain(method="random_preset", p=stain_jitter))
    if color_jitter:
        colour.append(A.OneOf([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=1.0),
                               A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0)], p=0.8))
    if greyscale:
        colour.append(A.ToGray(p=greyscale))
    if invert:
        colour.append(A.InvertImg(p=invert))
    return DrawnApart(size + [A.D4(p=1.0)] + colour)


class Resize:
    """Evaluation's resize of an image float [H, W, C] to ``size`` (h, w), linear, and of its mask uint8 [H, W] or
    [H, W, K], nearest (image_files.NEAREST), as albumentations' Resize does (tests/test_dataset.py compares them)
    without its import: ``transform(image=..., mask=...)`` -> {"image": ..., "mask": ...}."""

    def __init__(self, size):
        self.size = size

    def set_random_seed(self, seed):
        """Nothing is drawn: the Dataset seeds every transform."""

    def __call__(self, image, mask):
        return {"image": self._resized(image, cv2.INTER_LINEAR), "mask": self._resized(mask, NEAREST)}

    def _resized(self, array, interpolation):
        if array.shape[:2] == self.size:
            return array
        out = cv2.resize(array, self.size[::-1], interpolation=interpolation)
        return out.reshape(*self.size, *array.shape[2:])  # OpenCV drops a single channel's axis


def eval_transform(input_h, input_w, crop_size=0):
    """Evaluation: resize to input_h x input_w (:class:`Resize`), or (crop training) keep the original size (None)."""
    return None if crop_size else Resize((input_h, input_w))


# --------------------------------------------------------------------------------------------------- dataset

class Dataset(torch.utils.data.Dataset):
    """Samples of the layout above.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` returns ``(image, mask, {'img_id': id})``:
    image float32 [input_channels, H, W], normalised ``(x - 0.5) / 0.25`` from [0, 1];
    mask float32 [num_classes (+1 with borders), H, W] in {0, 1}. The augmentation of sample i in a given epoch is
    seeded by (seed, epoch, i), so a run is repeatable and a resumed run sees the same augmentations.
    ``cache=True`` decodes every file once, in this process, before training (forked workers share it; under the
    spawn start method, macOS's default, each worker receives a copy).
    ``border_size`` (h, w): the size a run trained on resized images sees (:func:`reading_of`); its border target is
    drawn at that size (:func:`border_target`), so that resizing keeps the lines whole.
    ``kinds=True`` adds each image's kind (:func:`image_modality` of the image as stored) to its metadata as 'kind',
    so that val.py's table of kinds costs no second read of every image.
    """

    def __init__(self, img_ids, dataset_dir, img_ext=".png", mask_ext=".png", num_classes=1, input_channels=3,
                 transform=None, seed=0, cache=False, borders=False, normalization="fixed", border_size=None,
                 kinds=False):
        self.img_ids = list(img_ids)
        self.kinds = kinds
        self.normalization = normalization
        self.layout = find_layout(dataset_dir, img_ext, mask_ext)
        self.borders, self.border_size = borders, border_size
        if borders:
            check_labels(self.layout, self.img_ids)
        self.num_classes, self.input_channels = num_classes, input_channels
        self.transform = transform
        self.seed = seed
        self.cached = None
        if cache:
            self.cached = [self.load(i) for i in progress_bar(range(len(self.img_ids)), desc="caching", leave=False,
                                                              disable=len(self.img_ids) < 200)]

    def __len__(self):
        return len(self.img_ids)

    def load(self, index):
        """Decode sample ``index`` -> (image as stored [H, W, C] (decode_image), mask uint8 [H, W, K] in {0,1})."""
        img_id = self.img_ids[index]
        img_path = self.layout.image(img_id)
        img = decode_image(img_path)
        labels = self.read_labels(img_id, img.shape[:2]) if self.borders or self.layout.kind != "masks" else None
        if self.layout.kind == "masks":
            masks = [self.read_mask(img_id, c, img_path, img.shape[:2]) for c in range(self.num_classes)]
        else:
            masks = [(labels > 0).astype(np.uint8)]
        if self.borders:
            masks.append(border_target(labels, self.border_size))
        return img, np.stack(masks, axis=-1)

    def read_mask(self, img_id, c, img_path, shape):
        path = self.layout.mask(img_id, c)
        mask = read_mask(path)
        if mask.shape != shape:
            turned = mask.shape == shape[::-1] and str(img_path).lower().endswith(JPEG_EXTS)
            raise DataError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image {img_path} is "
                            f"{shape[0]}x{shape[1]}; a mask must have its image's size" +
                            ("; the JPEG is read turned as its EXIF orientation says, as viewers show it: save the "
                             "mask as the image is shown" if turned else ""))
        return mask

    def read_labels(self, img_id, shape):
        """The instance labels of ``img_id``: int32 [H, W], 0 = background."""
        path = self.layout.labels(img_id)
        labels = self.layout.read_labels(img_id, shape)
        if labels.shape != shape:
            raise DataError(f"label image {path} is {labels.shape[0]}x{labels.shape[1]} but the image is "
                            f"{shape[0]}x{shape[1]}; instance labels must have their image's size")
        return labels

    def has_foreground(self):
        """Whether any mask has a pixel above 0. Masks are read until the first that has one, so a usual dataset
        costs one read."""
        return any((self.cached[i] if self.cached else self.load(i))[1].any() for i in range(len(self)))

    def modalities(self):
        """:func:`image_modality` of every sample, in order (from the cache, else decoding only the images, in one
        thread per usable CPU: OpenCV and NumPy release the GIL)."""
        if self.cached is not None:
            return [image_modality(img) for img, _ in self.cached]
        with ThreadPoolExecutor(usable_cpus()) as pool:
            return list(pool.map(lambda i: image_modality(decode_image(self.layout.image(i))), self.img_ids))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        stored, mask = self.cached[index] if self.cached is not None else self.load(index)
        meta = {"img_id": self.img_ids[index], **({"kind": image_modality(stored)} if self.kinds else {})}
        img = image_to_float(stored, self.input_channels, self.normalization)
        if self.transform is not None:
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        img = normalize(img.reshape(img.shape[0], img.shape[1], -1))
        mask = mask.reshape(mask.shape[0], mask.shape[1], -1)
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1), dtype=np.float32)), meta)


def evenly_spaced(count, samples):
    """Up to ``samples`` indices of ``count`` items, evenly spaced from the first to the last: int array, sorted."""
    return np.unique(np.linspace(0, count - 1, min(samples, count)).round().astype(int))


def mostly_foreground_note(data, what, samples=64):
    """A note ('' for none) when the nuclei of Dataset ``data`` (its class-0 masks or label images, up to ``samples``
    of them, evenly spaced; the cache's when it holds them, else read alone, without their images) cover more than
    :data:`measurements.MOSTLY_FOREGROUND` of their images on average: masks drawn dark-on-light, or label images whose
    background is not 0, would otherwise train a model of the background, or score one, without a word. ROI sets
    and GeoJSON objects, drawn on a background of 0, are not checked. ``what`` names the masks in the note ('the
    training masks')."""
    layout = data.layout
    if layout.kind in ("rois", "geojson"):
        return ""
    picked = evenly_spaced(len(data), samples)
    return foreground_note([(nuclei_marked(data, i) > 0).mean() for i in picked],
                           [layout.nuclei_file(data.img_ids[i]) for i in picked], what,
                           "a mask marks nuclei with values above 0 on a background of 0, so masks drawn dark on a "
                           "light background must be inverted (and label images need a background of 0)")


# The least share of the ids (pooled over the label images looked at) that split into separate objects for a note:
# resizing splits a few thin nuclei (27 of 28,862 ids in DSB2018's 96x96 labels, 9 of 247 in its worst image), a
# label image of classes instead of nuclei, or one numbered by another rule, splits many
SPLIT_SHARE = 0.01


def multi_object_ids_note(data, what, samples=64):
    """A note ('' for none) when, in the label images of Dataset ``data`` (up to ``samples`` of them, evenly spaced,
    read again from their files), at least :data:`SPLIT_SHARE` of the ids mark several separate objects
    (image_files.multi_object_ids): nuclei given one id, or cut in two. The DSB2018 score counts each such id as one
    nucleus, so that finding its parts scores a miss and false nuclei, and --borders sees no border between them;
    whether they are meant so cannot be told, so they are read as they are. ROI sets and GeoJSON objects, one polygon
    per nucleus, are not checked. ``what`` names the label images in the note."""
    layout = data.layout
    if layout.kind in ("rois", "geojson"):
        return ""
    picked = evenly_spaced(len(data), samples)
    split, ids_seen = {}, 0
    for i in picked:
        img_id = data.img_ids[i]
        if layout.labels(img_id) is not None:
            labels = layout.read_labels(img_id)
            ids_seen += len(np.unique(labels[labels > 0]))
            ids = multi_object_ids(labels)
            if len(ids):
                split[layout.labels(img_id)] = ids
    if sum(map(len, split.values())) < SPLIT_SHARE * ids_seen or not split:
        return ""
    path, ids = next(iter(split.items()))
    return (f"note: in {len(split)} of {len(picked)} of {what} an id marks several separate objects ({path}: "
            f"{len(ids)} id{'s' * (len(ids) > 1)}, e.g. {ids[0]}); each id is one nucleus to the DSB2018 score and "
            "--borders: give separate nuclei ids of their own (e.g. relabel the connected components)")


def nuclei_marked(data, index):
    """Sample ``index``'s class-0 mask (uint8, 0 background) or label image (int32) [H, W], from the cache when it
    holds it, else read alone (no image, no size check)."""
    if data.cached:
        return data.cached[index][1][..., 0]
    img_id = data.img_ids[index]
    return read_mask(data.layout.mask(img_id, 0)) if data.layout.kind == "masks" else data.layout.read_labels(img_id)


def eval_loader(dataset_dir, ids, reading, size, batch_size, num_workers, pin_memory=False, cache=False,
                kinds=False):
    """A DataLoader over ``ids`` at evaluation size, in order. ``reading``: dict(img_ext, mask_ext, num_classes,
    input_channels, borders) for :class:`Dataset`; ``size``: (input_h, input_w, crop_size); crop-trained runs
    (crop_size > 0) see whole images, whose sizes differ, so one per batch; ``kinds``: each batch's metadata also
    holds the images' kinds (:class:`Dataset`). Under DDP each process gets every world_size-th id, so every image
    is seen exactly once."""
    input_h, input_w, crop_size = size
    shard = ids[distributed.rank()::distributed.world_size()]
    data = Dataset(shard, dataset_dir, transform=eval_transform(input_h, input_w, crop_size), cache=cache,
                   kinds=kinds, **reading)
    return torch.utils.data.DataLoader(data, batch_size=1 if crop_size else batch_size, shuffle=False,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0, worker_init_fn=quiet_worker)


def quiet_worker(worker_id):
    """DataLoader ``worker_init_fn``: a worker stops without a traceback when the run stops.

    It ends with exit status 0 on SIGTERM. When the whole process group gets SIGTERM (``timeout``, a batch system
    ending a job), the main process then stops cleanly on its own SIGTERM; a worker killed by the signal would make
    it fail with a DataLoader traceback instead. (Ignoring the signal is no way out: multiprocessing ends leftover
    workers at exit with SIGTERM and waits for them.) And the thread through which it hands a batch's memory to the
    main process (multiprocessing's resource_sharer) prints nothing when the main process stops in the middle of
    taking one (Ctrl-C): that thread reports through sys.excepthook, which then passes over its errors."""
    for sig in STOP_SIGNALS:
        if not (sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN):  # nohup's stays ignored
            signal.signal(sig, _exit_quietly)
    sys.excepthook = quiet_about_fd_server


def _exit_quietly(signum, frame):
    os._exit(0)


RESOURCE_SHARER = os.path.join("multiprocessing", "resource_sharer.py")


def quiet_about_fd_server(exc_type, exc, tb):
    """sys.excepthook of a loader worker: a lost connection in multiprocessing's resource_sharer (the main process
    left mid-handshake) is not printed; every other error (too many open files, say) goes to the default hook."""
    gone = issubclass(exc_type, (EOFError, ConnectionError, multiprocessing.AuthenticationError))
    if not (gone and any(frame.f_code.co_filename.endswith(RESOURCE_SHARER) for frame, _ in traceback.walk_tb(tb))):
        sys.__excepthook__(exc_type, exc, tb)


def reading_of(cfg):
    """The :class:`Dataset` arguments of a run's flags ``cfg`` that say how its files are read."""
    return {**{k: getattr(cfg, k)
               for k in ("img_ext", "mask_ext", "num_classes", "input_channels", "borders", "normalization")},
            "border_size": None if cfg.crop_size else (cfg.input_h, cfg.input_w)}


def border_target(labels, size=None):
    """The --borders target of instance labels int [H, W]: uint8 [H, W] in {0, 1} (instances.touching_borders).
    With ``size`` (h, w), the size the labels will be resized to, it is drawn at that size and resized back: drawn
    at the file's size, the 2-pixel lines would mostly fall between the pixels that nearest-neighbour keeps."""
    if size is None or labels.shape == tuple(size):
        return touching_borders(labels)
    small = touching_borders(cv2.resize(labels, (size[1], size[0]), interpolation=NEAREST))
    return cv2.resize(small, (labels.shape[1], labels.shape[0]), interpolation=NEAREST)


# ---------------------------------------------------------------------------------------- balancing image kinds

MODALITIES = ("fluorescence", "stained", "bright-field")


def image_modality(img):
    """Decoded image [H, W, C] (any type) -> 'fluorescence', 'stained' or 'bright-field'.

    The three kinds of nucleus image in DSB2018, told apart on the image scaled to [0, 1]: a dark background
    (mean below 0.5) is fluorescence; a bright one is stained when coloured (mean channel spread above 0.05),
    else bright-field.
    """
    x = image_to_float(img, img.shape[2])
    if x.mean() < 0.5:
        return "fluorescence"
    spread = float((x.max(axis=2) - x.min(axis=2)).mean())
    return "stained" if spread > 0.05 else "bright-field"


def balance_weights(groups, power):
    """Sampling weight of each sample, ``n ** -power`` with n the number of samples in its group: float64 [N].

    power 0 draws every sample equally often (each group in proportion to its size), 1 draws every group
    equally often, 0.5 is in between.
    """
    _, index, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return counts[index].astype(np.float64) ** -power


class WeightedDistributedSampler(torch.utils.data.Sampler):
    """Draws ``len(weights)`` indices with replacement in proportion to ``weights``, the same draw in every
    process (seeded by seed and epoch); process ``rank`` of ``num_replicas`` takes every num_replicas-th one.
    The weighted counterpart of DistributedSampler (same ``set_epoch``), like WeightedRandomSampler."""

    def __init__(self, weights, num_replicas=1, rank=0, seed=0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = -(-len(self.weights) // num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                 generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return self.num_samples


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler so it yields ``(epoch, index)``; ``set_epoch`` reaches the wrapped DistributedSampler.

    The dataset seeds each sample's augmentation from that pair, which works with persistent workers.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)
