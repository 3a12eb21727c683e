"""What predict.py --instances measures: objects.csv, a row per nucleus (size, position, shape, intensity in each
channel, confidence, micrometres), and images.csv, a row per image or plane (its size, foreground and nuclei), and
how both are written (rounded, atomically).

To add a column to objects.csv: compute it in :func:`object_rows`, name it in OBJECT_COLUMNS and give its decimals
(OBJECT_DECIMALS, or SIGNIFICANT for values of any size).
"""
import math
import os
import re
from collections import namedtuple

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from files import atomic_write, interrupts_held
from image_files import nucleus_channel
from instances import mean_probability

TABLES = ("objects.csv", "images.csv")  # the objects' table and the images' (write_tables)
# DSB2018's masks cover 14 % of their images on average, 59 % at most; inverted, 41 % at least and 86 % on average
MOSTLY_FOREGROUND = 0.6


OBJECT_COLUMNS = ["image", "plane", "t", "z", "label", "area", "centroid_y", "centroid_x", "bbox_min_y",
                  "bbox_min_x", "bbox_max_y", "bbox_max_x", "mean_intensity", "integrated_intensity", "perimeter",
                  "eccentricity", "solidity", "major_axis_length", "minor_axis_length", "confidence", "pixel_size_um",
                  "area_um2", "perimeter_um", "major_axis_length_um", "minor_axis_length_um"]
# objects.csv's columns of each channel of a multi-channel image whose nucleus channel --channel picks
# (object_columns): nuclei found in the DNA channel are measured in a marker's channel too (EdU- or Ki67-positive
# nuclei), as CellProfiler's MeasureObjectIntensity measures them
CHANNEL_COLUMN = re.compile(r"(mean|integrated)_intensity_c\d+$")
# the micrometre columns of objects.csv: each pixel column times the pixel size to this power
IN_MICROMETRES = {"area": 2, "perimeter": 1, "major_axis_length": 1, "minor_axis_length": 1}
# Columns whose values may be anything: the intensities, in the image's own units (a float image's in [0, 1], or
# 1e-6), the pixel size (0.065 um under a 100x objective) and the micrometres (at 0.01 um per pixel, 2 decimals wrote
# nuclei of 85 and 99 px alike as 0.01 um2); 4 decimals, or SIGNIFICANT_DIGITS significant digits where those keep
# more (round_significant).
SIGNIFICANT = ("mean_intensity", "integrated_intensity", "pixel_size_um", "area_um2", "perimeter_um",
               "major_axis_length_um", "minor_axis_length_um")
# objects.csv's decimals: 2 for pixel positions and lengths, 4 for ratios and the confidence
OBJECT_DECIMALS = {c: 4 if c in ("eccentricity", "solidity", "confidence") else 2 for c in OBJECT_COLUMNS
                   if c not in SIGNIFICANT}
SIGNIFICANT_DIGITS = 6
# images.csv (--instances): a row per plane predicted, so that one without nuclei counts 0 (objects.csv has no row for
# it); the areas are empty for no nuclei, the pixel size when unknown.
IMAGE_COLUMNS = ["image", "plane", "t", "z", "height", "width", "scale", "foreground", "nuclei", "mean_area",
                 "median_area", "pixel_size_um"]
ImageRow = namedtuple("ImageRow", IMAGE_COLUMNS)  # a tuple, not a DataFrame: tens of thousands are held to the end
IMAGE_DECIMALS = {"scale": 4, "foreground": 4, "mean_area": 2, "median_area": 2}
# images.csv's columns of any size, 4 decimals or SIGNIFICANT_DIGITS significant digits: the pixel size and the
# areas in square micrometres, which write_tables adds after IMAGE_COLUMNS
IMAGE_SIGNIFICANT = ("pixel_size_um", "mean_area_um2", "median_area_um2")
# A colour image's intensity is its grey value, with OpenCV's weights for RGB -> grey: one set of columns for the
# grey and colour images of a run.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def foreground_note(shares, names, what, fix, each=False):
    """The note ('' for none) when ``what`` (the masks or predictions of the files ``names``) mark more than
    :data:`MOSTLY_FOREGROUND` of their pixels as nuclei (``shares``: each one's fraction, in [0, 1]): on average, or
    with ``each`` in any one of them, counted; the fullest named, then ``fix``, what to do."""
    over = sum(share > MOSTLY_FOREGROUND for share in shares)
    if not (over if each else np.mean(shares) > MOSTLY_FOREGROUND):
        return ""
    fullest = int(np.argmax(shares))
    marked = (f"more than {MOSTLY_FOREGROUND:.0%} of their pixels as nuclei in {over} of {len(shares)} images"
              if each else f"{np.mean(shares):.0%} of their pixels as nuclei on average")
    return f"note: {what} mark {marked} ({names[fullest]}: {shares[fullest]:.0%}); {fix}"


def object_columns(channels=0):
    """objects.csv's columns: OBJECT_COLUMNS, with those of ``channels`` channels after integrated_intensity
    (mean_intensity_c<c> of each, then integrated_intensity_c<c>; CHANNEL_COLUMN)."""
    at = OBJECT_COLUMNS.index("integrated_intensity") + 1
    return OBJECT_COLUMNS[:at] + [f"{kind}_intensity_c{c}" for kind in ("mean", "integrated")
                                  for c in range(channels)] + OBJECT_COLUMNS[at:]


