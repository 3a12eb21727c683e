"""Interrupting a real training run (SIGTERM, SIGINT) and resuming it with ``--resume NAME`` or ``--auto_resume``.

The interrupted run must exit with 130 and say how to resume, leave only complete files in models/<name>/, and
the resumed run must log every epoch exactly once with the same numbers as an uninterrupted run of the same seed
(CPU, one thread, so the arithmetic is the same).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest
import torch
import yaml

import config
import plot
import synthetic
import train
import trainer
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
NUMERIC = ["lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "val_iou_mean", "val_dice_mean"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           NO_ALBUMENTATIONS_UPDATE="1")


def default_sigint():
    """Run in the child before exec: a shell that starts jobs in the background (``cmd &`` without job control)
    makes them ignore SIGINT, and Python then never raises KeyboardInterrupt; Ctrl-C at a terminal is SIG_DFL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_cmd(*args):
    return [sys.executable, str(ROOT / "train.py"), *args]


def cli(argv):
    """train.py's command line, run in this process (cheaper than a subprocess): its exit code."""
    try:
        run_cli(train.main, argv)
    except SystemExit as e:
        return e.code
    return 0


def first_run_args(name):
    return ["--name", name, "--dataset", "tiny", "--arch", "UNet", "--input_w", "32", "--input_h", "32",
            "--epochs", str(EPOCHS), "-b", "2", "--num_workers", "0", "--device", "cpu", "--seed", "7",
            "--optimizer", "Adam", "--lr", "0.003"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    synthetic.generate_synthetic(str(root / "inputs" / "tiny"), num_images=12, size=32)
    return root


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run, started in the background while the interrupted runs go on."""
    proc = subprocess.Popen(train_cmd(*first_run_args("reference")), cwd=workdir, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def result():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        return pd.read_csv(workdir / "models" / "reference" / "log.csv")

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def wait_for_first_epoch(proc, run, timeout=180):
    """Poll until epoch 1 is logged and committed (last.pth is written after log.csv)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1][-2000:]
        log, ckpt = run / "log.csv", run / "last.pth"
        if log.exists() and ckpt.exists():
            epochs = pd.read_csv(log)["epoch"].tolist()
            if epochs:
                return epochs
        time.sleep(0.05)
    raise AssertionError("no epoch was logged in time")


