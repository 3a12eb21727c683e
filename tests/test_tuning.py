"""val.py --tune: the post-processing it writes to models/<name>/postprocessing.yml is the best of its grid on the
run's validation split (checked against separation_scores of every combination), val.py and predict.py take it as the
run's defaults (a flag still wins), a file chosen for other weights is ignored with a note, a run without one is
as before, and bundle.py carries it along."""
import os
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_synthetic, train_argv

import bundle
import config
import engine
import predict
import train
import tuning
import val
from config import MIN_CONFIDENCE, MIN_SIZE, TUNED_FILE, load_run_config, post_processing
from files import sha256_file
from image_files import read_labels
from metrics import separation_scores
from utils import DataError, UsageError

RUN = "tuned"
DATA = "tune24"
CPU = ["--device", "cpu", "--amp", "fp32"]


def from_masks(original):
    """engine.step with the logits of a stand-in network made from the true masks: inside a nucleus a probability
    rising from 0.55 at the left edge to 0.99 at the right, 0.02 outside, so that each --min_confidence of the grid
    keeps other nuclei and the defaults' 0.85 drops some that are right."""
    def step(model, images, masks, criterion, precision, **kwargs):
        loss, logits = original(model, images, masks, criterion, precision, **kwargs)
        ramp = torch.linspace(0.55, 0.99, masks.shape[-1]).expand_as(masks[:, :1])
        prob = torch.where(masks[:, :1] > 0.5, ramp, torch.full_like(ramp, 0.02))
        return loss, torch.logit(prob).expand_as(logits).contiguous()
    return step


@pytest.fixture(scope="module")
def _tuned_template(tmp_path_factory):
    """inputs/<DATA> (24 synthetic 32x32 images) and run RUN trained on half of them (1 epoch; 12 validation images,
    enough for --tune to weigh a gain), made once for the module and copied into each test's workdir."""
    root = tmp_path_factory.mktemp("tuned_template")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        make_synthetic(root, name=DATA, num_images=24, seed=1)
        train.main(train_argv(RUN, "--amp", "fp32", "--val_size", "0.5", dataset=DATA, epochs=1))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def tuned(tmp_path, monkeypatch, _tuned_template):
    """A workdir holding a copy of :func:`_tuned_template`, made the current directory, val.py's network replaced by
    :func:`from_masks`; yields the workdir."""
    shutil.copytree(_tuned_template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "step", from_masks(engine.step))
    return tmp_path


