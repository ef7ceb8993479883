"""Every architecture in transformers' image-classification mapping, fine-tuned 2 steps from a tiny checkpoint whose
3-class head (cat, dog, bird) is swapped for 4 colour classes: it trains and `predict` answers as pipeline() does,
or imgft refuses it in one line that names the architecture and the reason, before any training."""

import json

import pytest
from conftest import write_color_imagefolder
from tiny_models import ARCHITECTURES, TINY_CONFIGS, save_tiny_checkpoint
from transformers.utils import is_natten_available

from imgft.commands import predict
from imgft.errors import UserError

CLASSES = ["red", "green", "blue", "yellow"]
# Architectures imgft cannot fine-tune, and the words of the reason it gives.
REFUSED = {
    "imagegpt": "it reads input_ids, not the pixel_values",
    "pp_lcnet": "its forward takes no labels",
    "shieldgemma2": "it also needs a text prompt (input_ids)",
    "siglip2": "spatial_shapes and pixel_attention_mask",
}
if not is_natten_available():
    REFUSED["dinat"] = "cannot be built here: DinatForImageClassification requires the natten library"


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    root = tmp_path_factory.mktemp("four_colors")
    write_color_imagefolder(root / "train", CLASSES, 3, size=24, seed=1)
    write_color_imagefolder(root / "validation", CLASSES, 1, size=24, seed=2)
    return root


def test_every_architecture_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == ARCHITECTURES, "add a tiny config for each new architecture to tiny_models.py"


def fine_tune(train, colors, checkpoint, output_dir, *flags):
    train(
        ["--train_dir", colors / "train", "--validation_dir", colors / "validation", "--model_name_or_path",
         checkpoint, "--ignore_mismatched_sizes", "--output_dir", output_dir, "--max_train_steps", "2",
         "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", *flags]
    )  # fmt: skip


def predictions(model_dir, files, capsys):
    predict.main(["--model_name_or_path", str(model_dir), "--top_k", "4", *map(str, files)])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_predict_matches_pipeline(model_dir, files, capsys):
    from transformers import pipeline

    records = predictions(model_dir, files, capsys)
    classifier = pipeline("image-classification", model=str(model_dir), device="cpu")
    for record, expected in zip(records, classifier([str(f) for f in files], top_k=4), strict=True):
        assert [item["label"] for item in record["top_k"]] == [item["label"] for item in expected]
        assert [item["score"] for item in record["top_k"]] == pytest.approx(
            [item["score"] for item in expected], abs=1e-4
        )


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_architecture_trains_with_a_new_head_and_predicts_as_pipeline_does(model_type, train, colors, tmp_path, capsys):
    weights = model_type not in REFUSED  # a refusal comes before any weights load: shieldgemma2's are 2.7 B
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint", model_type, ["cat", "dog", "bird"], weights)
    output_dir = tmp_path / "out"
    if model_type in REFUSED:
        with pytest.raises(UserError) as refused:
            fine_tune(train, colors, checkpoint, output_dir)
        message = str(refused.value)
        assert message.startswith(model_type) and REFUSED[model_type] in message
        assert "\n" not in message
        assert not (output_dir / "all_results.json").exists()
        return
    fine_tune(train, colors, checkpoint, output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    names = config.get("label_names") or [config["id2label"][str(i)] for i in range(len(CLASSES))]
    assert names == sorted(CLASSES)  # the head was swapped for the data's classes
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 2
    files = sorted((colors / "validation").rglob("*.png"))
    assert_predict_matches_pipeline(output_dir, files, capsys)


def test_a_timm_checkpoint_trains_evaluates_and_predicts_with_no_extra_flags(train, colors, tmp_path, capsys):
    # Issue 13: TimmWrapperImageProcessor has no size or image_mean; its settings are timm's data config in
    # config.json. Training failed, evaluate needed --image_processor_name, predict could not be given one.
    from conftest import reset_accelerate

    from imgft.commands import evaluate

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint", "timm_wrapper", ["cat", "dog", "bird"])
    output_dir = tmp_path / "out"
    fine_tune(train, colors, checkpoint, output_dir)
    assert not (output_dir / "preprocessor_config.json").exists()  # timm keeps its data config in config.json
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["pretrained_cfg"]["input_size"] == [3, 32, 32] and saved["label_names"] == sorted(CLASSES)
    capsys.readouterr()
    reset_accelerate()
    try:
        evaluate.main(
            ["--model_name_or_path", str(output_dir), "--train_dir", str(colors / "train"),
             "--validation_dir", str(colors / "validation")]
        )  # fmt: skip
    finally:
        reset_accelerate()
    results = json.loads(capsys.readouterr().out.splitlines()[-1])
    trained = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == 4
    assert results["eval_accuracy"] == trained["eval_accuracy"]
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)
    assert_predict_matches_pipeline(output_dir, sorted((colors / "validation").rglob("*.png")), capsys)
