"""Tests for config.py: train.py's flags, --config YAML recipes, names and argument checks."""
import functools
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch._dynamo.exc
import yaml

import conftest
import train
import utils
from conftest import ROOT, write_cgroups
from optim import build_scheduler
from config import (build_train_parser, check_unchanged_on_resume, dataset_folder, default_run_name, parse_train_args,
                    read_run_config, read_yaml_config, save_run_config, schedule_note, unused_flags_note)
from utils import ArgumentParser, UsageError, run_cli


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_are_the_seed_ones():
    a = parse_train_args([])
    assert (a.arch, a.dataset, a.epochs, a.batch_size, a.input_w, a.input_h) == ("NestedUNet", "dsb2018_96", 100,
                                                                                 16, 96, 96)
    assert a.deep_supervision is False and a.val_size == 0.2 and a.split_seed == 41 and a.test_size == 0.0
    assert a.name == "dsb2018_96_NestedUNet_woDS"
    assert a.normalization == "fixed"  # 8-bit / 255, as the seed divided
    assert parse_train_args(["-a", "UNet", "-b", "4"]).arch == "UNet"  # the seed's short flags


def test_normalization_flag():
    assert parse_train_args(["--normalization", "percentile"]).normalization == "percentile"


def test_yaml_config_loads_and_flags_override(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", {"arch": "NestedUNet", "epochs": 7, "batch_size": 4,
                                          "deep_supervision": True, "lr": 0.05, "dataset": "mine", "input_w": 64})
    a = parse_train_args(["--config", cfg])
    assert (a.arch, a.epochs, a.batch_size, a.deep_supervision, a.lr, a.dataset, a.input_w) == \
        ("NestedUNet", 7, 4, True, 0.05, "mine", 64)
    assert a.input_h == 96  # untouched keys keep their defaults
    b = parse_train_args(["--config", cfg, "--epochs", "3", "--deep_supervision", "False", "-b", "2",
                          "--arch", "UNet"])
    assert (b.epochs, b.deep_supervision, b.batch_size, b.arch, b.lr) == (3, False, 2, "UNet", 0.05)
    assert b.name == "mine_UNet_woDS"
    with pytest.raises(UsageError, match="UNet has no deep supervision"):  # refused with the flags, not later
        parse_train_args(["--config", cfg, "--arch", "UNet"])
    # the flag may come before --config too
    c = parse_train_args(["--epochs", "5", "--config", cfg])
    assert c.epochs == 5
    # a key may be any long name of its flag, as on the command line
    d = parse_train_args(["--config", write_yaml(tmp_path / "alias.yml", {"learning_rate": 0.02})])
    assert d.lr == 0.02
    # a YAML list as the command line's comma-separated values
    e = parse_train_args(["--config", write_yaml(tmp_path / "steps.yml", {"milestones": [10, 20]})])
    assert e.milestone_list == [10, 20]


def test_a_recipe_value_is_read_as_written_as_on_the_command_line(tmp_path):
    """YAML would read the name no as False, 012 as 10 (octal) and 0001 as 1; the parser gets the text."""
    recipe = tmp_path / "r.yml"
    recipe.write_text("name: no\ndataset: '0001'\nepochs: 012\ndeep_supervision: on\nlr: 1e-3\ninit: null\n")
    args = parse_train_args(["--config", str(recipe)])
    assert (args.name, args.dataset, args.epochs, args.deep_supervision, args.lr, args.init) == \
        ("no", "0001", 12, True, 0.001, None)
    recipe.write_text("name: 012\ndataset: 0001\n")
    args = parse_train_args(["--config", str(recipe)])
    assert (args.name, args.dataset) == ("012", "0001")


def test_a_saved_config_round_trips_names_as_written(tmp_path):
    """config.yml keeps a non-ASCII or YAML-ambiguous name readable and reads it back unchanged."""
    args = parse_train_args(["--name", "Zellkern_ä", "--dataset", "no"])
    save_run_config(args, str(tmp_path / "config.yml"))
    assert "name: Zellkern_ä" in (tmp_path / "config.yml").read_text(encoding="utf-8")
    saved = read_run_config(str(tmp_path / "config.yml"))
    assert (saved.name, saved.dataset) == ("Zellkern_ä", "no")


def test_repo_configs_parse():
    configs = sorted((ROOT / "configs").glob("*.y*ml"))
    for path in configs:
        parse_train_args(["--config", str(path)])


