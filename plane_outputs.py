"""Writing each plane's outputs, and gathering the results of predict.py's plane jobs: a 2D image's PNGs, a stack's
ImageJ TIFF stacks, ROIs and GeoJSON objects written page by page as its planes come (in any order), and the
images.csv rows and objects tables of the planes, whose nuclei --stitch_z links through a stack's z planes.
"""
import os
import sys
from contextlib import ExitStack

import numpy as np
import pandas as pd

from files import atomic_imwrite, atomic_tiff_pages
from geojson_objects import GEOJSON_FILE, features_file, relabelled_features
from instances import link_planes
from measurements import CHANNEL_COLUMN, object_columns
from rois import relabelled, rois_archive
from utils import DataError

MERGED_TABLES = 1000  # objects tables of this many images are held as one
MOST_LABELS = np.iinfo(np.uint16).max  # the nuclei that <id>_instances holds, in one plane or a time point's z planes
# the outputs that list the nuclei, one file for all of a stack's planes: their writers, which yield add(nuclei)
LISTS = {"_rois": rois_archive, "_geojson": features_file}


def output_name(img_id, suffix, stack):
    """The file name of image ``img_id``'s output ``suffix``: a PNG for a 2D image, a TIFF stack for a stack, and
    for either the ROIs' zip file and the GeoJSON objects' ``<id>.geojson`` (the name QuPath's export gives)."""
    if suffix == "_geojson":
        return img_id + GEOJSON_FILE
    return f"{img_id}{suffix}{'.zip' if suffix == '_rois' else '.tif' if stack else '.png'}"


def write_image(out_dir, img_id, arrays):
    """A 2D image's outputs (:func:`predict.segment`) as ``<id><suffix>.png`` (the ROIs as ``<id>_rois.zip``, the
    GeoJSON objects as ``<id>.geojson``)."""
    for suffix, array in arrays.items():
        path = os.path.join(out_dir, output_name(img_id, suffix, stack=False))
        if suffix in LISTS:
            with LISTS[suffix](path) as add:
                add(array)
        else:
            atomic_imwrite(path, array)


def stack_layout(header, count):
    """The plane axes and their shape of the stacks written for a stack of ``count`` planes (its
    image_files.TiffHeader ``header``): the input's where ImageJ holds them in that order (T, Z, T and Z); others
    become one T axis."""
    axes = header.plane_axes if header.plane_axes in ("T", "Z", "TZ") else "T"
    return axes, header.plane_shape if axes == header.plane_axes else (count,)


def plane_grid(header, count):
    """(T, Z): the time points and z planes of the stacks written for a stack (:func:`stack_layout`); (1, 1) for a
    2D image (no plane axes)."""
    if not header.plane_axes:
        return 1, 1
    axes, shape = stack_layout(header, count)
    return {"T": (shape[0], 1), "Z": (1, shape[0]), "TZ": tuple(shape)}[axes]


def open_stack(out_dir, img_id, arrays, count, header):
    """The TIFF stacks ``<id><suffix>.tif`` of a stack of ``count`` planes, opened when the :func:`predict.segment`
    arrays of a first plane arrive: (an ExitStack that completes them when closed, where an error removes them,
    {suffix: write(plane, array)}, which writes a plane's array into its page of files.atomic_tiff_pages, or its
    ROIs into ``<id>_rois.zip`` and its GeoJSON objects into ``<id>.geojson``). The plane axes are
    :func:`stack_layout`'s. The header's pixel size is their calibration, so that Fiji measures them in
    micrometres."""
    axes, shape = stack_layout(header, count)
    with ExitStack() as opened:  # one that fails to open removes those opened before it
        writes = {}
        for suffix, array in arrays.items():
            path = os.path.join(out_dir, output_name(img_id, suffix, stack=True))
            if suffix in LISTS:
                writes[suffix] = in_plane_order(opened.enter_context(LISTS[suffix](path)))
            else:
                writes[suffix] = opened.enter_context(atomic_tiff_pages(
                    path, (*shape, *array.shape), array.dtype, axes + "YX", header.pixel_size))
        return opened.pop_all(), writes


