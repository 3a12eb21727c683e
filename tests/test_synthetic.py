"""Tests for synthetic.py: determinism, layout, value sets, label/mask consistency, styles, touching nuclei."""
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic  # noqa: E402
from conftest import held_by_another_process  # noqa: E402
from dataset import image_modality  # noqa: E402
from utils import UsageError  # noqa: E402

N = 12
SIZE = 64


def _files(folder):
    """{relative path: bytes} for every file below ``folder``."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "synthetic"
    ids = synthetic.generate_synthetic(str(out), num_images=N, size=SIZE, seed=0)
    return out, ids


def test_layout_and_ids(dataset):
    out, ids = dataset
    assert ids == [f"syn_{i:04d}" for i in range(N)]
    for sub in ("images", "masks/0", "labels"):
        assert sorted(os.listdir(out / sub)) == [i + ".png" for i in ids], sub
    for sid in ids:
        img = cv2.imread(str(out / "images" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "masks" / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        lab = cv2.imread(str(out / "labels" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert lab.shape == (SIZE, SIZE) and lab.dtype == np.uint16


def test_values_and_labels_consistent(dataset):
    out, ids = dataset
    for sid in ids:
        mask = cv2.imread(str(out / "masks" / "0" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        lab = cv2.imread(str(out / "labels" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask).tolist()) == {0, 255}, sid
        assert np.array_equal(lab > 0, mask > 0), sid
        # labels are numbered 1..N without gaps
        present = np.unique(lab[lab > 0])
        assert present.tolist() == list(range(1, int(lab.max()) + 1)), sid
        assert lab.max() >= 2, sid


def test_both_styles_present(dataset):
    out, ids = dataset
    styles = []
    for sid in ids:
        img = cv2.imread(str(out / "images" / f"{sid}.png")).astype(int)
        mask = cv2.imread(str(out / "masks" / "0" / f"{sid}.png"), cv2.IMREAD_GRAYSCALE) > 0
        grey = bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())
        inside, outside = img[mask].mean(), img[~mask].mean()
        if grey:
            assert inside > outside + 40, f"{sid}: fluorescence nuclei should be bright on a dark background"
            styles.append("fluorescence")
        else:
            b, g, r = (img[~mask][:, c].mean() for c in range(3))
            assert r > g and b > g and outside > 150, f"{sid}: background should be light pink"
            nb, ng, nr = (img[mask][:, c].mean() for c in range(3))
            assert nb > ng and inside < outside - 40, f"{sid}: nuclei should be dark purple/blue"
            styles.append("stained")
        assert image_modality(img.astype(np.uint8)) == styles[-1] == synthetic.style_of(int(sid.split("_")[1])), sid
    assert styles.count("fluorescence") == N // 2
    assert styles.count("stained") == N // 2


def _touching(lab):
    """True if two different nuclei are 4-adjacent (touching or overlapping)."""
    h = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    v = (lab[1:] != lab[:-1]) & (lab[1:] > 0) & (lab[:-1] > 0)
    return bool(h.any() or v.any())


def test_some_nuclei_touch(dataset):
    out, ids = dataset
    touching = [sid for sid in ids if _touching(cv2.imread(str(out / "labels" / f"{sid}.png"), cv2.IMREAD_UNCHANGED))]
    assert touching, "no image has two touching or overlapping nuclei"


def test_deterministic_same_seed(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synthetic.generate_synthetic(str(again), num_images=N, size=SIZE, seed=0)
    assert _files(out) == _files(again)


def test_each_image_reproducible_on_its_own(dataset):
    out, _ = dataset
    img, mask, lab = synthetic.render(7, size=SIZE, seed=0)
    assert np.array_equal(img, cv2.imread(str(out / "images" / "syn_0007.png")))
    assert np.array_equal(lab, cv2.imread(str(out / "labels" / "syn_0007.png"), cv2.IMREAD_UNCHANGED))


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    other = tmp_path / "other"
    synthetic.generate_synthetic(str(other), num_images=N, size=SIZE, seed=1)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("images")), "a different seed should change every image"


def test_ensure_synthetic_generates_then_is_idempotent(tmp_path):
    target = tmp_path / "inputs" / "synthetic"
    assert synthetic.ensure_synthetic(str(target), num_images=4, size=32, progress=False) == str(target)
    assert len(os.listdir(target / "images")) == 4
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask  # as os.makedirs would make it, not private
    before = _files(target)
    mtimes = {p: os.stat(target / p).st_mtime_ns for p in before}
    assert synthetic.ensure_synthetic(str(target), num_images=10, size=48, progress=False) == str(target)
    assert _files(target) == before, "an existing dataset must be left alone"
    assert {p: os.stat(target / p).st_mtime_ns for p in before} == mtimes
    # no temporary folder is left beside it
    assert os.listdir(tmp_path / "inputs") == ["synthetic"]


def test_ensure_synthetic_interrupted_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "inputs" / "synthetic"
    calls = []

    def boom(index, size=96, seed=0):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(index, size, seed)

    real = synthetic.render
    monkeypatch.setattr(synthetic, "render", boom)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(str(target), num_images=6, size=32, progress=False)
    assert not target.exists()
    assert os.listdir(tmp_path / "inputs") == []


def test_ensure_synthetic_refuses_foreign_folder(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError):
        synthetic.ensure_synthetic(str(target), num_images=2, size=32, progress=False)
    assert (target / "notes.txt").read_text() == "keep me"


def test_one_process_at_a_time_writes_an_out_folder(tmp_path):
    """Two synthetic.py into one --out both went on, and the one that ended last replaced the other's dataset: while
    one writes it (.<out>.lock beside it) a second is refused before it generates anything."""
    out = tmp_path / "out"
    with held_by_another_process(tmp_path / ".out.lock") as pid:
        with pytest.raises(UsageError, match=rf"^{re.escape(str(out))} is being written by another process \(pid "
                                             rf"{pid}\); wait for it to end, or choose another --out$"):
            synthetic.main(["--out", str(out), "--num_images", "2", "--size", "32"])
    assert os.listdir(tmp_path) == [".out.lock"]


def test_cli(tmp_path):
    out = tmp_path / "cli_out"
    r = subprocess.run(
        [sys.executable, str(ROOT / "synthetic.py"), "--out", str(out), "--num_images", "4", "--size", "32"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 4 synthetic images" in r.stdout
    assert len(os.listdir(out / "images")) == 4
    # the CLI matches the library call byte for byte
    lib = tmp_path / "lib"
    synthetic.generate_synthetic(str(lib), num_images=4, size=32, seed=0)
    assert _files(out) == _files(lib)
    r = subprocess.run(
        [sys.executable, str(ROOT / "synthetic.py"), "--out", str(out), "--num_images", "0"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
    )
    assert r.returncode == 2 and "--num_images" in r.stderr and "Traceback" not in r.stderr
