"""Tests for runs.py: the table of runs, against log.csv, split.csv and evaluation files written by hand here (each
value computed again from them), the state of each run, and the runs it lists or leaves out."""
import hashlib
import os

import pandas as pd
import pytest
import yaml

import runs
from config import run_lock_file
from conftest import held_by_another_process

LOG_COLUMNS = "epoch,lr,loss,iou,val_loss,val_iou,val_dice,val_iou_mean,val_dice_mean,seconds"


def make_run(name, val_ious, epochs=None, early_stopping=-1, val_ids=("v1", "v2"), train_ids=("t1", "t2"),
             parent="models", **config):
    """A run folder as train.py leaves it, written by hand: config.yml, log.csv with ``val_ious`` (one epoch each;
    val Dice 0.1 above, mean IoU 0.05 below, 1800 s an epoch), split.csv and model.pth (bytes of its name)."""
    folder = os.path.join(parent, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yml"), "w") as f:
        yaml.safe_dump({"name": name, "arch": "UNet", "dataset": "synthetic", "epochs": epochs or len(val_ious),
                        "early_stopping": early_stopping, **config}, f)
    rows = [f"{e + 1},0.001,1,0.5,1,{v},{v + 0.1},{v - 0.05},{v},1800" for e, v in enumerate(val_ious)]
    with open(os.path.join(folder, "log.csv"), "w") as f:
        f.write("\n".join([LOG_COLUMNS, *rows]) + "\n")
    pd.DataFrame({"img_id": [*train_ids, *val_ids], "split": ["train"] * len(train_ids) + ["val"] * len(val_ids)}) \
        .to_csv(os.path.join(folder, "split.csv"), index=False)
    with open(os.path.join(folder, "model.pth"), "wb") as f:
        f.write(name.encode())
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder, with no bundled run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    return tmp_path


def test_the_table_holds_each_runs_best_epoch_and_groups_runs_by_their_validation_images(workdir, capsys):
    make_run("low", [0.5, 0.6])
    make_run("high", [0.7, 0.8, 0.8], val_ids=("v2", "v1"), train_ids=("t9",))  # the same val images
    make_run("other", [0.9], val_ids=("v1", "v3"))
    table = runs.main([])
    names = list(table["name"])
    assert names[names.index("high") + 1] == "low"  # together, the best first
    high = table.set_index("name").loc["high"]
    assert high["best_epoch"] == 2  # the first of two equal epochs, whose weights model.pth keeps
    assert (high["val_iou"], high["val_dice"], high["val_iou_mean"]) == pytest.approx((0.8, 0.9, 0.75))
    assert high["hours"] == pytest.approx(1.5)
    fingerprint = hashlib.sha256(b"v1\nv2").hexdigest()[:8]
    assert list(table.set_index("name").loc[["high", "low"], "val_split"]) == [fingerprint] * 2
    assert table.set_index("name").loc["other", "val_split"] != fingerprint
    printed = capsys.readouterr().out
    assert "validated on 2 different sets of images" in printed and "0.8000" in printed


def test_each_runs_state(workdir):
    make_run("done", [0.5, 0.6])
    make_run("stopped", [0.5, 0.6], epochs=10)
    make_run("patience_ran_out", [0.7, 0.6, 0.65], epochs=10, early_stopping=2)
    make_run("patient", [0.7, 0.6, 0.65], epochs=10, early_stopping=3)
    make_run("fresh", [], epochs=10)
    make_run("busy", [0.5], epochs=10)
    with held_by_another_process(run_lock_file("busy")):
        states = runs.main([]).set_index("name")["state"].to_dict()
    assert states == {"done": "finished", "stopped": "stopped", "patience_ran_out": "early-stopped",
                      "patient": "stopped", "fresh": "no epoch", "busy": "training"}
    assert runs.main(["busy"])["state"].tolist() == ["stopped"]  # the train.py that held it ended


def test_evaluations_are_listed_with_their_means_and_marked_when_the_weights_changed(workdir):
    make_run("r", [0.5])
    weights = hashlib.sha256(b"r").hexdigest()
    for out, sha, scores in (("r", weights, {"iou": [0.4, 0.6], "dsb": [0.2, 0.3]}),
                             ("r_on_test", "0" * 64, {"iou": [0.1, 0.2]}),
                             ("someone_else", weights, {"iou": [0.9]})):
        os.makedirs(os.path.join("outputs", out))
        with open(os.path.join("outputs", out, "evaluation.yml"), "w") as f:
            yaml.safe_dump({"run": "someone" if out == "someone_else" else "r", "weights_sha256": sha}, f)
        pd.DataFrame(scores).to_csv(os.path.join("outputs", out, "scores.csv"), index=False)
    assert runs.main([])["evaluations"].tolist() == ["r IoU 0.5000, DSB 0.250; r_on_test IoU 0.1500, older weights"]


def test_which_runs_are_listed(workdir, capsys):
    make_run("dsb_a", [0.5])
    make_run("dsb_b", [0.5])
    make_run("syn", [0.5])
    make_run(".dsb_c.replaced", [0.5])  # kept aside by --overwrite
    make_run("nuclei", [0.5], parent=runs.PRETRAINED_DIR)  # bundled, and hidden by models/nuclei below
    make_run("bundled", [0.5], parent=runs.PRETRAINED_DIR)
    os.makedirs(os.path.join("models", "not_a_run"))
    assert runs.main(["dsb_*"])["name"].tolist() == ["dsb_a", "dsb_b"]
    assert sorted(runs.main([])["name"]) == ["bundled", "dsb_a", "dsb_b", "nuclei", "syn"]
    assert runs.main(["bundled"])["where"].tolist() == ["pretrained"]
    make_run("nuclei", [0.5])
    assert runs.main(["nuclei"])["where"].tolist() == ["models"]
    capsys.readouterr()
    assert runs.main(["x*"]).empty
    assert "no runs matching x* in models/" in capsys.readouterr().out


def test_a_run_whose_config_cannot_be_read_gets_a_row_saying_why(workdir, tmp_path):
    make_run("good", [0.5])
    make_run("bad", [0.5], epochs=3, arch="NoSuchNet")
    pd.DataFrame({"epoch": [1], "loss": [0.5]}).to_csv(os.path.join(make_run("odd_log", [0.5]), "log.csv"), index=False)
    table = runs.main(["--csv", str(tmp_path / "runs.csv")]).set_index("name")
    assert table.loc["bad", "state"].startswith("unreadable:") and "NoSuchNet" in table.loc["bad", "state"]
    assert table.loc["odd_log", "state"] == (f"unreadable: {os.path.join('models', 'odd_log', 'log.csv')} has no "
                                             "val_iou column: not a log.csv written by train.py")
    written = pd.read_csv(tmp_path / "runs.csv").set_index("name")
    assert written.loc["good", "val_iou"] == pytest.approx(0.5) and written.loc["good", "state"] == "finished"


def test_each_evaluation_is_read_once_however_many_runs_the_table_holds(workdir, monkeypatch):
    names = [f"r{i}" for i in range(4)]
    for name in names:
        make_run(name, [0.5])
        os.makedirs(os.path.join("outputs", name))
        with open(os.path.join("outputs", name, "evaluation.yml"), "w") as f:
            yaml.safe_dump({"run": name, "weights_sha256": hashlib.sha256(name.encode()).hexdigest()}, f)
        pd.DataFrame({"iou": [0.25 * int(name[1:])]}).to_csv(os.path.join("outputs", name, "scores.csv"), index=False)
    read, read_csv = [], pd.read_csv
    monkeypatch.setattr(runs.pd, "read_csv", lambda path, **kw: read.append(str(path)) or read_csv(path, **kw))
    table = runs.main([]).set_index("name")
    wanted = [os.path.join("outputs", n, "scores.csv") for n in names]
    assert sorted(p for p in read if p.endswith("scores.csv")) == wanted  # not once per run and output folder
    assert [table.loc[n, "evaluations"] for n in names] == [f"{n} IoU {0.25 * i:.4f}" for i, n in enumerate(names)]


def test_each_evaluation_says_which_images_it_scored_whatever_its_folder_is_called(workdir):
    make_run("r", [0.5])
    weights = hashlib.sha256(b"r").hexdigest()
    for out, record, iou in (("r", {"split": "val"}, 0.5), ("final", {"split": "test"}, 0.25),
                             ("flips", {"split": "val", "settings": {"tta": True}}, 0.75),
                             ("elsewhere", {"split": "every image", "dataset": "/data/stage1_test/"}, 0.125)):
        os.makedirs(os.path.join("outputs", out))
        with open(os.path.join("outputs", out, "evaluation.yml"), "w") as f:
            yaml.safe_dump({"run": "r", "weights_sha256": weights, **record}, f)
        pd.DataFrame({"iou": [iou]}).to_csv(os.path.join("outputs", out, "scores.csv"), index=False)
    assert runs.main([])["evaluations"].tolist() == [
        "elsewhere (every image of stage1_test) IoU 0.1250; final (test) IoU 0.2500; flips (val, TTA) IoU 0.7500; "
        "r (val) IoU 0.5000"]


def test_an_unreadable_runs_reason_is_printed_below_the_table_not_in_it(workdir, capsys):
    make_run("good", [0.5])
    make_run("bad", [0.5], arch="NoSuchNet")
    table = runs.main([]).set_index("name")
    lines = capsys.readouterr().out.splitlines()
    assert table.loc["bad", "state"].startswith("unreadable:")  # the DataFrame (and --csv) keep the reason
    assert len(lines[0]) < 200 and all("NoSuchNet" not in line for line in lines[:3])
    assert lines[3] == f"bad: {table.loc['bad', 'state']}"


def test_runs_without_a_split_csv_are_named_as_comparable_with_none(workdir, capsys):
    """Two older runs without split.csv: their val_split is blank, and a note says that the images that validated
    them are unknown, not that they share a set of images with each other."""
    for name in ("old_a", "old_b"):
        os.remove(os.path.join(make_run(name, [0.5]), "split.csv"))
    make_run("new", [0.6])
    table = runs.main([])
    assert table.set_index("name").loc[["old_a", "old_b"], "val_split"].tolist() == ["", ""]
    printed = capsys.readouterr().out
    assert "note: old_a, old_b have no split.csv (older runs), so the images they were validated on are unknown" \
        in printed and "different sets of images" not in printed


def test_a_run_ended_by_early_stopping_0_or_after_nan_val_scores_is_early_stopped(workdir):
    """train.py stops a run whose best val IoU is ``--early_stopping`` epochs old, 0 included (it stops after the
    first epoch), and a NaN val IoU never improves on the best: both runs are over (``--resume`` refuses them), not
    'stopped'. A NaN after the best counts as a stale epoch: 0.7, NaN, 0.6, 0.65 is 3 epochs past its best."""
    make_run("patience_0", [0.5], epochs=10, early_stopping=0)
    make_run("nan_then_stale", [0.7, float("nan"), 0.6, 0.65], epochs=10, early_stopping=3)
    make_run("nan_first", [float("nan"), 0.5, 0.4], epochs=10, early_stopping=2)  # the best is 0.5: 1 stale epoch
    make_run("all_nan", [float("nan")] * 3, epochs=10, early_stopping=3)  # no val IoU ever beat train.py's -1
    states = runs.main([]).set_index("name")["state"].to_dict()
    assert states == {"patience_0": "early-stopped", "nan_then_stale": "early-stopped", "nan_first": "stopped",
                      "all_nan": "early-stopped"}


def test_evaluations_whose_weights_are_not_recorded_or_whose_run_has_none_yet(workdir, capsys):
    """An evaluation.yml of a val.py older than its weights_sha256 key says nothing about the weights: not marked
    'older weights'. A run re-made under the same name that has saved no model.pth yet (its first epoch trains)
    keeps its row, 'no epoch', and the evaluation of the weights it replaced is marked 'older weights'."""
    make_run("old", [0.5])
    make_run("remade", [], epochs=10)
    os.remove(os.path.join("models", "remade", "model.pth"))
    for out, record in (("old", {"run": "old", "split": "val"}),
                        ("remade", {"run": "remade", "split": "val", "weights_sha256": "0" * 64})):
        os.makedirs(os.path.join("outputs", out))
        with open(os.path.join("outputs", out, "evaluation.yml"), "w") as f:
            yaml.safe_dump(record, f)
        pd.DataFrame({"iou": [0.5]}).to_csv(os.path.join("outputs", out, "scores.csv"), index=False)
    table = runs.main([]).set_index("name")
    assert table.loc["old", "evaluations"] == "old (val) IoU 0.5000"
    assert table.loc["remade", "state"] == "no epoch"
    assert table.loc["remade", "evaluations"] == "remade (val) IoU 0.5000, older weights"


def test_an_evaluation_yml_that_is_not_utf8_is_left_out(workdir):
    """outputs/ is the user's too: an evaluation.yml saved by an editor in Latin-1 is not val.py's, and is left out
    as an unreadable one is, not a traceback that hides the table."""
    make_run("r", [0.5])
    os.makedirs(os.path.join("outputs", "edited"))
    with open(os.path.join("outputs", "edited", "evaluation.yml"), "wb") as f:
        f.write("run: r\nsplit: val\nnote: caf\u00e9\n".encode("latin-1"))
    pd.DataFrame({"iou": [0.5]}).to_csv(os.path.join("outputs", "edited", "scores.csv"), index=False)
    assert runs.main([])["evaluations"].tolist() == [""]
