"""The shipped recipe configs (configs/recipes/): each parses to the recipe it promises, holds recipe keys
only (so it combines with the user's own data and model flags), and trains."""

import json

import pytest
import yaml
from conftest import REPO, data_flags, vit_flags

from imgft import args

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
# What a recipe must leave to the user: where the data, the model and the run's files are, and its length.
NOT_RECIPE_KEYS = {*args.DATA_FLAGS, "model_name_or_path", "model_type", "config_overrides", "output_dir"}
NOT_RECIPE_KEYS |= {"num_train_epochs", "max_train_steps", "resume_from_checkpoint", "seed"}


def test_both_recipes_are_shipped():
    assert [path.name for path in RECIPES] == ["small-data.yaml", "vit-finetune.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_config_parses_to_its_own_values_and_holds_recipe_keys_only(path):
    values = yaml.safe_load(path.read_text())
    assert values and not set(values) & NOT_RECIPE_KEYS
    parsed = args.to_dict(*args.parse_args([str(path)]))
    for key, value in values.items():
        assert parsed[key] == as_parsed(value, parsed[key]), key


def as_parsed(value, parsed):
    """A YAML value as the flag's type (YAML reads 1e-4, with no dot, as a string)."""
    return type(parsed)(value)


def test_vit_finetune_is_the_beit_deit_recipe():
    data_args, _, train_args = args.parse_args([str(REPO / "configs" / "recipes" / "vit-finetune.yaml")])
    assert 0.65 <= train_args.layer_decay <= 0.75 and train_args.ema_decay > 0.999
    mixing = (train_args.mixup_alpha, train_args.cutmix_alpha, train_args.mixup_prob)
    assert mixing == (0.8, 1.0, 1.0) and train_args.label_smoothing_factor == 0.1
    assert data_args.auto_augment == "randaugment" and data_args.random_erasing > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_config_trains_a_tiny_model_with_flags_after_it(train, tmp_path, colors_data, tiny_vit, path):
    out = tmp_path / "out"
    # The recipe first, then the user's data, model and length, as the README shows.
    argv = [path, *data_flags(colors_data), *vit_flags(tiny_vit), "--max_train_steps", "2"]
    assert train([*argv, "--output_dir", out]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 2
    saved = yaml.safe_load((out / "imgft_config.yaml").read_text())
    for key, value in yaml.safe_load(path.read_text()).items():
        assert saved[key] == as_parsed(value, saved[key]), key
    assert ("eval_ema_accuracy" in results) == (saved["ema_decay"] > 0)  # vit-finetune keeps an EMA
