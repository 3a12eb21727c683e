"""Two CPU processes with gloo via torchrun: files written once, and the reduced validation IoU equals a
single-process evaluation of the same weights on the same images; more processes than GPUs is a usage error."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import distributed
import train
import val
from synthetic import generate_synthetic
from utils import UsageError, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_cpu_processes(tmp_path, monkeypatch, capsys):
    generate_synthetic(str(tmp_path / "inputs" / "synthetic"), num_images=13, size=32, seed=3)
    # --standalone: a free port (a fixed --master_port fails while another run holds it); TMPDIR: where torchrun
    # leaves its torchelastic_* log folders
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), "--dataset", "synthetic", "--arch", "UNet", "--epochs", "1",
           "--input_w", "32", "--input_h", "32", "-b", "2", "--num_workers", "0", "--optimizer", "Adam",
           "--device", "cpu", "--name", "ddp"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("best epoch 1") == 1, run.stdout  # rank 0 alone prints the summary
    run_dir = tmp_path / "models" / "ddp"
    assert sorted(os.listdir(run_dir)) == ["config.yml", "curves.png", "last.pth", "log.csv", "model.pth",
                                           "split.csv", "train_batch.png"]
    log = pd.read_csv(run_dir / "log.csv")
    assert log["epoch"].tolist() == [1]

    # 3 val ids (odd count) over 2 ranks: sharding must cover each exactly once, not pad with duplicates.
    split = pd.read_csv(run_dir / "split.csv")
    assert (split["split"] == "val").sum() == 3
    # the single-process steps run in this process: a fresh interpreter would only add its imports
    monkeypatch.chdir(tmp_path)
    run_cli(val.main, ["--name", "ddp", "--device", "cpu", "--no_overlays"])
    scores = pd.read_csv(tmp_path / "outputs" / "ddp" / "scores.csv")
    assert len(scores) == 3
    pooled = float(capsys.readouterr().out.split("IoU")[1].split()[0])
    assert pooled == pytest.approx(log["val_iou"][0], abs=1e-4)

    # A single-process run resumes the DDP checkpoint (the checkpoint holds the unwrapped model).
    run_cli(train.main, ["--resume", "ddp", "--epochs", "2"])
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1, 2]

    # --auto_resume of the finished run (a requeued job): every process ends with exit 0 and trains nothing; rank 0
    # alone says so
    done = subprocess.run(cmd + ["--auto_resume", "--epochs", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "models/ddp is complete: it has trained its 2 epochs (--epochs 2); nothing left to train\n"
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1, 2]

    # Mistakes under torchrun: each process says it in one line (no gloo or SyncBatchNorm traceback).
    for extra, message in ((["--name", "ddp"], "models/ddp already holds a run"),
                           (["--name", "ddp_sync", "--sync_bn", "True"], "--sync_bn True: SyncBatchNorm")):
        failed = subprocess.run(cmd[:-2] + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert failed.returncode != 0 and failed.stderr.count(f"train.py: error: {message}") == 2, failed.stderr
        assert "gloo" not in failed.stderr and "ValueError" not in failed.stderr, failed.stderr[-3000:]


def test_torchrun_with_more_processes_than_gpus_is_a_usage_error(monkeypatch):
    """torchrun --nproc_per_node=4 on a machine with 2 GPUs: local process 2 has no GPU; it says so and the fix,
    before it sets a GPU or joins the group (there CUDA's 'invalid device ordinal' came with a traceback)."""
    for name, value in (("RANK", "2"), ("LOCAL_RANK", "2"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    called = []
    monkeypatch.setattr(torch.cuda, "set_device", called.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", called.append)
    with pytest.raises(UsageError, match=r"sees 2 CUDA GPUs .* --nproc_per_node=2 or fewer"):
        distributed.setup(torch.device("cuda"))
    assert called == []