def object_rows(img_id, plane, labels, raw, prob, pixel_size=None, channel=None, planes=(1, 1)):
    """regionprops_table of a label image int [H, W] -> DataFrame with :func:`object_columns`: the ``plane``'s time
    point and z plane in a stack of ``planes`` (T, Z) (0-based, 0 and 0 for a 2D image); lengths in pixels
    (bbox_max exclusive); the intensity of ``raw``, the plane as read [H, W, C] with every channel, in its own units:
    of the ``channel`` that --channel picks of several (image_files.nucleus_channel), else of the plane (C 1 or 3:
    GREY_WEIGHTS), and where --channel picks one of several, of each channel c as well (``_c<c>``; NaN where the
    nucleus holds NaN in it); the confidence, the mean of ``prob`` float [H, W] in [0, 1]
    (instances.mean_probability); the area and lengths in micrometres with ``pixel_size`` (um per pixel), NaN (empty
    in the file) without."""
    nucleus = nucleus_channel(raw, channel)
    table = regionprops_table(labels, intensity_image=nucleus, properties=(
        "label", "area", "centroid", "bbox", "intensity_mean", "perimeter", "eccentricity", "solidity",
        "axis_major_length", "axis_minor_length"))
    means = np.stack([table[f"intensity_mean-{c}"] for c in range(nucleus.shape[2])], axis=1)
    mean = means[:, 0] if nucleus.shape[2] == 1 else means @ GREY_WEIGHTS
    frame = pd.DataFrame({
        "image": img_id, "plane": plane, "t": plane // planes[1], "z": plane % planes[1], "label": table["label"],
        "area": table["area"].astype(int),
        "centroid_y": table["centroid-0"], "centroid_x": table["centroid-1"],
        "bbox_min_y": table["bbox-0"], "bbox_min_x": table["bbox-1"],
        "bbox_max_y": table["bbox-2"], "bbox_max_x": table["bbox-3"],
        "mean_intensity": mean, "integrated_intensity": mean * table["area"],
        "perimeter": table["perimeter"], "eccentricity": table["eccentricity"], "solidity": table["solidity"],
        "major_axis_length": table["axis_major_length"], "minor_axis_length": table["axis_minor_length"],
        "confidence": mean_probability(labels, prob)[table["label"] - 1]})
    size = np.nan if pixel_size is None else pixel_size
    frame["pixel_size_um"] = float(size)
    for column, power in IN_MICROMETRES.items():
        frame[f"{column}_um{'2' if power == 2 else ''}"] = frame[column] * size ** power
    channels = raw.shape[2] if nucleus.shape[2] < raw.shape[2] else 0
    for c in range(channels):
        frame[f"mean_intensity_c{c}"] = np.asarray(ndi.mean(raw[..., c], labels, table["label"]), np.float64)
        frame[f"integrated_intensity_c{c}"] = frame[f"mean_intensity_c{c}"] * table["area"]
    return frame[object_columns(channels)]


def image_row(img_id, plane, prob, threshold, scale, objects, pixel_size=None, planes=(1, 1)):
    """The images.csv row (ImageRow) of a plane predicted at ``scale``: its time point and z plane in a stack of
    ``planes`` (T, Z) (0-based; 0 and 0 for a 2D image), its size and foreground fraction of class 0 from ``prob``
    float [K, H, W] in [0, 1]; with ``objects`` (its :func:`object_rows` table, or None without --instances) the
    number of nuclei and their mean and median area in pixels (None: empty in the file); its ``pixel_size`` in
    micrometres (None: unknown)."""
    count = mean_area = median_area = None
    if objects is not None:
        count = len(objects)
        if count:
            mean_area, median_area = float(objects["area"].mean()), float(objects["area"].median())
    return ImageRow(img_id, plane, plane // planes[1], plane % planes[1], prob.shape[1], prob.shape[2], scale,
                    float((prob[0] > threshold).mean()), count, mean_area, median_area, pixel_size)


def write_tables(out_dir, rows, objects):
    """objects.csv of the ``objects`` table and images.csv of the ImageRows ``rows`` into ``out_dir``, each
    atomically; a Ctrl-C while they are written takes effect once both are this prediction's."""
    images = pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype({"nuclei": "Int64", "mean_area": float,
                                                                "median_area": float, "pixel_size_um": float})
    for area in ("mean_area", "median_area"):
        images[f"{area}_um2"] = images[area] * images["pixel_size_um"] ** 2
    with interrupts_held():
        with atomic_write(os.path.join(out_dir, TABLES[0])) as f:
            significant = [c for c in objects.columns if c in SIGNIFICANT or CHANNEL_COLUMN.match(c)]
            objects.round(OBJECT_DECIMALS).assign(**{c: round_significant(objects[c]) for c in significant}).to_csv(
                f, index=False)
        with atomic_write(os.path.join(out_dir, TABLES[1])) as f:
            images.round(IMAGE_DECIMALS).assign(**{c: round_significant(images[c]) for c in IMAGE_SIGNIFICANT}).to_csv(
                f, index=False)


def round_significant(values):
    """A float Series to 4 decimals, or to SIGNIFICANT_DIGITS significant digits where those keep more; NaN (an
    unknown pixel size) stays."""
    return values.map(lambda v: round(v, max(4, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(v)))))
                      if v and math.isfinite(v) else v)
