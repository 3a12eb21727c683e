"""Every run in models/ (and the bundled one in pretrained/) in one table: which is best, which stopped, which were
validated on the same images.

    python runs.py                          # the table, the best validation IoU first among runs that compare
    python runs.py 'dsb2018_96_*'           # only the runs whose names match (shell-style patterns)
    python runs.py --csv runs.csv           # also write it as CSV

A row per run: where it is (models, or pretrained for the bundled one), its architecture, dataset and image size;
the epochs trained and those asked for, and its state
(finished, early-stopped, stopped: ``train.py --resume`` goes on, training: a train.py holds it now); the best
epoch and its validation scores from log.csv (IoU pooled over the pixels and averaged over the images, Dice), the
hours it trained, and its val split: a fingerprint of the validation images in split.csv. Runs with the same dataset
and fingerprint were scored on the same images, so only their numbers compare; the table keeps them together. The
last column lists val.py's evaluations of the run in outputs/ (the mean IoU and DSB2018 score of their scores.csv),
each with the images it scored (val, test, every image of another dataset; TTA), marked when the run's weights
changed since.
"""
import fnmatch
import hashlib
import os

import pandas as pd
import yaml

from config import (EVALUATION_FILE, MODELS_DIR, OUTPUTS_DIR, PRETRAINED_DIR, best_after, read_run_config,
                    run_lock_file, stops_early)
from files import atomic_write, locked, sha256_file
from utils import ArgumentParser, DataError, UserError, first_few, path_arg, run_cli

COLUMNS = ["name", "where", "arch", "dataset", "size", "epochs", "epochs_asked", "state", "best_epoch", "val_iou",
           "val_iou_mean", "val_dice", "hours", "val_split", "evaluations"]


def run_folders(patterns):
    """{name: folder} of the runs to list: each folder of models/ with a config.yml, then the bundled runs of
    pretrained/ whose name no run in models/ takes (predict.py and val.py load that one), those whose names match
    one of the shell-style ``patterns`` (all when none), by name. Hidden folders (a run kept aside by --overwrite)
    are left out."""
    found = {}
    for parent in (MODELS_DIR, PRETRAINED_DIR):
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            folder = os.path.join(parent, name)
            if name.startswith(".") or name in found or not os.path.isfile(os.path.join(folder, "config.yml")):
                continue
            if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns):
                found[name] = folder
    return found


def read_log(folder):
    """The run's log.csv as a DataFrame (empty when the run saved no epoch yet). One without the epoch and val_iou
    columns that train.py writes (and the seed's log.csv has) is a DataError naming it."""
    path = os.path.join(folder, "log.csv")
    try:
        log = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["epoch", "val_iou"])
    missing = [c for c in ("epoch", "val_iou") if c not in log]
    if missing:
        raise DataError(f"{path} has no {' or '.join(missing)} column: not a log.csv written by train.py")
    return log


def val_split(folder):
    """The first 8 hex digits of the SHA-256 of the run's sorted validation ids (split.csv), '' without one (the
    images unknown, comparable with no other run's): equal for runs validated on the same images."""
    try:
        split = pd.read_csv(os.path.join(folder, "split.csv"), dtype=str)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return ""
    ids = sorted(split.loc[split["split"] == "val", "img_id"])
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]


def is_training(name, folder):
    """True when a train.py holds run ``name`` now (its lock in models/; a bundled run is never trained)."""
    lock = run_lock_file(name)
    if not folder.startswith(MODELS_DIR) or not os.path.exists(lock):
        return False
    with locked(lock) as holder:
        return holder is not None


def run_state(cfg, log, training):
    """'training', 'finished' (every epoch of --epochs), 'early-stopped' (--early_stopping epochs without a better
    val IoU, counted as train.py counts them: 0 stops after the first epoch, a NaN is no better), 'stopped'
    (train.py --resume goes on) or 'no epoch' (none saved)."""
    if training:
        return "training"
    if len(log) >= cfg.epochs:
        return "finished"
    if not len(log):
        return "no epoch"
    return "early-stopped" if stops_early(best_after(log["val_iou"]), cfg.early_stopping) else "stopped"


