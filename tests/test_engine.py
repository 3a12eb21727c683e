"""engine.recalibrate_batchnorm: precise BatchNorm statistics against a direct computation."""
import argparse
import io
import os
import select
import sys
import time
import types

import pytest
import torch

import engine
import utils
from archs import build_model
from engine import Precision, recalibrate_batchnorm, step
from losses import build_loss
from utils import UsageError, amp_mode, compile_mode


def test_precise_bn_is_the_plain_average_over_the_first_batches():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4, momentum=0.1))
    bn = model[1]
    batches = [(torch.randn(2, 3, 8, 8) * (k + 1) + k, torch.zeros(2, 1, 8, 8), {}) for k in range(3)]
    model.eval()
    recalibrate_batchnorm(model, batches, Precision(torch.device("cpu")), max_batches=2)
    with torch.no_grad():
        features = [conv(images) for images, _, _ in batches[:2]]
    means = torch.stack([f.mean((0, 2, 3)) for f in features])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored
    before = bn.running_mean.clone()
    recalibrate_batchnorm(model, batches, Precision(torch.device("cpu")), max_batches=0)
    torch.testing.assert_close(bn.running_mean, before)  # 0 = off


def test_precise_bn_shows_a_bar_over_the_batches_it_averages(monkeypatch):
    """train.py's precise BN (--precise_bn 40 of the full-size recipes: 40 forward passes of 8 crops of 256x256) ran
    for 6 minutes on 2 CPU cores with nothing on screen between the epoch's bar and validation's."""
    bars = []

    def spy(iterable=None, **kwargs):
        bars.append((kwargs, utils.progress_bar(iterable, file=io.StringIO(), **kwargs)))
        return bars[-1][1]

    monkeypatch.setattr(engine, "progress_bar", spy)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    batches = [(torch.randn(2, 3, 8, 8), torch.zeros(2, 1, 8, 8), {}) for _ in range(5)]
    for max_batches, progress, total in ((3, True, 3), (40, True, 5), (3, False, 3)):
        bars.clear()
        recalibrate_batchnorm(model, batches, Precision(torch.device("cpu")), max_batches, progress=progress)
        (kwargs, bar), = bars
        assert (kwargs["desc"], kwargs["total"], kwargs["disable"]) == ("precise BN", total, not progress)
        if progress:
            assert bar.n == total  # the batches averaged, counted as they went through the network


def read_until(fd, text, seconds=10):
    """What the terminal ``fd`` shows until ``text`` arrives (or ``seconds`` pass): Linux hands a pseudo-terminal's
    writes to its other end from a work queue, so that one read right after them may get only the first."""
    shown, end = "", time.monotonic() + seconds
    while text not in shown and select.select([fd], [], [], max(0, end - time.monotonic()))[0]:
        shown += os.read(fd, 65536).decode()
    return shown


def test_progress_bars_show_on_a_terminal_whose_size_was_never_set(monkeypatch):
    """A pseudo-terminal that no one sized (docker exec -t, script run from a job) reads 0 x 0, and tqdm drew the
    bars 0 characters wide: a whole training epoch showed nothing. A fresh pty is such a terminal."""
    pty = pytest.importorskip("pty", reason="pseudo-terminals are POSIX's")
    master, slave = pty.openpty()
    assert os.get_terminal_size(slave) == (0, 0)
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        monkeypatch.delenv("COLUMNS", raising=False)
        for _ in utils.progress_bar(range(3), desc="epoch 1/1", leave=True):
            pass
        terminal.flush()
        shown = read_until(master, "3/3")
    os.close(master)
    assert "epoch 1/1: 100%" in shown and "3/3" in shown and len(shown.splitlines()[-1]) <= 80


def test_progress_bars_in_a_log_file_are_written_every_30_s(monkeypatch):
    """A batch job's log (stderr not a terminal) got a bar's line ten times a second: megabytes for a long run."""
    assert utils.progress_bar(range(3), file=io.StringIO()).mininterval == 30  # pytest's stderr is no terminal
    monkeypatch.setattr(utils.sys.stderr, "isatty", lambda: True)
    assert utils.progress_bar(range(3), file=io.StringIO()).mininterval == 0.1