def record(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_tune_writes_the_best_of_its_grid_and_val_and_predict_take_it_unless_a_flag_says_otherwise(tuned, monkeypatch,
                                                                                                     capsys):
    seen = {}
    objects = tuning.ObjectCollector._objects

    def kept(self, img_id, prob):  # the probabilities tuned on, for the brute force below
        seen[img_id] = prob.copy()
        return objects(self, img_id, prob)

    monkeypatch.setattr(tuning.ObjectCollector, "_objects", kept)
    val.main(["--name", RUN, "--tune", *CPU])
    printed = capsys.readouterr().out
    chosen = record(tuned / "models" / RUN / TUNED_FILE)
    assert chosen["val_images"] == len(seen) == 12
    assert chosen["grid"]["min_confidence"] == [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95]
    assert chosen["grid"]["separation"] == ["watershed", "cc"] and "min_size" not in chosen
    # every combination scored again the slow way: split_instances with its filters, then dsb_score
    truth = {i: read_labels(tuned / "inputs" / DATA / "labels" / f"{i}.png") for i in seen}
    brute = {(m, c): np.mean([separation_scores(seen[i][0], truth[i], [m], min_size=MIN_SIZE,
                                                min_confidence=c)[m]["dsb"] for i in seen])
             for m in chosen["grid"]["separation"]
             for c in chosen["grid"]["min_confidence"]}
    best = max(brute.values())
    assert brute[chosen["separation"], chosen["min_confidence"]] == pytest.approx(best)
    assert chosen["dsb"]["tuned"] == pytest.approx(best)
    defaults = ("watershed", MIN_CONFIDENCE)
    kept = max(sum(v == d for v, d in zip(c, defaults)) for c, score in brute.items() if score == pytest.approx(best))
    assert sum(v == d for v, d in zip((chosen["separation"], chosen["min_confidence"]),
                                      defaults)) == kept  # of the ties, the one nearest the defaults
    assert chosen["dsb"]["defaults"] == pytest.approx(brute["watershed", MIN_CONFIDENCE])
    assert chosen["dsb"]["tuned"] > chosen["dsb"]["defaults"] + 0.05  # the ramp: 0.85 drops nuclei that are right
    assert chosen["min_confidence"] < MIN_CONFIDENCE
    assert f"{chosen['dsb']['tuned'] - chosen['dsb']['defaults']:+.4f} over the defaults" in printed
    choice = {k: chosen[k] for k in ("separation", "min_confidence")}

    # val.py: the choice is the run's default, and its DSB2018 score the one tuned; flags win
    scores = val.main(["--name", RUN, "--no_overlays", *CPU])
    assert scores["dsb"] == pytest.approx(chosen["dsb"]["tuned"])
    assert "tuned on validation" in capsys.readouterr().out
    settings = record(tuned / "outputs" / RUN / "evaluation.yml")["settings"]
    assert {k: settings[k] for k in choice} == choice
    scores = val.main(["--name", RUN, "--no_overlays", "--separation", "watershed", "--min_size", str(MIN_SIZE),
                       "--min_confidence", str(MIN_CONFIDENCE), *CPU])
    assert scores["dsb"] == pytest.approx(chosen["dsb"]["defaults"])
    assert "tuned on validation" not in capsys.readouterr().out
    val.main(["--name", RUN, "--no_overlays", "--min_confidence", "0.95", *CPU])
    settings = record(tuned / "outputs" / RUN / "evaluation.yml")["settings"]
    assert (settings["separation"], settings["min_size"], settings["min_confidence"]) == \
        (choice["separation"], MIN_SIZE, 0.95)

    # predict.py: the same
    image = str(tuned / "inputs" / DATA / "images" / f"{sorted(seen)[0]}.png")
    predict.main(["--name", RUN, "--input", image, "--output", "pred", "--instances", *CPU])
    assert "tuned on validation" in capsys.readouterr().out
    settings = record(tuned / "pred" / "prediction.yml")["settings"]
    assert {k: settings[k] for k in choice} == choice
    predict.main(["--name", RUN, "--input", image, "--output", "pred", "--instances", "--min_size", "0",
                  "--separation", "cc", *CPU])
    settings = record(tuned / "pred" / "prediction.yml")["settings"]
    assert (settings["separation"], settings["min_size"], settings["min_confidence"]) == \
        ("cc", 0, choice["min_confidence"])


@pytest.mark.parametrize("loss, confidence", [("BCEDiceLoss", MIN_CONFIDENCE), ("LovaszHingeLoss", 0.0)])
def test_a_tie_goes_to_the_defaults(loss, confidence):
    empty = [(0, {m: np.zeros((3, 0)) for m in ("watershed", "cc", "borders")})]  # every combination scores 1
    choice = tuning.choose(empty, RUN, Namespace(borders=True, loss=loss))
    assert choice["chosen"] == choice["defaults"] == {"separation": "borders",
                                                      "min_confidence": confidence}


@pytest.mark.parametrize("reversed_by", [0, 5])
def test_a_gain_that_some_images_reverse_keeps_the_defaults(reversed_by):
    """11 images of one true nucleus each: on 11 - ``reversed_by`` the defaults' --min_confidence 0.85 drops it (found
    at 0.82), on the others it drops a false one (0.83) beside it: the grid's best, 0.8, gains on the first and loses
    on the others. Chosen only when its gain's bootstrap interval lies above 0 (no image reverses it); else the
    defaults are kept, and neither val.py nor predict.py would say "tuned"."""
    dropped = {m: np.array([[0.99], [100], [0.82]]) for m in ("watershed", "cc")}
    false_kept = {m: np.array([[0.99, 0.0], [100, 100], [0.95, 0.83]]) for m in ("watershed", "cc")}
    images = [(1, dropped)] * (11 - reversed_by) + [(1, false_kept)] * reversed_by
    choice = tuning.choose(images, RUN, Namespace(borders=False, loss="BCEDiceLoss"))
    assert choice["best"]["min_confidence"] < 0.82
    assert choice["gains"].tolist() == [1.0] * (11 - reversed_by) + [-0.5] * reversed_by
    assert (choice["interval"][0] > 0) == (reversed_by == 0)
    assert choice["chosen"] == (choice["best"] if reversed_by == 0 else choice["defaults"])
    table = tuning.tuning_table("t", choice, len(images), "p.yml")
    assert "95 % interval of the gain per image, bootstrap over the 11 images" in table
    assert ("chosen: the defaults: 0 lies within that interval" in table) == (reversed_by > 0)
    few = tuning.choose(images[:9], RUN, Namespace(borders=False, loss="BCEDiceLoss"))
    assert few["interval"] is None and few["chosen"] == few["defaults"]  # 9 images: too few to tell
    assert "too few to tell a gain from chance" in tuning.tuning_table("t", few, 9, "p.yml")


def test_tune_refuses_other_images_and_flags_it_chooses_and_runs_that_are_not_the_users(tuned):
    for flags, words in ((["--dataset", DATA], "--dataset: --tune chooses on the run's validation split alone"),
                         (["--split", "test"], "--split test: --tune chooses on the run's validation split alone"),
                         (["--split", "train"], "--split train: "),
                         (["--min_confidence", "0.5", "--tta"], "--min_confidence and --tta: --tune chooses"),
                         (["--output", "x"], "--output: --tune chooses")):
        with pytest.raises(UsageError, match=words):
            val.main(["--name", RUN, "--tune", *flags, *CPU])
    with pytest.raises(UsageError, match="nuclei is the bundled model"):
        val.main(["--name", "nuclei", "--tune", *CPU])
    with pytest.raises(UsageError, match="no run named 'missing'"):
        val.main(["--name", "missing", "--tune", *CPU])
    assert not os.path.exists(tuned / "models" / RUN / TUNED_FILE)
    shutil.rmtree(tuned / "inputs" / DATA / "labels")
    with pytest.raises(DataError, match="needs instance labels, and 12 of the 12 validation images of tuned have none"):
        val.main(["--name", RUN, "--tune", *CPU])


def test_a_file_chosen_for_other_weights_is_ignored_with_a_note_and_a_damaged_one_named(tuned, capsys):
    val.main(["--name", RUN, "--tune", *CPU])
    path = tuned / "models" / RUN / TUNED_FILE
    assert record(path)["min_confidence"] < MIN_CONFIDENCE
    capsys.readouterr()
    weights = torch.load(tuned / "models" / RUN / "model.pth")
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()},
               tuned / "models" / RUN / "model.pth")  # as a --resume that saved a better epoch would
    val.main(["--name", RUN, "--no_overlays", *CPU])
    printed = capsys.readouterr().out
    assert f"note: {os.path.join('models', RUN, TUNED_FILE)} was chosen for other weights" in printed
    assert "tuned on validation" not in printed
    settings = record(tuned / "outputs" / RUN / "evaluation.yml")["settings"]
    assert (settings["separation"], settings["min_size"], settings["min_confidence"]) == \
        ("watershed", MIN_SIZE, MIN_CONFIDENCE)
    image = str(tuned / "inputs" / DATA / "images" / "syn_0000.png")
    predict.main(["--name", RUN, "--input", image, "--output", "pred", "--instances", *CPU])
    assert "was chosen for other weights" in capsys.readouterr().out
    assert record(tuned / "pred" / "prediction.yml")["settings"]["min_confidence"] == MIN_CONFIDENCE

    path.write_text("separation: borders\nmin_confidence: 0.5\nweights_sha256: x\n")  # not a borders run
    with pytest.raises(DataError, match=f"{TUNED_FILE} holds no post-processing that val.py --tune chose"):
        val.main(["--name", RUN, "--no_overlays", *CPU])
    val.main(["--name", RUN, "--tune", *CPU])  # which replaces it
    assert post_processing(RUN, load_run_config(RUN)).tuned.endswith("tuned on validation")