def read_evaluations():
    """{run name: [(output folder, its evaluation.yml as a dict, its scores.csv as a DataFrame)]} of val.py's
    evaluations in outputs/, by folder name; each folder read once, however many runs the table holds (reading them
    again for each run made the table of 100 runs and their evaluations take 20 s). A folder without a readable
    evaluation.yml (UTF-8, as val.py writes it) naming a run, or without an iou column in scores.csv, is left out."""
    if not os.path.isdir(OUTPUTS_DIR):
        return {}
    found = {}
    for out in sorted(os.listdir(OUTPUTS_DIR)):
        try:
            with open(os.path.join(OUTPUTS_DIR, out, EVALUATION_FILE)) as f:
                record = yaml.safe_load(f)
            if not isinstance(record, dict) or not isinstance(record.get("run"), str):
                continue
            scores = pd.read_csv(os.path.join(OUTPUTS_DIR, out, "scores.csv"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        if "iou" in scores:
            found.setdefault(record["run"], []).append((out, record, scores))
    return found


def saved_weights(folder):
    """The SHA-256 of the run's model.pth, '' before its first epoch saved one."""
    try:
        return sha256_file(os.path.join(folder, "model.pth"))
    except FileNotFoundError:
        return ""


def evaluations(folder, evaluated):
    """What each of ``evaluated`` ([(output folder, evaluation record, scores.csv)], :func:`read_evaluations`' of
    the run saved in ``folder``) scored: '<folder> (<images>) IoU x, DSB y' (the means over its images of
    scores.csv's iou and dsb; DSB2018 only with instance labels), the images named from its record ('val', 'test'
    or 'every image of <dataset>', ', TTA' for flips averaged) since a folder given by --output need not say, and a
    test score read as one more validation score would choose the run on the test set; ', older weights' when the
    run's model.pth is not the one it scored (or it has none yet: a run re-made under its name), none when its
    record does not say (older val.py)."""
    weights, found = None, []
    for out, record, scores in evaluated:
        split, settings = record.get("split"), record.get("settings")
        images = [f"every image of {os.path.basename(os.path.normpath(str(record.get('dataset'))))}"
                  if split == "every image" else split] if split else []
        images += ["TTA"] if isinstance(settings, dict) and settings.get("tta") else []
        text = f"{out}{' (' + ', '.join(images) + ')' if images else ''} IoU {scores['iou'].mean():.4f}"
        if "dsb" in scores and scores["dsb"].notna().any():
            text += f", DSB {scores['dsb'].mean():.3f}"
        recorded = record.get("weights_sha256")  # none in the evaluation.yml of a val.py before it
        if recorded is not None:
            weights = weights or saved_weights(folder)
            text += ", older weights" if recorded != weights else ""
        found.append(text)
    return found


def run_row(name, folder, evaluated=()):
    """The table's row (:data:`COLUMNS`) of run ``name`` saved in ``folder``, with its evaluations ``evaluated``
    (:func:`evaluations`)."""
    cfg = read_run_config(os.path.join(folder, "config.yml"))
    log = read_log(folder)
    arch = cfg.arch + (" + DS" if cfg.deep_supervision else "")
    size = f"crop {cfg.crop_size}" if cfg.crop_size else f"{cfg.input_h}x{cfg.input_w}"
    row = {"name": name, "where": os.path.basename(os.path.dirname(folder)), "arch": arch,
           "dataset": os.path.basename(os.path.normpath(str(cfg.dataset))), "size": size, "epochs": len(log),
           "epochs_asked": cfg.epochs, "state": run_state(cfg, log, is_training(name, folder)),
           "val_split": val_split(folder), "evaluations": "; ".join(evaluations(folder, evaluated))}
    if len(log) and log["val_iou"].notna().any():
        best = log.loc[log["val_iou"].idxmax()]  # the first of equal ones, as train.py keeps model.pth
        row.update(best_epoch=int(best["epoch"]), val_iou=best["val_iou"], val_iou_mean=best.get("val_iou_mean"),
                   val_dice=best.get("val_dice"), hours=log["seconds"].sum() / 3600 if "seconds" in log else None)
    return row


def runs_table(folders):
    """The DataFrame of :data:`COLUMNS` of the runs ``folders`` ({name: folder}), a row each, grouped by dataset and
    val split, the best val IoU first in each. A run whose config.yml or log.csv cannot be read gets a row with the
    error as its state."""
    rows, evaluated = [], read_evaluations()
    for name, folder in folders.items():
        try:
            rows.append(run_row(name, folder, evaluated.get(name, ())))
        except (UserError, OSError, yaml.YAMLError, pd.errors.ParserError, KeyError) as e:
            rows.append({"name": name, "where": os.path.basename(os.path.dirname(folder)), "state": f"unreadable: {e}"})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table = table.astype({column: "Int64" for column in ("epochs", "epochs_asked", "best_epoch")})
    return table.sort_values(["dataset", "val_split", "val_iou"], ascending=[True, True, False], na_position="last",
                             kind="stable", ignore_index=True)


def unreadable(table):
    """bool Series: the rows of the :func:`runs_table` ``table`` whose config.yml or log.csv could not be read."""
    return table["state"].astype(str).str.startswith("unreadable:")


def unreadable_notes(table):
    """A line for each run of the :func:`runs_table` ``table`` whose config.yml or log.csv could not be read: its
    name and why."""
    rows = table.loc[unreadable(table), ["name", "state"]]
    return [f"{name}: {state}" for name, state in rows.itertuples(index=False)]


def printable(table):
    """The :func:`runs_table` ``table`` as text: scores to 4 decimals, hours to 2, blanks where a value is missing."""
    digits = {"val_iou": 4, "val_iou_mean": 4, "val_dice": 4, "hours": 2}
    # the reason a run is unreadable is printed below the table (unreadable_notes): a sentence in the state column
    # made every row of the table hundreds of characters wide
    shown = table.assign(state=table["state"].where(~unreadable(table), "unreadable (below)"))
    shown = shown.astype(object).apply(lambda column: column.map(
        lambda v: "" if pd.isna(v) else f"{v:.{digits[column.name]}f}" if column.name in digits else v))
    return shown.to_string(index=False)


def main(argv):
    """runs.py with the command-line flags ``argv``: prints the table; returns it (a DataFrame)."""
    p = ArgumentParser(prog="runs.py", description="List the runs in models/ (and the bundled one): state, best "
                       "epoch and validation scores, grouped by the images they were validated on.")
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="only the runs whose names match one of these shell-style patterns ('dsb2018_*'; quote them)")
    p.add_argument("--csv", type=path_arg, default=None, metavar="FILE", help="also write the table to this CSV file")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = p.parse_args(argv)
    folders = run_folders(args.patterns)
    if not folders:
        matching = f" matching {' '.join(args.patterns)}" if args.patterns else ""
        print(f"no runs{matching} in {os.path.join(MODELS_DIR, '')} (train one: python train.py --help)")
        return pd.DataFrame(columns=COLUMNS)
    table = runs_table(folders)
    print(printable(table))
    for note in unreadable_notes(table):
        print(note)
    scored = table.dropna(subset=["val_iou"])
    unknown = scored["name"][scored["val_split"] == ""].tolist()
    groups = scored[scored["val_split"] != ""].groupby(["dataset", "val_split"]).ngroups
    if groups > 1:
        print(f"note: these runs were validated on {groups} different sets of images (dataset, val_split); compare "
              "val IoU only between runs of one set")
    if unknown:
        print(f"note: {first_few(unknown)} {'have' if len(unknown) > 1 else 'has'} no split.csv (older runs), so the "
              f"images {'they were' if len(unknown) > 1 else 'it was'} validated on are unknown: "
              f"{'their scores compare' if len(unknown) > 1 else 'its scores compare'} with no other run's")
    if args.csv:
        with atomic_write(args.csv) as f:
            table.to_csv(f, index=False)
        print(f"wrote {args.csv}")
    return table


if __name__ == "__main__":
    run_cli(main)
