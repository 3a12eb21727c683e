"""Tests for --ensemble (ensemble.py): the mean of several runs' probabilities in predict.py and val.py, against each
run's own predictions; what the runs must share; the splits an ensemble may be scored on; what the records say."""
import hashlib
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import inference
import predict
import train
import val
from checkpoints import load_run
from conftest import sample_bgr, train_argv
from test_predict import stop_prediction
from ensemble import MeanProbability, load_models
from inference import Predictor, forward_bytes_per_pixel
from splits import read_split, split_ids
from utils import UsageError


class Constant(torch.nn.Module):
    """A 'network' whose logits are ``value`` everywhere: [B, 1, H, W]."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((len(x), 1, *x.shape[2:]), float(self.value))


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def test_mean_probability_is_the_mean_of_the_members_sigmoids_and_stays_finite():
    x = torch.zeros(2, 3, 16, 16)
    out = MeanProbability([Constant(2.0), Constant(-1.0), Constant(0.5)])(x)
    assert out.shape == (2, 1, 16, 16)
    expected = np.mean([sigmoid(2.0), sigmoid(-1.0), sigmoid(0.5)])
    assert torch.sigmoid(out).numpy() == pytest.approx(np.full((2, 1, 16, 16), expected), abs=1e-6)
    # members sure of a pixel: the mean is 1 (or 0) within 1e-6 (and float32 rounding), the logits finite for a loss
    for sure in (200.0, -200.0):
        out = MeanProbability([Constant(sure), Constant(sure)])(x)
        assert torch.isfinite(out).all() and float(torch.sigmoid(out).max()) == pytest.approx(float(sure > 0), abs=2e-6)


def test_an_ensemble_predicts_the_mean_of_its_runs_probabilities(in_runs):
    """p (NestedUNet + deep supervision, trained) and u (a UNet, random weights): the ensemble's probabilities are the
    mean of each run's own predictor's, for the same image."""
    device = torch.device("cpu")
    image = sample_bgr(40, 56)[:, :, ::-1]
    alone = []
    for name in ("p", "u"):
        cfg, model = load_run(name, device)
        predictor = Predictor(model, cfg, device, amp="fp32")
        alone.append(predictor.predict(predictor.as_input(image)))
    cfg, model = load_models("p", ["u"], device)
    predictor = Predictor(model, cfg, device, amp="fp32")
    together = predictor.predict(predictor.as_input(image))
    assert together.shape == alone[0].shape == (1, 40, 56)
    assert np.abs(alone[0] - alone[1]).min() > 0.01  # two different networks: the mean is neither
    np.testing.assert_allclose(together, (alone[0] + alone[1]) / 2, atol=1e-5)


def test_predict_py_records_every_run_of_the_ensemble(in_runs, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), sample_bgr(32, 32))
    out = tmp_path / "out"
    predict.main(["--name", "p", "--ensemble", "u", "--input", str(folder), "--output", str(out), "--instances"])
    assert capsys.readouterr().out.startswith("p + 1 run: 1 image ")
    with open(out / "prediction.yml") as f:
        record = yaml.safe_load(f)
    with open(os.path.join("models", "u", "model.pth"), "rb") as f:
        u_sha = hashlib.sha256(f.read()).hexdigest()
    assert record["run"] == "p" and record["ensemble"] == ["u"]
    assert [(m["run"], m["weights_sha256"]) for m in record["ensemble_weights"]] == [("u", u_sha)]


def test_resume_keeps_the_images_of_the_same_ensemble_alone(in_runs, tmp_path, monkeypatch):
    """A prediction stopped after its first image: --resume with the same runs predicts the other alone; without the
    other run it is refused with the flags to give, once that run's weights changed (an image's record names every
    run's SHA-256) without: no flag gives them back."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in "ab":
        cv2.imwrite(str(folder / f"{n}.png"), sample_bgr(32, 32))
    shutil.copytree(os.path.join("models", "u"), os.path.join("models", "u2"))
    try:
        argv = ["--name", "p", "--input", str(folder), "--output", str(tmp_path / "out")]
        stop_prediction([*argv, "--ensemble", "u2"], 2, monkeypatch)
        assert sorted(os.listdir(tmp_path / "out" / ".predict_finished")) == ["a.json"]
        with pytest.raises(UsageError, match=r'settings than this one: ensemble \["u2"\] -> null; .*give the flags and '
                                             r'run it was made with, or leave out --resume'):
            predict.main([*argv, "--resume"])
        weights = torch.load(os.path.join("models", "u2", "model.pth"), weights_only=True)
        # the run trained on since: other weights
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()},
                   os.path.join("models", "u2", "model.pth"))
        with pytest.raises(UsageError, match=r"settings than this one: ensemble_weights .*; leave out --resume") as e:
            predict.main([*argv, "--ensemble", "u2", "--resume"])
        assert "give the flags" not in str(e.value)
        torch.save(weights, os.path.join("models", "u2", "model.pth"))
        calls = []
        real = inference.Predictor.predict
        monkeypatch.setattr(inference.Predictor, "predict",
                            lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
        predict.main([*argv, "--ensemble", "u2", "--resume"])
        assert len(calls) == 1  # b alone
    finally:
        shutil.rmtree(os.path.join("models", "u2"))


@pytest.mark.parametrize("others, words", [
    (["pc"], "run pc has crop_size 32, run p 0"),
    (["pp"], "run pp has normalization percentile, run p fixed"),
    (["u", "u"], "run u is named more than once"),
    (["p"], "run p is named more than once"),
    (["nosuch"], "no run named 'nosuch': .* check --ensemble"),
])
def test_runs_that_read_images_otherwise_are_refused(in_runs, tmp_path, others, words):
    cv2.imwrite(str(tmp_path / "a.png"), sample_bgr(32, 32))
    with pytest.raises(UsageError, match=words):
        predict.main(["--name", "p", "--ensemble", *others, "--input", str(tmp_path / "a.png"),
                      "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, words", [
    ([], "the val split of run p holds images that other runs trained on"),
    (["--split", "train"], "the train split of run p"),
    (["--tune"], "--tune chooses the post-processing of one run"),
])
def test_val_py_refuses_an_ensemble_on_images_some_of_its_runs_trained_on(in_runs, flags, words):
    with pytest.raises(UsageError, match=words):
        val.main(["--name", "p", "--ensemble", "u", *flags])


def test_val_py_scores_folds_together_on_their_shared_test_split(tiny_workdir, capsys):
    """Two folds of one cross-validation (--test_size 0.2): val.py --ensemble scores their mean on the test split they
    share, into outputs/f0_ensemble_test/, and writes the mean of the probabilities each run writes alone."""
    for fold in (0, 1):
        train.main(train_argv(f"f{fold}", "--folds", "2", "--fold", str(fold), "--test_size", "0.2", epochs=1))
    test_ids = split_ids(read_split(os.path.join("models", "f0", "split.csv")), "test")
    assert len(test_ids) == 2
    for fold in (0, 1):
        val.main(["--name", f"f{fold}", "--split", "test", "--no_overlays"])
    capsys.readouterr()
    scores = val.main(["--name", "f0", "--ensemble", "f1", "--split", "test", "--no_overlays"])
    assert "f0 + 1 run (test split, 2 images" in capsys.readouterr().out
    out = os.path.join("outputs", "f0_ensemble_test")
    table = pd.read_csv(os.path.join(out, "scores.csv"), dtype={"img_id": str})
    assert sorted(table["img_id"]) == sorted(test_ids)
    assert scores["iou"] == pytest.approx(scores["iou"])  # a number, not NaN
    for i in test_ids:
        alone = [cv2.imread(os.path.join("outputs", f"f{fold}_test", "0", f"{i}.png"), cv2.IMREAD_GRAYSCALE)
                 for fold in (0, 1)]
        together = cv2.imread(os.path.join(out, "0", f"{i}.png"), cv2.IMREAD_GRAYSCALE).astype(float)
        assert np.abs(together - (alone[0].astype(float) + alone[1]) / 2).max() <= 1  # each PNG rounded to 1/255
    with open(os.path.join(out, "evaluation.yml")) as f:
        record = yaml.safe_load(f)
    assert record["run"] == "f0" and record["ensemble"] == ["f1"] and record["split"] == "test"
    assert [m["run"] for m in record["ensemble_weights"]] == ["f1"]
    # a run of another --split_seed holds out other test images
    train.main(train_argv("s7", "--test_size", "0.2", "--split_seed", "7", epochs=1))
    theirs = split_ids(read_split(os.path.join("models", "s7", "split.csv")), "test")
    with pytest.raises(UsageError, match=rf"run s7's test split is not run f0's \(2 images of inputs/tiny, against 2 "
                                         rf"of inputs/tiny; {len(set(theirs) & set(test_ids))} in both\); train the "):
        val.main(["--name", "f0", "--ensemble", "s7", "--split", "test"])
    # the whole dataset: every image but the test split was trained on by one of the runs (4 by each)
    val.main(["--name", "f0", "--ensemble", "f1", "--dataset", "tiny", "--no_overlays"])
    printed = capsys.readouterr().out
    assert os.path.isdir(os.path.join("outputs", "f0_ensemble_on_tiny"))
    assert "without the 8 training images (2): " in printed
    assert "f0 + 1 run (all of inputs/tiny, the run's own dataset: its training images included; 8 trained on by one " \
           "of the runs, 10 images" in printed
    # a copy of it: found as the training images of either run, and counted in the title as in the summary
    shutil.copytree(os.path.join("inputs", "tiny"), os.path.join("inputs", "tiny_copy"))
    val.main(["--name", "f0", "--ensemble", "f1", "--dataset", "tiny_copy", "--no_overlays"])
    printed = capsys.readouterr().out
    assert "f0 + 1 run (all of inputs/tiny_copy, 4 of them the run's training images; 8 trained on by one of the " \
           "runs, 10 images" in printed
    assert "without the 8 training images (2): " in printed


def test_an_ensemble_s_windows_are_sized_for_its_largest_run_as_its_runs_go_one_after_another(in_runs):
    """The memory bound of an ensemble's forward pass is its largest run's (they run one after another) and its two
    float32 sums of the mean, not the bound of all its runs together, which would cut its windows needlessly."""
    device = torch.device("cpu")
    alone = [forward_bytes_per_pixel(load_run(name, device)[1], 3, device) for name in ("p", "u")]
    together = forward_bytes_per_pixel(load_models("p", ["u"], device)[1], 3, device)
    assert alone[0][1] == 4 and alone[1][1] == 1  # p's four deep-supervision heads; the ensemble's one mean
    assert together == (max(alone[0][0], alone[1][0]) + 2 * 4, 1)


def test_scale_auto_refuses_runs_that_learned_nuclei_of_another_size(in_runs, tmp_path):
    """--scale auto sizes the images for --name's run: a run averaged with it that learned nuclei 3 times as wide
    (pa_big) would see them at a third of that size; one within instances.AUTO_SCALE_BAND (pa_near, 1.4x) is taken."""
    cv2.imwrite(str(tmp_path / "a.png"), sample_bgr(32, 32))
    with open(os.path.join("models", "pa", "config.yml")) as f:
        config = yaml.safe_load(f)
    try:
        for name, diameter in (("pa_big", 9.0), ("pa_near", 4.2)):
            shutil.copytree(os.path.join("models", "pa"), os.path.join("models", name))
            with open(os.path.join("models", name, "config.yml"), "w") as f:
                yaml.safe_dump({**config, "name": name, "nucleus_diameter": diameter}, f, sort_keys=False)
        flags = ["--name", "pa", "--input", str(tmp_path / "a.png"), "--scale", "auto", "--ensemble"]
        with pytest.raises(UsageError, match=r"--scale auto: run pa_big learned nuclei 9\.0 px across, run pa 3\.0 "
                                             r"px.* give --scale FACTOR"):
            predict.main([*flags, "pa_big", "--output", str(tmp_path / "big")])
        assert not (tmp_path / "big").exists()
        predict.main([*flags, "pa_near", "--output", str(tmp_path / "near")])
        assert (tmp_path / "near" / "a.png").is_file()
    finally:
        for name in ("pa_big", "pa_near"):
            shutil.rmtree(os.path.join("models", name), ignore_errors=True)


def test_crop_trained_runs_of_other_crop_sizes_are_averaged(in_runs):
    """Runs trained on crops of any size predict whole images alike (crop_size says only that they were crops):
    pc (32) and a copy of it trained on 64 are averaged, as two identical networks, into pc's own probabilities."""
    with open(os.path.join("models", "pc", "config.yml")) as f:
        config = yaml.safe_load(f)
    shutil.copytree(os.path.join("models", "pc"), os.path.join("models", "pc64"))
    try:
        with open(os.path.join("models", "pc64", "config.yml"), "w") as f:
            yaml.safe_dump({**config, "name": "pc64", "crop_size": 64}, f, sort_keys=False)
        device = torch.device("cpu")
        image = sample_bgr(40, 56)[:, :, ::-1]
        probabilities = []
        for cfg, model in (load_run("pc", device), load_models("pc", ["pc64"], device)):
            predictor = Predictor(model, cfg, device, amp="fp32")
            probabilities.append(predictor.predict(predictor.as_input(image)))
        np.testing.assert_allclose(probabilities[1], probabilities[0], atol=1e-5)
    finally:
        shutil.rmtree(os.path.join("models", "pc64"))
