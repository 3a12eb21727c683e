"""Safety: untrusted checkpoints and YAML never run code, run names stay inside models/, files are written
atomically, a NaN loss stops the run and keeps the last good checkpoint, and corrupt image files only ever
give a DataError naming the file.

The scripts run in-process here (``run_cli(main, argv)`` in a temporary working directory), which is much
cheaper than a subprocess and goes through the same code as ``python train.py``.
"""
import contextlib
import errno
import gc
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bundle
import checkpoints
import config
import dataset
import engine
import files
import optim
import predict
import synthetic
import train
import trainer
import utils
import val
from archs import build_model
from checkpoints import atomic_torch_save
from conftest import ROOT, held_by_another_process, train_argv
from dataset import Dataset, decode_image, eval_transform, read_mask
from files import atomic_write, interrupts_held, sha256_file, temp_folder_beside
from utils import DataError, UsageError, run_cli

SMALL = ["--dataset", "tiny", "--arch", "UNet", "--input_w", "32", "--input_h", "32", "-b", "2",
         "--num_workers", "0", "--device", "cpu", "--seed", "3"]


def cli(main, argv):
    """Run a script's main like its command line does; returns the exit code (0 when it returned)."""
    try:
        run_cli(main, argv)
    except SystemExit as e:
        return e.code
    return 0


DEAD_PID = 4999999  # above the highest process id Linux gives (2^22)
CPU_SCALER = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="a CPU GradScaler came with torch 2.3")


def no_temp_files(folder):
    return [n for n in os.listdir(folder) if n.startswith(".") or n.endswith(".tmp")]


class Payload:
    """A pickle that, when unpickled by a trusting loader, runs a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """inputs/tiny (10 synthetic 32x32 samples) and models/good, one finished 1-epoch run."""
    root = tmp_path_factory.mktemp("safety")
    synthetic.generate_synthetic(str(root / "inputs" / "tiny"), num_images=10, size=32)
    with contextlib.chdir(root):
        assert cli(train.main, ["--name", "good", "--epochs", "1", *SMALL]) == 0
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def copy_run_without_weights(root, src, dst):
    """models/<dst> with <src>'s config.yml and split.csv only (the weights are then planted by the test)."""
    d = root / "models" / dst
    d.mkdir(parents=True)
    for n in ("config.yml", "split.csv"):
        (d / n).write_bytes((root / "models" / src / n).read_bytes())
    return d


def write_payload(path, marker, fmt):
    if fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(marker), "epoch": 1}, f, protocol=2)
    else:  # what torch.save makes of it: a zip archive with the same pickle inside
        torch.save({"model": Payload(marker), "epoch": 1}, path)


# ------------------------------------------------------------------------------------------ malicious pickles

def test_payload_would_run_if_loaded_unsafely(tmp_path):
    """The payload is real: an unrestricted torch.load runs it (so its absence below means something)."""
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "x.pth", marker, "torch")
    torch.load(tmp_path / "x.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch"])
@pytest.mark.parametrize("script", ["val", "resume"])
def test_malicious_checkpoint_is_refused(in_workdir, capsys, script, fmt):
    root = in_workdir
    name = f"evil_{script}_{fmt}"
    run = copy_run_without_weights(root, "good", name)
    marker = root / f"pwned_{name}"
    target = run / ("model.pth" if script == "val" else "last.pth")
    write_payload(target, marker, fmt)
    capsys.readouterr()
    if script == "val":
        code = cli(val.main, ["--name", name, "--device", "cpu"])
    else:
        code = cli(train.main, ["--resume", name])
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle payload ran"
    assert code == 1, err
    assert f"refusing to load models/{name}/{target.name}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("script", ["val", "predict", "resume"])
def test_weights_of_a_diverged_run_are_refused(in_workdir, capsys, script):
    """A model.pth or last.pth holding NaN weights (a run that diverged under an earlier version) would predict
    nothing without a word; loading it names the file and the cause instead."""
    name = f"nan_{script}"
    run = copy_run_without_weights(in_workdir, "good", name)
    good = in_workdir / "models" / "good"
    weights = torch.load(good / "model.pth", weights_only=True)
    first = next(v for v in weights.values() if v.is_floating_point())
    first[(0,) * first.dim()] = float("nan")
    torch.save(weights, run / "model.pth")
    state = torch.load(good / "last.pth", weights_only=True)
    state["model"] = weights
    torch.save(state, run / "last.pth")
    capsys.readouterr()
    if script == "val":
        code, target = cli(val.main, ["--name", name, "--device", "cpu"]), "model.pth"
    elif script == "predict":
        argv = ["--name", name, "--input", str(in_workdir / "inputs" / "tiny" / "images"), "--output",
                str(in_workdir / "pred_nan"), "--device", "cpu"]
        code, target = cli(predict.main, argv), "model.pth"
    else:
        code, target = cli(train.main, ["--resume", name, "--epochs", "2"]), "last.pth"
    err = capsys.readouterr().err
    assert code == 1 and f"models/{name}/{target} holds NaN or infinite weights" in err, err
    assert "Traceback" not in err and not (in_workdir / "pred_nan").exists()


# ------------------------------------------------------------------------------------------------------ YAML

