"""imgft.model's checks before any work: the head's class count and names, every label-count field an architecture
reads, --image_size reaching the model (config from scratch, resampled position tables from a checkpoint), and
one-line refusals of architectures the loop cannot train."""

import dataclasses
import json
import logging
import time

import pytest
import torch
from conftest import data_flags, save_tiny_vit, write_color_imagefolder
from tiny_models import save_tiny_checkpoint

from imgft.args import ModelArguments
from imgft.errors import UserError
from imgft.model import check_model_runs, load_model

FIVE = ["v", "w", "x", "y", "z"]
VIT_OVERRIDES = "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,patch_size=4"


def model_args(**changes):
    return dataclasses.replace(ModelArguments(), **changes)


def test_pvt_head_is_sized_by_its_own_num_labels_field(tmp_path):
    # PvtConfig keeps a num_labels field of its own (default 1000): id2label alone left the old head in place.
    checkpoint = save_tiny_checkpoint(tmp_path / "pvt", "pvt", ["cat", "dog", "bird"])
    model, _ = load_model(model_args(model_name_or_path=str(checkpoint), ignore_mismatched_sizes=True), FIVE)
    assert model.config.num_labels == 5
    assert model.classifier.out_features == 5


def test_timm_label_names_follow_the_data(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "timm", "timm_wrapper", ["cat", "dog", "bird"])
    model, _ = load_model(model_args(model_name_or_path=str(checkpoint), ignore_mismatched_sizes=True), FIVE)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["label_names"] == FIVE and saved["num_classes"] == 5


def test_a_head_of_the_wrong_size_is_refused_before_any_weights_load(tiny_vit, caplog, capfd):
    with pytest.raises(UserError) as refused:
        load_model(model_args(model_name_or_path=str(tiny_vit)), [f"c{i}" for i in range(10)])
    message = str(refused.value)
    assert "head for 5 classes, not the 10" in message and "--ignore_mismatched_sizes" in message
    printed = capfd.readouterr()
    assert "Reinit" not in caplog.text + printed.out + printed.err
    assert "LOAD REPORT" not in caplog.text + printed.out + printed.err


def test_same_class_count_with_other_names_warns_naming_both_lists(tiny_vit, caplog):
    with caplog.at_level(logging.WARNING, logger="imgft"):
        model, _ = load_model(model_args(model_name_or_path=str(tiny_vit)), FIVE)
    assert "[old0, old1, old2, old3, old4]" in caplog.text
    assert "[v, w, x, y, z]" in caplog.text
    assert model.config.id2label == dict(enumerate(FIVE))


def test_same_names_do_not_warn(tiny_vit, caplog):
    with caplog.at_level(logging.WARNING, logger="imgft"):
        load_model(model_args(model_name_or_path=str(tiny_vit)), [f"old{i}" for i in range(5)])
    assert "classifier head" not in caplog.text


def test_a_head_that_disagrees_with_the_class_count_is_refused(tiny_vit):
    model, processor = load_model(model_args(model_name_or_path=str(tiny_vit)), [f"old{i}" for i in range(5)])
    model.classifier = torch.nn.Linear(model.classifier.in_features, 7)
    with pytest.raises(UserError, match=r"vit \(ViTForImageClassification\)'s classifier head gives 7 outputs for"):
        check_model_runs(model, processor, FIVE)


@pytest.mark.parametrize("image_size", [None, 32])
def test_image_size_reaches_a_vit_built_from_scratch(image_size, train, colors_data, tmp_path):
    # Issue 13: "Input image size (32*32) doesn't match model (224*224)", with and without --image_size 32.
    flags = ["--model_type", "vit", "--config_overrides", VIT_OVERRIDES, "--max_train_steps", "1"]
    flags += ["--image_size", str(image_size)] if image_size else []
    train(data_flags(colors_data) + flags + ["--output_dir", tmp_path])
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}


def test_scratch_image_size_from_config_overrides_and_disagreement():
    model, processor = load_model(model_args(model_type="vit", config_overrides=VIT_OVERRIDES + ",image_size=24"), FIVE)
    assert model.config.image_size == 24 and processor.size.height == 24
    with pytest.raises(UserError, match="--image_size 32 and --config_overrides image_size=24 disagree"):
        load_model(model_args(model_type="vit", config_overrides=VIT_OVERRIDES + ",image_size=24", image_size=32), FIVE)


def test_image_size_from_a_vit_checkpoint_resamples_its_position_table(tmp_path):
    checkpoint = save_tiny_vit(tmp_path / "vit16", FIVE, image_size=16)  # patch 8: a 2 x 2 grid + the class token
    model, processor = load_model(model_args(model_name_or_path=str(checkpoint), image_size=48), FIVE)
    assert model.config.image_size == 48 and (processor.size.height, processor.size.width) == (48, 48)
    table = model.vit.embeddings.position_embeddings
    assert tuple(table.shape) == (1, 1 + 6 * 6, 32)
    original, _ = load_model(model_args(model_name_or_path=str(checkpoint)), FIVE)
    old = original.vit.embeddings.position_embeddings
    assert torch.equal(table[:, 0], old[:, 0])  # the class token's row is kept
    # Bicubic resampling of a 2 x 2 grid: the corners of the 6 x 6 grid stay close to the old corners.
    grid, old_grid = table[0, 1:].view(6, 6, -1), old[0, 1:].view(2, 2, -1)
    assert (grid[0, 0] - old_grid[0, 0]).abs().max() < (old_grid[0, 0] - old_grid[1, 1]).abs().max()
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(1, 3, 48, 48)).logits.shape == (1, 5)


def test_image_size_from_a_checkpoint_trains_and_predicts_as_pipeline(train, tmp_path, capsys):
    from test_architectures import assert_predict_matches_pipeline

    write_color_imagefolder(tmp_path / "data" / "train", ["red", "green"], 4, size=40, seed=1)
    write_color_imagefolder(tmp_path / "data" / "validation", ["red", "green"], 2, size=40, seed=2)
    checkpoint = save_tiny_vit(tmp_path / "vit16", ["a", "b"], image_size=16)
    out = tmp_path / "out"
    flags = ["--model_name_or_path", checkpoint, "--image_size", "48", "--max_train_steps", "1", "--output_dir", out]
    train(data_flags(tmp_path / "data") + flags)
    assert json.loads((out / "config.json").read_text())["image_size"] == 48
    capsys.readouterr()
    assert_predict_matches_pipeline(out, sorted((tmp_path / "data" / "validation").rglob("*.png")), capsys)


def test_an_architecture_the_loop_cannot_train_is_refused_before_it_is_built():
    start = time.perf_counter()  # ShieldGemma2's default config would build 2.7 B parameters
    with pytest.raises(UserError) as refused:
        load_model(model_args(model_type="shieldgemma2", config_overrides=""), FIVE)
    assert time.perf_counter() - start < 5
    assert str(refused.value).startswith("shieldgemma2 (ShieldGemma2ForImageClassification) cannot be fine-tuned")
