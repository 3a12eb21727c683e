"""Where a dataset's files are: the layouts on disk that train.py, val.py and score.py read, checked once when a
dataset is listed (each image paired with its masks or labels by id; a hint for a name that almost matches).

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
"""
import bisect
import difflib
import os
import re

import cv2
import numpy as np

from geojson_objects import GEOJSON_FILE, geojson_labels
from image_files import CELLPOSE_NOT_IMAGES, decode_image, read_label_image, read_mask
from instances import median_diameter, nucleus_areas
from rois import ROI_FILES, roi_labels
from utils import (NEAR_NAMES, DataError, UsageError, check_utf8_names, first_few, near_names, printable_path,
                   progress_bar)


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
            # Cellpose's own predictions, saved beside the images (<image>_cp_masks, without --savedir), are no
            # labels: Cellpose leaves them out of its training folders too
            predicted = {f"{i}{layout.img_suffix}_cp" for i in ids}
            label_ids = {i for i in _ids_in(dataset_dir, f"_masks{mask_ext}") if i in ids or i not in predicted}
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


def check_labels(layout, ids):
    """--borders needs instance labels for every id; raise a DataError naming the missing ones."""
    missing = [i for i in ids if layout.labels(i) is None]
    if missing:
        raise DataError(f"--borders True needs instance labels {layout.dataset_dir}/labels/<id>.png (16-bit, "
                        f"0 = background, 1..N one per nucleus; preprocess_dsb2018.py writes them); missing for "
                        f"{len(missing)} of {len(ids)} images, e.g. {first_few(missing)}; without them train with "
                        "--borders False")
