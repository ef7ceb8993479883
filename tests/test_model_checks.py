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
from safetensors.torch import load_file
from tiny_models import save_tiny_checkpoint

from imgft.args import ModelArguments
from imgft.errors import UserError
from imgft.model import check_model_runs, load_model, load_saved_classifier

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


# Heads of every kind: a Linear (ViT), one in a Sequential (ResNet), two averaged (SwiftFormer's head and dist_head),
# one inside the backbone (timm, Perceiver), and one in a model with no base model apart from it (CLIP).
HEAD_KINDS = ["vit", "resnet", "swiftformer", "timm_wrapper", "perceiver", "clip"]


def logits_by_class(model, processor):
    """{class name: its logits column} for a fixed random batch at the processor's input size."""
    from imgft import preprocessing

    size = preprocessing.input_size(processor, preprocessing.plan_for(processor))
    pixels = torch.randn((3, 3, *size), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    return {name: logits[:, index] for index, name in model.config.id2label.items()}


@pytest.mark.parametrize("model_type", HEAD_KINDS)
def test_the_same_classes_in_another_order_keep_their_own_rows(model_type, tmp_path, caplog):
    # Issue 21.11: the head was kept by position and renamed, so each class got another class's row.
    checkpoint = save_tiny_checkpoint(tmp_path / model_type, model_type, ["zero", "one", "two"])
    saved, processor = load_saved_classifier(model_args(model_name_or_path=str(checkpoint)))  # as evaluate loads
    with caplog.at_level(logging.INFO, logger="imgft"):
        model, _ = load_model(model_args(model_name_or_path=str(checkpoint)), ["one", "two", "zero"])
    assert model.config.id2label == {0: "one", 1: "two", 2: "zero"}
    assert model.config.label2id == {"one": 0, "two": 1, "zero": 2}
    expected = logits_by_class(saved, processor)
    for name, logits in logits_by_class(model, processor).items():
        assert torch.equal(logits, expected[name]), name
    said = [record for record in caplog.records if "another order" in record.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "[zero, one, two]: its rows are reordered to yours, [one, two, zero]" in said[0].getMessage()


def test_a_head_whose_rows_cannot_be_found_is_kept_by_position_with_a_warning(tiny_vit, monkeypatch, caplog):
    from imgft import model as model_module

    monkeypatch.setattr(model_module, "_output_layers", lambda model, num_classes: [])
    saved, _ = load_saved_classifier(model_args(model_name_or_path=str(tiny_vit)))
    names = ["old4", "old3", "old2", "old1", "old0"]
    with caplog.at_level(logging.WARNING, logger="imgft"):
        model, _ = load_model(model_args(model_name_or_path=str(tiny_vit)), names)
    assert torch.equal(model.classifier.weight, saved.classifier.weight)  # as it was, by position
    assert "its output rows cannot be found in ViTForImageClassification: the head is kept" in caplog.text


def save_without_class_names(path, model_type, label_names):
    """A checkpoint whose config.json says "id2label": null, as transformers 5.25 saves a PvtConfig built that way."""
    checkpoint = save_tiny_checkpoint(path, model_type, label_names)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(id2label=None, label2id=None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


def test_a_checkpoint_that_names_no_classes_loads_with_its_head_swapped(tmp_path):
    # Issue 21.19b: TypeError: 'NoneType' object is not subscriptable, in check_head.
    checkpoint = save_without_class_names(tmp_path / "pvt", "pvt", ["cat", "dog", "bird"])
    model, _ = load_model(model_args(model_name_or_path=str(checkpoint), ignore_mismatched_sizes=True), FIVE)
    assert model.classifier.out_features == 5 and model.config.id2label == dict(enumerate(FIVE))
    with pytest.raises(UserError, match=r"head for 3 classes, not the 5 in your data; pass --ignore_mismatched_sizes"):
        load_model(model_args(model_name_or_path=str(checkpoint)), FIVE)


def test_evaluate_and_predict_refuse_a_checkpoint_that_names_no_classes_in_one_line(tmp_path):
    checkpoint = save_without_class_names(tmp_path / "pvt", "pvt", ["cat", "dog", "bird"])
    with pytest.raises(UserError, match=r"names no classes \(id2label is null\), so its outputs have no names"):
        load_saved_classifier(model_args(model_name_or_path=str(checkpoint)))


def test_a_head_without_class_names_of_the_right_size_is_kept_with_a_warning(tmp_path, caplog):
    checkpoint = save_without_class_names(tmp_path / "pvt", "pvt", ["cat", "dog", "bird"])
    saved = load_file(checkpoint / "model.safetensors")["classifier.weight"]
    with caplog.at_level(logging.WARNING, logger="imgft"):
        model, _ = load_model(model_args(model_name_or_path=str(checkpoint)), ["x", "y", "z"])
    assert torch.equal(model.classifier.weight, saved)
    assert "head for 3 classes without names (its id2label is null); your classes are [x, y, z]" in caplog.text


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


@pytest.mark.slow
def test_your_model_on_its_classes_in_another_order_starts_where_it_ended(train, tmp_path, tiny_vit, capsys):
    # Issue 21.11: trained on [zero, one, two], then continued on the same images as class folders, which sort
    # [one, two, zero]: accuracy before training fell from 97 % to 3 %.
    import datasets
    from test_evaluate import evaluate

    folders = tmp_path / "folders"
    write_color_imagefolder(folders / "train", ["zero", "one", "two"], 12, seed=1)
    write_color_imagefolder(folders / "validation", ["zero", "one", "two"], 5, seed=2)
    in_order = ["zero", "one", "two"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=in_order)})
    (tmp_path / "parquet").mkdir()
    for split in ("train", "validation"):
        files = sorted((folders / split).rglob("*.png"))
        rows = {"image": [str(file) for file in files], "label": [in_order.index(file.parent.name) for file in files]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "parquet" / f"{split}.parquet"))
    first = tmp_path / "first"
    train(["--dataset_name", tmp_path / "parquet", "--model_name_or_path", tiny_vit, "--ignore_mismatched_sizes"]
          + ["--output_dir", first, "--num_train_epochs", "3", "--per_device_train_batch_size", "6"])  # fmt: skip
    assert json.loads((first / "config.json").read_text())["id2label"] == {"0": "zero", "1": "one", "2": "two"}
    trained = json.loads((first / "all_results.json").read_text())
    assert trained["eval_accuracy"] >= 0.8  # a model worth continuing from
    # A learning rate too small to move any weight: the final evaluation is the model as loaded.
    second = tmp_path / "second"
    train(data_flags(folders) + ["--model_name_or_path", first, "--output_dir", second, "--learning_rate", "1e-30"]
          + ["--max_train_steps", "1"])  # fmt: skip
    assert json.loads((second / "config.json").read_text())["id2label"] == {"0": "one", "1": "two", "2": "zero"}
    continued = json.loads((second / "all_results.json").read_text())
    # evaluate matches the folders' classes to the model's by name; training now does too.
    capsys.readouterr()
    code, evaluated, err = evaluate(["--model_name_or_path", first, "--validation_dir", folders / "validation"], capsys)
    assert code == 0, err
    for results in (continued, evaluated):
        assert results["eval_accuracy"] == trained["eval_accuracy"]
        assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
