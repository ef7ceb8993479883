"""Best model, evaluation cadence, early stopping and the report files a finished run leaves."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import data_flags, vit_flags
from PIL import Image
from safetensors.torch import load_file
from test_architectures import assert_predict_matches_pipeline

from imgft import best
from imgft.args import TrainArguments
from imgft.errors import UserError


def evaluations(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]


def test_best_tracking_follows_the_metric_and_its_direction():
    args = TrainArguments()
    state, improved = best.update(best.NO_BEST, {"eval_accuracy": 0.5, "eval_loss": 1.0}, 10, 1, args)
    assert improved and state["metric"] == 0.5 and state["step"] == 10
    state, improved = best.update(state, {"eval_accuracy": 0.4, "eval_loss": 0.9}, 20, 2, args)
    assert not improved and state["step"] == 10 and state["evaluations_without_improvement"] == 1
    by_loss = TrainArguments(metric_for_best_model="loss")
    assert best.greater_is_better(by_loss) is False
    state, improved = best.update(best.NO_BEST, {"eval_loss": 1.0}, 1, 1, by_loss)
    state, improved = best.update(state, {"eval_loss": 0.9}, 2, 1, by_loss)
    assert improved and state["metric"] == 0.9
    patient = TrainArguments(early_stopping_patience=2)
    assert best.stop_if_no_better({**state, "evaluations_without_improvement": 2}, patient).reason == "early_stopping"
    assert best.stop_if_no_better({**state, "evaluations_without_improvement": 5}, TrainArguments()) is None
    with pytest.raises(UserError, match="--metric_for_best_model f2 is not a metric here"):
        best.update(best.NO_BEST, {"eval_accuracy": 0.5}, 1, 1, TrainArguments(metric_for_best_model="f2"))


def test_load_best_model_at_end_saves_the_best_evaluations_weights(train, tmp_path, colors_data, tiny_vit, capsys):
    out = tmp_path / "out"
    # A learning rate that first learns, then wrecks the model: the last step is not the best one.
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--per_device_train_batch_size", "8", "--learning_rate", "3e-3"]
        + ["--eval_steps", "2", "--max_train_steps", "12", "--load_best_model_at_end"]
        + ["--metric_for_best_model", "loss"]
    )
    evals = evaluations(out)
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10, 12]
    best_eval = min(evals, key=lambda e: e["eval_loss"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_model_step"] == best_eval["step"]
    assert results["best_metric"] == pytest.approx(best_eval["eval_loss"])
    assert results["eval_loss"] == pytest.approx(best_eval["eval_loss"], rel=1e-5)  # the saved model is that one
    final, kept = load_file(out / "model.safetensors"), load_file(out / "best_model" / "model.safetensors")
    for name, tensor in final.items():
        assert torch.equal(tensor, kept[name]), name
    # Issue 21.19: best_model/ had no preprocessor_config.json, so pipeline() could not load it.
    capsys.readouterr()
    assert_predict_matches_pipeline(out / "best_model", sorted((colors_data / "validation").rglob("*.png")), capsys)


def test_early_stopping_stops_after_patience_evaluations(train, tmp_path, colors_data, tiny_vit, caplog):
    out = tmp_path / "out"
    # A learning rate of almost nothing: the loss stays put, so no evaluation beats the first by much.
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--learning_rate", "1e-12", "--eval_steps", "1", "--max_train_steps", "20"]
        + ["--metric_for_best_model", "accuracy", "--early_stopping_patience", "2"]
    )
    results = json.loads((out / "all_results.json").read_text())
    assert results["stopped_early"] is True
    assert results["train_steps"] == 3  # best at step 1, then two evaluations without a better accuracy
    assert "Stopping early: 2 evaluations without a better accuracy" in caplog.text


def test_a_finished_run_leaves_a_report_a_person_can_read(train, tmp_path, colors10_data, tiny_vit):
    out = tmp_path / "out"
    train(data_flags(colors10_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--num_train_epochs", "2"])
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_macro_precision", "eval_macro_recall", "eval_macro_f1"):
        assert 0 <= results[key] <= 1, key
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert len(eval_results["per_class"]) == 10
    matrix = eval_results["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == results["eval_samples"] == 30
    for picture in ("training_curves.png", "confusion_matrix.png", "mistakes.png"):
        with Image.open(out / picture) as image:
            assert image.width >= 400 and image.height >= 300, picture
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert {"image-classification", "imgft"} <= set(metadata["tags"])
    assert "model-index" in metadata
    assert 'pipeline("image-classification"' in card
    # --overwrite_output_dir clears every report file too, and a user's own file survives.
    (out / "mine.txt").write_text("keep")
    train(data_flags(colors10_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "1"]
          + ["--overwrite_output_dir"])  # fmt: skip
    assert (out / "mine.txt").read_text() == "keep"
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 1
    # Each mistake names its file, as the validation folder holds it (the images were stored shrunk).
    mistakes = json.loads((out / "eval_results.json").read_text())["mistakes"]
    assert mistakes
    for mistake in mistakes:
        path = Path(mistake["path"])
        assert (
            path.is_file() and path.parent.resolve() == (colors10_data / "validation" / mistake["true_label"]).resolve()
        )
