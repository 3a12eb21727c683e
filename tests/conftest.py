"""Shared fixtures for the dataset / config / train+val tests.

The scripts read and write the relative folders ``inputs/``, ``models/`` and ``outputs/``; every test that runs
them first changes into a temporary directory so that nothing is written into the repository (a session that
leaves something there ends with an error naming it).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
import yaml

import dataset
import inference
import layouts
import synthetic
import train
from archs import build_model
from config import SKIPPED_IN_CONFIG, build_train_parser
from utils import usable_cpus

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # set before a test module imports albumentations
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):  # the scripts' modules; bench/ for the reference implementations
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# The test machine's few cores are shared: one intra-op thread is faster for these tiny tensors than
# threads fighting over busy cores.
torch.set_num_threads(1)

# A shell starts a background job (`pytest &` in a script) with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: the tests that press Ctrl-C with os.kill(SIGINT) need Python's own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# what a test that writes into the current folder instead of its tmp_path leaves: the checkout's top, the folders the
# scripts write and bench/quality.py's default output folder (Python's and pytest's own caches aside)
CHECKED_FOLDERS = ("", "models", "outputs", "inputs", os.path.join("bench", "results"))
CACHES = ("__pycache__", ".pytest_cache")
CHECKOUT_BEFORE = pytest.StashKey[set]()
HYPOTHESIS_DIR = pytest.StashKey[str]()

# pytest-xdist's processes at most: each holds its own torch and the tests' models and data in memory
MOST_TEST_PROCESSES = 4
# The start of a "zygote" (tests/test_errors.py, tests/test_bench.py): an interpreter that imports the expensive
# modules once, runs no torch op, then forks a child per script run. fork_case's child runs the script file as
# __main__ with its own sys.argv, folder (and sys.path when the case gives one), stdout and stderr (a file each),
# exactly as ``python <script>`` would after its imports, and its exit status is the script's.
ZYGOTE_FORK = r"""
import json, os, runpy, sys, traceback
def fork_case(case):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd); os.close(f)
        os.chdir(case["cwd"])
        sys.argv = [case["script"], *case["args"]]
        if "path" in case:
            sys.path[:] = case["path"]
        runpy.run_path(case["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter does
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
"""

TINY_NAME = "tiny"
TINY_NUM = 10
TINY_SIZE = 32


def write_image(path, array):
    """Write ``array`` with cv2.imwrite (format from the extension), creating folders; returns the path as str.

    Arrays are in OpenCV's channel order (BGR / BGRA) like everything cv2 writes.
    """
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, np.asarray(array)), f"cv2 could not write {path}"
    return path


def make_layout(dataset_dir, ids, size=16, num_classes=1, img_ext=".png", mask_ext=".png", mask_value=255,
                channels=3):
    """A hand-made dataset folder: images/<id> (random 8-bit) and masks/<c>/<id> (a square of ``mask_value``)."""
    rng = np.random.default_rng(0)
    for sid in ids:
        shape = (size, size) if channels == 1 else (size, size, channels)
        write_image(os.path.join(dataset_dir, "images", sid + img_ext), rng.integers(0, 256, shape, dtype=np.uint8))
        for c in range(num_classes):
            mask = np.zeros((size, size), np.uint8)
            mask[2 + c: size // 2 + c, 3: size // 2 + 3] = mask_value
            write_image(os.path.join(dataset_dir, "masks", str(c), sid + mask_ext), mask)
    return str(dataset_dir)


def write_cgroups(root, own, files):
    """A fake /proc/self/cgroup under ``root`` naming ``own`` ('0::/path' for cgroup v2, '4:memory:/path' for v1)
    after another controller's line, and the ``files`` under its sys/fs/cgroup: {path below it: text}."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(f"7:blkio:/\n{own}\n")
    for name, text in files.items():
        path = root / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{text}\n")


def make_synthetic(root, name=TINY_NAME, num_images=TINY_NUM, size=TINY_SIZE, seed=0):
    """synthetic.generate_synthetic into <root>/inputs/<name>; returns the sorted ids."""
    return synthetic.generate_synthetic(os.path.join(str(root), "inputs", name), num_images=num_images, size=size,
                                        seed=seed)


class Pointwise(torch.nn.Module):
    """A 'network' whose logit at a pixel depends only on that pixel: tiling must not change it at all, so any
    misplaced window or wrong normalisation of the blend shows."""

    def forward(self, x):
        return 3 * x[:, :1] - x[:, 1:2] + 0.5 * x[:, 2:3]


def write_run(name, arch, deep_supervision, input_channels, num_classes, **values):
    """models/<name>: random weights with non-trivial BatchNorm statistics, written as train.py writes them
    (config.yml with the default flags and ``values``, model.pth)."""
    defaults = {k: v for k, v in vars(build_train_parser().parse_args([])).items() if k not in SKIPPED_IN_CONFIG}
    model = build_model(arch, num_classes, input_channels, deep_supervision)
    for m in model.modules():  # eval-mode BatchNorm that is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    os.makedirs(os.path.join("models", name))
    with open(os.path.join("models", name, "config.yml"), "w") as f:
        yaml.safe_dump({**defaults, "name": name, "arch": arch, "deep_supervision": deep_supervision,
                        "input_channels": input_channels, "num_classes": num_classes, **values}, f)
    torch.save(model.state_dict(), os.path.join("models", name, "model.pth"))


def checkout_entries():
    """The paths (relative to the checkout) of the entries of CHECKED_FOLDERS, less CACHES."""
    return {os.path.join(folder, name) for folder in CHECKED_FOLDERS if (ROOT / folder).is_dir()
            for name in os.listdir(ROOT / folder) if name not in CACHES}


def pytest_configure(config):
    """Notes the checkout's entries before the test modules are imported; gives Hypothesis a folder of this run for
    its example database and caches (by default .hypothesis/ in the folder pytest was started in, the checkout,
    written as test_safety.py is imported), removed at the end."""
    config.stash[CHECKOUT_BEFORE] = checkout_entries()
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:  # one the user chose stays
        config.stash[HYPOTHESIS_DIR] = os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(
            prefix="hypothesis-")


def pytest_xdist_auto_num_workers(config):
    """How many processes pytest.ini's ``-n auto`` starts: one per CPU this run may use (a job's or a container's
    share, :func:`utils.usable_cpus`, where pytest-xdist would count the whole machine's), at most
    MOST_TEST_PROCESSES; none besides pytest's own on one CPU."""
    cpus = min(usable_cpus(), MOST_TEST_PROCESSES)
    return cpus if cpus > 1 else 0


def pytest_unconfigure(config):
    if HYPOTHESIS_DIR in config.stash:
        del os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]
        shutil.rmtree(config.stash[HYPOTHESIS_DIR], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _checkout_unchanged(pytestconfig):
    """An error at the last test's teardown when the tests left files in the checkout instead of their tmp_path."""
    yield
    left = sorted(checkout_entries() - pytestconfig.stash[CHECKOUT_BEFORE])
    assert not left, f"the tests left {left} in {ROOT}: write them under tmp_path"


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory):
    """One tiny synthetic dataset (10 images, 32x32) generated once per session and copied into each workdir."""
    root = tmp_path_factory.mktemp("tiny_template")
    ids = make_synthetic(root)
    return root / "inputs" / TINY_NAME, ids


@pytest.fixture
def tiny_workdir(tmp_path, monkeypatch, _tiny_template):
    """tmp_path holding inputs/tiny (10 synthetic 32x32 images), made the current directory."""
    src, _ = _tiny_template
    shutil.copytree(src, tmp_path / "inputs" / TINY_NAME)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_ids(_tiny_template):
    return list(_tiny_template[1])


def assert_same_targets(folder, labelled, ids):
    """The dataset ``folder`` (ROI sets, GeoJSON objects...) gives the training targets (masks, and --borders' border
    maps) and nucleus diameter of the same images given as label images in ``labelled``."""
    for borders in (False, True):
        ours, theirs = (dataset.Dataset(ids, f, borders=borders, border_size=(32, 32)) for f in (folder, labelled))
        for i in range(len(ids)):
            assert np.array_equal(ours.load(i)[1], theirs.load(i)[1]) and ours.load(i)[1][..., 0].any()
    assert layouts.nucleus_diameter(folder, ids) == layouts.nucleus_diameter(labelled, ids)


def train_argv(name, *extra, dataset=TINY_NAME, arch="UNet", epochs=2, batch=4):
    """A small CPU train.py command line (32x32 unless --crop_size is in ``extra``, no workers, Adam so that
    predictions are not all one class)."""
    size = [] if "--crop_size" in extra else ["--input_w", "32", "--input_h", "32"]
    return ["--name", name, "--dataset", dataset, "--arch", arch, *size,
            "--epochs", str(epochs), "-b", str(batch), "--num_workers", "0", "--device", "cpu",
            "--optimizer", "Adam", "--lr", "0.01", *extra]


@contextmanager
def held_by_another_process(lock_file):
    """Another process holding ``lock_file`` (files.locked), as a script does while it writes; yields its pid and
    kills it at the end (the lock goes with it, the file stays, as after a killed script)."""
    code = ("import files, sys, time\nwith files.locked(sys.argv[1]) as holder:\n"
            "    print(holder or 'held', flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """predict.py's runs, made once per test process in a folder of their own: p, a NestedUNet + deep supervision
    trained for 1 epoch on inputs/synthetic (8 images, 32x32, resized training); beside it without training, copies
    of it with ``crop_size: 32`` in config.yml (pc: full-resolution prediction; pa: also a nucleus diameter) and
    with another --normalization (pp, pd), a UNet with random weights (u) and a run without model.pth (nomodel).
    Returns the folder's path (tests chdir into it: ``in_runs``)."""
    root = tmp_path_factory.mktemp("predict_runs")
    old = os.getcwd()
    os.chdir(root)
    try:
        synthetic.generate_synthetic(os.path.join("inputs", "synthetic"), num_images=8, size=32)
        train.main(["--dataset", "synthetic", "--arch", "NestedUNet", "--deep_supervision", "True", "--epochs", "1",
                    "--input_w", "32", "--input_h", "32", "-b", "2", "--num_workers", "0", "--name", "p",
                    "--device", "cpu"])
        with open(os.path.join("models", "p", "config.yml")) as f:
            config = yaml.safe_load(f)

        def make_run(name, weights=None, **changes):
            os.makedirs(os.path.join("models", name))
            with open(os.path.join("models", name, "config.yml"), "w") as f:
                yaml.safe_dump({**config, "name": name, **changes}, f, sort_keys=False)
            shutil.copy(os.path.join("models", "p", "split.csv"), os.path.join("models", name, "split.csv"))
            if weights is not None:
                torch.save(weights, os.path.join("models", name, "model.pth"))

        p_weights = torch.load(os.path.join("models", "p", "model.pth"), weights_only=True)
        make_run("pc", p_weights, crop_size=32)
        make_run("pa", p_weights, crop_size=32, nucleus_diameter=3.0)  # the nuclei it finds: mostly rescaled
        make_run("pp", p_weights, normalization="percentile")
        make_run("pd", p_weights, normalization="percentile_dark")
        torch.manual_seed(0)
        make_run("u", build_model("UNet", 1, 3, False).state_dict(), arch="UNet", deep_supervision=False)
        make_run("nomodel")
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs)
    return runs


def sample_bgr(height, width):
    """A synthetic nuclei image (BGR uint8) resized to height x width."""
    src = cv2.imread(os.path.join("inputs", "synthetic", "images", "syn_0000.png"))
    return cv2.resize(src, (width, height), interpolation=cv2.INTER_LINEAR)


def read_image(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} missing or unreadable"
    return image


def stack_flags(model="pc"):
    """predict.py's flags for every output of a stack (--min_confidence 0: the barely trained network's objects)."""
    return ["--name", model, "--instances", "--rois", "--overlay", "--save_prob", "--min_confidence", "0", "--device",
            "cpu", "--amp", "fp32"]


def movie(folder, planes=6):
    """A 16-bit ImageJ time-lapse ``folder``/movie.tif of ``planes`` 40x36 planes, calibrated; returns its path."""
    grey = sample_bgr(40, 36)[:, :, 0].astype(np.uint16)
    stack = np.stack([np.roll(grey, 3 * t, axis=1) * (100 + 30 * t) for t in range(planes)])
    os.makedirs(folder, exist_ok=True)
    tifffile.imwrite(folder / "movie.tif", stack, imagej=True, metadata={"axes": "TYX", "unit": "um"},
                     resolution=(1 / 0.5, 1 / 0.5))
    return str(folder / "movie.tif")


def interrupted(at, error):
    """A stand-in for inference.Predictor.predict that raises ``error`` at its ``at``-th call."""
    real, calls = inference.Predictor.predict, []

    def predict_plane(self, image, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error
        return real(self, image, *args, **kwargs)
    return predict_plane


STACK_OUTPUTS = ["movie.tif", "movie_instances.tif", "movie_overlay.tif", "movie_prob.tif", "movie_rois.zip"]


def read_record(out):
    """The prediction.yml in folder ``out``, as yaml.safe_load reads it."""
    with open(os.path.join(out, "prediction.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f)
