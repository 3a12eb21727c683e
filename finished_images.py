"""What a prediction stopped before its end had finished, so that ``predict.py --resume`` predicts only the others.

While predict.py runs, each image whose output files are all written gets a record in ``<output>/.predict_finished/``
(``<id>.json``, written atomically): the settings that made it, the file it was read from, and its images.csv rows
and objects table. The tables are written only at a prediction's end, from every image's rows: a stopped one's rows
live in these records until ``--resume`` writes them. A prediction that reaches its end removes the records of its
images (and the folder, once empty: predictions that share a folder keep each other's).

An image counts as finished for --resume when its record was made with the same settings (:func:`check_settings`),
from the same file, unchanged since (path, size and modification time), and its output files are all there.
"""
import json
import os
from contextlib import suppress

import numpy as np
import pandas as pd

from files import atomic_write, remove_killed_writes
from measurements import ImageRow
from utils import UsageError

FOLDER = ".predict_finished"  # hidden: predict.py's --input skips it, as it skips the lock file
# the settings that name what made the outputs rather than a flag: checkpoints.made_by's and the model's epoch
MADE_BY = ("weights_sha256", "config_sha256", "toolkit", "model")


def record_path(out_dir, img_id):
    """Where image ``img_id``'s record lies in ``out_dir``."""
    return os.path.join(out_dir, FOLDER, img_id + ".json")


def source_stamp(path):
    """What tells an input file apart from one rewritten since: [its absolute real path, size in bytes, modification
    time in ns]."""
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def plain(value):
    """A NumPy scalar as the Python one that JSON writes exactly (a float's shortest repr reads back to itself)."""
    return value.item() if isinstance(value, np.generic) else value


def table_record(table):
    """An objects table as JSON-ready lists: {column: [its dtype's name, its values]}, in column order."""
    return {column: [values.dtype.name, values.tolist()] for column, values in table.items()}


def table_from_record(record):
    """The objects table that :func:`table_record` wrote, with its dtypes (an image without nuclei: empty)."""
    return pd.DataFrame({column: pd.Series(values, dtype=dtype) for column, (dtype, values) in record.items()})


def record_finished(out_dir, settings, sources, img_id, rows, tables):
    """Record image ``img_id`` as finished: its output files are written; ``settings`` (:func:`json_ready`) made
    them from the file ``sources[img_id]``; ``rows``: its ImageRows, one per plane; ``tables``: its objects tables,
    one per plane, or none without --instances."""
    os.makedirs(os.path.join(out_dir, FOLDER), exist_ok=True)
    record = {"settings": settings, "source": source_stamp(sources[img_id]),
              "rows": [[plain(v) for v in row] for row in rows],
              "objects": table_record(pd.concat(tables, ignore_index=True)) if tables else None}
    text = json.dumps(record)  # at once: json.dump writes piece by piece, in Python, 5 times slower
    with atomic_write(record_path(out_dir, img_id)) as f:
        f.write(text)


def same_value(a, b):
    """Whether two settings' values are the same as JSON holds them (NaN equal to NaN, a tuple to its list)."""
    return json.dumps(a) == json.dumps(b)


def check_settings(out_dir, img_id, recorded, settings):
    """A UsageError when the ``recorded`` settings of image ``img_id``'s record are not this prediction's
    ``settings``: its outputs would then mix two predictions' settings."""
    changed = [k for k in dict.fromkeys([*recorded, *settings])
               if not same_value(recorded.get(k), settings.get(k))]
    if changed:
        shown = "; ".join(f"{k} {json.dumps(recorded.get(k))} -> {json.dumps(settings.get(k))}" for k in changed[:3])
        # no flag gives back another version of the run's weights, its config.yml or the toolkit, nor those of the
        # same runs averaged with it (--ensemble)
        made = set(changed) & set(MADE_BY) or ("ensemble_weights" in changed and "ensemble" not in changed)
        fix = "" if made else "give the flags and run it was made with, or "
        raise UsageError(f"--resume: the prediction that stopped in {os.path.join(out_dir, '')} (image {img_id}) was "
                         f"made with other settings than this one: {shown}"
                         f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''}; {fix}leave out --resume to "
                         "predict every image again")


def read_finished(out_dir, sources, outputs, settings):
    """The images that a stopped prediction in ``out_dir`` finished and --resume need not predict again:
    {img_id: (its ImageRows, its objects table or None)} of the images ``sources`` ({img_id: input file}) whose record
    is there, of that very file (unchanged since) and with every output file in ``outputs`` ({img_id: [file names]})
    there. A record made with other settings is a UsageError (:func:`check_settings`)."""
    folder = os.path.join(out_dir, FOLDER)
    if not os.path.isdir(folder):
        return {}
    remove_killed_writes(folder)
    finished = {}
    for img_id, source in sources.items():
        record = read_record(out_dir, img_id)
        if record is None:
            continue
        recorded, stamp, rows, table = record
        check_settings(out_dir, img_id, recorded, settings)
        if stamp == source_stamp(source) and all(os.path.isfile(os.path.join(out_dir, n)) for n in outputs[img_id]):
            finished[img_id] = (rows, table)
    return finished


def read_record(out_dir, img_id):
    """(settings, source stamp, ImageRows, objects table or None) of image ``img_id``'s record, as
    :func:`record_finished` wrote them; None for none, or for a file that is not such a record of this image (cut
    short, edited by hand, another image's copied): the image is then predicted again."""
    try:
        with open(record_path(out_dir, img_id)) as f:
            record = json.load(f)
        settings, source, objects = record["settings"], record["source"], record["objects"]
        rows = [ImageRow(*row) for row in record["rows"]]
        table = None if objects is None else table_from_record(objects)
        ours = isinstance(settings, dict) and {row.image for row in rows} == {img_id}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):  # none, not JSON, not a record's
        return None
    return (settings, source, rows, table) if ours else None


def forget_finished(out_dir, ids):
    """Remove the records of images ``ids`` (a prediction of them that reached its end, or one that starts over), and
    the records' folder once it holds no other's."""
    folder = os.path.join(out_dir, FOLDER)
    if not os.path.isdir(folder):
        return
    for img_id in ids:
        with suppress(FileNotFoundError):
            os.remove(record_path(out_dir, img_id))
    remove_killed_writes(folder)
    with suppress(OSError):  # another prediction's records are still there
        os.rmdir(folder)


def finished_count(out_dir, ids):
    """How many of the images ``ids`` have a record in ``out_dir``."""
    return sum(os.path.isfile(record_path(out_dir, img_id)) for img_id in ids)


def json_ready(settings):
    """``settings`` as JSON reads them back (tuples as lists, NumPy scalars as Python's), to be recorded and compared
    (a NaN stays NaN)."""
    return json.loads(json.dumps(settings, default=plain))
