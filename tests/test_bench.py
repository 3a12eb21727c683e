"""The benchmark scripts run end to end and end with their JSON summary. Speed itself is never asserted."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError

import cv2
import numpy as np
import pandas as pd
import psutil
import pytest
import tifffile
import torch
import yaml

import compare_scores  # bench/, on the path through conftest
import fold_bn
import group_split
import kernel_time
import profile_step
import robustness
import speed
import split_overlap
import stack_memory
import timing
import track
from config import ARCHS
from conftest import ZYGOTE_FORK, make_synthetic, write_run
from optim import fused_update
from utils import ArgumentParser, UsageError, stop_signals_as_interrupts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# how a script run by run_script names its CPUs in a header
ONE_CPU = f"1 of {os.cpu_count()} logical CPUs" if os.cpu_count() > 1 else "1 logical CPU"


def on_one_cpu():
    """preexec_fn: the script may run on one of this process's CPUs (as under taskset -c), fewer than the machine's
    where it has several."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# Importing torch and the toolkit's modules takes seconds of a --quick benchmark's few: run_script forks each script
# from a zygote (conftest.ZYGOTE_FORK) that imported them once. It runs on one CPU from its start, so that OpenMP,
# which counts the CPUs as it loads, sees one as in a script started on one CPU. The child has the sys.path that
# ``python bench/<name>`` has; the scripts' own measuring subprocesses are fresh interpreters, as ever.
ZYGOTE = ZYGOTE_FORK + r"""
fresh_path = sys.path[1:]  # a script's sys.path after its own folder
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "bench")]
import pandas, torch, torch._dynamo  # noqa: F401  (the expensive imports, done once)
import quality, speed, timing, trainer, val  # noqa: F401
for line in sys.stdin:
    case = json.loads(line)
    pid = fork_case(dict(case, path=[os.path.dirname(case["script"]), *fresh_path]))
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
ZYGOTES = []  # the module's one, started by the first run_script
OUTPUTS = []  # the folder of the scripts' stdout and stderr files (the tests check that cwd is left empty)


@pytest.fixture(scope="module", autouse=True)
def _zygote_outputs(tmp_path_factory):
    OUTPUTS.append(tmp_path_factory.mktemp("zygote"))
    yield
    for zygote in ZYGOTES:
        zygote.stdin.close()  # it ends at the end of its input
        zygote.wait(timeout=60)
    ZYGOTES.clear()
    OUTPUTS.clear()


def run_script(name, args, cwd, timeout=240):
    """Run bench/<name> on one CPU (:func:`on_one_cpu`), forked from the zygote (:data:`ZYGOTE`); returns its JSON
    summary, the last line of its output."""
    if not ZYGOTES:
        ZYGOTES.append(subprocess.Popen([sys.executable, "-c", ZYGOTE, ROOT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, preexec_fn=on_one_cpu,
                                        env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")))
    zygote, out, err = ZYGOTES[0], OUTPUTS[0] / "stdout", OUTPUTS[0] / "stderr"
    zygote.stdin.write(json.dumps({"script": os.path.join(ROOT, "bench", name), "args": args, "cwd": str(cwd),
                                   "out": str(out), "err": str(err)}) + "\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    with ThreadPoolExecutor(1) as waiting:
        try:
            code = int(waiting.submit(zygote.stdout.readline).result(timeout=timeout))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)  # the zygote then reads its exit status and goes on
            raise
    with open(out) as f, open(err) as g:
        stdout, stderr = f.read(), g.read()
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def assert_names_its_cpus(summary):
    """A timing names the CPUs it had (one, :func:`run_script`), and the machine's."""
    assert summary["cpus"] == 1 and summary["cpu_count"] == os.cpu_count()


def test_speed_quick_smallest(tmp_path):
    summary = run_script("speed.py", ["--quick", "--device", "cpu", "--archs", "UNet", "--batch_sizes", "4",
                                      "--num_images", "24", "--size", "32", "--steps", "1", "--repeats", "1",
                                      "--warmup", "0", "--num_workers", "1"], tmp_path)
    for key in ("bench", "torch", "devices", "rows", "geomean_ratio"):
        assert key in summary
    assert summary["bench"] == "speed" and "cpu" in summary["devices"]
    assert_names_its_cpus(summary)
    assert f"({ONE_CPU}, " in summary["devices"]["cpu"]
    (row,) = summary["rows"]
    assert row["arch"] == "UNet" and row["batch_size"] == 4 and row["device"] == "cpu"
    for loop in ("seed", "ours"):
        for key in ("images_per_s", "epoch_s", "peak_mem_mib", "steps_per_epoch", "precision", "tflop_per_s", "mfu"):
            assert key in row[loop]
        assert row[loop]["steps_per_epoch"] == 1 and row[loop]["images_per_s"] > 0
        assert row[loop]["mfu"] is None and 0 < row[loop]["matmul_share"] < 1  # 32x32 images: far below the ceiling
    assert summary["cpu_matmul_tflop_per_s"]["fp32"] > 0  # the seed's loop trains in fp32
    assert row["ratio"] > 0
    assert os.listdir(tmp_path) == []  # everything went to a temporary folder, removed afterwards