def test_a_bad_value_in_a_recipe_or_a_saved_run_names_its_file(tmp_path):
    recipe = tmp_path / "zero.yml"
    recipe.write_text("epochs: 0\n")
    with pytest.raises(UsageError, match=r"--epochs must be a positive number, got 0 \(set in --config .*zero.yml\)$"):
        parse_train_args(["--config", str(recipe)])
    for given in (["--epochs", "-1"], ["--epochs=-1"]):  # the command line's value
        with pytest.raises(UsageError, match=r"--epochs must be a positive number, got -1$"):
            parse_train_args(["--config", str(recipe), *given])
    recipe.write_text("batch_size: 0\narch: UNet\n")
    with pytest.raises(UsageError, match=r"got 0$"):  # an alias of the flag
        parse_train_args(["--config", str(recipe), "-b", "0"])
    with pytest.raises(UsageError, match=r"no deep supervision.*\(on the command line or in --config .*zero.yml\)$"):
        parse_train_args(["--config", str(recipe), "-b", "2", "--deep_supervision", "True"])
    recipe.write_text("name: runs/a\n")  # the run name's check too
    with pytest.raises(UsageError, match=r"not a path \(set in --config .*zero.yml\)$"):
        parse_train_args(["--config", str(recipe)])
    recipe.write_text("epochs: 0\n")
    with pytest.raises(UsageError, match=r"--min_lr must be between 0 and --lr 5e-06 .*got 1e-05$"):  # the default
        parse_train_args(["--config", str(recipe), "--epochs", "2", "--lr", "5e-6"])
    saved = tmp_path / "config.yml"  # a run's own config.yml, as val.py and predict.py read it: no --config flag
    saved.write_text("epochs: 0\n")
    with pytest.raises(UsageError, match=r"^\S*config.yml: --epochs must be a positive number"):
        read_run_config(str(saved))
    saved.write_text("input_w: 1600000\ninput_h: 1600000\n")  # was a cv2.error traceback, resizing the first image
    with pytest.raises(UsageError, match=r"^\S*config.yml: --input_w 1600000 and --input_h 1600000: .* more than "):
        read_run_config(str(saved))
    saved.write_text("epoch: 3\n")
    with pytest.raises(UsageError, match=r"^\S*config.yml: unknown keys epoch"):
        read_run_config(str(saved))
    recipe.write_text("optimiser: AdamW\nwarmup: 3\nfoo: 1\n")  # a typo is named with the flag it misses
    with pytest.raises(UsageError, match=r"unknown keys foo, optimiser \(did you mean optimizer\?\), warmup; see "):
        parse_train_args(["--config", str(recipe)])


def test_a_saved_run_loads_with_values_only_new_runs_are_refused(tmp_path):
    """Ranges checked when a run starts do not lock out runs an older version started (or values the run's
    optimizer and schedule never used)."""
    saved = tmp_path / "config.yml"
    saved.write_text("lr: 5.0e-06\nbalance: 12\ngamma: 1.5\nmomentum: 1.0\nloader: device\ncache: false\n"
                     "input_channels: 4\n")
    assert read_run_config(str(saved)).gamma == 1.5
    parse_train_args(["--scheduler", "CosineAnnealingLR", "--gamma", "1.5", "--optimizer", "Adam", "--momentum", "1"])
    with pytest.raises(UsageError, match="--balance must be between 0"):
        parse_train_args(["--balance", "12"])
    with pytest.raises(UsageError, match=r"--min_lr must be between 0 and --lr"):  # the plateau's floor too
        parse_train_args(["--scheduler", "ReduceLROnPlateau", "--min_lr", "inf"])


