"""--tta: each image's logits averaged over its views (checked against views made by hand), in predict and in
evaluate, which agree with each other with and without it."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import reset_accelerate
from PIL import Image
from test_predict import run_predict, save_opinionated_vit
from transformers import AutoImageProcessor, ViTForImageClassification

from imgft import transforms, tta
from imgft.commands import evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_opinionated_vit(tmp_path_factory.mktemp("opinionated_vit"))


def picture(index):
    """48 x 32 (width x height): a diagonal ramp with a bright square, so that every view looks different."""
    rng = np.random.default_rng(index)
    pixels = np.add.outer(np.arange(32) * 4, np.arange(48) * 3)[..., None] * np.array([1.0, 0.5, 0.2])
    top, left = rng.integers(0, 20, 2)
    pixels[top : top + 10, left : left + 10] = rng.integers(150, 256, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def logits_of(model, normalize, arrays):
    with torch.no_grad():
        return model(pixel_values=normalize(transforms.stack_images(arrays))).logits


def test_tta_logits_are_the_mean_of_the_views_logits_made_by_hand(model_dir, tmp_path, capsys):
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    _, eval_transform = transforms.build_transforms(processor, None, False, 1.0)
    normalize = transforms.normalizer(processor)
    images = [picture(i) for i in range(5)]
    centre = eval_transform(images)
    # The central 87.5 %: 42 x 28 of 48 x 32, from (3, 2).
    zoom = eval_transform([image.crop((3, 2, 45, 30)) for image in images])
    by_view = {
        "centre": logits_of(model, normalize, centre),
        "flip": logits_of(model, normalize, [np.fliplr(array) for array in centre]),
        "zoom": logits_of(model, normalize, zoom),
        "zoom_flip": logits_of(model, normalize, [np.fliplr(array) for array in zoom]),
    }
    for name in ("flip", "zoom", "zoom_flip"):
        assert (by_view[name] - by_view["centre"]).abs().max() > 0.1  # each view counts
    view_names = {"flip": ["centre", "flip"], "zoom": ["centre", "zoom"], "flip_zoom": list(by_view)}
    for choice, names in view_names.items():
        views = tta.views_transform(eval_transform, choice)
        pixel_values = tta.stack_views(views(images))
        assert pixel_values.shape == (5, len(names), 3, 16, 16) and pixel_values.dtype == torch.uint8
        with torch.no_grad():
            averaged = tta.tta_logits(model, pixel_values, normalize)
        expected = sum(by_view[name] for name in names) / len(names)
        assert torch.allclose(averaged, expected, atol=1e-6), choice

        # predict --tta gives the softmax of the same averaged logits, from the image files.
        files = [tmp_path / f"{i}.png" for i in range(5)]
        for image, path in zip(images, files, strict=True):
            image.save(path)
        records, _ = run_predict(["--model_name_or_path", model_dir, "--tta", choice, *files], capsys)
        scores = [{item["label"]: item["score"] for item in record["top_k"]} for record in records]
        probabilities = expected.softmax(dim=-1)
        for image_scores, image_probabilities in zip(scores, probabilities, strict=True):
            id2label = model.config.id2label
            by_label = {id2label[i]: p for i, p in enumerate(image_probabilities.tolist())}
            assert image_scores == pytest.approx(by_label, abs=1e-6)


def evaluate_results(model_dir, colors_data, out, capsys, extra=()):
    data = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    reset_accelerate()
    try:
        evaluate.main(list(map(str, ["--model_name_or_path", model_dir, *data, "--output_dir", out, *extra])))
    finally:
        reset_accelerate()
    results = json.loads(capsys.readouterr().out.splitlines()[-1])
    return results, json.loads((out / "eval_results.json").read_text())["confusion_matrix"]


def test_evaluate_and_predict_agree_with_and_without_tta(model_dir, colors_data, tmp_path, capsys):
    losses = []
    for tta_flag in ([], ["--tta", "flip_zoom"]):
        out = tmp_path / f"eval{len(tta_flag)}"
        results, matrix = evaluate_results(model_dir, colors_data, out, capsys, tta_flag)
        validation = colors_data / "validation"
        records, _ = run_predict(["--model_name_or_path", model_dir, validation, *tta_flag], capsys)
        assert len(records) == results["eval_samples"] == 25
        true_labels = [record["path"].split("/")[-2] for record in records]
        pairs = Counter(zip(true_labels, (record["label"] for record in records), strict=True))
        names = matrix["labels"]
        assert [[pairs[(true, predicted)] for predicted in names] for true in names] == matrix["matrix"]
        # The loss from predict's probabilities of the true class: the same logits, not just the same answer.
        probability_of_truth = [
            next(item["score"] for item in record["top_k"] if item["label"] == true)
            for record, true in zip(records, true_labels, strict=True)
        ]
        assert results["eval_loss"] == pytest.approx(-np.mean(np.log(probability_of_truth)), abs=1e-5)
        losses.append(results["eval_loss"])
    assert losses[1] != pytest.approx(losses[0], abs=1e-3)  # the views changed the answers