def test_speed_in_process_measures_more_than_two_runs(tmp_path):
    """--in_process builds every Trainer in one process: the third one of a pid's run name was refused (the second's
    --overwrite had set the first aside, and no measurement saves an epoch to drop it)."""
    summary = run_script("speed.py", ["--quick", "--in_process", "--device", "cpu", "--archs", "UNet,UNet,UNet",
                                      "--batch_sizes", "4", "--num_images", "24", "--size", "32", "--steps", "1",
                                      "--repeats", "1", "--warmup", "0", "--num_workers", "0"], tmp_path)
    assert len(summary["rows"]) == 3 and all(row["ours"]["images_per_s"] > 0 for row in summary["rows"])


def test_speed_stops_on_a_signal_that_ends_a_job(tmp_path):
    """SIGUSR1 (Slurm's warning before the time limit, one of utils.STOP_SIGNALS) stops bench/speed.py as Ctrl-C
    does: exit 130, its measuring subprocess killed, its work folder removed."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "speed.py"), "--quick", "--device", "cpu",
                             "--archs", "UNet", "--batch_sizes", "4", "--num_images", "24", "--size", "32",
                             "--num_workers", "0", "--warmup", "1000"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    measuring = []
    try:
        deadline = time.monotonic() + 120
        while not measuring and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            measuring = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for process in measuring:  # left behind by a speed.py that the signal killed
            if process.is_running():
                process.kill()
    assert measuring and proc.returncode == 130 and err.endswith("interrupted\n"), (proc.returncode, err[-2000:])
    assert not measuring[0].is_running()
    assert os.listdir(tmp_path) == []


def test_speed_kills_a_measuring_subprocess_that_a_stop_signal_catches_starting(tmp_path, monkeypatch):
    """A stop signal that lands while Popen starts the measuring subprocess (the child exists from its fork on, and
    the test above sends SIGUSR1 as soon as it sees a child): speed.py still kills the child, which went on
    measuring after speed.py had exited."""
    children = []

    class SignalledWhileStarting(subprocess.Popen):
        def __init__(self, args, **kwargs):
            super().__init__(["sleep", "60"], **kwargs)  # a stand-in for the measurement, cheap to end

        def _execute_child(self, *args):
            super()._execute_child(*args)
            children.append(psutil.Process(self.pid))
            os.kill(os.getpid(), signal.SIGUSR1)  # before Popen returns

    monkeypatch.setattr(speed.subprocess, "Popen", SignalledWhileStarting)
    try:
        with pytest.raises(KeyboardInterrupt), stop_signals_as_interrupts():
            speed.run_measurement({"in_process": False}, str(tmp_path))
        assert children and not children[0].is_running()
    finally:
        for child in children:
            if child.is_running():
                child.kill()


def test_gpu_session_dry_runs_every_part_and_sends_back_eight_files(tmp_path):
    """bench/gpu_session.sh --dry: the device session's steps on the CPU (speed.py eager, both recipes, val.py on the
    validation split and on another dataset; not the CUDA-graphs row, whose compiling takes minutes on a CPU), 8 files
    under $OUT (what the device tool sends back) with a summary of every part, and its work folder removed."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "--dry"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert sorted(os.listdir(out)) == ["b16.log", "b16_log.csv", "b16_test_scores.csv", "b16_val_scores.csv",
                                       "b64.log", "b64_log.csv", "speed.log", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["compile"] for row in summary["a_speed"]] == [False]
    assert all(row["ours_img_s"] > 0 and row["ratio"] > 0 for row in summary["a_speed"])
    assert summary["b_recipe"]["epochs"] == 1 and summary["c_recipe_b64"]["epochs"] == 1
    assert summary["b_val"]["iou"] == pytest.approx(summary["b_recipe"]["best_val_iou"], abs=1e-4)
    assert 0 <= summary["b_test"]["iou"] <= 1 and "dsb" in summary["b_test"]
    assert summary["b_goal_met"] is False  # one epoch is not the 100-epoch row
    assert len(pd.read_csv(out / "b16_test_scores.csv")) == 4  # every image of the other dataset
    assert not [name for name in os.listdir(tmp) if name.startswith("tmp.")]  # mktemp -d's work folder


