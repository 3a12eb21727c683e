"""Every bad input gets one clear message naming the flag or file, the right exit code, and no traceback.

Each case runs the real script file (train.py / val.py, as ``__main__``) in its own process, in one prepared
temporary directory. The processes are forked, four at a time, from one interpreter that has done the expensive
imports once (see ZYGOTE); a few cases are also run by fresh ``python script.py`` interpreters and must give the
same result. Each parametrized test checks its own case's exit code and message.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import synthetic
from archs import build_model
from config import parse_train_args, save_run_config
from conftest import ZYGOTE_FORK
from utils import clipped

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--input_w", "32", "--input_h", "32"]
SMALL = [*SIZE, "--arch", "UNet", "--epochs", "1", "-b", "2", "--num_workers", "0", "--device", "cpu"]


def train(*args, dataset="good"):
    """A small train.py command line, 32x32 unless ``args`` crop."""
    return ["train.py", "--dataset", dataset, *(SMALL[len(SIZE):] if "--crop_size" in args else SMALL), *args]


# id: (command, expected exit code, strings that the error message must contain)
CASES = {
    "missing_dataset": (train(dataset="nowhere"), 1, ["inputs/nowhere/images", "not found"]),
    "empty_image_folder": (train(dataset="empty"), 1, ["no .png images", "inputs/empty/images"]),
    "empty_class_folder": (train(dataset="empty0"), 1, ["no .png masks in inputs/empty0/masks/0",
                                                         "give every image its mask there, named like it"]),
    "images_without_masks": (train(dataset="nomask"), 1, ["have no mask", "syn_0001", "syn_0002"]),
    "masks_without_images": (train(dataset="noimg"), 1, ["have no image", "syn_0003", "syn_0004"]),
    "mask_files_beside_class_folders": (train(dataset="straymask"), 1, ["straymask/masks holds both class folders (0)",
                                                                      "preview", "move the other kind out"]),
    # no 'extra' without a mask; two images split by name
    "folder_named_like_an_image": (train(dataset="dirimage"), 1, ["has 2 samples", "--split_file", "'train'", "'val'"]),
    "one_image": (train(dataset="single"), 1, ["has 1 sample;", "cut it into tiles", "its mask alike"]),
    "truncated_image_cached": (train("--cache", "True", dataset="trunc"), 1, ["trunc/images/syn_0002.png"]),
    "truncated_image_uncached": (train("--cache", "False", dataset="trunc"), 1, ["trunc/images/syn_0002.png"]),
    "truncated_image_uncached_worker": (train("--cache", "False", "--num_workers", "1", dataset="trunc"), 1,
                                        ["trunc/images/syn_0002.png"]),
    "mask_other_size": (train(dataset="msize"), 1, ["msize/masks/0/syn_0001.png", "16x16", "32x32"]),
    "mask_values": (train(dataset="mvals"), 1, ["mvals/masks/0/syn_0001.png", "128", "0/255"]),
    "all_masks_empty_cached": (train("--cache", "True", dataset="blank"), 1, ["every training mask is empty",
                                                                            "inputs/blank/masks/0/syn_0"]),
    "all_masks_empty_uncached": (train("--cache", "False", dataset="blank"), 1, ["every training mask is empty"]),
    "file_name_not_utf8": (train(dataset="latin1"), 1, ["latin1/images/Zellkern_\\xe4.png is not valid UTF-8",
                                                        "rename it"]),
    "image_with_another_extension": (train(dataset="upper"), 1, ["1 mask has no image", "syn_0002"]),
    "num_classes_mismatch": (train("--num_classes", "2"), 2, ["--num_classes 2", "['0']"]),
    "wrong_img_ext": (train("--img_ext", ".jpg"), 1, ["no .jpg images", "--img_ext", ".png"]),
    "image_smaller_than_crop": (train("--crop_size", "64"), 2, ["--crop_size 64", "32x32"]),
    "unknown_arch": (train("--arch", "UNet3000"), 2, ["--arch", "UNet3000", "NestedUNet"]),
    "unknown_loss": (train("--loss", "Hinge"), 2, ["--loss", "Hinge", "BCEDiceLoss"]),
    "unknown_optimizer": (train("--optimizer", "Lion"), 2, ["--optimizer", "Lion", "Adam"]),
    "unknown_scheduler": (train("--scheduler", "Cyclic"), 2, ["--scheduler", "Cyclic", "CosineAnnealingLR"]),
    "zero_epochs": (train("--epochs", "0"), 2, ["--epochs", "0"]),
    "negative_batch": (train("-b", "-1"), 2, ["--batch_size", "-1"]),
    "zero_input_w": (train("--input_w", "0"), 2, ["--input_w", "0"]),
    "non_numeric_epochs": (train("--epochs", "ten"), 2, ["--epochs", "ten"]),
    "dataset_given_as_a_path": (train(dataset="inputs/good"), 2, ["--dataset inputs/good", "not a path",
                                                                  "--dataset good"]),
    "extension_without_dot": (train("--img_ext", "png"), 2, ["--img_ext", "with its dot, such as .png"]),
    "val_extension_without_dot": (["val.py", "--name", "pctrun", "--mask_ext", "tif"], 2,
                                  ["--mask_ext", "with its dot, such as .tif"]),
    "batch_larger_than_train_set": (train("-b", "16"), 2, ["--batch_size 16", "8 training images"]),
    "val_size_leaves_no_training_image": (train("--val_size", "0.95"), 2, ["--val_size 0.95", "empty part",
                                                                          "(each rounded up: 0 to train, 10 to "
                                                                          "validate)", "smaller fractions"]),
    "cuda_without_gpu": (train("--device", "cuda"), 2, ["--device cuda", "--device cpu"]),
    "cuda_index_without_gpu": (train("--device", "cuda:3"), 2, ["--device cuda:3 was asked for"]),
    "init_unknown_run": (train("--init", "ghost"), 2, ["--init ghost", "models/ghost/model.pth"]),
    "init_other_network": (train("--arch", "NestedUNet", "--init", "unet.pth"), 1,
                           ["--init unet.pth", "different network", "--arch"]),
    "init_from_the_run_itself": (train("--name", "nomodel", "--init", "nomodel", "--overwrite"), 2,
                                 ["--init nomodel lies in models/nomodel/", "another --name"]),
    "init_bundled_into_its_own_name": (train("--init", "nuclei", "--name", "nuclei"), 2,
                                       ["--init nuclei --name nuclei", "pretrained/nuclei/", "another --name"]),
    "init_other_network_of_a_run": (train("--arch", "NestedUNet", "--input_channels", "1", "--init", "pctrun",
                                          "--normalization", "percentile"), 2,
                                    ["--init pctrun was trained with --arch UNet --input_channels 3",
                                     "(not --arch NestedUNet --input_channels 1)"]),
    "init_a_run_folder": (train("--init", "models/pctrun"), 2, ["--init models/pctrun is a run's folder",
                                                                 "give its name, --init pctrun"]),
    "init_a_run_folder_elsewhere": (train("--init", "elsewhere/pct run"), 2,
                                    ["give its weights, --init 'elsewhere/pct run/model.pth'"]),
    "init_without_borders_for_borders": (train("--init", "partrun", "--borders", "True"), 2,
                                         ["--init partrun was trained with --borders False", "(not --borders True)"]),
    "init_other_normalization": (train("--init", "pctrun"), 2, ["--init pctrun", "--normalization percentile"]),
    "init_other_num_classes": (train("--init", "tworun"), 2, ["--init tworun was trained with --num_classes 2",
                                                              "(not --num_classes 1)"]),
    "init_file_of_other_num_classes": (train("--init", "models/tworun/model.pth"), 2,
                                       ["--init models/tworun/model.pth was trained with --num_classes 2",
                                        "(not --num_classes 1)"]),
    "unknown_normalization": (train("--normalization", "zscore"), 2, ["--normalization", "zscore", "percentile"]),
    "negative_balance": (train("--balance", "-0.5"), 2, ["--balance", "-0.5"]),
    "two_input_channels": (train("--input_channels", "2"), 2, ["--input_channels must be 1 (grey) or 3 (RGB)"]),
    "negative_min_lr": (train("--min_lr", "-1"), 2, ["--min_lr must be between 0 and --lr", "got -1.0"]),
    "min_lr_above_lr": (train("--min_lr", "0.1"), 2, ["--min_lr must be between 0 and --lr 0.001"]),
    "negative_gamma": (train("--scheduler", "MultiStepLR", "--gamma", "-1"), 2, ["--gamma must be in (0, 1]"]),
    "lr_not_a_number": (train("--lr", "nan"), 2, ["--lr must be above 0", "got nan"]),
    "negative_momentum": (train("--optimizer", "SGD", "--momentum", "-1"), 2, ["--momentum must be in [0, 1)"]),
    "negative_weight_decay": (train("--weight_decay", "-1"), 2, ["--weight_decay must be 0 or more"]),
    "factor_above_one": (train("--scheduler", "ReduceLROnPlateau", "--factor", "2"), 2, ["--factor must be"]),
    "negative_seed": (train("--seed", "-1"), 2, ["--seed must be in [0, 2^32)"]),
    "negative_split_seed": (train("--split_seed", "-1"), 2, ["--split_seed must be in [0, 2^32)"]),
    "infinite_balance": (train("--balance", "inf"), 2, ["--balance must be between 0 (uniform) and 1"]),
    "nesterov_without_momentum": (train("--optimizer", "SGD", "--nesterov", "True", "--momentum", "0"), 2,
                                  ["--nesterov True needs a --momentum above 0"]),
    "device_loader_without_cache": (train("--loader", "device", "--cache", "False"), 2,
                                    ["--loader device", "--cache False", "--loader workers"]),
    "milestone_zero": (train("--scheduler", "MultiStepLR", "--milestones", "0,2"), 2, ["--milestones", "from 1"]),
    "bottleneck_of_one_value": (train("--input_w", "16", "--input_h", "16", "-b", "1"), 2,
                                ["16-pixel images in batches of 1", "--batch_size 2"]),
    "unet_with_deep_supervision": (train("--deep_supervision", "True"), 2, ["UNet has no deep supervision",
                                                                            "--arch NestedUNet"]),
    "val_without_model": (["val.py", "--name", "nomodel", "--device", "cpu"], 2, ["models/nomodel/model.pth"]),
    "val_unknown_run": (["val.py", "--name", "ghost", "--device", "cpu"], 2, ["ghost", "models/ghost/config.yml"]),
    "val_misspelt_run": (["val.py", "--name", "pctrum", "--device", "cpu"], 2, ["models/pctrum/config.yml not found "
                                                                                "(did you mean pctrun?)"]),
    "val_misspelt_bundled_run": (["val.py", "--name", "Nuclei", "--device", "cpu"], 2,
                                 ["(did you mean nuclei, the bundled model?)"]),
    "val_run_of_a_moved_dataset": (["val.py", "--name", "movedrun", "--device", "cpu"], 1,
                                   ["run movedrun was trained on inputs/moved, which is not there: put it back",
                                    "--dataset <set>"]),
    "resume_run_of_a_moved_dataset": (["train.py", "--resume", "movedrun"], 1,
                                      ["--resume movedrun: the dataset inputs/moved is not there",
                                       "give --dataset with the folder's name or path now"]),
    "val_run_without_split": (["val.py", "--name", "pctrun", "--device", "cpu"], 2,
                              ["models/pctrun/split.csv not found", "--dataset <set>"]),
    "val_split_ids_missing_from_the_dataset": (["val.py", "--name", "partrun", "--device", "cpu"], 1,
                                               ["1 of the 3 val images in models/partrun/split.csv is not in "
                                                "inputs/good", "syn_0042", "--dataset <set>"]),
    "val_weights_of_another_network": (["val.py", "--name", "archrun", "--device", "cpu"], 1,
                                       ["models/archrun/model.pth does not match the run's config.yml",
                                        "tensors missing", "its arch, deep_supervision"]),
    "val_run_of_the_original": (["val.py", "--name", "origrun", "--dataset", "good", "--device", "cpu"], 2,
                                ["models/origrun/config.yml is the original pytorch-nested-unet's config.yml",
                                 "train the model again here"]),
    "init_from_a_run_of_the_original": (train("--init", "origrun"), 2, ["models/origrun/config.yml is the original"]),
    "name_with_dots": (train("--name", "../x"), 2, ["--name", "../x"]),
    "name_absolute": (train("--name", "/tmp/x"), 2, ["--name", "/tmp/x"]),
    "name_empty": (train("--name", ""), 2, ["--name is empty", "or leave it out"]),
    "name_leading_dash": (train("--name=-run"), 2, ["--name '-run' must not start with '-'", "give --name run"]),
    "name_trailing_space": (train("--name", "run "), 2, ["--name 'run ' must not", "give --name run"]),
    "resume_a_path": (["train.py", "--resume", "models/run/"], 2, ["--resume 'models/run/' must be a plain name"]),
    "init_empty": (train("--init", ""), 2, ["--init is empty", "start from scratch"]),
    "init_the_current_folder": (train("--init", "."), 2, ["--init . is a folder; give a run name"]),
    "val_name_slash": (["val.py", "--name", "/"], 2, ["must be a plain name such as 'dsb2018_96_NestedUNet_wDS'"]),
    "val_split_read_with_another_extension": (["val.py", "--name", "partrun", "--img_ext", ".tif", "--device", "cpu"],
                                              1, ["no .tif images in inputs/good/images", "pass --img_ext .png"]),
    "val_name_of_the_run_folder": (["val.py", "--name", "models/pctrun/"], 2,
                                   ["--name 'models/pctrun/' must be a plain name such as 'pctrun'"]),
    "val_name_with_dots": (["val.py", "--name", "../x"], 2, ["--name", "../x"]),
    "val_output_is_a_file": (["val.py", "--name", "pctrun", "--output", "unet.pth"], 2,
                             ["--output unet.pth", "is not a folder", "choose another --output"]),
    "predict_output_is_a_file": (["predict.py", "--name", "pctrun", "--input", "inputs/good/images", "--output",
                                  "unet.pth"], 2, ["--output unet.pth", "is a file", "folder"]),
    "resume_with_another_lr": (["train.py", "--name", "nomodel", "--resume", "--lr", "0.5"], 2,
                               ["--lr 0.5", "differs", "--init nomodel"]),
}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _prepare(root):
    """inputs/good (10 synthetic 32x32 samples) and one broken variant of it per data error; models/nomodel."""
    good = root / "inputs" / "good"
    synthetic.generate_synthetic(str(good), num_images=10, size=32)
    (root / "inputs" / "empty" / "images").mkdir(parents=True)
    (root / "inputs" / "empty" / "masks" / "0").mkdir(parents=True)
    d = _copy(good, root / "inputs" / "nomask")
    for i in ("syn_0001", "syn_0002"):
        os.remove(d / "masks" / "0" / f"{i}.png")
    d = _copy(good, root / "inputs" / "noimg")
    for i in ("syn_0003", "syn_0004"):
        os.remove(d / "images" / f"{i}.png")
    d = _copy(good, root / "inputs" / "empty0")
    shutil.rmtree(d / "masks" / "0")
    (d / "masks" / "0").mkdir()
    d = _copy(good, root / "inputs" / "straymask")
    shutil.copy(d / "masks" / "0" / "syn_0001.png", d / "masks" / "preview.png")
    d = _copy(good, root / "inputs" / "dirimage")  # 2 images and a folder images/extra.png/, which is no image
    for i in range(2, 10):
        for sub in ("images", "masks/0"):
            os.remove(d / sub / f"syn_000{i}.png")
    (d / "images" / "extra.png").mkdir()
    d = _copy(good, root / "inputs" / "single")  # a user's one annotated image
    for i in range(1, 10):
        for sub in ("images", "masks/0"):
            os.remove(d / sub / f"syn_000{i}.png")
    d = _copy(good, root / "inputs" / "trunc")
    data = (d / "images" / "syn_0002.png").read_bytes()
    (d / "images" / "syn_0002.png").write_bytes(data[: len(data) // 3])
    d = _copy(good, root / "inputs" / "msize")
    cv2.imwrite(str(d / "masks" / "0" / "syn_0001.png"), np.zeros((16, 16), np.uint8))
    d = _copy(good, root / "inputs" / "mvals")
    soft = np.zeros((32, 32), np.uint8)
    soft[4:12, 4:12], soft[20:28, 20:28] = 128, 255
    cv2.imwrite(str(d / "masks" / "0" / "syn_0001.png"), soft)
    d = _copy(good, root / "inputs" / "upper")
    os.rename(d / "images" / "syn_0002.png", d / "images" / "syn_0002.PNG")
    d = _copy(good, root / "inputs" / "blank")  # every mask empty
    for f in (d / "masks" / "0").iterdir():
        cv2.imwrite(str(f), np.zeros((32, 32), np.uint8))
    d = _copy(good, root / "inputs" / "latin1")  # a file name in Latin-1, as unzipped from a Windows archive
    for sub in ("images", "masks/0"):
        os.rename(d / sub / "syn_0001.png", os.fsdecode(os.fsencode(d / sub) + b"/Zellkern_\xe4.png"))
    # UNet weights, for --init with another network.
    torch.save(build_model("UNet", 1, 3, False).state_dict(), root / "unet.pth")
    # A run that saved its config and split but no weights yet.
    run = root / "models" / "nomodel"
    run.mkdir(parents=True)
    save_run_config(parse_train_args(["--name", "nomodel", "--dataset", "good", *SMALL]), str(run / "config.yml"))
    (run / "split.csv").write_text("img_id,split\n" + "".join(f"syn_000{i},{'val' if i > 7 else 'train'}\n"
                                                              for i in range(10)))
    # A finished UNet run trained with --normalization percentile, for --init with the default normalization.
    run = root / "models" / "pctrun"
    run.mkdir(parents=True)
    pct = parse_train_args(["--name", "pctrun", "--dataset", "good", "--normalization", "percentile", *SMALL])
    save_run_config(pct, str(run / "config.yml"))
    shutil.copy(root / "unet.pth", run / "model.pth")
    # A finished run whose split names an image its dataset no longer holds (a dataset prepared again in part).
    run = root / "models" / "partrun"
    run.mkdir(parents=True)
    save_run_config(parse_train_args(["--name", "partrun", "--dataset", "good", *SMALL]), str(run / "config.yml"))
    shutil.copy(root / "unet.pth", run / "model.pth")
    (run / "split.csv").write_text("img_id,split\n" + "".join(f"syn_000{i},train\n" for i in range(8))
                                   + "syn_0008,val\nsyn_0009,val\nsyn_0042,val\n")
    # A finished run whose dataset has been moved away since (its last.pth stands for a run to resume).
    run = root / "models" / "movedrun"
    run.mkdir(parents=True)
    save_run_config(parse_train_args(["--name", "movedrun", "--dataset", "moved", *SMALL]), str(run / "config.yml"))
    shutil.copy(root / "unet.pth", run / "model.pth")
    shutil.copy(root / "unet.pth", run / "last.pth")
    shutil.copy(root / "models" / "nomodel" / "split.csv", run / "split.csv")
    # A run whose config.yml names another network than its weights (edited by hand).
    run = root / "models" / "archrun"
    run.mkdir(parents=True)
    save_run_config(parse_train_args(["--name", "archrun", "--dataset", "good", *SMALL, "--arch", "NestedUNet"]),
                    str(run / "config.yml"))
    shutil.copy(root / "unet.pth", run / "model.pth")
    shutil.copy(root / "models" / "nomodel" / "split.csv", run / "split.csv")
    # A run of the original pytorch-nested-unet: its train.py's config.yml (yaml.dump of its flags) and weights.
    run = root / "models" / "origrun"
    run.mkdir(parents=True)
    original = {"name": "origrun", "epochs": 100, "batch_size": 16, "arch": "UNet", "deep_supervision": True,
                "input_channels": 3, "num_classes": 1, "input_w": 96, "input_h": 96, "loss": "BCEDiceLoss",
                "dataset": "good", "img_ext": ".png", "mask_ext": ".png", "optimizer": "SGD", "lr": 0.001,
                "momentum": 0.9, "weight_decay": 0.0001, "nesterov": False, "scheduler": "CosineAnnealingLR",
                "min_lr": 1e-05, "factor": 0.1, "patience": 2, "milestones": "1,2", "gamma": 0.6666666666666666,
                "early_stopping": -1, "num_workers": 4}
    (run / "config.yml").write_text(yaml.dump(original))
    shutil.copy(root / "unet.pth", run / "model.pth")
    shutil.copytree(root / "models" / "pctrun", root / "elsewhere" / "pct run")  # a run's folder outside models/
    # A finished 2-class UNet run, whose second class could pass for a border channel in a 1-class run.
    run = root / "models" / "tworun"
    run.mkdir(parents=True)
    save_run_config(parse_train_args(["--name", "tworun", "--dataset", "good", "--num_classes", "2", *SMALL]),
                    str(run / "config.yml"))
    torch.save(build_model("UNet", 2, 3, False).state_dict(), run / "model.pth")


def _argv(case_id, command):
    argv = list(command)
    if argv[0] == "train.py" and not any(a.startswith(("--name", "--resume")) for a in argv):
        argv += ["--name", case_id]
    return argv


ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")


def run_real(root, case_id, command):
    """``python <ROOT>/train.py ...`` as a fresh interpreter."""
    argv = _argv(case_id, command)
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=120)


# Importing torch and albumentations costs about two CPU seconds per interpreter, ten times what most cases need.
# So the table runs through a zygote (conftest.ZYGOTE_FORK) that forks one child per case, four at a time.
# test_zygote_matches_real_interpreter checks a few cases against real interpreters.
ZYGOTE = ZYGOTE_FORK + r"""
import config, dataset, trainer, train, val  # noqa: F401  (the expensive imports, done once)
import sklearn.model_selection, torch._dynamo  # noqa: F401  (imported by the split and the first optimizer)
cases, running, codes = json.load(sys.stdin), {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for case in cases:
    while len(running) >= 4:
        reap()
    running[fork_case(case)] = case["id"]
while running:
    reap()
print(json.dumps(codes))
"""


def run_zygote(root, commands):
    """Run {case_id: command} through the zygote; returns {case_id: CompletedProcess}."""
    out_dir = root / "_outputs"
    out_dir.mkdir()
    cases = []
    for cid, command in commands.items():
        argv = _argv(cid, command)
        cases.append({"id": cid, "script": str(ROOT / argv[0]), "args": argv[1:], "cwd": str(root),
                      "out": str(out_dir / f"{cid}.out"), "err": str(out_dir / f"{cid}.err")})
    z = subprocess.run([sys.executable, "-c", ZYGOTE], input=json.dumps(cases), cwd=root, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert z.returncode == 0, z.stderr[-3000:]
    codes = json.loads(z.stdout.strip().splitlines()[-1])
    return {c["id"]: subprocess.CompletedProcess([c["script"], *c["args"]], codes[c["id"]],
                                                 open(c["out"]).read(), open(c["err"]).read()) for c in cases}


# Not a bad-input case: --debug must bring the traceback back (here for a data error raised in a worker).
DEBUG_COMMAND = train("--cache", "False", "--num_workers", "1", "--debug", dataset="trunc")
# Checked against real interpreters too: an argparse error, a data error from a DataLoader worker, val.py.
REAL = ["non_numeric_epochs", "truncated_image_uncached_worker", "val_unknown_run"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    _prepare(root)
    return root


@pytest.fixture(scope="module")
def results(root):
    commands = {cid: cmd for cid, (cmd, _, _) in CASES.items()}
    commands["debug"] = DEBUG_COMMAND
    return run_zygote(root, commands)


def message_lines(stderr):
    """stderr without the progress bars tqdm may have drawn before the error."""
    lines = []
    for line in stderr.splitlines():
        line = line.split("\r")[-1].strip()
        if line and not ("it/s]" in line or "s/it]" in line or "|" in line):
            lines.append(line)
    return lines


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_gives_one_clear_line(results, case_id):
    command, code, needles = CASES[case_id]
    r = results[case_id]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = message_lines(r.stderr)
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith(f"{command[0]}: error: "), lines
    message = " ".join(lines)
    for needle in needles:
        assert needle in message, (needle, message)


def test_an_image_left_out_for_its_extension_is_named_before_its_mask_s_error(results):
    """images/syn_0002.PNG beside .png images: the note naming it comes before the error that its mask has no
    image, which it explains."""
    r = results["image_with_another_extension"]
    assert "left out: syn_0002.PNG" in r.stdout, r.stdout


# Cases that fail while the run is being set up (split, loaders, network), after models/<name>/ was made.
SET_UP_FAILURES = ["init_unknown_run", "init_other_network", "image_smaller_than_crop", "batch_larger_than_train_set",
                   "truncated_image_cached", "mask_other_size", "mask_values"]


@pytest.mark.parametrize("case_id", SET_UP_FAILURES)
def test_failed_set_up_leaves_no_run_folder(root, results, case_id):
    """A new run that stops on bad input before training leaves nothing in models/ (no need for --overwrite)."""
    assert results[case_id].returncode != 0
    assert not (root / "models" / case_id).exists()


def test_init_from_the_run_being_replaced_keeps_that_run(root, results):
    assert results["init_from_the_run_itself"].returncode == 2
    assert (root / "models" / "nomodel" / "config.yml").is_file()


def test_debug_shows_the_traceback(results):
    r = results["debug"]
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "DataError" in r.stderr and "syn_0002.png" in r.stderr


@pytest.mark.parametrize("case_id", REAL)
def test_zygote_matches_real_interpreter(root, results, case_id):
    """The same case run by a fresh ``python script.py`` gives the same exit code and message."""
    command = CASES[case_id][0]
    real = run_real(root, case_id, [*command, "--name", f"real_{case_id}"] if command[0] == "train.py" else command)
    assert real.returncode == results[case_id].returncode
    assert message_lines(real.stderr) == message_lines(results[case_id].stderr)


def test_clipped_cuts_after_a_word_or_inside_a_long_first_one():
    assert clipped("a  b\nc", 10) == "a b c"
    assert clipped("alpha beta gamma delta", 14) == "alpha beta..."
    assert clipped("alpha beta gamma", 13) == "alpha beta..."  # a cut at a word's end keeps the word
    assert clipped("x" * 150 + " tail", 100) == "x" * 97 + "..."
