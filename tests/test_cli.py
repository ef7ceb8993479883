"""The command line as a user meets it: exit codes, messages, and never a traceback for bad input."""

import sys

import numpy as np
import pytest
from conftest import run_command
from PIL import Image

PYTHON = sys.executable


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_demo_data_writes_the_digits_imagefolder(tmp_path):
    root = tmp_path / "digits"
    result = run_command([PYTHON, "-m", "imgft", "demo-data", root])
    assert result.returncode == 0, result.stderr
    train_files = sorted((root / "train").rglob("*.png"))
    validation_files = sorted((root / "validation").rglob("*.png"))
    assert len(train_files) + len(validation_files) == 1797
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert sorted(p.name for p in (root / "validation").iterdir()) == [str(d) for d in range(10)]
    assert 0.18 < len(validation_files) / 1797 < 0.22
    with Image.open(train_files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.asarray(image).max() > 200  # a white digit, not an empty picture

    again = run_command([PYTHON, "-m", "imgft", "demo-data", root])
    assert_clean_error(again, "already exists")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--learnin_rate", "1e-3"], ["unknown flag '--learnin_rate'", "did you mean --learning_rate"]),
        (["--learning_rate", "fast"], ["--learning_rate", "invalid float value"]),
        (["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size must be at least 1"]),
        (["--train_dir", "/no/such/folder"], ["--train_dir /no/such/folder is not a folder"]),
        (["--model_name_or_path", "someone/no-such-model"], ["HF_HUB_OFFLINE"]),
        (["configs/missing.yaml"], ["cannot read config file configs/missing.yaml"]),
    ],
)
def test_train_loop_refuses_bad_input_with_one_clear_line(args, fragments, tmp_path):
    result = run_command([PYTHON, "train_loop.py", *args, "--output_dir", tmp_path / "out"])
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag():
    from imgft.args import field_names

    result = run_command([PYTHON, "train_loop.py", "--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("usage: train_loop.py [CONFIG.yaml] [--flag value ...]\n")
    for name in field_names():
        assert f"--{name}" in result.stdout, name


@pytest.mark.parametrize(
    ("command", "listed", "left_out"),
    [
        ("evaluate", ["--model_name_or_path", "--per_device_eval_batch_size", "--tta"], ["--auto_augment"]),
        ("check-data", ["--train_dir", "--strict_data"], ["--learning_rate", "--model_name_or_path"]),
        ("demo-data", ["DIR", "the digits demo"], ["error"]),
        ("flags", ["Markdown table"], ["--learning_rate"]),  # not the table itself
    ],
)
def test_module_command_help_names_the_command_and_its_arguments(command, listed, left_out, capsys):
    from imgft.commands.cli import main

    try:
        main([command, "--help"])
    except SystemExit as exit_:  # argparse's own --help exits
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m imgft {command} "), out
    for fragment in listed:
        assert fragment in out, fragment
    for fragment in left_out:
        assert fragment not in out, fragment


def test_demo_data_without_a_folder_is_one_clear_error():
    assert_clean_error(run_command([PYTHON, "-m", "imgft", "demo-data"]), "usage: python -m imgft demo-data DIR")


def test_module_usage_and_unknown_command():
    usage = run_command([PYTHON, "-m", "imgft"])
    assert usage.returncode == 2 and "evaluate" in usage.stdout
    assert_clean_error(run_command([PYTHON, "-m", "imgft", "frobnicate"]), "unknown command 'frobnicate'")
    assert_clean_error(run_command([PYTHON, "-m", "imgft", "evaluate"]), "needs --model_name_or_path")


def test_flags_refuses_arguments_it_would_ignore(capsys):
    from imgft.commands.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["flags", "--learning_rate"])
    assert stopped.value.code == 2
    assert capsys.readouterr() == ("", "error: flags takes no arguments (got --learning_rate)\n")