def test_gpu_session_refuses_an_out_folder_that_holds_an_earlier_session_s_files(tmp_path):
    """$OUT with files of an earlier session (a --dry run again into the same folder): its logs were appended to
    and the summary counted their rows too (4 speed rows for 2), and a part that failed this time left the earlier
    CSV in place, reported as this session's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "speed.log").write_text("earlier\n")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "--dry"], cwd=tmp_path,
                          env=dict(os.environ, OUT=str(out), PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr == f"error: OUT={out} is not empty: give a new or empty folder\n"
    assert os.listdir(out) == ["speed.log"] and proc.stdout == ""


def test_lovasz_quick(tmp_path):
    summary = run_script("lovasz.py", ["--quick", "--device", "cpu", "--cases", "4x32x32", "--repeats", "2",
                                       "--warmup", "1"], tmp_path)
    for key in ("bench", "torch", "devices", "rows", "all_agree"):
        assert key in summary
    assert summary["all_agree"] is True
    assert_names_its_cpus(summary)
    (row,) = summary["rows"]
    for key in ("loss_max_abs_diff", "grad_max_abs_diff", "batched_ms", "loop_ms", "speedup"):
        assert key in row


def test_quality_tiny_recipe_row(tmp_path):
    """bench/quality.py trains a recipe, evaluates val (with TTA) and test, and appends one widened CSV row."""
    make_synthetic(tmp_path)
    recipe = tmp_path / "tiny.yml"
    recipe.write_text("name: tiny_UNet\ndataset: tiny\narch: UNet\ninput_w: 32\ninput_h: 32\nbatch_size: 4\n"
                      "val_size: 0.2\ntest_size: 0.2\nnum_workers: 0\noptimizer: AdamW\n")
    out = tmp_path / "quality.csv"
    pd.DataFrame([{"run": "older", "val_iou": 0.5}]).to_csv(out, index=False)
    (row,) = run_script("quality.py", [str(recipe), "--epochs", "1", "--suffix", "_t", "--out", str(out)], tmp_path)
    assert row["run"] == "tiny_UNet_t" and row["epochs"] == 1 and row["arch"] == "UNet"
    assert row["command"] == f"python train.py --config {recipe} --name tiny_UNet_t --epochs 1"
    assert torch.cuda.is_available() or row["hardware"].endswith(", " + ONE_CPU)
    for key in ("val_iou", "val_iou_mean", "val_dice_mean", "val_iou_tta", "test_iou", "test_iou_mean", "dsb",
                "dsb_cc"):
        assert 0.0 <= row[key] <= 1.0, key
    table = pd.read_csv(out)
    assert list(table["run"]) == ["older", "tiny_UNet_t"] and "dsb" in table.columns
    assert (tmp_path / "models" / "tiny_UNet_t" / "model.pth").is_file()
    (again,) = run_script("quality.py", [str(recipe), "--epochs", "1", "--suffix", "_t", "--out", str(out),
                                         "--evaluate_only", "--no_tta"], tmp_path)
    assert again["val_iou"] == row["val_iou"] and again["test_iou"] == row["test_iou"]
    log_seconds = pd.read_csv(tmp_path / "models" / "tiny_UNet_t" / "log.csv")["seconds"].sum()
    assert again["minutes"] == round(log_seconds / 60, 1)
    assert len(pd.read_csv(out)) == 3


def test_quality_fine_tuning_recipe_starts_from_the_same_suffix_run(tmp_path):
    """A recipe with ``init: <run>`` benchmarked with --suffix S fine-tunes <run>S, the base run of that benchmark."""
    make_synthetic(tmp_path)
    common = "dataset: tiny\narch: UNet\ninput_w: 32\ninput_h: 32\nbatch_size: 4\nnum_workers: 0\noptimizer: AdamW\n"
    (tmp_path / "base.yml").write_text("name: tiny_base\n" + common)
    (tmp_path / "tune.yml").write_text("name: tiny_tune\ninit: tiny_base\nbalance: 1\n" + common)
    rows = run_script("quality.py", [str(tmp_path / "base.yml"), str(tmp_path / "tune.yml"), "--epochs", "1",
                                     "--suffix", "_t", "--no_tta", "--out", str(tmp_path / "q.csv")], tmp_path)
    assert [r["run"] for r in rows] == ["tiny_base_t", "tiny_tune_t"]
    assert rows[1]["command"].endswith("--name tiny_tune_t --epochs 1 --init tiny_base_t")


def test_robustness_rows_and_the_identity_is_the_undegraded_row(tmp_path, monkeypatch, capsys):
    """bench/robustness.py on a tiny run of random weights: after the undegraded row one row per severity, every
    score in [0, 1]; the identity gives the undegraded row exactly, and so do the 16-bit copies of the 8-bit
    images, which percentile normalisation turns into the same network input."""
    ids = make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    write_run("r", "UNet", False, 3, 1, dataset="tiny", normalization="percentile")
    pd.DataFrame({"img_id": ids, "split": ["train"] * 7 + ["val"] * 3}).to_csv("models/r/split.csv", index=False)
    result = robustness.main(["--name", "r", "--degradations", "identity,hot_pixels,sixteen_bit", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = result["rows"]
    assert [(r["degradation"], r["severity"]) for r in rows] == [
        ("none", "-"), ("identity", "-"), ("hot_pixels", "0.01 %"), ("hot_pixels", "0.1 %"),
        ("sixteen_bit", "values kept"), ("sixteen_bit", "x 257")]
    assert result["images"] == 3 and sum(k["images"] for k in rows[0]["by_kind"].values()) == 3
    assert all(0 <= r[k] <= 1 for r in rows for k in ("iou", "iou_mean", "dsb"))
    scores = ("iou", "iou_mean", "dsb", "by_kind", "input_change")
    for same in (rows[1], rows[4], rows[5]):
        assert {k: same[k] for k in scores} == {k: rows[0][k] for k in scores}
    assert rows[2]["input_change"] > 0  # a hot pixel is a change
    with pytest.raises(UsageError, match="--degradations blur"):
        robustness.main(["--name", "r", "--degradations", "blur"])


def test_kernel_time_rows(tmp_path):
    # one --amp: each row is a process of its own, and the precisions are chosen as in every other script
    summary = run_script("kernel_time.py", ["--size", "32", "--batch", "2", "--steps", "1", "--amps", "fp32"],
                         tmp_path)
    assert summary["bench"] == "kernel_time" and len(summary["rows"]) == 2
    assert_names_its_cpus(summary)
    assert [r["allocator"] for r in summary["rows"]] == ["default", "keep_freed_memory"]
    for row in summary["rows"]:
        assert row["images_per_s"] > 0 and row["minor_faults"] >= 0 and row["sys_s"] >= 0


def test_fold_bn_times_both_networks_and_they_agree(tmp_path):
    summary = run_script("fold_bn.py", ["--arch", "NestedUNet", "--deep_supervision", "--height", "36", "--width",
                                        "44", "--amp", "fp32", "--device", "cpu", "--pairs", "2"], tmp_path)
    assert summary["bench"] == "fold_bn" and summary["precision"].startswith("fp32") and summary["pairs"] == 2
    assert set(summary["seconds_per_image"]) == {"unfolded", "folded"} and summary["speedup"] > 0
    assert summary["max_logit_difference"] < 1e-4  # in fp32 folding changes only the rounding
    assert_names_its_cpus(summary)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not fused_update("AdamW", "cpu"), reason="the fused update on the CPU came with torch 2.4")
def test_fused_optimizer_times_both_updates(tmp_path):
    summary = run_script("fused_optimizer.py", ["--arch", "UNet", "--batch_size", "2", "--size", "32", "--amp", "fp32",
                                                "--device", "cpu", "--pairs", "2", "--steps", "1"], tmp_path)
    assert summary["bench"] == "fused_optimizer" and summary["optimizer"] == "AdamW" and summary["pairs"] == 2
    assert set(summary["images_per_s"]) == {"default", "fused"} and summary["speedup"] > 0
    assert_names_its_cpus(summary)
    assert os.listdir(tmp_path) == []


def test_memory_format_times_both_layouts(tmp_path):
    summary = run_script("memory_format.py", ["--arch", "UNet", "--batch_size", "2", "--size", "32", "--amp", "fp32",
                                              "--device", "cpu", "--pairs", "2", "--steps", "1"], tmp_path)
    assert summary["bench"] == "memory_format" and summary["precision"] == "fp32" and summary["pairs"] == 2
    assert set(summary["images_per_s"]) == {"channels_last", "nchw"} and summary["channels_last_speedup"] > 0
    assert_names_its_cpus(summary)
    assert os.listdir(tmp_path) == []


def test_profile_step_shares_the_step_among_its_operators(tmp_path):
    summary = run_script("profile_step.py", ["--arch", "UNet", "--batch_size", "2", "--size", "32", "--amp", "fp32",
                                             "--device", "cpu", "--steps", "1", "--warmup", "1", "--rows", "400",
                                             "--by_shape"], tmp_path)
    assert summary["bench"] == "profile_step" and summary["precision"].startswith("fp32") and summary["arch"] == "UNet"
    ops = {op["op"] for op in summary["ops"]}
    assert {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::native_batch_norm"} <= ops, ops
    assert 0.99 < sum(op["share"] for op in summary["ops"]) < 1.01  # every operator listed: the whole step
    first_conv = [op for op in summary["ops"] if op["op"] == "aten::mkldnn_convolution" and "[2, 3, 32, 32]" in
                  op["shapes"]]
    assert len(first_conv) == 1 and first_conv[0]["calls_per_step"] == 1  # the input layer, by its shape
    assert_names_its_cpus(summary)
    assert os.listdir(tmp_path) == []


def test_group_split_holds_out_whole_groups():
    groups = ["a"] * 50 + ["b"] * 12 + ["c"] * 9 + ["d"] * 8 + ["e"] * 6 + ["f"] * 15
    ids = [f"id{i:03d}" for i in range(len(groups))]
    split, _ = group_split.group_split(ids, groups, 0.2)
    assert split["img_id"].tolist() == ids
    by_group = pd.crosstab(pd.Series(groups), split["split"].to_numpy())
    assert ((by_group["train"] == 0) | (by_group["val"] == 0)).all()  # no group on both sides
    assert by_group.loc["a", "val"] == 0  # the largest group always trains
    assert abs((split["split"] == "val").mean() - 0.2) <= 0.03
    with pytest.raises(UsageError, match="--val_size"):
        group_split.group_split(ids[:51], groups[:51], 0.2)  # 'a' + one 'b': no draw near 20 %


def test_split_overlap_finds_overlapping_tiles_and_fields_at_another_contrast_or_size():
    """A validation tile cut from the slide of a training tile, 40x44 pixels of them in common, and a training field
    at another contrast or size share content; another slide does not, nor does an image whose only windows in
    common with a training image are its empty background."""
    rng = np.random.default_rng(0)
    slide = rng.integers(0, 150, (80, 100, 3), dtype=np.uint8)
    sparse, other_sparse = np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64, 3), np.uint8)
    sparse[:8, :8], other_sparse[40:, 56:] = rng.integers(1, 256, (2, 8, 8, 3), dtype=np.uint8)
    other = rng.integers(0, 150, (48, 64, 3), dtype=np.uint8)
    images = {"tile": slide[:48, :64], "sparse": sparse, "overlapping": slide[8:56, 20:84],
              "stretched": (slide[:48, :64] * 1.5).astype(np.uint8), "other": other, "background": other_sparse,
              "smooth": cv2.GaussianBlur(rng.integers(0, 256, (96, 128), dtype=np.uint8), (0, 0), 4)[..., None]}
    # a field shrunk to half its size: smooth, as a microscope field is at the scale of a 32x32 thumbnail (noise is not)
    images["shrunk"] = cv2.resize(images["smooth"], (64, 48), interpolation=cv2.INTER_AREA)[..., None]
    found = split_overlap.shared_content(images, ["overlapping", "stretched", "other", "background", "shrunk"],
                                         ["tile", "sparse", "smooth"])
    assert found == {"overlapping": "40x44 pixels identical with tile (at offset 8, 20 in it)",
                     "stretched": "the field of tile at another contrast or size",
                     "shrunk": "the field of smooth at another contrast or size"}


def test_compare_scores_help_answers_before_torch_is_imported(tmp_path):
    """The README's comparison of two runs answered --help after 4-9 s on 2 CPU cores: it imported evaluation.py, and
    with it torch, before parsing its arguments. Python's -X importtime lists every module imported, in stderr."""
    out = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "bench", "compare_scores.py"),
                          "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: compare_scores.py" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "pandas" in imported and not imported & {"torch", "evaluation"}, "heavy imports for --help"


