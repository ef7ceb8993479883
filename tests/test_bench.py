"""The benchmark harness runs both pipelines for real; the numbers themselves come from `python -m imgft bench`."""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks import bench
from benchmarks import memory as memory_bench


def test_camera_folder_is_photo_sized_jpegs(tmp_path):
    root = bench.write_camera_folder(tmp_path / "camera", 2, 1, classes=2, size=(400, 300))
    files = sorted((tmp_path / "camera").rglob("*.jpg"))
    assert len(files) == 2 * 2 + 2 * 1
    with Image.open(files[0]) as image:
        assert image.size == (400, 300) and image.format == "JPEG"
    assert root == tmp_path / "camera"


def test_run_pair_times_both_pipelines_cold_and_warm(tmp_path):
    data_dir = bench.write_camera_folder(str(tmp_path / "camera"), 4, 2, classes=2, size=(320, 240))
    runs = bench.run_pair("camera", data_dir, str(tmp_path), 32, 2, 4, repeats=1)
    for pipeline in ("upstream", "imgft"):
        for temperature in ("cold", "warm"):
            (run,) = runs[pipeline][temperature]
            assert run["seconds"] > 0 and run["peak_memory_mib"] > 50
            assert len(run["images_per_second_by_epoch"]) == 2
            assert all(0 <= share <= 1 for share in run["data_wait_fraction_by_epoch"])
            assert 0 <= run["eval_accuracy"] <= 1
    summary = bench.summarize(runs["imgft"])
    assert (
        summary["warm"]["images_per_second_after_first_epoch"]
        == runs["imgft"]["warm"][0]["images_per_second_by_epoch"][1]
    )
    # Scratch output folders and caches are removed; each run's log stays for a look.
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith("camera-")]
    assert leftovers and all(name.endswith(".log") for name in leftovers)


@pytest.mark.parametrize("pipeline", ["upstream", "imgft"])
def test_loader_only_rate_iterates_a_whole_epoch(tmp_path, pipeline):
    data_dir = bench.write_camera_folder(str(tmp_path / "camera"), 3, 1, classes=2, size=(320, 240))
    assert bench.loader_only_rate(pipeline, data_dir, 32, 4, str(tmp_path / "cache")) > 0


def measured_pair():
    """A pair's results as measure_pair returns them, with round numbers."""

    def summary(seconds, rate, wait):
        numbers = {"seconds": seconds, "peak_memory_mib": 900.0, "images_per_second_after_first_epoch": rate}
        numbers["data_wait_fraction_after_first_epoch"] = wait
        return {"cold": numbers, "warm": numbers}

    return {
        "summary": {
            "upstream": summary(75.0, 40.0, 0.95),
            "imgft": summary(10.0, 500.0, 0.12),
            bench.GPU_VARIANT: summary(8.0, 900.0, 0.30),
        },
        "speedups": {"imgft": {"cold": 7.5, "warm": 9.25}, bench.GPU_VARIANT: {"cold": 9.4, "warm": 11.0}},
        "model_only_images_per_second_by_pipeline": {"imgft": 600.0, bench.GPU_VARIANT: 1000.0},
        "end_to_end_vs_model_only": {"imgft": 0.83, bench.GPU_VARIANT: 0.9},
        "loader_only_images_per_second": {"upstream": 40.0, "imgft": 2000.0},
    }


def test_table_reports_ratios_against_upstream_for_each_of_our_pipelines():
    pair = measured_pair()
    results = {
        "pairs": {"camera": pair},
        "memory": {"peak_memory_mib": {"1x": 1000, "4x": 1050}, "ratio_4x_to_1x": 1.05},
    }
    table = bench.format_table(results)
    assert "| camera | upstream | 75.0 | 75.0 | 40 | 95% | 40 | 900 |" in table
    assert f"| camera | {bench.GPU_VARIANT} | 8.0 | 8.0 | 900 | 30% |  | 900 |" in table  # no loader of its own
    assert "**imgft speed-up** | **7.5x** | **9.2x**" in table
    assert "imgft reaches 83% of it" in table
    assert f"**{bench.GPU_VARIANT} speed-up** | **9.4x** | **11.0x** | model-only 1000 images/s" in table
    assert "(1.05x)" in table
    json.dumps(results)


