"""`python -m imgft evaluate` on data of its own: a test folder or a dataset split with no training data, labels
from the model's config, and a training run's files left alone unless --output_dir says otherwise."""

import json

import pytest
import yaml
from conftest import reset_accelerate, save_tiny_vit, write_color_imagefolder
from test_data import write_parquet_dataset

MODEL_CLASSES = ["red", "green", "blue"]  # not sorted: the folder's classes must map by name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("model"), MODEL_CLASSES)


def evaluate(argv, capsys):
    """(exit code, the JSON result or None, stderr) of `python -m imgft evaluate ARGV`, run in this process."""
    from imgft.commands.cli import main

    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["evaluate", *[str(a) for a in argv]])
            raise SystemExit(0)
    finally:
        reset_accelerate()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.out.strip().splitlines()
    return stopped.value.code, json.loads(lines[-1]) if stopped.value.code == 0 else None, captured.err


def test_a_test_folder_alone_is_evaluated_with_the_models_labels(model_dir, tmp_path, capsys):
    test_dir = write_color_imagefolder(tmp_path / "test", ["green", "red"], 3)
    (test_dir / "green" / "000.png").unlink()  # green 2, red 3
    code, results, err = evaluate(
        ["--model_name_or_path", model_dir, "--validation_dir", test_dir, "--output_dir", tmp_path / "report"], capsys
    )
    assert code == 0, err
    assert results["eval_samples"] == 5
    per_class = json.loads((tmp_path / "report" / "eval_results.json").read_text())["per_class"]
    assert {name: row["support"] for name, row in per_class.items()} == {"red": 3, "green": 2, "blue": 0}


def test_a_test_folder_may_hold_a_single_class(model_dir, tmp_path, capsys):
    test_dir = write_color_imagefolder(tmp_path / "test", ["blue"], 2)
    code, results, err = evaluate(["--model_name_or_path", model_dir, "--validation_dir", test_dir], capsys)
    assert code == 0, err
    assert results["eval_samples"] == 2


def test_image_size_evaluates_the_model_resized_to_it_as_training_would(model_dir, tmp_path, capsys):
    # The 16 px ViT at 32 px: its position table resampled to the 4 x 4 patch grid, not a crash.
    test_dir = write_color_imagefolder(tmp_path / "test", ["red", "blue"], 2)
    argv = ["--model_name_or_path", model_dir, "--validation_dir", test_dir]
    at_16 = evaluate(argv, capsys)
    at_32 = evaluate([*argv, "--image_size", "32"], capsys)
    assert at_32[0] == 0, at_32[2]
    assert at_32[1]["eval_samples"] == 4
    assert at_32[1]["eval_loss"] != pytest.approx(at_16[1]["eval_loss"], rel=1e-5)


def test_a_class_the_model_does_not_know_is_one_line_naming_it(model_dir, tmp_path, capsys):
    test_dir = write_color_imagefolder(tmp_path / "test", ["red", "purple"], 2)
    code, _, err = evaluate(["--model_name_or_path", model_dir, "--validation_dir", test_dir], capsys)
    assert code == 2
    message = err[err.index("error: ") :].strip()
    assert len(message.splitlines()) == 1
    assert "purple" in message and "red, green, blue" in message


def test_a_dataset_split_is_evaluated_with_no_training_split(tmp_path, capsys):
    model = save_tiny_vit(tmp_path / "model", ["dog", "cat"])
    only_test = write_parquet_dataset(tmp_path / "only_test", {"test": 5})
    code, results, err = evaluate(["--model_name_or_path", model, "--dataset_name", only_test], capsys)
    assert code == 0, err
    assert results["eval_samples"] == 5
    three = write_parquet_dataset(tmp_path / "three", {"train": 8, "validation": 4, "test": 6})
    argv = ["--model_name_or_path", model, "--dataset_name", three]
    assert evaluate(argv, capsys)[1]["eval_samples"] == 4
    assert evaluate([*argv, "--eval_split", "test"], capsys)[1]["eval_samples"] == 6
    assert evaluate([*argv, "--eval_split", "train"], capsys)[1]["eval_samples"] == 8


@pytest.fixture
def finished_run(tmp_path, colors_data):
    """A training run's output folder: a model, its report and the config that made it (which names the folder)."""
    from imgft.args import parse_args, to_dict

    run = save_tiny_vit(tmp_path / "run", ["blue", "green", "purple", "red", "yellow"])
    flags = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    flags += ["--model_name_or_path", run, "--output_dir", run]
    (run / "imgft_config.yaml").write_text(yaml.safe_dump(to_dict(*parse_args([str(f) for f in flags]))))
    for name, content in {"all_results.json": '{"eval_accuracy": 0.9}', "eval_results.json": '{"run": 1}'}.items():
        (run / name).write_text(content)
    return run


def contents(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_evaluate_never_overwrites_a_training_run_unless_told(finished_run, tmp_path, capsys):
    before = contents(finished_run)
    other = write_color_imagefolder(tmp_path / "other", ["red", "green"], 2)
    # The config names the run's folder as output_dir: that is where training wrote, not an order to write.
    code, results, err = evaluate([finished_run / "imgft_config.yaml", "--validation_dir", other], capsys)
    assert code == 0, err
    assert results["eval_samples"] == 4
    assert contents(finished_run) == before

    told = [finished_run / "imgft_config.yaml", "--validation_dir", other, "--output_dir", finished_run]
    code, _, err = evaluate(told, capsys)
    assert code == 2
    assert "all_results.json" in err and "--overwrite_output_dir" in err
    assert contents(finished_run) == before

    code, _, err = evaluate([*told, "--overwrite_output_dir"], capsys)
    assert code == 0, err
    report = json.loads((finished_run / "eval_results.json").read_text())
    assert sum(row["support"] for row in report["per_class"].values()) == 4
    assert (finished_run / "all_results.json").read_bytes() == before["all_results.json"]