def test_compare_scores_pairs_by_image_id_in_any_order():
    rng = np.random.default_rng(2)
    a = pd.DataFrame({"img_id": [f"i{k}" for k in range(30)], "iou": rng.uniform(0.5, 0.9, 30),
                      "dsb": rng.uniform(0.2, 0.6, 30), "kind": ["fluorescence"] * 20 + ["stained"] * 10})
    b = a.sample(frac=1, random_state=0).assign(iou=lambda t: t["iou"] + 0.05, dsb=lambda t: t["dsb"] - 0.01)
    table = compare_scores.compare(a.set_index("img_id"), b.set_index("img_id"), groups="kind")
    row = table.set_index(["images", "score"])
    assert row.loc[("all", "iou"), "b_minus_a"] == pytest.approx(0.05)
    assert row.loc[("all", "iou"), ["ci_low", "ci_high"]].tolist() == pytest.approx([0.05, 0.05])
    assert row.loc[("all", "iou"), "b_better"] == 30 and row.loc[("all", "dsb"), "b_worse"] == 30
    assert row.loc[("stained", "dsb"), "n"] == 10 and row.loc[("stained", "dsb"), "ci_high"] < 0


def test_compare_scores_compares_each_class_and_score_py_s_f1():
    """A run of several classes is compared class by class (val.py's iou_class<c>, dice_class<c>), two tools by
    score.py's F1 too; counts and names are not scores."""
    ids = [f"i{k}" for k in range(12)]
    a = pd.DataFrame({"img_id": ids, "iou": 0.5, "dice": 0.6, "iou_class0": 0.7, "dice_class0": 0.8,
                      "iou_class1": 0.3, "dice_class1": 0.4, "f1": 0.5, "tp": 3, "prediction": "x.png"})
    b = a.assign(iou_class1=0.4, f1=0.45)
    table = compare_scores.compare(a.set_index("img_id"), b.set_index("img_id")).set_index("score")
    assert list(table.index) == ["iou", "dice", "iou_class0", "dice_class0", "iou_class1", "dice_class1", "f1"]
    assert table.loc["iou_class1", "b_minus_a"] == pytest.approx(0.1) and table.loc["f1", "b_worse"] == 12


