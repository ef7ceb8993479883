"""Real 2-process DDP on CPU (gloo), launched with accelerate like a multi-GPU job."""

import json
import re
import shutil
import sys

from conftest import REPO, launch_two_processes, run_command


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_process_training_and_evaluation_match_one_process(train, tmp_path, colors_data, tiny_vit):
    # Validation of 37 images: divisible neither by 2 processes nor by the batch size of 5.
    data = tmp_path / "data"
    shutil.copytree(colors_data / "train", data / "train")
    shutil.copytree(colors_data / "train", data / "validation")
    for extra in sorted((data / "validation").rglob("*.png"))[37:]:
        extra.unlink()
    assert len(list((data / "validation").rglob("*.png"))) == 37
    data_flags = ["--train_dir", data / "train", "--validation_dir", data / "validation"]

    out = tmp_path / "ddp"
    result = launch_two_processes(
        ["train_loop.py", *data_flags, "--model_name_or_path", tiny_vit, "--ignore_mismatched_sizes"]
        + ["--output_dir", out, "--max_train_steps", "3", "--per_device_train_batch_size", "4"]
        + ["--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "5", "--logging_steps", "1"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert "batch 16 = 4 per device x 2 process(es) x 2 accumulation" in result.stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 37
    assert results["train_steps"] == 3
    assert len([r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]) == 3

    evaluate = [sys.executable, "-m", "imgft", "evaluate", "--model_name_or_path", out, *data_flags]
    evaluate += ["--per_device_eval_batch_size", "5"]
    single = run_command(evaluate)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch_two_processes(["-m", "imgft", *evaluate[3:]])
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = last_json_line(single.stdout), last_json_line(double.stdout)
    assert one["eval_samples"] == two["eval_samples"] == 37
    assert one["eval_accuracy"] == two["eval_accuracy"] == results["eval_accuracy"]
    assert abs(one["eval_loss"] - two["eval_loss"]) < 1e-5


def test_no_process_reads_a_new_output_dir_while_the_shared_folder_check_removes_it(tmp_path):
    # The check makes the folder, and the main process removes it again; a process that went on at once
    # listed a folder that vanished under it: FileNotFoundError, now and then, on a first launch.
    out = tmp_path / "new"
    result = launch_two_processes([REPO / "tests" / "output_dir_check_race.py", out])
    assert result.returncode == 0, result.stderr[-3000:]
    # The two processes' lines may interleave.
    answers = sorted(re.findall(r"rank \d: finished (?:True|False)", result.stdout))
    assert answers == ["rank 0: finished False", "rank 1: finished False"]
    assert not out.exists()