def test_yaml_python_tag_in_config_is_refused(in_workdir, capsys):
    marker = in_workdir / "pwned_yaml"
    cfg = in_workdir / "evil.yml"
    cfg.write_text(f"epochs: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    assert cli(train.main, ["--config", str(cfg), *SMALL]) == 2
    assert not marker.exists()
    assert "evil.yml" in capsys.readouterr().err


def test_yaml_python_tag_in_saved_run_config_is_refused(in_workdir, capsys):
    marker = in_workdir / "pwned_saved_yaml"
    run = copy_run_without_weights(in_workdir, "good", "evil_yaml")
    (run / "config.yml").write_text(f"arch: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    capsys.readouterr()
    assert cli(val.main, ["--name", "evil_yaml", "--device", "cpu"]) == 2
    assert cli(train.main, ["--resume", "evil_yaml"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert err.count("models/evil_yaml/config.yml") == 2, err


@pytest.mark.parametrize("text,key", [("epochz: 3", "epochz"), ("epochs: ten", "epochs"), ("lr: [0.1]", "lr"),
                                      ("deep_supervision: maybe", "deep_supervision"), ("epochs: 2.5", "epochs"),
                                      ("- epochs", "flag: value")])
def test_bad_config_keys_and_types_are_named(tmp_path, monkeypatch, capsys, text, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yml").write_text(text + "\n")
    assert cli(train.main, ["--config", "c.yml"]) == 2
    err = capsys.readouterr().err
    assert "c.yml" in err and key in err, err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ run names

@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", "."])
def test_run_name_must_stay_inside_models(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    assert cli(train.main, ["--name", name, *SMALL]) == 2
    assert cli(val.main, ["--name", name]) == 2
    assert cli(train.main, ["--resume", name]) == 2
    err = capsys.readouterr().err
    assert err.count("--name") + err.count("--resume") >= 3, err
    assert not os.path.exists(tmp_path / "x") and os.listdir(tmp_path) == []


def test_existing_run_needs_overwrite(in_workdir, capsys):
    run = in_workdir / "models" / "good"
    before = {n: (run / n).read_bytes() for n in os.listdir(run)}
    assert cli(train.main, ["--name", "good", "--epochs", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and "models/good" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    assert cli(train.main, ["--resume", "good", "--overwrite", "--epochs", "2"]) == 2
    assert "give one of the two" in capsys.readouterr().err
    assert {n: (run / n).read_bytes() for n in before} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may remove any file")
def test_overwrite_of_a_run_this_user_may_not_remove_is_refused_before_training(in_workdir, capsys):
    """A colleague's run in a shared project folder, made with umask 022: --overwrite set it aside, trained an epoch,
    then failed to remove it ('model.pth: Permission denied'), and every later --resume or --overwrite of the name
    failed the same way. (A run of this user without write permission stands for it.)"""
    run = in_workdir / "models" / "theirs"
    shutil.copytree(in_workdir / "models" / "good", run)
    run.chmod(0o555)
    try:
        assert cli(train.main, ["--name", "theirs", "--epochs", "1", "--overwrite", *SMALL]) == 2
    finally:
        run.chmod(0o755)
    assert "may not remove the files in models/theirs" in capsys.readouterr().err
    assert not (in_workdir / "models" / ".theirs.replaced").exists()
    shutil.rmtree(run)


def test_a_run_stopped_before_its_first_save_is_started_again_with_overwrite(in_workdir, capsys):
    """A run that failed in epoch 1 left config.yml and split.csv only: the message names --overwrite, not
    --resume (which would refuse it in turn)."""
    shutil.copytree(in_workdir / "models" / "good", in_workdir / "models" / "early",
                    ignore=shutil.ignore_patterns("*.pth", "log.csv", "curves.png"))
    assert cli(train.main, ["--name", "early", "--epochs", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "saved no epoch" in err and "--overwrite" in err and "--resume" not in err
    # a finished run whose last.pth was removed (val.py and predict.py need only model.pth) is not one of those
    shutil.copytree(in_workdir / "models" / "good", in_workdir / "models" / "slim",
                    ignore=shutil.ignore_patterns("last.pth"))
    assert cli(train.main, ["--name", "slim", "--epochs", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (without the last.pth that --resume needs)" in err and "--init slim" in err
    assert cli(train.main, ["--resume", "slim", "--epochs", "9"]) == 2
    assert ("it was removed, or the run was killed while it saved its first epoch; start a new run from its weights "
            "with --init slim") in capsys.readouterr().err


@pytest.mark.parametrize("lost", ["log.csv", "split.csv"])
def test_resume_without_its_log_or_split_is_refused(in_workdir, capsys, lost):
    name = "lost_" + lost.split(".")[0]
    shutil.copytree(in_workdir / "models" / "good", in_workdir / "models" / name)
    (in_workdir / "models" / name / lost).unlink()
    epochs = len(pd.read_csv(in_workdir / "models" / "good" / "log.csv"))
    assert cli(train.main, ["--resume", name, "--epochs", str(epochs + 1)]) == 1
    err = capsys.readouterr().err
    assert f"models/{name}/{lost} not found" in err and "--overwrite" in err and "Traceback" not in err


def test_resume_of_an_early_stopped_run_names_the_flag(in_workdir, capsys):
    assert cli(train.main, ["--name", "early_stop", "--epochs", "3", "--early_stopping", "0", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "early stopping after epoch 1: 0 epochs without a better val IoU (--early_stopping 0)" in out
    assert cli(train.main, ["--resume", "early_stop", "--epochs", "5"]) == 2
    assert "--early_stopping 0 would stop it at once" in capsys.readouterr().err
    assert cli(train.main, ["--resume", "early_stop", "--epochs", "5", "--loader", "device", "--cache", "False"]) == 2
    assert "--cache False cannot apply" in capsys.readouterr().err  # checked on resume too
    assert cli(train.main, ["--resume", "early_stop", "--epochs", "3", "--early_stopping", "-1"]) == 0


@pytest.mark.parametrize("content", ["img_id,split\nsyn_0001,train\n".encode("utf-16"),
                                     b'img_id,split\n"syn_0001,train\n'], ids=["utf16", "unclosed_quote"])
def test_unreadable_split_file_is_named(in_workdir, capsys, content):
    (in_workdir / "split.csv").write_bytes(content)
    assert cli(train.main, ["--name", "s", "--split_file", "split.csv", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "split.csv is not a readable CSV" in err and "UTF-8" in err and "Traceback" not in err


def test_resume_removes_the_temporary_files_of_a_killed_save(in_workdir):
    shutil.copytree(in_workdir / "models" / "good", in_workdir / "models" / "killed")
    # a killed process's save (pid 4999999: above Linux's highest), and a file of the user's that looks alike
    (in_workdir / "models" / "killed" / f".last.pth.{DEAD_PID}.k2j4ab_c.tmp").write_bytes(b"PK half a checkpoint")
    (in_workdir / "models" / "killed" / ".notes.tmp").write_text("mine")
    epochs = len(pd.read_csv(in_workdir / "models" / "killed" / "log.csv"))
    assert cli(train.main, ["--resume", "killed", "--epochs", str(epochs + 1)]) == 0
    assert no_temp_files(in_workdir / "models" / "killed") == [".notes.tmp"]


# ---------------------------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file(tmp_path, exc):
    path = tmp_path / "log.csv"
    path.write_text("old\n")
    with pytest.raises(exc):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise exc()
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["log.csv"]


def test_files_and_folders_follow_a_umask_set_after_the_import(tmp_path):
    """A notebook that sets umask 077 after importing the toolkit (its images are private) gets private files and
    folders from it, as from open() and os.makedirs, not those of the umask at the import."""
    previous = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "log.csv") as f:
            f.write("epoch\n")
        folder = temp_folder_beside(tmp_path / "outputs")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "log.csv").st_mode & 0o777 == 0o600
    assert os.stat(folder).st_mode & 0o777 == 0o700


def test_atomic_write_writes_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """CSVs the toolkit writes (split.csv, scores.csv, objects.csv) hold image names and are read back as UTF-8: a
    locale of another encoding (Windows' cp1252, a Latin-1 Linux) must not decide how they are written."""
    real_fdopen = os.fdopen

    def fdopen_latin1(fd, mode="r", *args, **kwargs):
        if "b" not in mode and kwargs.get("encoding") is None:
            kwargs["encoding"] = "cp1252"  # what a text file without an encoding gets on such a machine
        return real_fdopen(fd, mode, *args, **kwargs)
    monkeypatch.setattr(os, "fdopen", fdopen_latin1)
    with atomic_write(tmp_path / "split.csv") as f:
        f.write("img_id,split\ncafé 細胞,val\n")
    assert pd.read_csv(tmp_path / "split.csv", encoding="utf-8")["img_id"].tolist() == ["café 細胞"]


@pytest.mark.parametrize("module", ["utils", "files"])
def test_windows_is_named_at_start_not_a_missing_module(module):
    """utils and files need POSIX (signals, fcntl locks): on Windows every script says so in one line, not
    ModuleNotFound, whichever of them it imports first."""
    code = f"import sys; sys.platform = 'win32'; sys.modules['fcntl'] = None; import {module}"  # no fcntl there
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == ("error: this toolkit runs on Linux and macOS; on Windows, "
                                                            "run it in WSL (Windows Subsystem for Linux)")


def test_a_folder_that_takes_no_file_is_named_in_the_error(tmp_path, monkeypatch, capsys):
    """A read-only models/ or outputs/ (faked: this user may be root): the one-line error names the folder, not
    the temporary file that could not be made in it."""
    def refuse(dir, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".config.yml.123.abc.tmp"))
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(files.tempfile, "mkdtemp", refuse)

    def write():
        with atomic_write(tmp_path / "config.yml") as f:
            f.write("x")
    for main in (lambda argv: write(), lambda argv: files.temp_folder_beside(tmp_path / "outputs")):
        with pytest.raises(SystemExit):
            run_cli(main, [])
        assert f" error: {tmp_path}: Permission denied (check the path" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 6442450944 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError()])
def test_running_out_of_memory_is_one_line_naming_the_flags_that_need_less(error, capsys, monkeypatch):
    """A --batch_size or --tile too large for the GPU or the RAM (predict.py, val.py, a device data set too large):
    a one-line error and exit code 1, not torch's traceback; any other RuntimeError stays a traceback."""
    def main(argv):
        raise error
    monkeypatch.setattr(sys, "argv", ["predict.py"])
    with pytest.raises(SystemExit) as stop:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "error: out of memory (" in err and "--batch_size" in err and "--tile" in err

    def bug(argv):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="mat1"):
        run_cli(bug, [])


@pytest.mark.parametrize("script, named, absent", [("val.py", ["--batch_size"], ["--tile", "--crop_size"]),
                                                   ("train.py", ["--batch_size", "--crop_size"], ["--tile"]),
                                                   ("export.py", [], ["--batch_size", "--tile", "--crop_size"])])
def test_running_out_of_memory_names_only_flags_the_script_has(script, named, absent, capsys, monkeypatch):
    """val.py has no --tile (its windows follow the memory), export.py no --batch_size: the error told their users to
    give them, which only gave 'unrecognized arguments'."""
    def main(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit):
        run_cli(main, [])
    err = capsys.readouterr().err
    assert err.startswith(f"{script}: error: out of memory (CUDA out of memory.") and "free the memory" in err
    assert all(flag in err for flag in named) and not any(flag in err for flag in absent), err


def test_a_loader_worker_is_quiet_about_its_fd_server_only(capsys):
    """The race behind a traceback after Ctrl-C (the main process left while a worker's resource_sharer thread
    handed it a batch): errors raised in that module are not printed by the worker's excepthook; others are."""
    def raised_in(filename):
        try:
            exec(compile("raise EOFError('peer gone')", filename, "exec"))
        except EOFError:
            return sys.exc_info()
    dataset.quiet_about_fd_server(*raised_in(os.path.join("/usr", "lib", "multiprocessing", "resource_sharer.py")))
    assert capsys.readouterr().err == ""
    dataset.quiet_about_fd_server(*raised_in("our_code.py"))
    assert "EOFError: peer gone" in capsys.readouterr().err
    too_many = raised_in(os.path.join("multiprocessing", "resource_sharer.py"))[2]  # another error there is printed
    dataset.quiet_about_fd_server(OSError, OSError(24, "Too many open files"), too_many)
    assert "Too many open files" in capsys.readouterr().err


class UnreadableImages(torch.utils.data.Dataset):
    """Four samples whose files cannot be read: each one is a DataError, raised in the loader worker."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DataError(f"cannot read image {index}.png")


def test_an_error_in_a_loader_worker_ends_the_workers_before_the_exit():
    """The error a loader worker raised holds itself through the frame that re-raised it (a reference cycle), and with
    its frames the loader: run_cli ends the workers now, through their own exit (which removes their pymp-* folders in
    TMPDIR), not multiprocessing at the interpreter's exit with SIGTERM. The garbage collector, which would end them
    after 5 s each, is held off."""
    def main(argv):
        loader = torch.utils.data.DataLoader(UnreadableImages(), num_workers=1, persistent_workers=True,
                                             worker_init_fn=dataset.quiet_worker)
        for _ in loader:
            pass

    before = set(psutil.Process().children())
    gc.disable()
    try:
        assert cli(main, []) == 1
        assert set(psutil.Process().children()) <= before
    finally:
        gc.enable()


def test_atomic_torch_save_interrupted_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_ctrl_c_while_an_epoch_is_saved_takes_effect_once_its_files_agree(in_workdir, monkeypatch, capsys):
    """Ctrl-C after model.pth of epoch 2 is written but before last.pth: the save completes, then the run stops
    with its one-line message, and model.pth, log.csv and last.pth are all of epoch 2 (cut off there, --resume
    would have redone epoch 2 while model.pth held the first try's weights)."""
    real_save = trainer.save_training_state
    calls = []

    def interrupt_then_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_training_state", interrupt_then_save)
    assert cli(train.main, ["--name", "held", "--epochs", "3", *SMALL]) == 130
    assert "stopped during epoch 3; " in capsys.readouterr().out
    run = in_workdir / "models" / "held"
    assert no_temp_files(run) == []
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
    assert pd.read_csv(run / "log.csv")["epoch"].tolist() == [1, 2]


def test_overwrite_stopped_before_its_first_epoch_gives_the_old_run_back(in_workdir, monkeypatch, capsys):
    """Ctrl-C in epoch 1 of an --overwrite run (started with the wrong flags): the run it was to replace is back,
    file for file; once the new run saves an epoch the old one is gone, and no hidden copy is left behind."""
    assert cli(train.main, ["--name", "kept", "--epochs", "1", *SMALL]) == 0
    runs = in_workdir / "models"
    before = {f: (runs / "kept" / f).read_bytes() for f in sorted(os.listdir(runs / "kept"))}
    real_train = trainer.train_one_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    assert cli(train.main, ["--name", "kept", "--epochs", "2", "--lr", "0.5", "--overwrite", *SMALL]) == 130
    assert "models/kept holds the run it was to replace again" in capsys.readouterr().out
    assert {f: (runs / "kept" / f).read_bytes() for f in sorted(os.listdir(runs / "kept"))} == before
    assert no_temp_files(runs) == []
    monkeypatch.setattr(trainer, "train_one_epoch", real_train)
    real_save = trainer.save_training_state

    def interrupt_then_save(*args, **kwargs):  # Ctrl-C while the new run's first epoch is saved
        os.kill(os.getpid(), signal.SIGINT)
        real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_training_state", interrupt_then_save)
    assert cli(train.main, ["--name", "kept", "--epochs", "2", "--lr", "0.5", "--overwrite", *SMALL]) == 130
    assert no_temp_files(runs) == [] and "lr: 0.5" in (runs / "kept" / "config.yml").read_text()
    assert torch.load(runs / "kept" / "last.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(trainer, "save_training_state", real_save)
    elsewhere = in_workdir / "disk2" / "kept"  # a run folder that is a link to another disk stays a link
    shutil.move(runs / "kept", elsewhere)
    os.symlink(elsewhere, runs / "kept")
    assert cli(train.main, ["--name", "kept", "--epochs", "1", "--lr", "0.3", "--overwrite", *SMALL]) == 0
    assert os.path.islink(runs / "kept") and "lr: 0.3" in (elsewhere / "config.yml").read_text()
    assert no_temp_files(runs) == no_temp_files(elsewhere.parent) == []
    os.remove(runs / "kept")
    shutil.move(elsewhere, runs / "kept")
    os.rename(runs / "kept", runs / ".kept.replaced")  # as a killed --overwrite leaves it
    with pytest.raises(UsageError, match="move it back to models/kept"):
        train.main(["--name", "kept", "--epochs", "1", "--overwrite", *SMALL])


def test_a_folder_replaced_never_goes_missing_and_killed_builds_are_cleared(tmp_path, monkeypatch):
    """Ctrl-C between the two renames that swap a finished folder in (bundle.py, val.py, datasets): the swap
    completes first, so the folder is never missing. The hidden build folders a killed process left beside it are
    removed by the next build; one of a process still running (this one) is kept."""
    dst = tmp_path / "nuclei"
    dst.mkdir()
    (dst / "model.pth").write_text("old")
    (tmp_path / f".nuclei.tmp-{DEAD_PID}-killed1").mkdir()
    (tmp_path / f".nuclei.tmp-{DEAD_PID}-killed1.old").mkdir()
    (tmp_path / f".nuclei.tmp-{os.getpid()}-building").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()
    real_rename = os.rename

    def rename_then_interrupt(src, target):
        real_rename(src, target)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with files.folder_replaced_when_done(dst) as tmp:
            with open(os.path.join(tmp, "model.pth"), "w") as f:
                f.write("new")
    monkeypatch.undo()
    assert (dst / "model.pth").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == [f".nuclei.tmp-{os.getpid()}-building", ".other.tmp-keep", "nuclei"]


@pytest.mark.parametrize("finished", [True, False])
def test_a_swap_killed_between_its_renames_is_completed_by_the_next_build(tmp_path, finished):
    """SIGKILL (which cannot be held) after replace_folder moved the old folder aside and before the finished one
    took its place: the next build beside it puts the finished folder there (or, were it gone, the old one back)
    instead of clearing both as a killed build's leftovers."""
    dst, new = tmp_path / "nuclei", tmp_path / f".nuclei.tmp-{DEAD_PID}-k1"
    old = tmp_path / f"{new.name}.old"
    old.mkdir()
    (old / "model.pth").write_text("old")
    if finished:
        new.mkdir()
        (new / "model.pth").write_text("new")
    files.temp_folder_beside(dst)
    assert (dst / "model.pth").read_text() == ("new" if finished else "old")
    assert not new.exists() and not old.exists()


def test_of_several_killed_swaps_the_one_with_a_finished_build_wins(tmp_path, monkeypatch):
    """The folder's entries in name order, so that the swap without a finished build comes first."""
    class InNameOrder(list):  # os.scandir's result is also a context manager
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": InNameOrder(sorted(real_scandir(path), key=lambda e: e.name)))
    for name, text in (("a.old", "oldest"), ("b", "newest"), ("b.old", "older")):  # a's build is gone, b's is there
        folder = tmp_path / f".nuclei.tmp-{DEAD_PID}-{name}"
        folder.mkdir()
        (folder / "model.pth").write_text(text)
    files.temp_folder_beside(tmp_path / "nuclei")
    assert (tmp_path / "nuclei" / "model.pth").read_text() == "newest"
    assert not [name for name in os.listdir(tmp_path) if str(DEAD_PID) in name]  # the others cleared


def test_a_symlinked_folder_stays_a_link_when_replaced(tmp_path):
    """inputs/<set> linked to another disk: the new folder is built beside the target and replaces it there."""
    target, link = tmp_path / "big_disk" / "dsb", tmp_path / "inputs" / "dsb"
    target.mkdir(parents=True)
    (target / "old.png").write_text("old")
    link.parent.mkdir()
    link.symlink_to(target)
    with files.folder_replaced_when_done(link) as tmp:
        with open(os.path.join(tmp, "new.png"), "w") as f:
            f.write("new")
    assert link.is_symlink() and os.listdir(target) == ["new.png"] and os.listdir(link.parent) == ["dsb"]


def test_a_folder_replaced_in_a_group_s_shared_folder_keeps_its_group(tmp_path):
    """A project folder shared by a group (chmod g+s): val.py's outputs, a dataset or a bundled run built there keep
    the set-group-ID bit, so that the folders made inside belong to the group, as os.makedirs would make them."""
    shared = tmp_path / "project"
    shared.mkdir()
    os.chmod(shared, 0o2770)
    with files.folder_replaced_when_done(shared / "outputs") as tmp:
        os.mkdir(os.path.join(tmp, "overlays"))
    assert os.stat(shared / "outputs").st_mode & stat.S_ISGID
    assert os.stat(shared / "outputs" / "overlays").st_mode & stat.S_ISGID


def test_signals_that_end_a_job_stop_as_ctrl_c_unless_ignored():
    """nohup ignores SIGHUP: it stays ignored; the others stop the script as Ctrl-C does, and are given back."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with utils.stop_signals_as_interrupts():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGUSR1)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EACCES])
def test_a_file_system_without_locks_gets_a_note_not_a_refusal(tmp_path, monkeypatch, capsys, code):
    """A Lustre mount without -o flock (ENOSYS), an NFS one without a lock manager (ENOLCK): train.py refused every
    run with 'Function not implemented' and no file named; the block now runs after a note. Another error names the
    lock file."""
    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    path = tmp_path / ".run.lock"
    if code == errno.EACCES:
        with pytest.raises(PermissionError) as e, files.locked(str(path)):
            pass
        assert e.value.filename == str(path)
        return
    with files.locked(str(path)) as holder:
        assert holder is None and path.read_text() == str(os.getpid())
    assert not path.exists()
    assert f"note: {path}: this file system takes no file locks" in capsys.readouterr().err


def left_by_a_colleague(lock_file):
    """A lock file (a Path) as another user's killed job leaves it: a pid no process has, and read-only for this
    user (a file of this user without write permission stands for it: the permissions bind the owner too)."""
    lock_file.write_text(str(DEAD_PID))
    lock_file.chmod(0o444)


def assert_taken_and_removed(lock_file):
    """files.locked takes ``lock_file`` (a Path), holding it with this pid, and removes it on release."""
    with files.locked(str(lock_file)) as holder:
        assert holder is None and lock_file.read_text() == str(os.getpid())
    assert not lock_file.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_lock_file_this_user_may_not_write_is_taken_or_its_holder_named(tmp_path):
    """A colleague's lock file in a shared folder, made with umask 022 (rw-r--r--), that their killed job left: the
    other users were refused ('Permission denied') until someone removed it by hand; while their job runs, the
    others learn that it does and its pid. One this user may not even read is named as such."""
    path = tmp_path / ".out.lock"
    left_by_a_colleague(path)
    assert_taken_and_removed(path)
    with held_by_another_process(path) as pid:
        path.chmod(0o444)
        with files.locked(str(path)) as holder:
            assert holder == str(pid)
        path.chmod(0)
        with pytest.raises(DataError, match="another user's lock file"):
            with files.locked(str(path)):
                pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_two_processes_taking_over_a_colleague_s_lock_file_do_not_both_hold_it(tmp_path, monkeypatch):
    """Two scripts find the read-only lock file of a colleague's killed job: the first takes it over (removes it,
    makes its own, holds it) while the second has it open. The second then removed the first one's lock file and
    made its own: both wrote the folder, each believing it alone did. Now it finds the first one holding the lock."""
    path = tmp_path / ".out.lock"
    left_by_a_colleague(path)
    first, read_only, held = files.locked(str(path)), files.others_lock_file, []

    def first_takes_over_meanwhile(lock_file):
        fd = read_only(lock_file)
        if not held:
            held.append("taking")
            held[0] = first.__enter__()
        return fd

    monkeypatch.setattr(files, "others_lock_file", first_takes_over_meanwhile)
    with files.locked(str(path)) as second:
        assert held == [None] and second == str(os.getpid())
    assert path.read_text() == str(os.getpid())
    first.__exit__(None, None, None)
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_colleague_s_lock_file_removed_as_it_is_opened_is_made_anew(tmp_path, monkeypatch):
    """The read-only lock file, removed by the one who takes it over (or by its owner) between the two opens: it was a
    'No such file or directory' error; the lock is free, so it is taken."""
    path = tmp_path / ".out.lock"
    left_by_a_colleague(path)
    read_only = files.others_lock_file

    def removed_first(lock_file):
        if os.path.exists(lock_file):
            os.remove(lock_file)
        return read_only(lock_file)

    monkeypatch.setattr(files, "others_lock_file", removed_first)
    with files.locked(str(path)) as holder:
        assert holder is None and path.read_text() == str(os.getpid())
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_colleague_s_lock_file_on_a_file_system_without_locks_is_replaced(tmp_path, monkeypatch, capsys):
    """A Lustre or NFS mount without locks, and a colleague's read-only lock file left there: after the note, the
    block was to run, but writing this pid into the read-only file failed ('Invalid argument') on every run until
    someone removed the file by hand. It is replaced by one's own, as where locks work."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    path = tmp_path / ".run.lock"
    left_by_a_colleague(path)
    assert_taken_and_removed(path)
    assert capsys.readouterr().err.count(f"note: {path}: this file system takes no file locks") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any folder")
def test_a_run_folder_this_user_may_not_read_is_named_not_taken_for_absent(tmp_path, monkeypatch):
    """A colleague's private run in a shared project folder (their umask 077): val.py, predict.py and --resume said
    there was no run of that name, to train it first. (A folder of this user without permissions stands for it.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "theirs").mkdir(parents=True)
    (tmp_path / "models" / "theirs" / "config.yml").write_text("name: theirs\n")
    (tmp_path / "models" / "theirs").chmod(0)
    try:
        for load in (lambda: config.load_run_config("theirs"), lambda: config.parse_train_args(["--resume", "theirs"])):
            with pytest.raises(DataError, match="models/theirs is a run folder this user may not read"):
                load()
    finally:
        (tmp_path / "models" / "theirs").chmod(0o700)


def test_a_run_linked_to_a_missing_folder_is_named_not_taken_for_absent(tmp_path, monkeypatch):
    """models/<name> a link to a run on a share that is not mounted: val.py, predict.py and --resume said there was
    no run of that name, to train it first, and a new run of that name created the link's target path (a folder the
    mounted share would hide). Each names the link and its target, and nothing is created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "shared").symlink_to(tmp_path / "share" / "shared")
    for load in (lambda: config.load_run_config("shared"), lambda: config.parse_train_args(["--resume", "shared"]),
                 lambda: config.run_dir("shared")):
        with pytest.raises(DataError, match=f"^models/shared is a link to {tmp_path}/share/shared, which is not "
                                            r"there \(a share not mounted, or a run moved\?\); mount or restore it, or "
                                            "remove the link models/shared$"):
            load()
    assert not os.path.exists(tmp_path / "share")


def test_temporary_files_of_another_machine_are_left_to_it(tmp_path):
    """On a file system shared between machines (a cluster's) a pid says nothing about another machine's writer:
    its temporary files and folders stay; this machine's of a killed process go, in the names of earlier versions
    too."""
    here, other = f"{DEAD_PID}@{files.HOST}", f"{DEAD_PID}@{files.HOST}x"
    names = [f".a.png.{here}.k2j4ab_c.tmp", f".b.png.{other}.k2j4ab_c.tmp", f".c.png.{DEAD_PID}.k2j4ab_c.tmp"]
    for name in names:
        (tmp_path / name).write_text("half")
    for writer in (here, other, str(DEAD_PID)):
        (tmp_path / f".out.tmp-{writer}-abc").mkdir()
    (tmp_path / ".notes.99999999999.k2j4ab_c.tmp").write_text("not a pid")  # was an OverflowError
    files.remove_killed_writes(str(tmp_path))
    made = files.temp_folder_beside(str(tmp_path / "out"))
    assert os.path.basename(made).startswith(f".out.tmp-{os.getpid()}@{files.HOST}-")
    assert sorted(os.listdir(tmp_path)) == sorted([names[1], f".out.tmp-{other}-abc", os.path.basename(made),
                                                   ".notes.99999999999.k2j4ab_c.tmp"])
    assert files.host_name("node1") == "node1"  # machines whose names differ stay apart in the file names
    assert len({files.host_name(h) for h in ("10.1.2.3", "10.1.2.4", "node_1", "node1", "n" * 64)}) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9-]{1,32}", files.host_name(h)) for h in ("10.1.2.3", "Zellkern-ä", "n" * 64))
    long_name = tmp_path / ("z" * 250 + ".png")  # a temporary name of it stays within 255 bytes
    with atomic_write(long_name, "wb") as f:
        f.write(b"png")
    assert long_name.read_bytes() == b"png"


def test_interrupts_held_act_after_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(OSError, match="No space left"):  # an error inside the block is the one reported
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError(28, "No space left on device")


FULL_DISK = """
import os, resource, signal, sys
import torch
from checkpoints import atomic_torch_save
from files import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as one on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    {write}
except OSError as e:
    print(e.filename, e.strerror, sorted(os.listdir(".")))
"""


@pytest.mark.parametrize("write", ["atomic_torch_save(torch.zeros(100_000), 'model.pth')",
                                   "with atomic_write('log.csv') as f: f.write('x' * 200_000)"])
def test_a_full_disk_is_an_oserror_naming_the_file(tmp_path, write):
    """A disk that fills while a file is written (a file-size limit stands in for it): an OSError naming the file,
    which the scripts print in one line, and no temporary file left; torch.save itself raised a RuntimeError."""
    code = FULL_DISK.format(write=write)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    name = "model.pth" if "torch" in write else "log.csv"
    assert out.stdout.split("[")[0].strip() == f"{name} File too large", out.stdout
    assert out.stdout.rstrip().endswith("[]"), out.stdout


# ------------------------------------------------------------------------------------------------- NaN loss

def test_nan_loss_stops_and_keeps_last_good_checkpoint(in_workdir, monkeypatch, capsys):
    """Epoch 1 trains normally; from epoch 2 on the loss is NaN: the run stops naming epoch and step and what to
    try, and models/<name>/ still holds epoch 1, complete."""
    state = {"nan": False}
    real_loss, real_save = engine.loss_over_heads, trainer.Trainer._save_epoch

    def loss(criterion, outputs, target):
        value = real_loss(criterion, outputs, target)
        return value * float("nan") if state["nan"] else value

    def save_then_poison(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        state["nan"] = True

    monkeypatch.setattr(engine, "loss_over_heads", loss)
    monkeypatch.setattr(trainer.Trainer, "_save_epoch", save_then_poison)
    assert cli(train.main, ["--name", "nan", "--epochs", "3", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "NaN or infinite at epoch 2, step 1" in err and "last.pth still holds epoch 1" in err, err
    assert "--lr" in err
    run = in_workdir / "models" / "nan"
    assert no_temp_files(run) == []
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert pd.read_csv(run / "log.csv")["epoch"].tolist() == [1]
    torch.load(run / "model.pth", weights_only=True)


def test_huge_learning_rate_stops_in_the_first_epoch(in_workdir, capsys):
    assert cli(train.main, ["--name", "huge_lr", "--epochs", "2", "--lr", "1e30", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite at epoch 1" in err and "no epoch was saved" in err and "--lr" in err, err
    run = in_workdir / "models" / "huge_lr"
    assert not (run / "last.pth").exists() and not (run / "model.pth").exists()
    assert no_temp_files(run) == []


def test_a_gpu_that_runs_out_of_memory_names_the_batch_size(in_workdir, capsys, monkeypatch):
    """CUDA's out-of-memory error in a training step (a --batch_size too large for the GPU) is a one-line error that
    names the flag and how to go on, not a traceback."""
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "step", out_of_memory)
    assert cli(train.main, ["--name", "oom", "--epochs", "1", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "cpu ran out of memory during epoch 1, before any epoch was saved" in err, err
    assert "--batch_size" in err and "Traceback" not in err


def test_weights_that_diverge_at_the_last_step_are_never_saved(in_workdir, capsys):
    """AdamW's decay of 1e10 wrecks the weights in the epoch's one update, after its training loss was
    computed: the validation loss catches it, before model.pth or last.pth (once written as the best epoch)."""
    argv = ["--name", "decay", "--epochs", "2", "--optimizer", "AdamW", "--weight_decay", "1e10", *SMALL, "-b", "8"]
    assert cli(train.main, argv) == 1
    err = capsys.readouterr().err
    assert "the validation loss became NaN or infinite after epoch 1's training" in err, err
    assert "no epoch was saved" in err and "--weight_decay" in err and "Traceback" not in err
    run = in_workdir / "models" / "decay"
    assert not (run / "last.pth").exists() and not (run / "model.pth").exists()
    assert no_temp_files(run) == []


# ------------------------------------------------------------------------------------ corrupt image files

def _sample_png(kind):
    rng = np.random.default_rng(0)
    if kind == "image":
        ok, buf = cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    else:
        mask = np.zeros((32, 32), np.uint8)
        mask[5:20, 8:24] = 255
        ok, buf = cv2.imencode(".png", mask)
    assert ok
    return buf.tobytes()


PNG = {"image": _sample_png("image"), "mask": _sample_png("mask")}


@st.composite
def corrupted(draw):
    which = draw(st.sampled_from(["image", "mask"]))
    data = bytearray(PNG[which])
    how = draw(st.sampled_from(["truncate", "flip", "random"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    else:
        data = bytearray(draw(st.binary(min_size=0, max_size=512)))
    return which, bytes(data)


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    (root / "images").mkdir()
    (root / "masks" / "0").mkdir(parents=True)
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_corrupt_png_gives_array_or_dataerror_naming_the_file(corrupt_dir, case):
    which, data = case
    img_path, mask_path = str(corrupt_dir / "images" / "s.png"), str(corrupt_dir / "masks" / "0" / "s.png")
    for path, kind in ((img_path, "image"), (mask_path, "mask")):
        with open(path, "wb") as f:
            f.write(data if kind == which else PNG[kind])
    bad = img_path if which == "image" else mask_path

    def check(fn):
        try:
            return fn()
        except DataError as e:
            assert bad in str(e), str(e)
            return None

    out = check(lambda: decode_image(bad) if which == "image" else read_mask(bad))
    if out is not None:
        assert isinstance(out, np.ndarray) and out.size > 0
        if which == "mask":
            assert out.dtype == np.uint8 and set(np.unique(out).tolist()) <= {0, 1}
    ds = Dataset(["s"], str(corrupt_dir), transform=eval_transform(32, 32))
    sample = check(lambda: ds[0])
    if sample is not None:
        image, mask, meta = sample
        assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and meta["img_id"] == "s"
        assert torch.isfinite(image).all()


def test_bundled_run_loads_from_pretrained_unless_models_has_it(tmp_path, monkeypatch):
    """A run in pretrained/<name>/ loads by name (val, predict, --init); models/<name>/ wins; its weights must
    match their .sha256."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    bundled = tmp_path / "pretrained" / "nuclei"
    bundled.mkdir(parents=True)
    torch.manual_seed(0)
    net = build_model("UNet", 1, 3, False)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, bundled / "model.pth")  # fp16, as shipped
    (bundled / "model.pth.sha256").write_text(sha256_file(bundled / "model.pth") + "  model.pth\n")
    (bundled / "config.yml").write_text("arch: UNet\ndeep_supervision: false\nname: nuclei\nnormalization: fixed\n")
    cfg, model = checkpoints.load_run("nuclei", torch.device("cpu"))
    assert cfg.arch == "UNet" and next(model.parameters()).dtype == torch.float32
    assert torch.allclose(model.state_dict()["final.weight"], net.state_dict()["final.weight"], atol=1e-3)
    assert config.init_weights_path("nuclei") == str(bundled / "model.pth")
    own = tmp_path / "models" / "nuclei"
    own.mkdir(parents=True)
    (own / "config.yml").write_text("arch: NestedUNet\ndeep_supervision: true\nname: nuclei\nnormalization: fixed\n")
    assert config.saved_run_dir("nuclei") == os.path.join("models", "nuclei")
    assert config.load_run_config("nuclei").arch == "NestedUNet"
    (own / "config.yml").unlink()
    with open(bundled / "model.pth", "r+b") as f:  # one flipped byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match="SHA-256 differs"):
        checkpoints.load_run("nuclei", torch.device("cpu"))


def test_bundle_writes_fp16_weights_that_load_by_name(tiny_workdir, monkeypatch):
    monkeypatch.setattr(config, "PRETRAINED_DIR", str(tiny_workdir / "pretrained"))
    train.main(train_argv("mine", epochs=1))
    with pytest.raises(UsageError, match=r"--name mines: no run of that name in models/ \(did you mean mine\?\)"):
        bundle.main(["--name", "mines"])
    with pytest.raises(UsageError, match="--as '../x' must be a plain name"):
        bundle.main(["--name", "mine", "--as", "../x"])
    with pytest.raises(UsageError, match="--as is empty"):
        bundle.main(["--name", "mine", "--as", ""])
    bundle.main(["--name", "mine"])
    shipped = tiny_workdir / "pretrained" / "mine"
    assert sorted(os.listdir(shipped)) == ["config.yml", "log.csv", "model.pth", "model.pth.sha256", "split.csv"]
    weights = torch.load(shipped / "model.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    shutil.rmtree(tiny_workdir / "models" / "mine")  # only the bundled copy is left
    _, model = checkpoints.load_run("mine", torch.device("cpu"))
    predict.main(["--name", "mine", "--input", "inputs/tiny/images", "--output", "out", "--device", "cpu"])
    assert len(os.listdir("out")) == len(os.listdir("inputs/tiny/images")) + 1  # the masks and prediction.yml
    # bundled again from another run: the model card stays, and a bundling stopped halfway leaves the old bundle
    (shipped / "README.md").write_text("model card")
    before = {f: (shipped / f).read_bytes() for f in os.listdir(shipped)}
    train.main(train_argv("better", "--seed", "1", epochs=1))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(bundle.shutil, "copyfile", stopped)
        bundle.main(["--name", "better", "--as", "mine"])
    assert {f: (shipped / f).read_bytes() for f in os.listdir(shipped)} == before
    assert sorted(os.listdir(shipped.parent)) == ["mine"]  # no temporary folder left
    bundle.main(["--name", "better", "--as", "mine"])
    assert (shipped / "README.md").read_text() == "model card" and (shipped / "model.pth").read_bytes() != \
        before["model.pth"]
    checkpoints.load_run("mine", torch.device("cpu"))  # its checksum matches
    # a run that predict.py could not load is refused before anything is written, not bundled with a usage line
    cfg = yaml.safe_load((tiny_workdir / "models" / "better" / "config.yml").read_text())
    (tiny_workdir / "models" / "better" / "config.yml").write_text(yaml.safe_dump({**cfg, "arch": "NestedUNet"}))
    with pytest.raises(DataError, match="does not match the run's config.yml"):
        bundle.main(["--name", "better", "--as", "broken"])
    assert sorted(os.listdir(shipped.parent)) == ["mine"]


@CPU_SCALER
def test_training_state_round_trips_every_part(tmp_path):
    """last.pth gives back what a resumed run continues with: the early-stopping count (patience does not start
    over), the fp16 loss scale, the optimizer's moments and the RNG draws that come next."""
    torch.manual_seed(0)
    net = build_model("UNet", 1, 3, False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.rand(2, 3, 16, 16)).mean().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    path = str(tmp_path / "last.pth")
    best = {"best_iou": 0.5, "best_epoch": 2, "stale_epochs": 3}
    checkpoints.save_training_state(path, net, optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=1024.0),
                                    5, best)
    next_draw = torch.rand(4)
    fresh = build_model("UNet", 1, 3, False)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    epoch, restored = checkpoints.load_training_state(path, fresh, fresh_optimizer,
                                                      torch.optim.lr_scheduler.ConstantLR(fresh_optimizer), scaler,
                                                      torch.device("cpu"))
    assert (epoch, restored) == (5, best)
    assert scaler.state_dict()["scale"] == 1024.0
    moments = [optimizer.state[p]["exp_avg"] for p in net.parameters()]
    torch.testing.assert_close([fresh_optimizer.state[p]["exp_avg"] for p in fresh.parameters()], moments)
    torch.testing.assert_close(torch.rand(4), next_draw)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
@pytest.mark.parametrize("saved_channels_last", [True, False], ids=["channels_last_to_NCHW", "NCHW_to_channels_last"])
def test_resume_in_the_other_memory_format_takes_the_textbook_step(tmp_path, name, saved_channels_last):
    """A run saved in one memory format and resumed in the other (--channels_last auto differs between a CPU with
    native bf16 and an AVX2 one, and between a GPU and an AVX2 CPU): its next step is Adam's or SGD's formula,
    computed here in float64 from last.pth. The moments restored in their saved layout were paired with the
    parameters position by position in memory, so each weight took another weight's momentum (0.008-0.016 off
    after one step here; the run went on without an error)."""
    def run_parts(channels_last):
        torch.manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        net = build_model("UNet", 1, 3, False).to(memory_format=layout)
        optimizer = optim.build_optimizer(name, net.parameters(), 0.01, 0.9, False, 0,
                                          fused=optim.fused_update(name, "cpu"))
        return net, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)

    net, optimizer, scheduler = run_parts(saved_channels_last)
    net(torch.rand(2, 3, 16, 16)).mean().backward()
    optimizer.step()
    path = str(tmp_path / "last.pth")
    checkpoints.save_training_state(path, net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), 1,
                                    {"best_iou": 0.5, "best_epoch": 1, "stale_epochs": 0})
    names = [n for n, _ in net.named_parameters()]
    saved = torch.load(path, weights_only=True)
    grads = [torch.randn(p.shape, dtype=torch.float64) for p in net.parameters()]
    expected = []
    for i, (n, g) in enumerate(zip(names, grads)):
        state, weight = saved["optimizer"]["state"][i], saved["model"][n].double()
        if name == "SGD":  # momentum 0.9, no dampening: buf <- 0.9 buf + g; w <- w - lr buf
            expected.append(weight - 0.01 * (0.9 * state["momentum_buffer"].double() + g))
            continue
        m = 0.9 * state["exp_avg"].double() + 0.1 * g  # Adam, step 2, betas (0.9, 0.999), eps 1e-8
        v = 0.999 * state["exp_avg_sq"].double() + 0.001 * g * g
        expected.append(weight - 0.01 * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8))
    resumed, resumed_optimizer, resumed_scheduler = run_parts(not saved_channels_last)
    checkpoints.load_training_state(path, resumed, resumed_optimizer, resumed_scheduler,
                                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    for p, g in zip(resumed.parameters(), grads):
        p.grad = torch.empty_like(p).copy_(g)  # in the parameter's layout, as backward gives it
    resumed_optimizer.step()
    torch.testing.assert_close([p.detach().double() for p in resumed.parameters()], expected, rtol=0, atol=1e-6)


def test_only_one_extra_head_channel_passes_for_a_border_channel():
    """Weights of a --borders run (one channel more in the heads) load into a run without borders, the border
    channel left out; weights of a network with more classes are not cut down to fit."""
    one = build_model("NestedUNet", 1, 3, True).state_dict()
    for channels, dropped in ((2, True), (3, False)):
        weights = build_model("NestedUNet", channels, 3, True).state_dict()
        kept, was_dropped = checkpoints.without_border_channel(weights, one)
        assert was_dropped == dropped
        assert all(kept[k].shape == (v.shape if dropped else weights[k].shape) for k, v in one.items())


@CPU_SCALER
def test_state_saved_without_fp16_resumes_with_fp16(tmp_path):
    """A run saved with a disabled GradScaler (CPU, bf16 or fp32) and resumed where --amp picks fp16 (a GPU without
    bf16): the scaler starts anew instead of the resume being refused (its empty state does not load)."""
    net = build_model("UNet", 1, 3, False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    path = str(tmp_path / "last.pth")
    checkpoints.save_training_state(path, net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), 3,
                                    {"best_iou": 0.5, "best_epoch": 2, "stale_epochs": 1})
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    epoch, best = checkpoints.load_training_state(path, net, optimizer, scheduler, fp16, torch.device("cpu"))
    assert epoch == 3 and best["best_epoch"] == 2 and fp16.is_enabled()


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_kept(tmp_path, monkeypatch, capsys):
    """An output folder from elsewhere (a colleague's zip) may hold .predict.lock as a link to any file: taking the
    lock truncated that file and wrote this process's pid into it. Now a one-line error, and the target stays."""
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".predict.lock").symlink_to(target)
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "nuclei", "--input", str(tmp_path / "in.png"), "--output", str(out), "--instances"]
    cv2.imwrite(str(tmp_path / "in.png"), np.zeros((32, 32), np.uint8))
    assert cli(predict.main, argv) == 1
    assert ".predict.lock is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "precious" and (out / ".predict.lock").is_symlink()


@pytest.mark.parametrize("checksum", [b"\xff\xfe not text", b"", b"hello  model.pth\n", "folder"])
def test_a_sha256_file_that_holds_no_checksum_is_named(tmp_path, checksum):
    """A .sha256 beside the weights that is not UTF-8 was a UnicodeDecodeError traceback, one without a checksum
    blamed the weights ('damaged or replaced'), and a folder (or a broken link) in its place skipped the check."""
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, path)
    if checksum == "folder":
        (tmp_path / "model.pth.sha256").mkdir()
        with pytest.raises(IsADirectoryError):
            checkpoints.load_checkpoint(str(path), "cpu")
        return
    (tmp_path / "model.pth.sha256").write_bytes(checksum)
    with pytest.raises(DataError, match=r"model.pth.sha256 holds no SHA-256"):
        checkpoints.load_checkpoint(str(path), "cpu")
    (tmp_path / "model.pth.sha256").write_text(sha256_file(path).upper() + "  model.pth\n")
    assert torch.equal(checkpoints.load_checkpoint(str(path), "cpu")["w"], torch.zeros(2))