def test_compare_scores_interval_does_not_depend_on_the_row_order():
    """The bootstrap resamples the images in one order (their sorted ids), so shuffling A's rows, as val.py's
    order by score does, gives the same interval; a single image gets none."""
    rng = np.random.default_rng(3)
    ids = [f"i{k:03d}" for k in range(134)]
    a = pd.DataFrame({"iou": rng.uniform(0.5, 0.9, 134)}, index=pd.Index(ids, name="img_id"))
    b = a.assign(iou=a["iou"] + rng.normal(0.005, 0.03, 134))
    intervals = {tuple(compare_scores.compare(a.sample(frac=1, random_state=s), b)[["ci_low", "ci_high"]].iloc[0])
                 for s in range(5)}
    assert len(intervals) == 1
    single = compare_scores.compare(a.iloc[:1], b.iloc[:1])
    assert single["n"][0] == 1 and np.isnan(single["ci_low"][0]) and np.isnan(single["ci_high"][0])


def test_compare_scores_gives_no_interval_on_fewer_than_ten_images(tmp_path, capsys):
    """The README's fine-tuning comparison on a few images' validation split: B better on each of 3 images had a
    95 % interval above 0 (the bootstrap of 3 differences spans little more than them), "clearly better" by the
    script's own rule; below 10 images, as val.py, it gives none and says why. 10 images get one, which a paired
    difference the same on every image pins to it."""
    for n in (3, 10):
        ids = [f"i{k}" for k in range(n)]
        pd.DataFrame({"img_id": ids, "iou": np.linspace(0.5, 0.8, n)}).to_csv(tmp_path / "a.csv", index=False)
        pd.DataFrame({"img_id": ids, "iou": np.linspace(0.5, 0.8, n) + 0.01}).to_csv(tmp_path / "b.csv", index=False)
        row = compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]).iloc[0]
        out = capsys.readouterr().out
        assert (row["n"], row["b_better"], row["b_minus_a"]) == (n, n, pytest.approx(0.01))
        if n < 10:
            assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"])
            assert "note: no interval where fewer than 10 images were compared (as few as 3 here)" in out
        else:
            assert [row["ci_low"], row["ci_high"]] == pytest.approx([0.01, 0.01]) and "no interval" not in out


