"""The benchmark harness runs both pipelines for real; the numbers themselves come from `python -m imgft bench`."""

import json
import os

import pytest
from PIL import Image

from imgft import bench


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
            assert run["seconds"] > 0 and run["peak_rss_mib"] > 50
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


def test_table_reports_ratios_against_upstream():
    summary = {"seconds": 10.0, "peak_rss_mib": 900.0, "images_per_second_after_first_epoch": 500.0}
    pair = {
        "summary": {"upstream": {"cold": summary, "warm": summary}, "imgft": {"cold": summary, "warm": summary}},
        "speedup_cold": 7.5,
        "speedup_warm": 9.25,
        "model_only_images_per_second": 600.0,
        "imgft_end_to_end_vs_model_only": 0.83,
        "loader_only_images_per_second": {"upstream": 40.0, "imgft": 2000.0},
    }
    results = {"pairs": {"camera": pair}, "memory": {"peak_rss_mib": {"1x": 1000, "4x": 1050}, "ratio_4x_to_1x": 1.05}}
    table = bench.format_table(results)
    assert "**7.5x** | **9.2x**" in table
    assert "83% of it" in table
    assert "(1.05x)" in table
    json.dumps(results)