def test_yaml_unknown_key_named(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", {"epochs": 3, "deep_supervison": True})
    with pytest.raises(UsageError) as e:
        parse_train_args(["--config", cfg])
    assert "deep_supervison" in str(e.value) and cfg in str(e.value)
    with pytest.raises(UsageError, match="resume: a flag of one command, not of a recipe; give it on the command"):
        parse_train_args(["--config", write_yaml(tmp_path / "resume.yml", {"resume": True})])
    with pytest.raises(UsageError, match="auto_resume: a flag of one command, not of a recipe"):
        parse_train_args(["--config", write_yaml(tmp_path / "auto.yml", {"auto_resume": True})])


def test_a_flag_set_twice_in_a_recipe_is_refused(tmp_path):
    """YAML keeps the last of two equal keys, and two names of one flag would both apply: neither silently."""
    with pytest.raises(UsageError, match=r"twice.yml: not valid YAML \(line 3, column 1: lr is given twice\)"):
        parse_train_args(["--config", write_yaml(tmp_path / "twice.yml", "lr: 0.1\nepochs: 2\nlr: 0.01\n")])
    with pytest.raises(UsageError, match=r"alias.yml: lr and learning_rate set the same flag; keep one"):
        parse_train_args(["--config", write_yaml(tmp_path / "alias.yml", "lr: 0.1\nlearning_rate: 0.01\n")])


def test_a_flag_given_under_two_names_or_shortened_is_refused(capsys):
    """argparse keeps the last of two names of one flag, and reads a shortened name as the flag it starts: train.py
    --scale 0.5 (a predict.py flag) would train with --scale_jitter 0.5 without a word."""
    for argv, message in ((["--lr", "0.1", "--learning_rate=0.01"], "--learning_rate and --lr set the same flag"),
                          (["--scale", "0.5"], "unrecognized arguments: --scale 0.5"),
                          (["--channel", "1"], "unrecognized arguments: --channel 1")):
        with pytest.raises(SystemExit) as e:
            parse_train_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert parse_train_args(["--lr", "0.1", "--lr", "0.01"]).lr == 0.01  # one name twice: the last, as usual
    with pytest.raises(SystemExit):  # a short flag with its value attached
        parse_train_args(["-b16", "--batch_size", "8"])
    assert "--batch_size and -b set the same flag" in capsys.readouterr().err


def test_a_negative_count_in_a_recipe_names_its_flag_and_the_recipe(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", {"num_workers": -1})
    with pytest.raises(UsageError, match=r"--num_workers must not be negative, got -1 \(set in --config "):
        parse_train_args(["--config", cfg])


def test_a_yaml_syntax_error_says_where(tmp_path):
    with pytest.raises(UsageError, match=r"tab.yml: not valid YAML \(line 2, column 1: found character '\\t' that "
                                         "cannot start any token"):
        parse_train_args(["--config", write_yaml(tmp_path / "tab.yml", "epochs: 2\n\tlr: 0.1\n")])
    with pytest.raises(UsageError, match=r"indent.yml: not valid YAML \(line 2, column 4: mapping values are not "):
        parse_train_args(["--config", write_yaml(tmp_path / "indent.yml", "a: 1\n  b: 2\n")])
    for text in ("[1, 2]: 3\n", "[a]: 1\n[b]: 2\n"):
        with pytest.raises(UsageError, match=r"key.yml: not valid YAML \(line 1, column 1: found unhashable key"):
            parse_train_args(["--config", write_yaml(tmp_path / "key.yml", text)])


def test_a_saved_run_with_an_empty_split_file_loads(tmp_path):
    """Earlier versions saved 'no split file' as an empty value; such a run still loads (as having none)."""
    path = tmp_path / "config.yml"
    save_run_config(parse_train_args(["--name", "old"]), str(path))
    path.write_text(path.read_text().replace("split_file: null", "split_file: ''"))
    assert "split_file: ''" in path.read_text() and read_run_config(str(path)).split_file is None


def test_the_default_workers_count_the_cpus_the_job_was_given(monkeypatch):
    """A batch job's or taskset's CPUs (the affinity), not the machine's: 4 workers on 1 allowed CPU oversubscribe."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parse_train_args([]).num_workers == 1


def test_a_cpu_quota_caps_the_cpus_the_job_was_given(tmp_path, monkeypatch):
    """A container's --cpus or a Kubernetes limit is a CFS quota on the process's cgroup or one above it, the
    tightest of which counts, rounded up (1.5 CPUs: 2, 0.5 CPU: still 1); the affinity counts when it is smaller."""
    write_cgroups(tmp_path / "k8s", "0::/kubepods/pod1/ctr",
                  {"kubepods/pod1/ctr/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "150000 100000",
                   "kubepods/cpu.max": "400000 100000", "cpu.max": "max 100000"})
    assert utils.cgroup_cpus(str(tmp_path / "k8s")) == 2
    write_cgroups(tmp_path / "half", "0::/docker/abc", {"cpu.max": "50000 100000"})  # its own cgroup shown as /
    assert utils.cgroup_cpus(str(tmp_path / "half")) == 1
    # v1 (cpu and cpuacct mounted together, /sys/fs/cgroup/cpu linked to them) on a hybrid host
    write_cgroups(tmp_path / "docker_v1", "3:cpu,cpuacct:/docker/abc\n0::/",
                  {"cpu/cpu.cfs_quota_us": 300000, "cpu/cpu.cfs_period_us": 100000})
    assert utils.cgroup_cpus(str(tmp_path / "docker_v1")) == 3
    write_cgroups(tmp_path / "none_v1", "3:cpu,cpuacct:/user\n0::/",
                  {"cpu/user/cpu.cfs_quota_us": -1, "cpu/user/cpu.cfs_period_us": 100000,
                   "cpu/cpu.cfs_quota_us": -1, "cpu/cpu.cfs_period_us": 100000})
    assert utils.cgroup_cpus(str(tmp_path / "none_v1")) is None
    assert utils.cgroup_cpus(str(tmp_path / "nowhere")) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(utils, "cgroup_cpus", functools.partial(utils.cgroup_cpus, str(tmp_path / "half")))
    assert utils.usable_cpus() == 1 and parse_train_args([]).num_workers == 1
    monkeypatch.setattr(utils, "cgroup_cpus", lambda: 16)
    assert utils.usable_cpus() == 8
    monkeypatch.setattr(utils, "cgroup_cpus", lambda: None)
    assert utils.usable_cpus() == 8


def test_the_test_suite_runs_one_process_per_usable_cpu_at_most_four(monkeypatch):
    """pytest.ini's -n auto asks conftest: a 2-CPU job gets 2 processes on a 64-CPU machine (pytest-xdist alone
    counts 64), one CPU none besides pytest's own."""
    for cpus, processes in ((1, 0), (2, 2), (3, 3), (64, 4)):
        monkeypatch.setattr(conftest, "usable_cpus", lambda n=cpus: n)
        assert conftest.pytest_xdist_auto_num_workers(None) == processes


def test_the_test_suite_without_pytest_xdist_names_it(tmp_path):
    """An environment made before pytest.ini asked for -n (pip keeps what it has): pytest names the missing plugin
    instead of 'unrecognized arguments: -n' (plugins not loaded stand for one not installed)."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_metrics.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "Missing required plugins: pytest-xdist" in done.stdout + done.stderr, done.stderr


def test_a_shipped_recipe_named_from_another_folder_is_pointed_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a batch job's working folder: models/ and inputs/ here, the code elsewhere
    with pytest.raises(UsageError, match=r"--config configs/synthetic_UNet.yml: file not found; the recipes ship "
                                         f"beside the scripts: --config {ROOT}/configs/synthetic_UNet.yml$"):
        parse_train_args(["--config", "configs/synthetic_UNet.yml"])
    with pytest.raises(UsageError, match=r"--config configs/mine.yml: file not found$"):
        parse_train_args(["--config", "configs/mine.yml"])


def test_a_home_folder_path_in_a_recipe_is_expanded(tmp_path, monkeypatch):
    """The shell expands ~ on a command line but not in a YAML recipe or after --flag=: the toolkit does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "split.csv").write_text("id,split\n")
    args = parse_train_args(["--config", write_yaml(tmp_path / "home.yml", "split_file: ~/split.csv\n")])
    assert args.split_file == str(tmp_path / "split.csv")
    assert parse_train_args(["--split_file=~/split.csv"]).split_file == str(tmp_path / "split.csv")
    torch.save({}, tmp_path / "w.pth")
    assert parse_train_args(["--init=~/w.pth"]).init == str(tmp_path / "w.pth")


