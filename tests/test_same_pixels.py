"""One file, one answer (issue 21, 16 and 16b): training's evaluation, `python -m imgft evaluate`, `predict` and
`pipeline()` given images as the model card's usage snippet loads them all see a file alike, with default flags.

Camera-sized photos reach evaluation whole, never shrunk before the processor's own resize; 16-bit, transparent
(RGBA, LA) and palette-with-transparency files go through one conversion, `images.to_rgb`, which the card carries."""

import io
import json
import math
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import reset_accelerate, write_color_imagefolder
from PIL import Image, ImageOps
from test_predict import COLOR_NAMES, save_opinionated_vit

from imgft import images
from imgft.commands import predict
from imgft.report import model_card

LOSS_TOLERANCE = 1e-4  # the brief's float tolerance; a shrink before the processor's resize moved it by 2e-3


def stroke_mask(width=40, height=30):
    """A hand-drawn-looking "2": True where the pen went."""
    mask = np.zeros((height, width), dtype=bool)
    for top, bottom, left, right in ((4, 8, 8, 32), (8, 15, 28, 32), (13, 17, 8, 32), (17, 24, 8, 12), (22, 26, 8, 32)):
        mask[top:bottom, left:right] = True
    return mask


def write_awkward_files(folder):
    """One file of each kind that PIL's convert("RGB") and imgft once saw differently, in class folders."""
    mask = stroke_mask()
    height, width = mask.shape
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, width)[None, :] * np.ones((height, 1))
    sixteen = (ramp * 20000 + mask * 40000).astype(np.uint16)  # nearly every value above 255: PIL clips them
    white_on_clear = np.zeros((height, width, 4), dtype=np.uint8)
    white_on_clear[..., :3] = 255  # white strokes over transparent white: what became a blank image
    white_on_clear[..., 3] = mask * 255
    black_on_clear = np.zeros((height, width, 4), dtype=np.uint8)  # black strokes over transparent black
    black_on_clear[..., 3] = mask * 255
    faded = np.dstack([rng.integers(0, 256, (height, width, 3)), ramp * 255]).astype(np.uint8)  # partly opaque
    light_la = np.dstack([np.full((height, width), 220), np.where(mask, 255, 0)]).astype(np.uint8)
    palette = Image.fromarray(mask.astype(np.uint8), "P")
    palette.putpalette([250, 250, 250, 30, 200, 30] + [0] * 762)  # index 0, transparent, stores near-white
    photo = np.clip(rng.normal(128, 60, (height, width, 3)), 0, 255).astype(np.uint8)
    files = {
        "red/sixteen_bit.png": (Image.fromarray(sixteen), {}),
        "red/thirty_two_bit.tif": (Image.fromarray(sixteen.astype(np.int32)), {}),  # mode I, 16-bit values
        "red/white_on_transparent.png": (Image.fromarray(white_on_clear, "RGBA"), {}),
        "green/black_on_transparent.png": (Image.fromarray(black_on_clear, "RGBA"), {}),
        "green/partly_opaque.png": (Image.fromarray(faded, "RGBA"), {}),
        "green/light_la.png": (Image.fromarray(light_la, "LA"), {}),
        "blue/palette_with_transparency.png": (palette, {"transparency": 0}),
        "blue/photo.jpg": (Image.fromarray(photo), {"quality": 90}),
    }
    for name, (image, options) in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, **options)
    return folder


def write_large_photos(folder, classes=("red", "green"), per_class=2):
    """1600 x 1200 JPEGs with fine texture and noise, so that every resampling step shows in the pixels."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:1200, 0:1600]
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            base = 127 + 100 * np.sin(x / (7 + n + index)) * np.cos(y / (5 + n))
            pixels = np.stack([base, np.roll(base, 37, axis=1), 255 - base], axis=-1)
            pixels += rng.normal(0, 20, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name / f"{n}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny ViT whose answers vary from image to image, with the model card a training run writes."""
    folder = save_opinionated_vit(tmp_path_factory.mktemp("opinionated_vit"))
    model_card.write_model_card(folder, {}, {}, COLOR_NAMES)
    return folder


@pytest.fixture(scope="module")
def awkward_files(tmp_path_factory):
    return write_awkward_files(tmp_path_factory.mktemp("awkward"))


