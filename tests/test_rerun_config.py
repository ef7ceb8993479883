"""A run's imgft_config.yaml reruns it, from its own directory or any other, and still guards a finished run."""

import json
import os

import pytest
import yaml
from conftest import vit_flags

from imgft import outputs
from imgft.args import ABSOLUTE_PATHS_KEY, parse_args, to_dict
from imgft.errors import UserError


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder holding data and a model folder, the working directory, with a run typed in relative paths."""
    root = tmp_path / "project"
    for folder in ("data/train", "data/validation", "models/mine", "output/run"):
        (root / folder).mkdir(parents=True)
    monkeypatch.chdir(root)
    argv = ["--train_dir", "data/train", "--validation_dir", "data/validation", "--output_dir", "output/run"]
    argv += ["--model_name_or_path", "models/mine", "--image_processor_name", "google/vit-base-patch16-224"]
    argv += ["--resume_from_checkpoint", "latest", "--seed", "7"]
    parsed = parse_args(argv)
    saved = root / "output" / "run" / outputs.CONFIG_FILE
    outputs.write_run_config(saved, to_dict(*parsed))
    return root, parsed, saved


def test_saved_config_records_absolute_paths_and_reruns_unchanged_from_its_directory(project):
    root, parsed, saved = project
    written = yaml.safe_load(saved.read_text())
    assert written[ABSOLUTE_PATHS_KEY] == {
        "data/train": str(root / "data" / "train"),
        "data/validation": str(root / "data" / "validation"),
        "output/run": str(root / "output" / "run"),
        "models/mine": str(root / "models" / "mine"),
    }  # the Hub id and 'latest' are no paths
    assert {key: written[key] for key in to_dict(*parsed)} == to_dict(*parsed)
    # From its own directory the paths stay as typed: the same config, so a resume still matches it.
    assert parse_args([str(saved)]) == parsed


def test_saved_config_reruns_from_another_directory(project, tmp_path, monkeypatch):
    root, parsed, saved = project
    (tmp_path / "elsewhere" / "data" / "train").mkdir(parents=True)  # a same-named folder that is not the run's
    monkeypatch.chdir(tmp_path / "elsewhere")
    data, model, train = parse_args([str(saved), "--output_dir", "new"])
    assert data.train_dir == str(root / "data" / "train")
    assert data.validation_dir == str(root / "data" / "validation")
    assert model.model_name_or_path == str(root / "models" / "mine")
    assert model.image_processor_name == "google/vit-base-patch16-224"
    assert train.resume_from_checkpoint == "latest"
    assert train.output_dir == "new"  # the command line wins, as typed
    assert train.seed == 7
    assert parse_args([str(saved)])[2].output_dir == str(root / "output" / "run")


def test_an_edited_path_in_a_saved_config_is_taken_as_typed(project):
    root, _, saved = project
    saved.write_text(saved.read_text().replace("train_dir: data/train", "train_dir: other/train"))
    assert parse_args([str(saved)])[0].train_dir == "other/train"


def test_finished_run_guard_reads_the_saved_config_without_its_absolute_paths(project):
    root, parsed, saved = project
    (saved.parent / outputs.RESULTS_FILE).write_text("{}")
    config = to_dict(*parsed)
    # A blind relaunch of the same finished run has nothing to do: the recorded paths are no change of settings.
    assert outputs.check_output_dir("output/run", True, False, config) is True
    with pytest.raises(UserError, match="to run it again, pass a new --output_dir"):
        outputs.check_output_dir("output/run", False, False, config)


def test_a_run_reruns_from_another_directory_with_a_new_output_dir(train, tmp_path, monkeypatch, colors_data, tiny_vit):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "data").symlink_to(colors_data)
    monkeypatch.chdir(tmp_path / "project")
    run = ["--train_dir", "data/train", "--validation_dir", "data/validation", "--max_train_steps", "1"]
    train(run + vit_flags(tiny_vit) + ["--output_dir", "output/first"])
    saved = tmp_path / "project" / "output" / "first" / outputs.CONFIG_FILE
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="holds a finished run; to run it again, pass a new --output_dir"):
        train([saved])
    train([saved, "--output_dir", "again"])
    results = json.loads((tmp_path / "elsewhere" / "again" / outputs.RESULTS_FILE).read_text())
    assert results["train_samples"] == 60 and results["train_steps"] == 1
    rerun_config = yaml.safe_load((tmp_path / "elsewhere" / "again" / outputs.CONFIG_FILE).read_text())
    assert rerun_config["train_dir"] == os.path.join(tmp_path, "project", "data", "train")