def test_a_folder_given_for_a_file_or_an_empty_path_is_named(tmp_path, capsys):
    with pytest.raises(UsageError, match="--config .*: is a folder; give the recipe's .yml file"):
        parse_train_args(["--config", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        parse_train_args(["--dataset", ""])
    assert e.value.code == 2 and "argument --dataset: expected a path, got ''" in capsys.readouterr().err


def test_a_schedule_longer_than_the_run_gets_a_note():
    assert schedule_note(parse_train_args(["--epochs", "3", "--warmup_epochs", "2"])) == ""  # reaches --lr in epoch 3
    assert "--warmup_epochs 3 is not shorter than --epochs 3: the learning rate stays below --lr" in schedule_note(
        parse_train_args(["--epochs", "3", "--warmup_epochs", "3"]))
    multistep = ["--scheduler", "MultiStepLR", "--epochs", "5", "--warmup_epochs", "1"]
    assert schedule_note(parse_train_args(multistep + ["--milestones", "3"])) == ""
    assert "--milestones 4,9 fall at or after the last epoch" in schedule_note(
        parse_train_args(multistep + ["--milestones", "2,4,9"]))


def test_flags_that_the_others_leave_without_effect_get_a_note():
    assert unused_flags_note(parse_train_args(["--optimizer", "Adam"])) == ""  # the seed's momentum 0.9 beside it
    assert unused_flags_note(parse_train_args(["--optimizer", "SGD", "--momentum", "0.5", "--nesterov", "True"])) == ""
    assert unused_flags_note(parse_train_args(["--optimizer", "AdamW", "--momentum", "0.5", "--nesterov", "True"])) \
        == "note: --momentum 0.5 and --nesterov True: SGD's, not AdamW's; no effect here"
    assert unused_flags_note(parse_train_args(["--crop_size", "32", "--nucleus_diameter", "12"])) == ""
    assert unused_flags_note(parse_train_args(["--nucleus_diameter", "12"])) == \
        "note: --nucleus_diameter 12: for a --crop_size run (predict.py --scale reads it); no effect here"


def test_schedule_and_split_flags_that_the_others_leave_without_effect_get_a_note(tmp_path):
    """A schedule's flags beside another --scheduler, and the random split's beside --split_file or --folds, were
    taken and ignored without a word: the run trained exactly as without them."""
    assert unused_flags_note(parse_train_args(["--scheduler", "MultiStepLR", "--min_lr", "0.001", "--factor", "0.5",
                                               "--patience", "7"])) == (
        "note: --min_lr 0.001: CosineAnnealingLR's and ReduceLROnPlateau's, not MultiStepLR's; no effect here; "
        "note: --factor 0.5 and --patience 7: ReduceLROnPlateau's, not MultiStepLR's; no effect here")
    # a recipe's milestones as a YAML list, beside the default schedule
    recipe = write_yaml(tmp_path / "r.yml", {"milestones": [30, 60], "gamma": 0.1})
    assert unused_flags_note(parse_train_args(["--config", recipe])) == \
        "note: --milestones 30,60 and --gamma 0.1: MultiStepLR's, not CosineAnnealingLR's; no effect here"
    assert unused_flags_note(parse_train_args(["--scheduler", "ConstantLR", "--min_lr", "1e-6"])) == \
        "note: --min_lr 1e-06: CosineAnnealingLR's and ReduceLROnPlateau's, not ConstantLR's; no effect here"
    # each schedule's own flags, and the defaults (the seed's config.yml holds them all) beside any schedule
    for used in (["--scheduler", "ReduceLROnPlateau", "--factor", "0.5", "--patience", "7", "--min_lr", "1e-6"],
                 ["--scheduler", "MultiStepLR", "--milestones", "30, 60", "--gamma", "0.1"],
                 ["--scheduler", "ConstantLR", "--milestones", "1, 2"]):
        assert unused_flags_note(parse_train_args(used)) == ""
    assert unused_flags_note(parse_train_args(["--split_file", "s.csv", "--val_size", "0.3", "--split_seed", "3"])) \
        == "note: --val_size 0.3 and --split_seed 3: --split_file s.csv gives the split; no effect here"
    assert unused_flags_note(parse_train_args(["--folds", "5", "--fold", "2", "--val_size", "0.3"])) == \
        "note: --val_size 0.3: --folds 5 validates on fold --fold 2; no effect here"
    assert unused_flags_note(parse_train_args(["--folds", "5", "--test_size", "0.1", "--split_seed", "3"])) == ""


def learning_rates(epochs, warmup, scheduler, milestones):
    """The rate of each epoch of a run, from optim.build_scheduler stepped as train.py steps it (--lr 1)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = build_scheduler(scheduler, optimizer, epochs, warmup, 0.0, 0.1, 2, milestones, 0.5)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("epochs", [1, 2, 3, 5])
@pytest.mark.parametrize("warmup", [0, 1, 2, 3, 5])
def test_the_schedule_note_agrees_with_the_rates_the_scheduler_gives(epochs, warmup):
    """The note names exactly the warm-ups that never reach --lr and the milestones at which the rate is never
    lowered, as the schedule itself, stepped once per epoch, shows."""
    milestones = [1, 2, 4]
    argv = ["--epochs", str(epochs), "--warmup_epochs", str(warmup), "--lr", "1", "--min_lr", "0"]
    note = schedule_note(parse_train_args(argv))
    assert ("--warmup_epochs" in note) == (max(learning_rates(epochs, warmup, "CosineAnnealingLR", [])) < 1 - 1e-9)
    note = schedule_note(parse_train_args(argv + ["--scheduler", "MultiStepLR", "--milestones", "1,2,4"]))
    rates = learning_rates(epochs, warmup, "MultiStepLR", milestones)
    lowered = sum(later < earlier for earlier, later in zip(rates, rates[1:]))  # the warm-up only raises it
    unused = [m for m in milestones if warmup + m >= epochs]
    assert lowered == len(milestones) - len(unused)
    assert (f"--milestones {','.join(map(str, unused))} fall" in note) == bool(unused)


@pytest.mark.parametrize("key,value", [("epochs", "many"), ("epochs", 2.5), ("lr", "fast"), ("lr", [1, 2]),
                                       ("deep_supervision", "maybe"), ("batch_size", True)])
def test_yaml_wrong_type_named(tmp_path, key, value):
    cfg = write_yaml(tmp_path / "r.yml", {key: value})
    with pytest.raises(UsageError) as e:
        parse_train_args(["--config", cfg])
    assert key in str(e.value)


def test_yaml_values_converted(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", "epochs: 4\nlr: 1e-2\nbatch_size: 8.0\ndeep_supervision: 'True'\n")
    a = parse_train_args(["--config", cfg])
    assert a.epochs == 4 and isinstance(a.epochs, int)
    assert a.lr == 0.01 and a.batch_size == 8 and isinstance(a.batch_size, int) and a.deep_supervision is True


def test_config_file_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(UsageError) as e:
        parse_train_args(["--config", str(tmp_path / "nope.yml")])
    assert "nope.yml" in str(e.value)
    cfg = write_yaml(tmp_path / "list.yml", "- 1\n- 2\n")
    with pytest.raises(UsageError):
        parse_train_args(["--config", cfg])
    cfg = write_yaml(tmp_path / "bad.yml", "epochs: [1,\n")
    with pytest.raises(UsageError) as e:
        parse_train_args(["--config", cfg])
    assert "bad.yml" in str(e.value)


def test_yaml_config_keeps_help_and_config_out(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", {"config": "other.yml"})
    with pytest.raises(UsageError) as e:
        read_yaml_config(cfg, build_train_parser())
    assert "config" in str(e.value)


@pytest.mark.parametrize("text,expected", [("True", True), ("False", False), ("1", True), ("0", False),
                                           ("true", True), ("false", False)])
def test_deep_supervision_flag_values(text, expected):
    a = parse_train_args(["--deep_supervision", text])
    assert a.deep_supervision is expected


def test_deep_supervision_flag_rejects_garbage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_train_args(["--deep_supervision", "sure"])
    assert e.value.code == 2
    assert "--deep_supervision" in capsys.readouterr().err


def test_default_name():
    assert parse_train_args(["--dataset", "foo", "--arch", "UNet"]).name == "foo_UNet_woDS"
    assert parse_train_args(["--dataset", "foo", "--deep_supervision", "True"]).name == "foo_NestedUNet_wDS"
    assert parse_train_args(["--dataset", "foo", "--name", "mine"]).name == "mine"
    a = parse_train_args(["--dataset", "d", "--arch", "NestedUNet", "--deep_supervision", "1"])
    assert default_run_name(a) == "d_NestedUNet_wDS"
    # a dataset elsewhere, given by its absolute path, names the run by its folder (was a path as the run name)
    assert parse_train_args(["--dataset", str(ROOT / "configs") + "/", "--arch", "UNet"]).name == "configs_UNet_woDS"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/tmp/abs", os.path.abspath("abs_run"), "a\\b"])
def test_path_like_names_refused(name):
    with pytest.raises(UsageError) as e:
        parse_train_args(["--name", name])
    assert "--name" in str(e.value)


def test_path_like_dataset_name_in_default_name_refused():
    with pytest.raises(UsageError):
        parse_train_args(["--dataset", "../elsewhere"])


def test_a_relative_dataset_folder_outside_inputs_is_refused_with_its_absolute_path(tmp_path, monkeypatch):
    """A folder beside inputs/ (the README's mine/) was refused with '--dataset mine once the folder is there':
    the very flag given, so no fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs" / "good").mkdir(parents=True)
    (tmp_path / "data" / "mine").mkdir(parents=True)
    for given, fix in (("data/mine", f"--dataset {tmp_path / 'data' / 'mine'}) or move or link it to inputs/mine"),
                       ("inputs/good", "not a path (--dataset good)")):
        with pytest.raises(UsageError) as e:
            parse_train_args(["--dataset", given])
        assert str(e.value).startswith(f"--dataset {given}") and str(e.value).endswith(fix), e.value
    assert parse_train_args(["--dataset", str(tmp_path / "data" / "mine")]).name == "mine_NestedUNet_woDS"


def test_a_dataset_of_the_current_folder_is_not_taken_from_inputs_of_the_same_name(tmp_path):
    """./mine is the current folder's mine/: with an inputs/mine too, score.py --truth ./mine scored against
    inputs/mine, and train.py --dataset ./mine trained on it, without a word."""
    for folder in ("inputs/mine", "mine"):
        (tmp_path / folder).mkdir(parents=True)
    assert dataset_folder("./mine") == "./mine"
    assert dataset_folder("mine") == os.path.join("inputs", "mine")  # a name: inputs/ first
    with pytest.raises(UsageError) as e:
        parse_train_args(["--dataset", "./mine"])
    assert str(e.value).endswith(f"give its absolute path (--dataset {tmp_path / 'mine'}) or --dataset mine for "
                                 "inputs/mine"), e.value
    assert parse_train_args(["--dataset", "mine"]).dataset == "mine"


@pytest.mark.parametrize("argv,flag", [
    (["--input_w", "100"], "--input_w"), (["--input_h", "40"], "--input_h"), (["--crop_size", "50"], "--crop_size"),
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
    (["-b", "0"], "--batch_size"), (["--batch_size", "-2"], "--batch_size"),
    (["--input_w", "0"], "--input_w"), (["--num_classes", "0"], "--num_classes"),
    (["--val_size", "0"], "--val_size"), (["--val_size", "0.6", "--test_size", "0.5"], "--test_size"),
    (["--lr", "0"], "--lr"), (["--milestones", "a,b"], "--milestones"),
    (["--num_workers", "-1"], "--num_workers"), (["--crop_size", "-16"], "--crop_size"),
    (["--stain_jitter", "1.5"], "--stain_jitter"), (["--stain_jitter", "0.5", "--loader", "device"], "--stain_jitter"),
    (["--stain_jitter", "0.5", "--input_channels", "1"], "--input_channels 3"),
    (["--nucleus_diameter", "-2"], "--nucleus_diameter"),
    (["--scheduler", "MultiStepLR", "--milestones", ""], "MultiStepLR needs at least one epoch"),
    (["--greyscale", "0.2", "--input_channels", "1"], "--greyscale"),
    (["--name", "a\x85b"], "control character; give --name ab"),  # C1 controls too
    (["--dataset", "/data/-x"], "the run name '-x_NestedUNet_woDS' (made from --dataset)"),
    (["--resume", "--name", "models/x"], "--name 'models/x' must be a plain name"),
    (["--early_stopping", "-5"], "--early_stopping -5: give a number of epochs (0 or more), or -1"),
    (["--auto_resume", "--resume", "x"], "starts it otherwise; leave out --resume"),
    (["--auto_resume", "--overwrite"], "starts it otherwise; leave out --overwrite"),
])
def test_bad_values_refused_naming_the_flag(argv, flag):
    with pytest.raises(UsageError) as e:
        parse_train_args(argv)
    assert flag in str(e.value)


def test_sizes_multiple_of_16_accepted():
    a = parse_train_args(["--input_w", "32", "--input_h", "48"])
    assert (a.input_w, a.input_h, a.crop_size) == (32, 48, 0)
    assert parse_train_args(["--crop_size", "64"]).crop_size == 64


def test_resize_flags_beside_crop_size_refused(tmp_path):
    """A crop run never resizes: --input_w/--input_h beside --crop_size would be ignored without a word."""
    with pytest.raises(UsageError, match=r"^--input_h is not used with --crop_size 64 .* leave --input_h out, or "):
        parse_train_args(["--input_h", "40", "--crop_size", "64"])  # not "must be a multiple of 16"
    with pytest.raises(UsageError, match=r"^--input_w is not used .* leave --input_w and --input_h out, or give "
                                         r"--crop_size 0 to train on resized images$"):
        parse_train_args(["--config", write_yaml(tmp_path / "c.yml", {"crop_size": 64}), "--input_w", "32",
                          "--input_h=32"])
    # a recipe's sizes, with --crop_size given here: a note (the recipe is not the user's to edit)
    args = parse_train_args(["--config", write_yaml(tmp_path / "r.yml", {"input_w": 32, "input_h": 48}),
                             "--crop_size", "64"])
    assert unused_flags_note(args) == "note: --input_h/--input_w 48x32: for a run on resized images; no effect with " \
                                      "--crop_size 64"
    assert unused_flags_note(parse_train_args(["--crop_size", "64"])) == ""


def test_yaml_bad_values_checked_too(tmp_path):
    cfg = write_yaml(tmp_path / "r.yml", {"input_w": 90})
    with pytest.raises(UsageError) as e:
        parse_train_args(["--config", cfg])
    assert "--input_w" in str(e.value)


def test_usage_error_exit_code_2():
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, ["--epochs", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("flag, good, bad, allowed", [
    ("shot_noise", ("0", "1", "10", "1000"), ("0.5", "-10", "1001", "nan"), "a photon count from 1 to 1000"),
    ("blur", ("0", "0.5", "4", "10"), ("-1", "10.5", "nan", "inf"), "a Gaussian sigma in pixels up to 10")])
def test_noise_and_blur_are_off_or_in_range_and_kept_on_resume(capsys, flag, good, bad, allowed):
    """--shot_noise PHOTONS (the log-uniform range's lower end) and --blur SIGMA: 0 (off) or in their range; anything
    else is a one-line error, and a resumed run keeps the run's value, as every augmentation flag."""
    for value in good:
        assert getattr(parse_train_args([f"--{flag}", value]), flag) == float(value)
    for value in bad:
        with pytest.raises(SystemExit) as e:
            run_cli(train.main, [f"--{flag}", value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith(
            f"--{flag} must be 0 (off) or {allowed}, got {float(value)}\n"), err
    check_unchanged_on_resume(parse_train_args([]), {}, "r", "--resume r")  # an older run's config.yml: off
    with pytest.raises(UsageError, match=rf"^--{flag} 4\.0 differs from the run's 0\.0; "):
        check_unchanged_on_resume(parse_train_args([f"--{flag}", "4"]), {flag: 0.0}, "r", "--resume r")


def test_a_path_that_cannot_be_written_is_a_one_line_error(capsys):
    """An OSError naming a file (a folder where a file goes, no permission, a full disk): one line, exit 1."""
    def main(argv):
        raise IsADirectoryError(21, "Is a directory", "models/.base.tmp", None, "models/base")

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: models/base: Is a directory (check the path, its permissions and the free disk space)")
    with pytest.raises(IsADirectoryError):
        run_cli(main, ["--debug"])


def test_a_failed_torch_compile_is_a_one_line_error(capsys):
    """torch.compile fails at a --compile run's first step (no C++ compiler, a full TMPDIR) with a page of its own
    traceback (105 lines for CXX=/bin/false): one line naming --compile and the fix, exit 1; other RuntimeErrors
    still show theirs."""
    def main(argv):
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found\nmore")

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "error: --compile: torch.compile failed (InvalidCxxCompiler: No working C++ compiler " \
        "found); leave out --compile" in err[0]
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        run_cli(main, ["--debug"])

    def bug(argv):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli(bug, [])


def test_recipe_that_is_not_utf8_is_named(tmp_path):
    recipe = tmp_path / "windows.yml"
    recipe.write_text("dataset: mine\n", encoding="utf-16")
    with pytest.raises(UsageError, match="windows.yml: not UTF-8 text; save it as UTF-8"):
        parse_train_args(["--config", str(recipe)])


def test_help_is_quick_and_lists_flags(tmp_path):
    """--help answers before torch or albumentations is imported (seconds of a cold start); Python's -X importtime
    lists every module imported, in stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--deep_supervision" in out.stdout and "--config" in out.stdout and "--crop_size" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "json" in imported and not imported & {"torch", "albumentations"}, "heavy imports for --help"
    assert not os.listdir(tmp_path), "--help wrote files"


def test_version_names_the_toolkit_python_and_torch_at_once(tmp_path):
    """--version, for a bug report: one line with the checkout's commit and the versions of Python and torch, exit 0,
    without importing torch; it is no setting of a run (not in config.yml, refused in a recipe)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--version"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"train.py: toolkit {utils.code_version(str(ROOT))}, Python {platform.python_version()}, "
                          f"torch {torch.__version__}, {platform.platform()}\n")
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and not os.listdir(tmp_path)
    assert not hasattr(parse_train_args([]), "version")
    recipe = write_yaml(tmp_path / "r.yml", {"version": "1.0"})
    with pytest.raises(UsageError, match="version: a flag of one command, not of a recipe"):
        parse_train_args(["--config", recipe])


def test_help_shows_a_default_only_where_it_tells_something():
    p = ArgumentParser(prog="x.py")
    p.add_argument("--size", type=int, default=3, help="pixels")
    p.add_argument("--name", help="a run")
    p.add_argument("--tta", action="store_true", help="flips")
    p.add_argument("--sep", default="auto", help="how (default: learned borders when trained with them)")
    text = " ".join(p.format_help().split())
    assert "pixels (default: 3)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "them) (default" not in text
