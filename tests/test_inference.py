"""Tests for inference.py: the Predictor's contract (sizes, scaling, eval mode), the windows it tiles a large image
into and how their seams blend, and the memory budget that sizes them (RAM, a container's or batch job's limit, a
GPU's free memory).

Most use tiny stand-in networks whose output is known exactly (Pointwise: a pixel's logit from that pixel alone), so
that a misplaced window or a wrong blend shows at full precision.
"""
import copy
import os
from argparse import Namespace

import cv2
import numpy as np
import pytest
import torch

import inference
import utils
from archs import build_model
from conftest import Pointwise, write_cgroups
from utils import DataError


class ShapeRecorder(Pointwise):
    """Pointwise, noting the shape of every input it sees."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


def test_a_run_trained_on_resized_non_square_images_predicts_at_its_training_size():
    """--input_h 32 --input_w 48: every image goes through the network at 32 rows by 48 columns, and comes back at
    its own size (rows and columns not swapped on the way)."""
    cfg = Namespace(crop_size=0, input_h=32, input_w=48, num_classes=1, borders=False, input_channels=3)
    model = ShapeRecorder()
    image = np.random.default_rng(0).random((40, 70, 3), dtype=np.float32)
    prob = inference.Predictor(model, cfg, torch.device("cpu"), tile=512, amp="fp32").predict(image)
    assert model.shapes == [(1, 3, 32, 48)] and prob.shape == (1, 40, 70)
    resized = cv2.resize(image, (48, 32), interpolation=cv2.INTER_LINEAR)
    expected = inference.Predictor(Pointwise(), crop_cfg(), torch.device("cpu"), tile=512, amp="fp32").predict(resized)
    np.testing.assert_allclose(prob[0], cv2.resize(expected[0], (70, 40), interpolation=cv2.INTER_LINEAR), atol=1e-6)


def crop_cfg(num_classes=1):
    return Namespace(crop_size=32, input_h=32, input_w=32, num_classes=num_classes, borders=False, input_channels=3)


def test_an_image_as_stored_is_refused_and_a_grey_one_without_its_channel_axis_is_read():
    """Predictor.predict takes the image scaled to [0, 1] (as_input): given one as stored (uint8, or its floats
    0-255) the network saw a far brighter image than any it learned and predicted without an error. as_input takes a
    grey image [H, W], as most readers give one, as [H, W, 1]."""
    cfg = Namespace(**vars(crop_cfg()), normalization="fixed")
    predictor = inference.Predictor(Pointwise(), cfg, torch.device("cpu"), tile=512, amp="fp32")
    stored = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    for image in (stored, stored.astype(np.float32), predictor.as_input(stored)[:, :, 0]):
        with pytest.raises(ValueError, match=r"float \[H, W, C\] in \[0, 1\].*predictor\.as_input"):
            predictor.predict(image)
    grey = stored[:, :, 0]
    np.testing.assert_array_equal(predictor.as_input(grey), predictor.as_input(grey[:, :, None]))
    overshoot = cv2.resize(predictor.as_input(stored), (60, 40), interpolation=cv2.INTER_CUBIC)
    assert overshoot.min() < 0 < 1 < overshoot.max()  # what a user's own resizing may give: predicted
    assert predictor.predict(overshoot).shape == (1, 40, 60)


def test_a_network_in_training_mode_predicts_as_in_eval_mode_and_keeps_its_statistics():
    """A Predictor on a network being trained (or built and loaded by hand, in training mode): BatchNorm would
    normalise by the image's own statistics and fold them into the network's running ones. It predicts in eval mode
    and gives every module its own mode back (a frozen BatchNorm stays frozen)."""
    torch.manual_seed(0)
    model = build_model("UNet", 1, 3, False)
    model.conv1_0.bn1.eval()  # as --freeze_bn leaves it
    statistics = copy.deepcopy(model.state_dict())
    image = np.random.default_rng(0).random((32, 48, 3), dtype=np.float32)
    prob = inference.Predictor(model, crop_cfg(), torch.device("cpu"), tile=512, amp="fp32").predict(image)
    assert model.training and not model.conv1_0.bn1.training and model.conv0_0.bn1.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, statistics[key], rtol=0, atol=0, msg=key)
    expected = inference.Predictor(model.eval(), crop_cfg(), torch.device("cpu"), tile=512, amp="fp32").predict(image)
    np.testing.assert_array_equal(prob, expected)


@pytest.mark.parametrize("shape,tile,overlap", [((100, 150), 32, 8), ((96, 160), 64, 32), ((70, 33), 32, 0),
                                                ((17, 300), 48, 16)])
def test_tiling_places_and_normalises_windows_exactly(shape, tile, overlap):
    rng = np.random.default_rng(0)
    image = rng.random(shape + (3,), dtype=np.float32)
    whole = inference.Predictor(Pointwise(), crop_cfg(), torch.device("cpu"), tile=512).predict(image)
    tiled = inference.Predictor(Pointwise(), crop_cfg(), torch.device("cpu"), tile, overlap,
                                batch_size=5).predict(image)
    assert whole.std() > 0.1
    assert tiled.shape == (1,) + shape
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_windowed_network_gives_the_whole_image_logits_of_every_head(heads):
    """val.py's and train.py's windows (inference.WindowedNetwork): a pointwise network gets exactly its whole-image
    logits, from windows of at most tile x tile pixels, for each deep-supervision head; an image that fits is run
    whole."""
    class Heads(ShapeRecorder):
        def forward(self, x):
            out = super().forward(x)
            return [out * (h + 1) for h in range(heads)] if heads > 1 else out

    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 96, 160), dtype=np.float32))
    whole = Heads()(x)
    model = Heads()
    windowed = inference.WindowedNetwork(model, tile=64, overlap=32)(x)
    for a, b in zip(*(o if heads > 1 else [o] for o in (windowed, whole))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert model.shapes and all(shape[-2:] == (64, 64) for shape in model.shapes)
    model.shapes.clear()
    inference.WindowedNetwork(model, tile=160)(x)
    assert model.shapes == [(2, 3, 96, 160)]


class WideHeads(ShapeRecorder):
    """ShapeRecorder's logits in ``heads`` deep-supervision heads, behind a layer of 96 channels that makes its
    forward pass cost 384 bytes per input pixel (inference.forward_bytes_per_pixel), as a real network's costs more
    than its whole-image sums."""

    def __init__(self, heads):
        super().__init__()
        self.heads, self.wide = heads, torch.nn.Identity()

    def forward(self, x):
        self.wide(x.repeat(1, 32, 1, 1))
        out = super().forward(x)
        return [out * (h + 1) for h in range(self.heads)] if self.heads > 1 else out


@pytest.mark.parametrize("heads", [1, 4])
def test_windows_fit_the_memory_budget_beside_the_whole_image_sums(monkeypatch, heads):
    """A whole slide in windows holds whole-image buffers beside them: val.py's and train.py's input, float32 sums of
    every head and weights on the device (inference.WindowedNetwork), predict.py's input, sums and weights
    (inference.Predictor). The windows get what the budget leaves: buffers and windows fit it together, the outputs
    stay the whole image's. A budget that cannot hold them with 64 x 64 windows runs those where the memory available
    holds them, and is a one-line DataError where it does not."""
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 192, 320), dtype=np.float32))
    pixels = 192 * 320
    held = {"windowed": (3 + heads + 1) * pixels * 4, "predictor": (3 + 1 + 1) * pixels * 4}
    for budget in (4_000_000, held["windowed"] + 384 * 64 * 64):
        monkeypatch.setattr(inference, "memory_budget", lambda device: budget)
        model = WideHeads(heads)
        network = inference.whole_image_network(model, crop_cfg(), torch.device("cpu"), progress=False)
        model.shapes.clear()  # the probe's
        windowed = network(x)
        whole = WideHeads(heads)(x)
        for a, b in zip(*(o if heads > 1 else [o] for o in (windowed, whole))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert model.shapes and all(b * 384 * h * w + held["windowed"] <= budget for b, _, h, w in model.shapes)
        if heads == 1:
            model = WideHeads(1)
            predictor = inference.Predictor(model, crop_cfg(), torch.device("cpu"), batch_size=8)
            model.shapes.clear()
            prob = predictor.predict(x[0].numpy().transpose(1, 2, 0) * 0.25 + 0.5)  # normalised back to x
            np.testing.assert_allclose(prob, torch.sigmoid(whole[0]).numpy(), atol=1e-5)
            assert model.shapes and all(b * 384 * h * w + held["predictor"] <= budget for b, _, h, w in model.shapes)
    monkeypatch.setattr(inference, "memory_budget", lambda device: held["windowed"] + 384 * 64 * 64 - 1)
    model = WideHeads(heads)
    network = inference.whole_image_network(model, crop_cfg(), torch.device("cpu"), progress=False)
    model.shapes.clear()
    for a, b in zip(*(o if heads > 1 else [o] for o in (network(x), WideHeads(heads)(x)))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert {(h, w) for _, _, h, w in model.shapes} == {(64, 64)}
    monkeypatch.setattr(inference, "memory_available", lambda device: held["windowed"] + 384 * 64 * 64 - 1)
    with pytest.raises(DataError, match=r"^a 192x320 image needs 0\.00 GiB in windows \(its whole-image sums beside "
                                        r"the smallest windows\), more than the 0\.00 GiB of memory available: free"):
        network(x)


def test_sizing_windows_leaves_a_network_in_training_as_it_was():
    """train.py sizes its validation windows (inference.forward_bytes_per_pixel) on the network it trains: the probe
    leaves its mode and BatchNorm statistics as they were."""
    net = build_model("UNet", 1, 3, False).train()
    before = copy.deepcopy(net.state_dict())
    assert inference.forward_bytes_per_pixel(net, 3, torch.device("cpu"))[0] > 0
    assert net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_blend_weights_and_window_starts():
    w = inference.blend_weights(64, 48, 16)
    assert w.shape == (64, 48) and w.min() > 0 and w.max() == 1 and w[32, 24] == 1
    assert inference.window_starts(150, 64, 32) == [0, 32, 64, 86]
    assert inference.window_starts(40, 64, 32) == [0]


@pytest.mark.parametrize("available, budget", [(900, 250), (500, 250), (400, 100)])
def test_cpu_memory_budget_is_a_quarter_of_the_ram_unless_little_is_available(monkeypatch, available, budget):
    """A quarter of the RAM whatever is available while half of it or more is (the same windows, the same
    predictions from run to run), a quarter of the available RAM when less is. Available, not merely unused: the
    page cache, which grows as files are read, counts as available."""
    monkeypatch.setattr(inference, "ram", lambda: (1000, available))
    assert inference.memory_budget(torch.device("cpu")) == budget


def memory_files(folders, v1=False):
    """The memory files of each {folder under sys/fs/cgroup: (limit, used bytes, inactive page cache bytes)}, as
    conftest.write_cgroups takes them."""
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 else \
        ("memory.max", "memory.current", "inactive_file")
    files = {}
    for folder, (limit, used, cache) in folders.items():
        files.update({os.path.join(folder, names[0]): limit, os.path.join(folder, names[1]): used,
                      os.path.join(folder, "memory.stat"): f"active_file 5\n{names[2]} {cache}"})
    return files


def test_the_memory_limit_of_a_container_or_batch_job_caps_the_ram(tmp_path, monkeypatch):
    """A Slurm job's limit sits on a cgroup above the process's own (v2), a container's on the cgroup it shows as
    its root (v1); page cache that the kernel can drop does not count as used. No limit: psutil's figures."""
    write_cgroups(tmp_path / "slurm", "0::/job_7/step_0",
                  memory_files({"job_7": (2000, 1500, 100), "job_7/step_0": ("max", 1200, 100),
                                "": ("max", 9000, 0)}))
    assert utils.cgroup_memory(str(tmp_path / "slurm")) == [(2000, 1400)]
    # hybrid hosts (this project's CI among them): the memory controller on v1, an empty v2 hierarchy beside it
    write_cgroups(tmp_path / "docker", "4:memory:/docker/abc\n0::/",
                  memory_files({"memory": (3000, 800, 300)}, v1=True))
    assert utils.cgroup_memory(str(tmp_path / "docker")) == [(3000, 500)]
    write_cgroups(tmp_path / "slurm_v1", "4:memory:/slurm/job_8\n0::/",
                  memory_files({"memory/slurm/job_8": (4000, 1000, 0), "memory": (9223372036854771712, 5000, 0)},
                               v1=True))
    assert utils.cgroup_memory(str(tmp_path / "slurm_v1")) == [(4000, 1000)]
    unlimited = (9223372036854771712, 800, 0)  # v1's "no limit"
    write_cgroups(tmp_path / "none", "4:memory:/user",
                  memory_files({"memory/user": unlimited, "memory": unlimited}, v1=True))
    assert utils.cgroup_memory(str(tmp_path / "none")) == []
    assert utils.cgroup_memory(str(tmp_path / "nowhere")) == []
    monkeypatch.setattr(utils.psutil, "virtual_memory", lambda: Namespace(total=10_000, available=6000))
    monkeypatch.setattr(utils, "cgroup_memory", lambda: [(2000, 1400)])
    assert utils.ram() == (2000, 600)
    monkeypatch.setattr(utils, "cgroup_memory", lambda: [])
    assert utils.ram() == (10_000, 6000)