def test_a_run_without_the_file_is_post_processed_as_before(tuned):
    cfg = load_run_config(RUN)
    assert post_processing(RUN, cfg) == ("watershed", {"min_size": MIN_SIZE, "min_confidence": MIN_CONFIDENCE}, "",
                                         "")
    assert post_processing(RUN, cfg, "cc", 0, 0.5)[:3] == ("cc", {"min_size": 0, "min_confidence": 0.5}, "")
    cfg.loss, cfg.borders = "LovaszHingeLoss", True
    assert post_processing(RUN, cfg)[:2] == ("borders", {"min_size": MIN_SIZE, "min_confidence": 0.0})
    val.main(["--name", RUN, "--no_overlays", *CPU])
    assert not os.path.exists(tuned / "models" / RUN / TUNED_FILE)


def test_bundle_carries_the_choice_for_its_fp16_weights(tuned, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    val.main(["--name", RUN, "--tune", *CPU])
    chosen = record(tuned / "models" / RUN / TUNED_FILE)
    bundle.main(["--name", RUN, "--as", "bundled"])
    assert post_processing("bundled", load_run_config("bundled"))[:3] == post_processing(RUN, load_run_config(RUN))[:3]
    assert record(tmp_path / "pretrained" / "bundled" / TUNED_FILE)["dsb"] == chosen["dsb"]
    os.remove(tuned / "models" / RUN / TUNED_FILE)  # bundled again without one: the earlier choice goes
    bundle.main(["--name", RUN, "--as", "bundled"])
    assert not os.path.exists(tmp_path / "pretrained" / "bundled" / TUNED_FILE)


def test_a_file_that_kept_the_defaults_is_not_said_to_tune(tuned):
    """--tune that kept the defaults (its best's gain within the images' spread) writes them: val.py and predict.py
    then post-process as without the file, and do not say "tuned on validation"."""
    path = tuned / "models" / RUN / TUNED_FILE
    sha = sha256_file(str(tuned / "models" / RUN / "model.pth"))
    path.write_text(f"separation: watershed\nmin_confidence: {MIN_CONFIDENCE}\nweights_sha256: {sha}\n")
    assert post_processing(RUN, load_run_config(RUN)) == (
        "watershed", {"min_size": MIN_SIZE, "min_confidence": MIN_CONFIDENCE}, "", "")
    path.write_text(f"separation: cc\nmin_confidence: {MIN_CONFIDENCE}\nweights_sha256: {sha}\n")
    assert post_processing(RUN, load_run_config(RUN))[::2] == ("cc", "separation tuned on validation")