def in_plane_order(add):
    """write(plane, rois) for a stack's planes 0, 1, ... in any order: ``add`` gets their ROIs (or GeoJSON objects)
    in plane order (the order of Fiji's ROI Manager), those of a plane that comes early held until the planes before
    it came."""
    early, coming = {}, 0

    def write(plane, rois):
        nonlocal coming
        early[plane] = rois
        while coming in early:
            add(early.pop(coming))
            coming += 1
    return write


def write_planes(writes, plane, arrays):
    """A plane's :func:`predict.segment` ``arrays`` into their pages of the stacks being written
    (:func:`open_stack`)."""
    for suffix, array in arrays.items():
        writes[suffix](plane, array[..., ::-1] if suffix == "_overlay" else array)  # BGR -> RGB


class Gathered:
    """The results of the :func:`predict.predict_plane` jobs, handed over in submission order (utils.BatchedThreads'
    ``on_result``): the images.csv rows, the objects tables, and each stack's outputs written into their pages as its
    planes come (:func:`open_stack`), so that a long time-lapse's are never all in memory. With ``stitch_z`` (an
    IoU), the nuclei of a stack of several z planes are linked through them first (:meth:`link`); with ``track``
    (an IoU), those of a time-lapse of single planes through its time points. Once a stack's
    files are written, ``on_finished(img_id, its rows, its objects tables)`` is called, as :func:`predict.predict_plane`
    calls it for a 2D image (finished_images.record_finished: what --resume need not predict again)."""

    def __init__(self, out_dir, stitch_z=None, on_finished=None, track=None):
        self.out_dir, self.stitch_z, self.on_finished, self.track = out_dir, stitch_z, on_finished, track
        self.rows, self.tables, self.merged = [], [], []
        # img_id -> [its stacks being written (open_stack), their write functions, the planes still to come, the rows
        # and the objects tables of those placed]
        self.writing = {}
        # img_id -> [the next plane to link, the results of later planes that came before it, the previous plane's
        # linked labels, the largest label of its time point]: the previous plane alone, as the pages are written
        self.linking = {}
        self.dropped = set()  # the files left out at a later plane: the rows of the planes before it go too
        self.errors = []  # of the files left out by their jobs

    def add(self, result):
        """One plane's :func:`predict.predict_plane` result: (source, arrays or None once written, its image row, its
        objects table or None, None), or a file left out (source, None, None, None, its error)."""
        (img_id, count, header), arrays, row, table, error = result
        if error is not None:
            if img_id not in self.dropped:
                self.leave_out(img_id, error)
        elif table is not None and self.link_iou(header, count) and img_id not in self.dropped:
            self.link(result)
        else:
            self.place(result)

    def leave_out(self, img_id, error):
        """Leave out file ``img_id`` for the DataError message ``error`` of its plane's job."""
        self.errors.append(error)
        self.drop(img_id, (DataError, DataError(error), None))

    def link_iou(self, header, count):
        """The intersection over union that links the nuclei of a stack's planes (instances.link_planes): --stitch_z's
        through the z planes of a stack of several, --track's through the time points of a time-lapse of single
        planes; None where neither links them (a 2D image, or the flag not given)."""
        times, z_planes = plane_grid(header, count)
        if z_planes > 1:
            return self.stitch_z
        return self.track if times > 1 else None

    def link(self, result):
        """A plane of a stack whose nuclei --stitch_z links through its z planes, or --track through its time points:
        placed once the planes before it are, with its labels, objects table, ROIs and GeoJSON objects relabelled by
        instances.link_planes against the plane before it (new nuclei after the largest label of its time point, or
        of the time-lapse). More nuclei than a 16-bit label image holds leave the file out, as one plane with as many
        does (:func:`predict.segment`)."""
        (img_id, count, header), _, row, _, _ = result
        state = self.linking.setdefault(img_id, [0, {}, None, 0])
        state[1][row.plane] = result
        z_planes = plane_grid(header, count)[1]
        tracking = z_planes == 1  # a time-lapse: each time point continues the one before, its labels the tracks
        while state[0] in state[1]:
            source, arrays, row, table, _ = state[1].pop(state[0])
            t, z = divmod(row.plane, z_planes)
            labels = arrays["_instances"]
            previous, largest = (state[2], state[3]) if z or (tracking and t) else (np.zeros_like(labels), 0)
            mapping = link_planes(previous, labels, self.link_iou(header, count), largest + 1)
            largest = max(largest, int(mapping.max()))
            if largest > MOST_LABELS:
                self.leave_out(img_id, self.too_many_labels(img_id, largest, t, z, tracking))
                return
            arrays["_instances"] = mapping[labels].astype(np.uint16)
            if "_rois" in arrays:
                arrays["_rois"] = relabelled(arrays["_rois"], mapping)
            if "_geojson" in arrays:
                arrays["_geojson"] = relabelled_features(arrays["_geojson"], mapping)
            state[0], state[2], state[3] = state[0] + 1, arrays["_instances"], largest
            self.place((source, arrays, row, table.assign(label=mapping[table["label"]]).sort_values("label"), None))
        if state[0] == count:
            self.linking.pop(img_id)

    @staticmethod
    def too_many_labels(img_id, largest, t, z, tracking):
        """The error that leaves a stack out when its linked labels passed a 16-bit label image's ``largest`` at time
        point ``t`` (z plane ``z``): --track's when ``tracking``, else --stitch_z's."""
        if tracking:
            return (f"image {img_id}: --track: {largest} tracks by time point {t} do not fit a 16-bit label image; "
                    "predict it in parts (crop it into smaller images, or fewer time points) or without --track")
        return (f"image {img_id}: --stitch_z: {largest} nuclei by z plane {z} of time point {t} do not fit a 16-bit "
                "label image; predict it in parts (crop it into smaller images, or fewer z planes) or without "
                "--stitch_z")

    def place(self, result):
        """A plane's result, kept: its image row and objects table, and its arrays into the stacks being written; the
        stack's ``on_finished`` once they are complete."""
        (img_id, count, header), arrays, row, table, _ = result
        self.rows.append(row)
        if table is not None:
            self.tables.append(table)
            if len(self.tables) == MERGED_TABLES:  # an image's own DataFrame takes ~10 times the bytes of its rows
                self.merged.append(pd.concat(self.tables, ignore_index=True))
                self.tables.clear()
        if arrays is not None and img_id not in self.dropped:
            if img_id not in self.writing:
                self.writing[img_id] = [*open_stack(self.out_dir, img_id, arrays, count, header), count, [], []]
            stack = self.writing[img_id]
            write_planes(stack[1], row.plane, arrays)
            stack[2] -= 1
            stack[3].append(row)
            stack[4] += [] if table is None else [table]
            if not stack[2]:
                self.writing.pop(img_id)[0].close()
                if self.on_finished:
                    self.on_finished(img_id, stack[3], stack[4])

    def drop(self, img_id, exc_info):
        """Leave out file ``img_id`` for the error ``exc_info`` (sys.exc_info() in its handler): its rows go, and a
        stack being written is removed (the error passed on to its files, which then leave nothing)."""
        self.dropped.add(img_id)
        self.linking.pop(img_id, None)
        if img_id in self.writing:
            self.writing.pop(img_id)[0].__exit__(*exc_info)

    def drop_unfinished(self):
        """On an error or Ctrl-C that stops the prediction: no stack is left half-written."""
        for img_id in list(self.writing):
            self.drop(img_id, sys.exc_info())

    def results(self, objects):
        """(the image rows of the files kept, their objects table with ``objects``, else None). Images of other
        channel counts share the union of their columns, in channel order."""
        rows = [row for row in self.rows if row.image not in self.dropped]
        if not objects or not rows:  # every file left out (or none to predict): no table to concatenate
            return rows, None
        table = objects_table(self.merged + self.tables)
        return rows, table[~table["image"].isin(self.dropped)].reset_index(drop=True)


def objects_table(tables):
    """Objects tables as one (measurements.object_rows' columns, for the most channels among them): images of other
    channel counts share the union of their columns, in channel order."""
    table = pd.concat(tables, ignore_index=True)
    return table[object_columns(sum(bool(CHANNEL_COLUMN.match(c)) for c in table.columns) // 2)]