def test_gpu_memory_budget_is_half_of_the_free_memory(monkeypatch):
    """On a GPU shared with other processes, what is free counts, not its size (torch: (free, total) bytes)."""
    monkeypatch.setattr(inference.torch.cuda, "mem_get_info", lambda device: (1_000_000_000, 80_000_000_000))
    assert inference.memory_budget(torch.device("cuda")) == 500_000_000


@pytest.mark.parametrize("overlap", [16, 64])
def test_windows_sized_from_the_memory_budget(monkeypatch, overlap):
    """tile None: the whole image when its forward pass fits the budget, else the largest windows that fit; both
    give the whole-image probabilities (Pointwise: exactly), also when --overlap (default 64) is as large as the
    smallest window."""
    image = np.random.default_rng(1).random((100, 150, 3), dtype=np.float32)
    whole = inference.Predictor(Pointwise(), crop_cfg(), torch.device("cpu"), tile=512).predict(image)
    roomy = inference.Predictor(Pointwise(), crop_cfg(), torch.device("cpu"))
    assert roomy.tile ** 2 >= 100 * 150
    # 64 x 64 windows of WideHeads (384 bytes per pixel) beside the image, the sums and the weights (5 floats a pixel)
    monkeypatch.setattr(inference, "memory_budget", lambda device: 64 * 64 * 384 + 100 * 150 * 5 * 4)
    tight = inference.Predictor(WideHeads(1), crop_cfg(), torch.device("cpu"), overlap=overlap)
    assert tight.tile == 64 and tight.batch_size == 1
    for predictor in (roomy, tight):
        np.testing.assert_allclose(predictor.predict(image), whole, atol=1e-5)
    assert inference.tile_for_budget(3472, 6e9) == 1312 and inference.tile_for_budget(1e9, 1) == 64


def test_windowed_network_bar_follows_the_progress_flag(capsys):
    """The bar over an image's windows is drawn only where the evaluation draws bars (not on other DDP ranks, nor
    with train.py's bars off)."""
    x = torch.zeros(1, 3, 96, 160)
    inference.WindowedNetwork(ShapeRecorder(), tile=64, overlap=32, progress=False)(x)
    assert "windows" not in capsys.readouterr().err
    inference.WindowedNetwork(ShapeRecorder(), tile=64, overlap=32)(x)
    assert "windows" in capsys.readouterr().err