def test_gpu_variant_runs_imgft_with_bf16_and_channels_last():
    command = bench.pipeline_command(bench.GPU_VARIANT, "d", "o", 64, 2, 32)
    assert command[1] == "train_loop.py"
    assert command[-3:] == ["--mixed_precision", "bf16", "--channels_last"]
    assert "--mixed_precision" not in bench.pipeline_command("imgft", "d", "o", 64, 2, 32)
    assert bench.pipelines()[:2] == ("upstream", "imgft")


def test_model_only_rate_times_real_training_steps():
    assert bench.model_only_rate(16, 4, 3, steps=2) > 0


def test_pairs_and_skip_memory_choose_what_runs(tmp_path, monkeypatch):
    measured = []

    def measure_pair(name, *args):
        measured.append(name)
        return measured_pair()

    monkeypatch.setattr(bench, "measure_pair", measure_pair)
    monkeypatch.setattr(bench, "memory_growth", lambda *args: pytest.fail("--skip_memory was given"))
    monkeypatch.setattr(bench, "write_camera_folder", lambda *args: pytest.fail("no camera pair was asked for"))
    output = tmp_path / "results.json"
    argv = ["--pairs", "digits", "--skip_memory", "--repeats", "1", "--output", str(output)]
    bench.main([*argv, "--workdir", str(tmp_path / "work")])
    assert measured == ["digits"]
    written = json.loads(output.read_text())
    assert list(written["pairs"]) == ["digits"] and "memory" not in written


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--output", "{tmp}/no_folder/results.json"], "give a file in an existing folder"),
        (["--output", "{tmp}"], "give a file in an existing folder"),
        (["--repeats", "0", "--output", "{tmp}/results.json"], "--repeats must be at least 1 (got 0)"),
    ],
)
def test_an_unwritable_output_or_no_repeats_is_refused_at_once(tmp_path, capsys, monkeypatch, flags, says):
    # The results were written first after the first pair's runs, minutes in: a traceback, the runs lost.
    monkeypatch.setattr(bench, "measure_pair", lambda *args: measured_pair())
    argv = [flag.format(tmp=tmp_path) for flag in flags] + ["--pairs", "digits", "--skip_memory"]
    with pytest.raises(SystemExit) as stopped:
        bench.main([*argv, "--workdir", str(tmp_path / "work")])
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_compile_variant_reports_its_ratios_in_the_table(tmp_path, monkeypatch):
    def run(rates, seconds):
        return {"seconds": seconds, "images_per_second_by_epoch": rates, "eval_accuracy": 0.9}

    runs = {"eager": [run([80.0, 100.0, 100.0], 60.0)], "compiled": [run([20.0, 150.0, 150.0], 90.0)]}
    summary = {variant: bench._compile_summary(variant_runs) for variant, variant_runs in runs.items()}
    assert summary["compiled"]["seconds"] == 90.0 and summary["eager"]["seconds"] == 60.0
    assert summary["compiled"]["images_per_second_after_first_epoch"] == 150.0  # the first epoch compiles
    compiled = {"summary": summary, "compiled_vs_eager_seconds": 1.5}
    compiled["compiled_vs_eager_rate_after_first_epoch"] = 1.5
    table = bench.format_table({"pairs": {}, bench.COMPILE: compiled})
    assert "--torch_compile on the digits: 90.0 s against 60.0 s without (1.50x the time" in table
    assert "after the first epoch 150 against 100 images/s (1.50x)" in table

    monkeypatch.setattr(bench, "measure_compile", lambda *args: compiled)
    monkeypatch.setattr(bench, "measure_pair", lambda *args: pytest.fail("only compile was asked for"))
    output = tmp_path / "results.json"
    bench.main(["--pairs", "compile", "--skip_memory", "--output", str(output), "--workdir", str(tmp_path)])
    assert json.loads(output.read_text())[bench.COMPILE] == compiled


def test_memory_pair_trains_each_variant_in_its_own_process():
    results = memory_bench.measure("tiny", batch_size=2, steps=1, variants=("full", "lora+gradient_checkpointing"))
    full, lora = (results["summary"][variant] for variant in ("full", "lora+gradient_checkpointing"))
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"] // 5
    assert full["peak_memory_mib"] > 50 and full["training_memory_mib"] > 0
    assert full["peak_memory_mib_vs_full"] == 1 and lora["peak_memory_mib_vs_full"] > 0
    assert len(results["runs"]["full"][0]["step_seconds"]) == 1  # after the warm-up step
    table = memory_bench.format_table(results)
    assert "| lora+gradient_checkpointing | " in table and "| full | 42,282 (100.00%) |" in table
    json.dumps(results)


