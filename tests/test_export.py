"""Tests for export.py: the ONNX model computes what PyTorch computes (needs onnx and onnxruntime)."""
import os

import cv2
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="export.py needs the onnx package (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="checking the exported model needs onnxruntime "
                                                "(pip install onnxruntime)")

import export  # noqa: E402
import image_files  # noqa: E402
from archs import ARCHS  # noqa: E402
from checkpoints import load_run  # noqa: E402
from config import DEEP_SUPERVISION_ARCHS  # noqa: E402
from conftest import held_by_another_process, write_run  # noqa: E402
from inference import Predictor  # noqa: E402
from utils import UsageError  # noqa: E402


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """models/ds (NestedUNet + deep supervision) and models/u (UNet, 1 input channel, 2 classes)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    write_run("ds", "NestedUNet", True, 3, 1)
    write_run("u", "UNet", False, 1, 2)
    return tmp_path


def onnx_vs_torch(path, name, x, prune=None):
    _, model = load_run(name, torch.device("cpu"))
    with torch.no_grad():
        out = model(x) if prune is None else model(x, prune=prune)
    want = (out[-1] if isinstance(out, list) else out).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert got.shape == want.shape
    return np.abs(got - want).max()


def test_every_normalization_has_its_scaling_in_the_printed_contract():
    assert set(export.SCALING) == set(image_files.NORMALIZATIONS)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_pytorch_with_dynamic_shapes(run_dir, capsys, arch):
    """Every network of archs.ARCHS (with deep supervision where it has it), traced at one size, runs at others."""
    write_run(arch, arch, arch in DEEP_SUPERVISION_ARCHS, 3, 1)
    result = export.main(["--name", arch, "--height", "32", "--width", "32"])
    path = run_dir / "models" / arch / "model.onnx"
    assert result["path"] == os.path.join("models", arch, "model.onnx") and path.is_file()
    assert result["max_abs_diff"] < 1e-4
    out = capsys.readouterr().out
    assert "ONNX Runtime vs PyTorch" in out
    # the seconds of tracing are announced before they start, not silent
    assert out.index(f"exporting {arch} ({arch}) to ") < out.index("wrote ")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    torch.manual_seed(1)
    for shape in ((1, 3, 32, 32), (2, 3, 48, 64)):  # another batch size and another image size than traced
        assert onnx_vs_torch(path, arch, torch.randn(*shape)) < 1e-4


def test_export_pruned_and_unet(run_dir):
    export.main(["--name", "ds", "--prune", "2", "--output", "ds2.onnx", "--height", "32", "--width", "32"])
    assert onnx_vs_torch(run_dir / "ds2.onnx", "ds", torch.randn(1, 3, 32, 48), prune=2) < 1e-4
    assert os.path.getsize(run_dir / "ds2.onnx") < os.path.getsize(run_dir / "models" / "ds" / "model.pth") / 4
    export.main(["--name", "u", "--output", "u.onnx", "--height", "32", "--width", "32"])
    assert onnx_vs_torch(run_dir / "u.onnx", "u", torch.randn(3, 1, 16, 32)) < 1e-4
    # by default a pruned export has a name of its own, beside (not over) the whole network's model.onnx
    result = export.main(["--name", "ds", "--prune", "1", "--height", "32", "--width", "32"])
    assert result["path"] == os.path.join("models", "ds", "model_L1.onnx")


def documented_probabilities(onnx_path, image_path, resize_to=None):
    """export.py's docstring followed step by step with OpenCV, numpy and ONNX Runtime: float32 [K, H, W]."""
    image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    height, width = image.shape[:2]
    if resize_to:
        image = cv2.resize(image, resize_to[::-1], interpolation=cv2.INTER_LINEAR)
    x = ((image - 0.5) / 0.25).transpose(2, 0, 1)[None]
    h, w = x.shape[2:]
    x = np.pad(x, ((0, 0), (0, 0), (0, -h % 16), (0, -w % 16)), mode="reflect")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    prob = 1 / (1 + np.exp(-session.run(None, {"image": x})[0][0, :, :h, :w]))
    return np.stack([cv2.resize(p, (width, height)) for p in prob]) if resize_to else prob


@pytest.mark.parametrize("arch, crop_size", [("NestedUNet", 0), ("UNet", 32)],
                         ids=["trained_resized", "trained_on_crops"])
def test_the_documented_input_gives_predict_pys_probabilities(run_dir, arch, crop_size, capsys):
    """A colour image of odd size (padded, and for the resized-trained run resized) prepared as export.py says."""
    write_run("r", arch, arch == "NestedUNet", 3, 1, crop_size=crop_size)
    export.main(["--name", "r", "--height", "32", "--width", "32"])
    printed = capsys.readouterr().out
    assert "RGB order" in printed and "by reflection" in printed
    assert ("resize each image to 96x96" in printed) == (not crop_size)
    rng = np.random.default_rng(0)
    colour = cv2.GaussianBlur(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8), (5, 5), 0)
    colour[:, :, 0] //= 3  # channels that differ, so that BGR order would show
    cv2.imwrite(str(run_dir / "colour.png"), colour)
    cfg, model = load_run("r", torch.device("cpu"))
    predictor = Predictor(model, cfg, torch.device("cpu"), amp="fp32")
    want = predictor.predict(predictor.as_input(image_files.decode_image(str(run_dir / "colour.png"))))
    got = documented_probabilities(run_dir / "models" / "r" / "model.onnx", run_dir / "colour.png",
                                   None if crop_size else (96, 96))
    assert got.shape == want.shape == (1, 37, 45)
    assert np.abs(got - want).max() < 1e-4


def test_export_leaves_the_sessions_random_numbers_alone(run_dir):
    """Its example input comes from a generator of its own: a notebook's torch draws after an export go on from its
    own seed, not from the example's seed 0."""
    after = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        export.main(["--name", "u", "--output", f"u{seed}.onnx"])
        after.append(torch.rand(3).tolist())
    assert after[0] != after[1]


def test_export_errors(run_dir):
    with pytest.raises(UsageError, match="--prune needs a NestedUNet"):
        export.main(["--name", "u", "--prune", "2"])
    with pytest.raises(UsageError, match="multiple of 16"):
        export.main(["--name", "ds", "--height", "40"])
    for folder in ("models", "onnx_files/"):  # an existing folder, or one named as a folder
        with pytest.raises(UsageError, match=f"--output {folder} is a folder; give the file to write, e.g. "):
            export.main(["--name", "u", "--output", folder])
    assert not os.path.exists(run_dir / "models" / "u" / "model.onnx")


def test_export_into_a_run_being_trained_is_refused(run_dir):
    """export.py into models/<name>/ went on while a train.py trained the run: the file went stale there without a
    word, and the weights loaded before an --overwrite replaced the run landed in the new run's folder. While a train.py
    holds models/.<name>.lock it is refused; an --output elsewhere exports the weights so far."""
    with held_by_another_process(run_dir / "models" / ".u.lock") as pid:
        with pytest.raises(UsageError, match=rf"^models/u is being written by another process \(pid {pid}\); wait for "
                                             "it to end, or choose another --output$"):
            export.main(["--name", "u", "--height", "32", "--width", "32"])
        assert not os.path.exists(run_dir / "models" / "u" / "model.onnx")
        export.main(["--name", "u", "--height", "32", "--width", "32", "--output", "u.onnx"])
    assert os.path.isfile(run_dir / "u.onnx")