def test_compare_scores_names_left_out_images_and_refuses_repeated_ids(tmp_path, capsys):
    pd.DataFrame({"img_id": ["x", "y", "z"], "iou": [0.5, 0.6, 0.7]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"img_id": ["x", "y"], "iou": [0.6, 0.7]}).to_csv(tmp_path / "b.csv", index=False)
    compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert f"note: 1 image only in {tmp_path / 'a.csv'} (e.g. z) is left out" in capsys.readouterr().out
    pd.DataFrame({"img_id": ["x", "x"], "iou": [0.6, 0.7]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UsageError, match="b.csv lists 1 img_id more than once"):
        compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])


def test_compare_scores_takes_the_folds_of_a_cross_validation_as_one_table(tmp_path):
    """Two models cross-validated in two folds each (train.py --folds 2): a quoted pattern per model joins its folds'
    scores.csv files, so that every image is paired with itself; an image in two folds' files is refused, naming
    both, and a pattern that matches nothing names itself."""
    for model, ious in (("a", [0.5, 0.6, 0.7, 0.8]), ("b", [0.6, 0.8, 0.7, 0.9])):
        for fold, ids in enumerate((["p", "q"], ["r", "s"])):
            (tmp_path / f"{model}_fold{fold}").mkdir()
            pd.DataFrame({"img_id": ids, "iou": ious[2 * fold:2 * fold + 2]}).to_csv(
                tmp_path / f"{model}_fold{fold}" / "scores.csv", index=False)
    table = compare_scores.main([str(tmp_path / "a_fold*" / "scores.csv"), str(tmp_path / "b_fold*" / "scores.csv")])
    row = table.set_index("score").loc["iou"]
    assert row["n"] == 4 and row["b_minus_a"] == pytest.approx((0.1 + 0.2 + 0.0 + 0.1) / 4)
    assert (row["b_better"], row["b_worse"]) == (3, 0)
    pd.DataFrame({"img_id": ["p"], "iou": [0.5]}).to_csv(tmp_path / "b_fold1" / "scores.csv", index=False)
    with pytest.raises(UsageError, match=r"lists 1 img_id more than once \(e.g. p, in .*b_fold0/scores.csv and "
                                         r".*b_fold1/scores.csv\)"):
        compare_scores.main([str(tmp_path / "a_fold*" / "scores.csv"), str(tmp_path / "b_fold*" / "scores.csv")])
    with pytest.raises(UsageError, match=r"c_fold\*/scores.csv: no file matches"):
        compare_scores.main([str(tmp_path / "a_fold*" / "scores.csv"), str(tmp_path / "c_fold*" / "scores.csv")])


def test_compare_scores_keeps_images_named_like_missing_values(tmp_path):
    """Images NA.png and null.png (pandas' missing-value words) were read as two NaN ids: a val.py scores.csv of
    them was refused as listing one img_id twice. An empty score is still a missing one."""
    for name, iou in (("a", [0.5, 0.6, 0.7]), ("b", [0.6, 0.7, 0.8])):
        (tmp_path / f"{name}.csv").write_text("img_id,iou,dsb\n" + "".join(
            f"{i},{v},{'' if i == 'x' else v}\n" for i, v in zip(["NA", "null", "x"], iou)))
    table = compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]).set_index("score")
    assert table.loc["iou", "n"] == 3 and table.loc["iou", "b_minus_a"] == pytest.approx(0.1)
    assert table.loc["dsb", "n"] == 2
    assert compare_scores.read_scores(str(tmp_path / "a.csv")).index.tolist() == ["NA", "null", "x"]