def test_memory_pair_alone_makes_no_data(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "write_camera_folder", lambda *args: pytest.fail("no camera pair was asked for"))
    monkeypatch.setattr(bench, "memory_growth", lambda *args: pytest.fail("no data pair was asked for"))
    monkeypatch.setattr(memory_bench, "measure", lambda **options: {"measured": options})
    monkeypatch.setattr(memory_bench, "format_table", lambda results: "memory table")
    output = tmp_path / "results.json"
    bench.main(["--pairs", "memory", "--quick", "--output", str(output), "--workdir", str(tmp_path / "work")])
    written = json.loads(output.read_text())
    assert written["pairs"] == {} and written["training_memory"] == {"measured": {"steps": 2, "repeats": 1}}
    assert not (tmp_path / "work" / "digits").exists()


def test_digits_subsample_trains_on_so_many_per_class_and_validates_on_all_the_others(tmp_path):
    root = bench.write_digits_subsample(str(tmp_path / "digits"), 3, seed=5)
    train = sorted((tmp_path / "digits" / "train").rglob("*.png"))
    validation = sorted((tmp_path / "digits" / "validation").rglob("*.png"))
    assert [len(list((tmp_path / "digits" / "train" / str(d)).iterdir())) for d in range(10)] == [3] * 10
    assert len(train) + len(validation) == 1797  # all of scikit-learn's digits, each once
    assert not {path.name for path in train} & {path.name for path in validation}
    assert root == str(tmp_path / "digits")
    with Image.open(train[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    bench.write_digits_subsample(str(tmp_path / "other"), 3, seed=6)  # another seed, other training images
    other_train = sorted(path.name for path in (tmp_path / "other" / "train").rglob("*.png"))
    assert other_train != [path.name for path in train]


def test_recipes_pair_runs_the_defaults_and_small_data_and_reports_the_gain(tmp_path, monkeypatch, train):
    commands = []

    def run_in_this_process(command, env, log_path):
        """run_process for train_loop.py, run in this process: it spares a new process' 6 s of imports."""
        commands.append(command)
        assert command[:2] == [sys.executable, "train_loop.py"]
        start = time.perf_counter()
        assert train(command[2:]) == 0
        return time.perf_counter() - start, 0.0

    monkeypatch.setattr(bench, "run_process", run_in_this_process)
    monkeypatch.chdir(bench.REPO)  # where run_process runs it, so that the config's relative path is found
    pair = {name: bench.RECIPE_VARIANTS[name] for name in ("default", "small-data")}  # not the ablations
    tiny = ("--num_train_epochs", "1", "--max_eval_samples", "50")  # 20 training images, 50 of the others
    recipes = bench.measure_recipes(str(tmp_path), (2,), seeds=(7,), variants=pair, flags=tiny)
    assert [command[2] == bench.SMALL_DATA_CONFIG for command in commands] == [False, True]  # config first
    (measured,) = recipes.values()
    (default,), (recipe,) = measured["runs"]["default"], measured["runs"]["small-data"]
    for run in (default, recipe):
        assert run["seed"] == 7 and run["seconds"] > 0 and 0 <= run["eval_accuracy"] <= 1
        assert run["train_samples"] == 20 and run["eval_samples"] == 50
    config = yaml.safe_load(Path(bench.REPO, bench.SMALL_DATA_CONFIG).read_text())
    assert default["train_steps"] == 1  # one epoch of 20 images in batches of 32
    assert recipe["train_steps"] == math.ceil(20 / config["per_device_train_batch_size"])  # its batch
    median_of_one = {key: recipe[key] for key in ("eval_accuracy", "seconds")}
    assert measured["summary"]["small-data"] == median_of_one
    gain = 100 * (recipe["eval_accuracy"] - default["eval_accuracy"])
    assert measured["recipe_minus_default_points"] == pytest.approx(gain)
    assert measured["recipe_vs_default_seconds"] == pytest.approx(recipe["seconds"] / default["seconds"])
    assert os.listdir(tmp_path) == []  # the data and each run's folder are removed
    table = bench.format_recipes_table(recipes)
    assert f"| 2 | small-data | {recipe['eval_accuracy']:.1%} | {recipe['seconds']:.1f} |" in table
    assert f"**{gain:+.1f} points**" in table