def check_run_files_complete(run):
    names = sorted(os.listdir(run))
    leftovers = [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert not leftovers, f"temporary files left in {run}: {leftovers}"
    assert {"config.yml", "split.csv", "log.csv", "last.pth", "model.pth"} <= set(names), names
    for n in names:
        path = run / n
        if n.endswith(".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            assert obj, n
        elif n.endswith(".csv"):
            assert len(pd.read_csv(path)) > 0, n
        elif n.endswith(".yml"):
            assert isinstance(yaml.safe_load(path.read_text()), dict), n
        elif n.endswith(".png"):
            assert cv2.imread(str(path)) is not None, n
    ckpt = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    logged = pd.read_csv(run / "log.csv")["epoch"].tolist()
    # last.pth is the commit point: the log holds its epochs, at most one more (redone on resume).
    assert logged[: ckpt["epoch"]] == list(range(1, ckpt["epoch"] + 1)), (logged, ckpt["epoch"])
    assert len(logged) - ckpt["epoch"] in (0, 1)
    return ckpt["epoch"]


# SIGHUP: a terminal closed without nohup; SIGUSR1: Slurm's --signal before the time limit (both killed at once)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1],
                         ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"])
def test_interrupt_then_resume_matches_uninterrupted_run(workdir, reference, sig, monkeypatch, capsys):
    name = f"stopped_{sig.name}"
    run = workdir / "models" / name
    proc = subprocess.Popen(train_cmd(*first_run_args(name)), cwd=workdir, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        wait_for_first_epoch(proc, run)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err
    assert f"--resume {name}" in out + err, out + err
    assert not (workdir / "models" / f".{name}.lock").exists()
    saved = check_run_files_complete(run)
    assert 1 <= saved < EPOCHS, "the signal should have arrived mid-run"

    monkeypatch.chdir(workdir)
    assert cli(["--resume", name]) == 0, capsys.readouterr().err[-2000:]
    assert f"resuming after epoch {saved}" in capsys.readouterr().out
    check_run_files_complete(run)
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == list(range(1, EPOCHS + 1))

    ref = reference()
    assert ref["epoch"].tolist() == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(log[NUMERIC], ref[NUMERIC], check_exact=False, rtol=0, atol=1e-6)
    # The training was not degenerate (otherwise equal numbers would prove little).
    assert log["loss"].nunique() == EPOCHS


@pytest.fixture(scope="module")
def workers_run(workdir, tmp_path_factory):
    """One finished run with a persistent loader worker and a warm-up epoch, in a TMPDIR of its own, for the tests
    of how such a run exits (they only read it): (its CompletedProcess, that TMPDIR)."""
    tmp = tmp_path_factory.mktemp("workers_tmp")
    done = subprocess.run(train_cmd(*first_run_args("workers"), "--num_workers", "1", "--loader", "workers",
                                    "--warmup_epochs", "1", "--epochs", "1"),  # later flags win
                          cwd=workdir, env=dict(ENV, TMPDIR=str(tmp)), capture_output=True, text=True, timeout=120)
    return done, tmp


def test_run_with_loader_workers_and_warmup_exits(workers_run):
    """Finished, a run with persistent loader workers exits (its workers are ended at exit by SIGTERM; they must
    not ignore it, or the exit waits for them for ever)."""
    done, _ = workers_run
    assert done.returncode == 0, done.stderr[-2000:]


def run_with_workers_stopped_after_epoch_1(workdir, name, stop, **popen):
    """Start a run with a loader worker, wait until its first epoch is saved, call ``stop(proc)``; returns (exit
    code, stdout, stderr)."""
    proc = subprocess.Popen(train_cmd(*first_run_args(name), "--num_workers", "1", "--loader", "workers",
                                      "--epochs", "50"),  # later flags win
                            cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)
    try:
        wait_for_first_epoch(proc, workdir / "models" / name)
        stop(proc)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.parametrize("group", [True, False], ids=["SIGTERM_to_the_group", "SIGINT_to_the_main_process"])
def test_stops_cleanly_with_loader_workers(workdir, group):
    """``timeout`` and batch systems send SIGTERM to the whole process group, DataLoader workers included; Ctrl-C
    from another program reaches the main process alone. Either way the run stops as after Ctrl-C at a terminal
    (exit 130, how to resume, no traceback), neither on a dead worker nor waiting for one."""
    name = f"stopped_with_workers_{group}"

    def stop(proc):
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)

    code, out, err = run_with_workers_stopped_after_epoch_1(workdir, name, stop, preexec_fn=default_sigint)
    assert code == 130, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert f"--resume {name}" in out + err, out + err
    check_run_files_complete(workdir / "models" / name)


def child_pids(parent):
    """The processes whose parent is ``parent`` (Linux: field 4 of /proc/<pid>/stat, after the parenthesised name)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def test_killed_loader_worker_is_a_one_line_error(workdir):
    """The kernel's out-of-memory killer ends a loader worker with SIGKILL: the run says so in one line, with the
    command that continues from the last saved epoch, instead of PyTorch's traceback (also when the other loader's
    worker ends afterwards, which makes PyTorch raise the error again)."""
    name = "worker_killed"

    def kill_a_worker(proc):
        workers = sorted(child_pids(proc.pid))
        assert workers, "the run has no loader worker to kill"
        os.kill(workers[0], signal.SIGKILL)

    code, out, err = run_with_workers_stopped_after_epoch_1(workdir, name, kill_a_worker)
    assert code == 1, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    # PyTorch says "is killed by signal: Killed", or "exited unexpectedly" when it sees the worker gone before its
    # exit status: either way one line with the command that continues
    assert "killed by signal" in err or "exited unexpectedly" in err, err[-2000:]
    assert f"--resume {name} --num_workers 0" in err, err[-2000:]
    check_run_files_complete(workdir / "models" / name)


# train.py whose first loader worker dies (SIGKILL, as by the out-of-memory killer) right after epoch 1's last.pth is
# written, before the trainer records the epoch as saved: on a loaded machine the kill of the test above can land there
WORKER_KILLED_AT_THE_COMMIT = """
import os, signal, time
import psutil
import train, trainer, utils
save = trainer.save_training_state
def save_then_lose_a_worker(*args):
    save(*args)
    worker = min(child.pid for child in psutil.Process().children())
    os.kill(worker, signal.SIGKILL)
    os.waitid(os.P_PID, worker, os.WEXITED | os.WNOWAIT)  # dead, and left for PyTorch to find
    time.sleep(1)  # PyTorch's SIGCHLD handler runs meanwhile, unless held
trainer.save_training_state = save_then_lose_a_worker
utils.run_cli(train.main)
"""


def test_worker_killed_as_the_epoch_is_saved_says_to_resume_from_it(workdir):
    """A loader worker killed between the write of last.pth and the line that records its epoch as saved: the error
    says to resume from that epoch, not that no epoch was saved and to start again with --overwrite (which throws
    the saved epoch away)."""
    name = "worker_killed_at_the_commit"
    done = subprocess.run([sys.executable, "-c", WORKER_KILLED_AT_THE_COMMIT, *first_run_args(name), "--num_workers",
                           "1", "--loader", "workers"], cwd=workdir, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "killed by signal" in done.stderr, done.stderr[-2000:]
    assert f"during epoch 2; models/{name}/last.pth holds epoch 1. Continue with: python train.py --resume {name} " \
           "--num_workers 0" in done.stderr, done.stderr[-2000:]
    check_run_files_complete(workdir / "models" / name)


# ------------------------------------------------------------------------ --auto_resume: one command, every start

RECIPE = "dataset: tiny\narch: UNet\ninput_w: 32\ninput_h: 32\nepochs: 2\nbatch_size: 2\nnum_workers: 0\n" \
         "device: cpu\nseed: 7\noptimizer: Adam\nlr: 0.003\n"


def stop_after_epoch_1(monkeypatch):
    """Stop the next run as a job's SIGTERM does, right after its first epoch is saved."""
    def line_then_stop(row, *args):
        if row["epoch"] == 1:
            raise KeyboardInterrupt
        return trainer.epoch_line(row, *args)

    monkeypatch.setattr(trainer, "epoch_line", line_then_stop)


def test_auto_resume_starts_continues_as_resume_does_and_ends(workdir, monkeypatch, capsys):
    """One unchanged command line (a recipe and --name, as a requeued batch job runs it) starts the run, continues
    it with the numbers of a plain --resume, then says it is complete and exits 0 without training; a flag of the
    command line or of the recipe that differs from the run's is refused."""
    monkeypatch.chdir(workdir)
    (workdir / "auto.yml").write_text(RECIPE)
    cmd = ["--config", "auto.yml", "--name", "auto", "--auto_resume"]
    run = workdir / "models" / "auto"
    with monkeypatch.context() as m:
        stop_after_epoch_1(m)
        assert cli(cmd) == 130
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    shutil.copytree(run, workdir / "models" / "plain")
    assert cli(cmd) == 0 and "resuming after epoch 1" in capsys.readouterr().out
    assert cli(["--resume", "plain"]) == 0
    log, plain = (pd.read_csv(workdir / "models" / n / "log.csv") for n in ("auto", "plain"))
    assert log["epoch"].tolist() == [1, 2] and log["loss"].nunique() == 2
    pd.testing.assert_frame_equal(log[NUMERIC], plain[NUMERIC], check_exact=True)

    finished = {f: (run / f).read_bytes() for f in os.listdir(run)}
    capsys.readouterr()
    assert cli(cmd) == 0
    out = capsys.readouterr().out
    assert out == "models/auto is complete: it has trained its 2 epochs (--epochs 2); nothing left to train\n"
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == finished
    assert cli(cmd + ["--lr", "0.01"]) == 2
    assert "--lr 0.01 differs from the run's 0.003; --auto_resume continues models/auto" in capsys.readouterr().err
    (workdir / "auto.yml").write_text(RECIPE.replace("arch: UNet", "arch: NestedUNet"))
    assert cli(cmd) == 2
    err = capsys.readouterr().err
    assert "--arch NestedUNet differs from the run's UNet" in err and err.endswith("(set in --config auto.yml)\n")
    (run / "config.yml").rename(run / "config.yml.bak")
    assert cli(cmd) == 2
    assert "models/auto/config.yml not found; it holds the run's settings beside its last.pth" in \
        capsys.readouterr().err


def test_resume_refuses_a_log_older_than_last_pth(workdir, monkeypatch, capsys):
    """A run folder copied while it trained can hold a log.csv of fewer epochs than its last.pth (or an empty one):
    resumed, its log would miss epochs, and the summary at the end looked the best epoch up there (IndexError after
    all the training). It is refused in one line before anything is trained; the log saved with last.pth resumes."""
    monkeypatch.chdir(workdir)
    assert cli([*first_run_args("stale_log"), "--epochs", "1"]) == 0
    log = workdir / "models" / "stale_log" / "log.csv"
    saved = log.read_text()
    for stale in (saved.splitlines()[0] + "\n", ""):
        log.write_text(stale)
        capsys.readouterr()
        assert cli(["--resume", "stale_log", "--epochs", "2"]) == 1
        assert capsys.readouterr().err.endswith(
            f": error: --resume stale_log: {os.path.join('models', 'stale_log', 'log.csv')} lacks 1 of the 1 "
            "epochs that last.pth holds (the first: 1; a log older than last.pth, copied while the run trained?); "
            "restore the log.csv saved with last.pth, or start again with --overwrite\n")
        assert log.read_text() == stale
    log.write_text(saved)
    assert cli(["--resume", "stale_log", "--epochs", "2"]) == 0
    assert pd.read_csv(log)["epoch"].tolist() == [1, 2]


def test_auto_resume_starts_again_after_a_kill_in_epoch_1_and_ends_an_early_stopped_run(workdir, monkeypatch, capsys):
    """A job stopped or killed (SIGKILL: no clean-up) before its first epoch was saved leaves config.yml and
    split.csv: the same command starts the run again in its folder (no folder set aside that would stop the next
    job). A run that --early_stopping ended is complete: exit 0, nothing trained. Weights without last.pth are never
    trained over: the message says how to replace them by hand (--overwrite cannot go with --auto_resume)."""
    monkeypatch.chdir(workdir)
    cmd = [*first_run_args("auto_early"), "--early_stopping", "0", "--auto_resume"]
    run = workdir / "models" / "auto_early"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_one_epoch", stopped)
        assert cli(cmd) == 130
        assert "before any epoch was saved; start again with the same command" in capsys.readouterr().out
        assert sorted(os.listdir(run)) == ["config.yml", "split.csv"]
        m.setattr(trainer.Trainer, "_restore_replaced_run", lambda self: None)  # what a SIGKILL leaves undone
        assert cli(cmd) == 130
    assert cli(cmd) == 0
    assert "early stopping after epoch 1" in capsys.readouterr().out
    assert [n for n in os.listdir(workdir / "models") if n.startswith(".auto_early")] == []
    finished = {f: (run / f).read_bytes() for f in os.listdir(run)}
    assert cli(cmd) == 0
    assert "models/auto_early is complete: early stopping ended it after epoch 1 (--early_stopping 0)" in \
        capsys.readouterr().out
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == finished
    shutil.copy(run / "model.pth", run / "last.pth")  # a plain state dict: no epoch to read
    assert cli(cmd) == 1
    assert "models/auto_early/last.pth has no 'epoch': it is not a last.pth of this toolkit" in capsys.readouterr().err
    os.remove(run / "last.pth")  # weights without last.pth: killed while saving epoch 1, or a finished run's removed
    assert cli(cmd) == 2
    assert "run this command once with --overwrite instead of --auto_resume to replace it" in capsys.readouterr().err


def test_loader_workers_leave_no_temporary_folders(workers_run):
    """A run with loader workers ends them before the interpreter exits: multiprocessing's SIGTERM at exit would end
    them through quiet_worker's os._exit, which skips the removal of their pymp-* folders in TMPDIR."""
    run, tmp = workers_run
    assert run.returncode == 0, run.stderr[-2000:]
    assert not list(tmp.glob("pymp-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU refuses --device cuda")
def test_a_setting_kept_from_config_yml_that_this_machine_lacks_is_named_as_kept(workdir, monkeypatch, capsys):
    """A run started on a GPU machine with --device cuda and resumed on one without: the error names config.yml, where
    the flag the user did not type comes from, and the flag that changes it; typed, the flag gets no such note."""
    monkeypatch.chdir(workdir)
    run = workdir / "models" / "from_gpu"
    run.mkdir(parents=True)
    (run / "config.yml").write_text(yaml.safe_dump({**yaml.safe_load(RECIPE), "name": "from_gpu", "device": "cuda"}))
    assert cli(["--resume", "from_gpu"]) == 2
    assert capsys.readouterr().err.endswith(" error: --device cuda was asked for but no CUDA GPU is visible to "
                                            "PyTorch; use --device cpu or auto (kept from models/from_gpu/config.yml; "
                                            "give --device for this machine)\n")
    assert cli(["--resume", "from_gpu", "--device", "cuda"]) == 2
    assert "kept from" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU refuses --device cuda")
def test_a_setting_kept_from_config_yml_is_named_as_kept_under_auto_resume_with_a_recipe(workdir, monkeypatch,
                                                                                         capsys):
    """A requeued job (a recipe that sets no --device, and --auto_resume) of a run started with --device cuda, now
    on a machine without a GPU: the flag comes from config.yml, not from the recipe, and the error says so; set in
    the recipe, it gets no such note."""
    monkeypatch.chdir(workdir)
    (workdir / "kept.yml").write_text(RECIPE.replace("device: cpu\n", ""))
    cmd = ["--config", "kept.yml", "--name", "kept", "--auto_resume"]
    with monkeypatch.context() as m:
        stop_after_epoch_1(m)
        assert cli(cmd) == 130
    saved = workdir / "models" / "kept" / "config.yml"
    saved.write_text(yaml.safe_dump({**yaml.safe_load(saved.read_text()), "device": "cuda"}))
    capsys.readouterr()
    assert cli(cmd) == 2
    assert capsys.readouterr().err.endswith("use --device cpu or auto (kept from models/kept/config.yml; give --device "
                                            "for this machine)\n")
    (workdir / "kept.yml").write_text(RECIPE.replace("device: cpu", "device: cuda"))  # now the recipe's own flag
    assert cli(cmd) == 2
    assert "kept from" not in capsys.readouterr().err


def test_log_records_where_each_epoch_trained(workdir, monkeypatch):
    """log.csv names each epoch's device type and precision (engine.Precision.label): a run resumed in another
    memory format or precision (--amp auto / --channels_last auto differ between machines) shows where it changed."""
    monkeypatch.chdir(workdir)
    args = first_run_args("moved")
    args[args.index("--epochs") + 1] = "1"
    assert cli(args + ["--channels_last", "True"]) == 0
    assert cli(["--resume", "moved", "--epochs", "2", "--channels_last", "False"]) == 0
    log = pd.read_csv(workdir / "models" / "moved" / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert log["device"].tolist() == ["cpu", "cpu"]
    assert log["precision"].tolist() == ["fp32+channels_last", "fp32"]


def test_saved_num_workers_above_this_machine_s_cpus_is_lowered_with_a_note(workdir, monkeypatch, capsys):
    """A run moved from a larger machine keeps its --num_workers; resumed where fewer CPUs are usable, it loads
    with as many workers as CPUs and says so (the numbers do not depend on the worker count); a --num_workers
    given on the command line is kept as given."""
    monkeypatch.chdir(workdir)
    args = first_run_args("from_big")
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--num_workers") + 1] = "2"
    assert cli(args + ["--loader", "workers"]) == 0
    monkeypatch.setattr(config, "usable_cpus", lambda: 1)
    resumed = config.parse_train_args(["--resume", "from_big", "--epochs", "2"])
    assert config.fit_saved_workers(resumed, ["--resume", "from_big", "--epochs", "2"]) == (
        "note: --num_workers 2, kept from models/from_big/config.yml, is more than the 1 CPU this process may use "
        "here: 1 loader worker (give --num_workers to choose)")
    assert resumed.num_workers == 1
    given = ["--resume", "from_big", "--epochs", "2", "--num_workers", "2"]
    kept = config.parse_train_args(given)
    assert config.fit_saved_workers(kept, given) == "" and kept.num_workers == 2
    capsys.readouterr()
    assert cli(["--resume", "from_big", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "is more than the 1 CPU this process may use here" in out and "1 loader worker)" in out


def test_curves_are_redrawn_within_their_share_of_the_time_and_when_the_run_ends_or_stops(workdir, monkeypatch):
    """Drawing curves.png takes about a second, longer than a GPU's epoch of a 96x96 recipe: train.py redraws it after
    an epoch only once the time since its last drawing is 1 / trainer.CURVES_SHARE times that drawing's, and always
    when the run ends or stops, from the saved epochs: then it is the picture plot.py draws from log.csv."""
    monkeypatch.chdir(workdir)
    drawn, draw = [], trainer.plot_runs
    monkeypatch.setattr(trainer, "plot_runs", lambda logs, *a: drawn.append(len(logs[0])) or draw(logs, *a))

    def curves_of_the_log(name):
        assert plot.main(["--name", name, "--out", f"{name}.png"]) is None
        return (workdir / f"{name}.png").read_bytes() == (workdir / "models" / name / "curves.png").read_bytes()

    monkeypatch.setattr(trainer, "CURVES_SHARE", 1e9)  # drawing as good as free: after every epoch
    assert cli(first_run_args("curves_free")) == 0
    assert drawn == [1, 2, 3] and curves_of_the_log("curves_free")
    drawn.clear()
    monkeypatch.setattr(trainer, "CURVES_SHARE", 1e-9)  # as if a drawing took hours: once, at the end
    assert cli(first_run_args("curves_dear")) == 0
    assert drawn == [3] and curves_of_the_log("curves_dear")

    drawn.clear()
    train_epoch = trainer.Trainer.train_epoch

    def stopped_in_epoch_3(self, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(self, epoch, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", stopped_in_epoch_3)
    assert cli(first_run_args("curves_stopped")) == 130
    assert drawn == [2] and curves_of_the_log("curves_stopped")