@pytest.mark.parametrize("flags, fast", [("fpu avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                                         ("fpu avx2 avx512f", False)])
def test_native_bf16_is_found_without_torchs_probes(tmp_path, monkeypatch, flags, fast):
    """torch before 2.5 has no CPU probes: /proc/cpuinfo's flags tell instead (bf16 was taken for emulated)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    read_flags = engine.cpu_flags
    assert read_flags(str(cpuinfo)) == set(flags.split()) and read_flags(str(tmp_path / "none")) == set()
    monkeypatch.setattr(engine, "cpu_flags", lambda: read_flags(str(cpuinfo)))
    assert engine.cpu_has_fast_bf16() is fast


def test_amp_auto_follows_the_cpu_and_can_be_forced(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)
    fast = Precision.choose(cpu, "auto")
    assert fast.amp_dtype == torch.bfloat16 and fast.channels_last and "native bf16" in fast.describe()
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    slow = Precision.choose(cpu, True)  # the flag's old value
    assert slow.amp_dtype is None and "no native bf16" in slow.describe()
    forced = Precision.choose(cpu, "bf16")  # forced even without native bf16, with a warning in the header
    assert forced.amp_dtype == torch.bfloat16 and "emulated" in forced.describe()
    assert Precision.choose(cpu, "False").amp_dtype is None
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        Precision.choose(cpu, "fp16")
    # --channels_last auto: NCHW only for fp32 on a CPU without AVX512 (faster there; slower on AVX512); True/False
    # force it
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not Precision.choose(cpu, "fp32", "auto").channels_last
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert Precision.choose(cpu, "fp32", "auto").channels_last
    assert not Precision.choose(cpu, "fp32", False).channels_last
    assert Precision.choose(cpu, "fp32", True).channels_last
    assert Precision.choose(cpu, "bf16", "auto").channels_last
    assert not Precision.choose(cpu, "bf16", False).channels_last
    assert Precision.choose(cpu, "bf16", True).label() == "bf16+channels_last"
    assert Precision.choose(cpu, "fp32", False).label() == "fp32"


def fake_gpus(monkeypatch, majors):
    """PyTorch sees GPUs of compute capability ``majors``[i].x as cuda:i, and cuda:0 is the current one; a bf16
    tensor can be made on each (true of every CUDA GPU, so torch's emulation probe answers True)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(majors))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(major=majors[torch.device(device or "cuda").index
                                                                              or 0]))


def test_amp_auto_takes_fp16_on_a_gpu_without_native_bf16(monkeypatch):
    """A T4 or V100 (compute capability 7.x) emulates bf16 far slower than its fp16: auto picks fp16 + GradScaler
    there and bf16 only on Ampere or later, asking the GPU of --device, not the current one."""
    fake_gpus(monkeypatch, [7, 8])
    t4, a100 = torch.device("cuda:0"), torch.device("cuda:1")
    assert Precision.choose(t4, "auto").amp_dtype == torch.float16
    assert Precision.choose(a100, "auto").amp_dtype == torch.bfloat16
    with pytest.raises(UsageError, match="--amp bf16: this GPU has no native bf16"):
        Precision.choose(t4, "bf16")


def test_bf16_step_keeps_the_loss_in_fp32_and_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("UNet", 1, 3, False)
    images, masks = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    losses = {}
    for amp in ("fp32", "bf16"):
        precision = Precision.choose(torch.device("cpu"), amp)
        net = precision.prepare(model)
        x, y = precision.to_device(images, masks)
        loss, logits = step(net, x, y, build_loss("BCEDiceLoss"), precision)
        assert loss.dtype == torch.float32 and logits.dtype == torch.float32
        losses[amp] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.02)


def test_amp_flag_reads_old_and_new_values():
    assert [amp_mode(v) for v in (True, "true", "False", 0, "BF16", "fp32")] == ["auto", "auto", "fp32", "fp32",
                                                                                   "bf16", "fp32"]
    assert [compile_mode(v) for v in (False, "True", "reduce-overhead")] == [False, "default", "reduce-overhead"]
    with pytest.raises(argparse.ArgumentTypeError):
        amp_mode("half")


def test_a_gpu_index_beyond_the_visible_gpus_is_named(monkeypatch):
    """--device cuda:3 on a machine with one GPU: the error names the flag and the GPUs there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(UsageError, match=r"--device cuda:3: PyTorch sees 1 CUDA GPU \(cuda:0 to cuda:0\)"):
        engine.choose_device("cuda:3")
    assert engine.choose_device("cuda:0") == torch.device("cuda:0")


def test_the_gpu_of_device_becomes_the_current_one(monkeypatch):
    """--device cuda:1: torch's current GPU is cuda:1, so that HostCopy's CUDA event (recorded on the current GPU's
    stream) waits for the loss's copy queued on cuda:1, and the DataLoader's pin_memory thread opens no context on
    cuda:0, perhaps another job's GPU."""
    fake_gpus(monkeypatch, [8, 8])
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert engine.choose_device("cuda:1") == torch.device("cuda:1")
    assert current == [torch.device("cuda:1")]
    monkeypatch.setenv("RANK", "0")  # under torchrun: the rank's own GPU, set by distributed.setup, and no other
    monkeypatch.setenv("WORLD_SIZE", "2")
    engine.choose_device("cuda:1")
    assert current == [torch.device("cuda:1")]


@pytest.mark.parametrize("cpus", [1, 64])
def test_torch_threads_never_exceed_the_cpus_a_quota_allows(monkeypatch, cpus):
    """A CPU quota below torch's thread count (which follows the affinity only) caps the threads; a larger count of
    usable CPUs never raises them."""
    before = torch.get_num_threads()
    monkeypatch.setattr(engine, "usable_cpus", lambda: cpus)
    try:
        engine.fit_threads_to_cpus()
        assert torch.get_num_threads() == min(cpus, before)
    finally:
        torch.set_num_threads(before)
