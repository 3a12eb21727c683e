"""Every YAML recipe in configs/ loads through train.py's own checks, and names what the README says."""
import glob
import os

import pytest

from config import parse_train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yml")))


def test_there_are_recipes():
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses(path):
    args = parse_train_args(["--config", path])
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.startswith("dsb2018"):
        assert args.name == stem, f"set 'name: {stem}' in the recipe: docs/results.md names a run after its recipe"
        assert args.split_seed == 41 and args.val_size in (0.2, 0.15)


def test_seed_recipe_is_the_seed():
    args = parse_train_args(["--config", os.path.join(REPO, "configs", "seed_dsb2018_96_NestedUNet_wDS.yml")])
    assert (args.optimizer, args.lr, args.scheduler, args.epochs, args.batch_size) == ("SGD", 1e-3,
                                                                                      "CosineAnnealingLR", 100, 16)
    assert args.name == "dsb2018_96_NestedUNet_wDS"