def test_compare_scores_refuses_tables_without_common_images(tmp_path):
    pd.DataFrame({"img_id": ["x"], "iou": [0.5]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"img_id": ["y"], "iou": [0.5]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UsageError, match="share no img_id"):
        compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    with pytest.raises(UsageError, match="no such file"):
        compare_scores.main([str(tmp_path / "missing.csv"), str(tmp_path / "b.csv")])


def test_compare_scores_refuses_tables_of_different_classes(tmp_path):
    """A run of several classes scores an image's iou by the mean of its classes: against a run of one class the
    difference was printed as if one score (a two-class B 0.03 'better' than a one-class A)."""
    pd.DataFrame({"img_id": ["x", "y"], "iou": [0.5, 0.6]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"img_id": ["x", "y"], "iou": [0.55, 0.65], "iou_class0": [0.5, 0.6],
                  "iou_class1": [0.6, 0.7]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UsageError, match=r"a.csv scores one class and .*b.csv scores 2 classes"):
        compare_scores.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    table = compare_scores.main([str(tmp_path / "b.csv"), str(tmp_path / "b.csv")]).set_index("score")
    assert table.loc["iou", "n"] == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_the_network_benchmarks_take_every_network(arch):
    step_flags = ArgumentParser()
    timing.add_step_args(step_flags)
    for parse in (fold_bn.parse_args, kernel_time.parse_args, profile_step.parse_args, step_flags.parse_args):
        assert parse(["--arch", arch]).arch == arch


def test_stack_memory_runs_every_checkout_before_reading_any_output_back(tmp_path, monkeypatch, capsys):
    """A child's peak RSS counts this process's memory at the fork: reading a 1000-frame run's stacks back before the
    next run (3 GiB) had that run report 3064 MiB for a predict.py whose own peak is under 1 GiB. Every checkout
    runs first; outputs written alike are identical byte for byte (prediction.yml, each run's own record, aside)."""
    calls = []

    def run_predict(checkout, stack, out_dir, device):
        calls.append("run")
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "prediction.yml"), "w") as f:  # of its own folder and time
            f.write(f"command: predict.py --output {out_dir}\n")
        for suffix in stack_memory.SUFFIXES:
            tifffile.imwrite(os.path.join(out_dir, f"movie{suffix}.tif"), np.zeros((2, 4, 4), np.uint8), imagej=True)
        return 100.0, 1.0

    read_stack = stack_memory.read_stack
    monkeypatch.setattr(stack_memory, "run_predict", run_predict)
    monkeypatch.setattr(stack_memory, "read_stack", lambda path: calls.append("read") or read_stack(path))
    stack_memory.main(["--frames", "2", "--size", "32", "--checkouts", str(tmp_path), str(tmp_path)])
    assert calls[:2] == ["run", "run"] and set(calls[2:]) == {"read"}
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [row["same_as_first"] for row in summary["rows"]] == [True, True]