def card_recipe(model_folder, monkeypatch):
    """The names the model card's usage snippet defines (its `load_image` and `classifier`), its code run as it
    is, in a folder holding the image.jpg it labels."""
    text = (Path(model_folder) / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    folder = Path(model_folder) / "card_run"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), (200, 30, 30)).save(folder / "image.jpg")
    monkeypatch.chdir(folder)
    namespace = {}  # nothing but what the snippet imports and defines: it must stand alone, as a user copies it
    exec(compile(code, "model card usage", "exec"), namespace)
    return namespace


def files_of(folder):
    return sorted(str(path) for path in Path(folder).rglob("*") if path.is_file())


def run_predict(model_folder, files, capsys):
    capsys.readouterr()
    predict.main(["--model_name_or_path", str(model_folder), "--top_k", "5", *files])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def recipe_answers(recipe, files):
    return [recipe["classifier"](recipe["load_image"](path), top_k=5) for path in files]


def scores(top_k):
    return {item["label"]: item["score"] for item in top_k}


def mean_loss(files, answers):
    """Cross-entropy averaged over `files`, each labelled by its folder, from each one's class scores."""
    losses = [-math.log(scores(answer)[Path(path).parent.name]) for path, answer in zip(files, answers, strict=True)]
    return sum(losses) / len(losses)


def run_evaluate(model_folder, validation_dir, capsys, *flags):
    from imgft.commands import evaluate

    capsys.readouterr()
    reset_accelerate()
    try:
        evaluate.main(["--model_name_or_path", str(model_folder), "--validation_dir", str(validation_dir), *flags])
    finally:
        reset_accelerate()
    return json.loads(capsys.readouterr().out.splitlines()[-1])


# --- 16: one conversion --------------------------------------------------------------------------------------------


def readers(recipe):
    """Every way imgft (and the card) turns a file into the RGB image the transforms get."""
    return {
        "predict": lambda path: predict.load_image(path)[0],
        "training's stored copy (--resize_once)": lambda path: Image.open(
            io.BytesIO(images.shrink_file(path, stored_size=10_000)[0])
        ),
        "datasets' decode (evaluation, training with --resize_once false)": lambda path: images.to_rgb(
            datasets.Image().decode_example({"path": path, "bytes": None})
        ),
        "a stream (--streaming)": lambda path: images.decode_value({"path": None, "bytes": Path(path).read_bytes()})[0],
        "the model card's load_image": recipe["load_image"],
    }


def test_every_reader_and_the_cards_loader_convert_each_kind_of_file_alike(model_dir, awkward_files, monkeypatch):
    recipe = card_recipe(model_dir, monkeypatch)
    kinds = {Image.open(path).mode for path in files_of(awkward_files)}
    assert kinds == {"I;16", "I", "RGBA", "LA", "P", "RGB"}  # the kinds the files are meant to be
    for path in files_of(awkward_files):
        seen = {name: np.asarray(read(path)) for name, read in readers(recipe).items()}
        for name, pixels in seen.items():
            assert pixels.dtype == np.uint8 and pixels.shape == (30, 40, 3), (path, name)
            assert np.array_equal(pixels, seen["predict"]), f"{path}: {name} differs from predict"
        if "transparent" in path or "sixteen" in path or "thirty_two" in path:  # a drawing: it must show
            assert len(np.unique(seen["predict"].reshape(-1, 3), axis=0)) > 1, f"{path} became blank"


def test_predict_evaluate_and_the_cards_pipeline_recipe_give_one_answer(model_dir, awkward_files, monkeypatch, capsys):
    files = files_of(awkward_files)
    records = run_predict(model_dir, files, capsys)
    assert [record["path"] for record in records] == files
    assert len({record["label"] for record in records}) > 1  # the model tells these images apart
    results = run_evaluate(model_dir, awkward_files, capsys)
    assert results["eval_samples"] == len(files)
    assert results["eval_loss"] == pytest.approx(mean_loss(files, [r["top_k"] for r in records]), abs=LOSS_TOLERANCE)
    recipe = card_recipe(model_dir, monkeypatch)
    for record, answer in zip(records, recipe_answers(recipe, files), strict=True):
        assert scores(record["top_k"]) == pytest.approx(scores(answer), abs=1e-5), record["path"]


def stored_training_images(folder, stored_size):
    """(the split after --resize_once's pass, its image column): train stored, validation checked."""
    from imgft.args import DataArguments
    from imgft.data import decode_once_dropping_unreadable, load_labeled_dataset

    data_args = DataArguments(train_dir=str(folder / "train"), validation_dir=str(folder / "validation"))
    dataset, image_column, label_column, names = load_labeled_dataset(data_args, None, 0)
    kept, _ = decode_once_dropping_unreadable(dataset, image_column, label_column, names, data_args, stored_size)
    return kept, image_column


