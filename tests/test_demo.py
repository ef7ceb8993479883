"""The README's first command: no arguments, no network, real data, a model that learns."""

import json
import os


def test_demo_defaults_reach_97_percent_on_digits(train, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IMGFT_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    train(["--output_dir", out])
    assert len(os.listdir(tmp_path / "home" / "digits" / "train")) == 10  # written because it was missing
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 359
    assert results["eval_accuracy"] >= 0.97, results
    assert "from scratch" in caplog.text and "--model_name_or_path" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "resnet"
    assert config["id2label"]["7"] == "7"