def test_robustness_degrades_16_bit_and_float_images_as_it_says(tmp_path, monkeypatch):
    """A float image is saturated (clipped at its maximum, as top_of says) and given a ramp as floats, not rounded to
    whole numbers; sixteen_bit and camera_offset, which put 8-bit images into 16 bits, are a UsageError naming an
    image that is not 8-bit (times 257, a 12-bit image's values would clip at 65535; the offset's gain would
    squeeze it into 240 levels)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (16, 16, 1)).astype(np.float32)
    saturated = robustness.saturation(image, 4, rng)
    assert saturated.max() == image.max() and (saturated == image.max()).mean() > 0.5
    ramped = robustness.background_ramp(image, 0.5, rng)
    assert ramped.dtype == np.float32 and np.allclose(ramped[:, 0], image[:, 0]) and len(np.unique(ramped)) > 100
    ids = make_synthetic(tmp_path)
    monkeypatch.chdir(tmp_path)
    for i in ids:
        path = f"inputs/tiny/images/{i}.png"
        cv2.imwrite(path, cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.uint16) * 16)
    write_run("r", "UNet", False, 3, 1, dataset="tiny", normalization="percentile")
    pd.DataFrame({"img_id": ids, "split": ["train"] * 7 + ["val"] * 3}).to_csv("models/r/split.csv", index=False)
    with pytest.raises(UsageError, match=rf"--degradations sixteen_bit: image {ids[7]} is uint16, .* leave them"):
        robustness.main(["--name", "r", "--degradations", "hot_pixels,sixteen_bit", "--device", "cpu"])
    with pytest.raises(UsageError, match=rf"--degradations camera_offset: image {ids[7]} is uint16, .* leave them"):
        robustness.main(["--name", "r", "--degradations", "camera_offset", "--device", "cpu"])


def test_track_bench_counts_a_nucleus_kept_only_when_one_label_covers_it_in_every_frame():
    """bench/track.py's score, on label stacks written out here: of three nuclei away from the edges, one keeps its
    label, one changes it in the last frame, one is missed in a frame; one at the edge is left out."""
    truth = np.zeros((3, 12, 12), np.int32)
    truth[:, 2:4, 2:4], truth[:, 2:4, 7:9], truth[:, 7:9, 2:4], truth[:, 7:9, 10:12] = 1, 2, 3, 4  # 4 at the edge
    tracked = np.zeros_like(truth)
    tracked[:, 2:4, 2:4], tracked[:, 2:4, 7:9], tracked[2, 2:4, 7:9] = 5, 6, 9  # 2 changes label in frame 2
    tracked[:2, 7:9, 2:4] = 7  # 3 missed in frame 2
    tracked[:, 2, 2] = 8  # 1's label covers most of it (3 of its 4 pixels), not all
    assert track.kept_tracks(truth, tracked) == (3, 2, 1)
    assert np.array_equal(track.moved(truth[0], 2, (1, 2))[1], np.roll(truth[0], (1, 2), axis=(0, 1)))


def test_compare_scores_refuses_a_pattern_that_joins_a_test_score_to_the_folds(tmp_path):
    """outputs/a_fold*/scores.csv also matches outputs/a_fold0_test/ (val.py --name a_fold0 --split test): its test
    images are in no fold's val scores, so no image repeats, and they were pooled with the folds' validation as if
    cross-validated. Each file's evaluation.yml (val.py's) names its split: files of two splits are refused."""
    for folder, split, ids in (("a_fold0", "val", ["p"]), ("a_fold1", "val", ["q"]), ("a_fold0_test", "test", ["t"]),
                               ("b", None, ["p", "q", "t"])):
        (tmp_path / folder).mkdir()
        pd.DataFrame({"img_id": ids, "iou": [0.5] * len(ids)}).to_csv(tmp_path / folder / "scores.csv", index=False)
        if split:
            (tmp_path / folder / "evaluation.yml").write_text(f"run: {folder[:7]}\nsplit: {split}\n")
    with pytest.raises(UsageError, match=r"a_fold\*/scores.csv matches scores of run a_fold0 \(val split\) \(.*"
                                         r"a_fold0/scores.csv\) and of run a_fold0 \(test split\) \(.*"
                                         r"a_fold0_test/scores.csv\); give a pattern of one split's files"):
        compare_scores.main([str(tmp_path / "a_fold*" / "scores.csv"), str(tmp_path / "b" / "scores.csv")])
    table = compare_scores.main([str(tmp_path / "a_fold?" / "scores.csv"), str(tmp_path / "b" / "scores.csv")])
    assert table.set_index("score").loc["iou", "n"] == 2  # p and q, the folds' validation images alone


def test_compare_scores_names_the_settings_two_evaluations_differ_in(tmp_path, capsys):
    """An evaluation with --tta against one without: B - A measures TTA as well as the models, and nothing said so.
    A note names each scoring setting the two evaluation.yml files differ in; none when they agree or either
    records none (score.py's scores.csv)."""
    settings = {"a": {"tta": False, "prune": None, "min_size": 8}, "b": {"tta": True, "prune": None, "min_size": 8},
                "c": {"tta": False, "prune": None, "min_size": 8}, "d": None}
    for folder, held in settings.items():
        (tmp_path / folder).mkdir()
        pd.DataFrame({"img_id": ["p", "q"], "iou": [0.5, 0.6]}).to_csv(tmp_path / folder / "scores.csv", index=False)
        if held:
            (tmp_path / folder / "evaluation.yml").write_text(yaml.safe_dump({"run": "r", "settings": held}))
    for b, noted in (("b", True), ("c", False), ("d", False)):
        compare_scores.main([str(tmp_path / "a" / "scores.csv"), str(tmp_path / b / "scores.csv")])
        out = capsys.readouterr().out
        assert ("note: A and B were scored with other settings (tta False / True, A / B)" in out) == noted


def test_compare_scores_names_the_settings_the_folds_of_one_pattern_differ_in(tmp_path, capsys):
    """Fold 0 of A evaluated with --tta, fold 1 without: A's pooled scores mix both, and only the first file's
    evaluation.yml was read, so that A against B (no TTA) read as a TTA comparison and the mix went unsaid."""
    for folder, tta, ids in (("a_fold0", True, ["p", "q"]), ("a_fold1", False, ["r", "s"]),
                             ("b_fold0", False, ["p", "q"]), ("b_fold1", False, ["r", "s"])):
        (tmp_path / folder).mkdir()
        pd.DataFrame({"img_id": ids, "iou": [0.5, 0.6]}).to_csv(tmp_path / folder / "scores.csv", index=False)
        (tmp_path / folder / "evaluation.yml").write_text(yaml.safe_dump(
            {"run": folder, "split": "val", "settings": {"tta": tta, "min_size": 8}}))
    a, b = str(tmp_path / "a_fold?" / "scores.csv"), str(tmp_path / "b_fold?" / "scores.csv")
    compare_scores.main([a, b])
    out = capsys.readouterr().out
    assert f"note: the files of {a} were scored with other settings (tta False / True): their scores mix them" in out
    assert "A and B were scored with other settings" not in out and f"the files of {b}" not in out
    compare_scores.main([b, a])  # the mix is said of whichever side holds it
    assert f"note: the files of {a} were scored" in capsys.readouterr().out


def test_compare_scores_says_that_the_separation_changes_the_nuclei_scores_alone(tmp_path, capsys):
    """The separation and the object filters make the nuclei (dsb, f1, pq); iou and dice are the network's pixels
    (evaluation.ImageWriter scores them before any separation): evaluations that differ in them alone get a note
    naming the nuclei scores, not one saying that B - A of every score measures them."""
    for folder, separation in (("a", "watershed"), ("b", "borders")):
        (tmp_path / folder).mkdir()
        pd.DataFrame({"img_id": ["p", "q"], "iou": [0.5, 0.6], "dsb": [0.3, 0.4]}).to_csv(
            tmp_path / folder / "scores.csv", index=False)
        (tmp_path / folder / "evaluation.yml").write_text(yaml.safe_dump(
            {"run": "r", "settings": {"tta": False, "separation": separation, "min_size": 8}}))
    compare_scores.main([str(tmp_path / "a" / "scores.csv"), str(tmp_path / "b" / "scores.csv")])
    out = capsys.readouterr().out
    assert "(separation watershed / borders, A / B): B - A of dsb, f1 and pq measures them as well as the models " \
           "(iou and dice do not depend on them)" in out