def test_stored_training_images_are_made_again_when_the_conversion_changes(tmp_path, monkeypatch):
    # datasets keys a map's cache by its function's name alone: without the conversion's code in the key, images
    # stored by an older to_rgb (onto white, say) would be trained on while predict converts another way.
    write_color_imagefolder(tmp_path / "train", ["red", "green"], 2, size=8)
    write_color_imagefolder(tmp_path / "validation", ["red", "green"], 1, size=8)
    first, image_column = stored_training_images(tmp_path, 20)
    again, _ = stored_training_images(tmp_path, 20)
    assert again["train"].cache_files == first["train"].cache_files  # unchanged code: the cache is read back
    monkeypatch.setattr(images, "to_rgb", lambda image: ImageOps.invert(image.convert("RGB")))
    changed, _ = stored_training_images(tmp_path, 20)
    assert changed["train"].cache_files != first["train"].cache_files
    for before, after in zip(first["train"][image_column], changed["train"][image_column], strict=True):
        assert np.array_equal(np.asarray(after), 255 - np.asarray(before))


# --- 16b: evaluation sees large photos whole -----------------------------------------------------------------------


def test_resize_once_stores_training_images_shrunk_and_evaluation_images_whole(tmp_path):
    write_color_imagefolder(tmp_path / "train", ["red", "green"], 2, size=60)
    write_color_imagefolder(tmp_path / "validation", ["red", "green"], 2, size=60)
    kept, image_column = stored_training_images(tmp_path, 20)
    assert {image.size for image in kept["train"][image_column]} == {(20, 20)}
    assert {image.size for image in kept["validation"][image_column]} == {(60, 60)}
    assert {image.format for image in kept["validation"][image_column]} == {"PNG"}  # the files themselves


@pytest.mark.slow
def test_large_photos_are_evaluated_as_predict_and_pipeline_see_them(model_dir, tmp_path, capsys):
    from transformers import pipeline

    photos = write_large_photos(tmp_path / "photos")
    files = files_of(photos)
    classifier = pipeline("image-classification", model=str(model_dir), device="cpu")
    from_pipeline = mean_loss(files, classifier(files, top_k=5))
    from_predict = mean_loss(files, [record["top_k"] for record in run_predict(model_dir, files, capsys)])
    assert from_predict == pytest.approx(from_pipeline, abs=1e-6)
    default = run_evaluate(model_dir, photos, capsys)  # --resize_once is on by default
    assert default["eval_loss"] == pytest.approx(from_pipeline, abs=LOSS_TOLERANCE)
    whole = run_evaluate(model_dir, photos, capsys, "--resize_once", "false")
    assert whole["eval_loss"] == pytest.approx(default["eval_loss"], abs=1e-6)


@pytest.mark.slow
def test_training_evaluates_as_evaluate_predict_and_the_cards_recipe_do(
    train, colors_data, awkward_files, tmp_path, monkeypatch, capsys
):
    validation = tmp_path / "validation"
    write_large_photos(validation, classes=("red", "blue"), per_class=1)
    for path in files_of(awkward_files):
        target = validation / Path(path).relative_to(awkward_files)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
    checkpoint = save_opinionated_vit(tmp_path / "checkpoint")
    output_dir = tmp_path / "out"
    train(
        ["--train_dir", colors_data / "train", "--validation_dir", validation, "--model_name_or_path", checkpoint,
         "--output_dir", output_dir, "--max_train_steps", "1", "--per_device_train_batch_size", "4"]
    )  # fmt: skip
    trained = json.loads((output_dir / "all_results.json").read_text())
    files = files_of(validation)
    assert trained["eval_samples"] == len(files)
    from_predict = mean_loss(files, [record["top_k"] for record in run_predict(output_dir, files, capsys)])
    assert trained["eval_loss"] == pytest.approx(from_predict, abs=LOSS_TOLERANCE)
    evaluated = run_evaluate(output_dir, validation, capsys)
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    recipe = card_recipe(output_dir, monkeypatch)  # the card the run wrote
    assert mean_loss(files, recipe_answers(recipe, files)) == pytest.approx(from_predict, abs=1e-6)
