"""`python -m imgft predict`: which files it finds, what it prints and writes, and how it refuses bad input."""

import csv
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate, run_command, write_color_imagefolder
from PIL import Image

from imgft.commands import predict

COLOR_NAMES = ["red", "green", "blue", "yellow", "purple"]


def save_opinionated_vit(path, label_names=COLOR_NAMES):
    """An untrained tiny ViT initialised with large weights, so that its answers vary from image to image
    (the usual 0.02 init answers the same class for everything) with scores from about 0.4 to 0.97."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.3,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_opinionated_vit(tmp_path_factory.mktemp("opinionated_vit"))


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, colors_data):
    """Images in nested folders with an upper-case extension, plus what must be skipped or named."""
    root = tmp_path_factory.mktemp("messy")
    validation = colors_data / "validation"
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(validation / "red" / "000.png", root / "a.PNG")
    shutil.copy(validation / "blue" / "001.png", root / "nested" / "b.png")
    shutil.copy(validation / "green" / "002.png", root / "nested" / "deeper" / "c.png")
    Image.open(validation / "yellow" / "003.png").save(root / "nested" / "d.JPEG", quality=95)
    for hidden in (root / "__MACOSX" / "x.png", root / ".cache" / "y.png", root / "._a.png", root / ".z.png"):
        hidden.parent.mkdir(exist_ok=True)
        shutil.copy(validation / "red" / "000.png", hidden)
    (root / "notes.txt").write_text("not an image")
    (root / "metadata.csv").write_text("file_name,label\na.PNG,red\n")  # describes images, is none: not named
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes((validation / "red" / "001.png").read_bytes()[:100])
    return root


def run_predict(argv, capsys):
    predict.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_finds_images_recursively_and_names_unreadable_ones(model_dir, messy_folder, capsys):
    records, err = run_predict(["--model_name_or_path", model_dir, messy_folder], capsys)
    relative = [str(Path(r["path"]).relative_to(messy_folder)) for r in records]
    assert relative == ["a.PNG", "nested/b.png", "nested/d.JPEG", "nested/deeper/c.png"]  # walk order, sorted
    assert f"{messy_folder / 'empty.jpg'}: empty file (0 bytes)" in err
    assert f"{messy_folder / 'truncated.png'}: cannot decode" in err
    assert f"skipping {messy_folder / 'notes.txt'}: not an image PIL can open" in err  # named, as training does
    assert "__MACOSX" not in err and ".cache" not in err and "metadata.csv" not in err
    assert "Labelled 4 image(s), skipped 2 unreadable and 1 non-image file(s)" in err
    assert "image/s" not in err  # no progress bar for a handful of images
    for record in records:
        assert set(record) == {"path", "label", "score", "top_k"}
        scores = [item["score"] for item in record["top_k"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)  # --top_k 5 by default
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # all 5 classes
        assert (record["label"], record["score"]) == (record["top_k"][0]["label"], scores[0])
        assert {item["label"] for item in record["top_k"]} == set(COLOR_NAMES)


def test_matches_the_transformers_pipeline_and_does_not_depend_on_batching(model_dir, colors_data, capsys):
    from transformers import pipeline

    files = sorted((colors_data / "validation").rglob("*.png"))[::4]  # 7 files, every class
    batch_sizes = []
    logits_of = predict.predicted_logits

    def recording_logits(model, batch, normalize, with_views):
        batch_sizes.append(len(batch))
        return logits_of(model, batch, normalize, with_views)

    flags = ["--model_name_or_path", model_dir, "--top_k", "9", "--per_device_eval_batch_size", "3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "predicted_logits", recording_logits)
        records, _ = run_predict([*flags, *files], capsys)
    assert batch_sizes == [3, 3, 1]
    assert [r["path"] for r in records] == [str(f) for f in files]
    assert all(len(r["top_k"]) == 5 for r in records)  # capped at the number of classes
    assert len({r["label"] for r in records}) > 1  # the model does tell images apart
    classifier = pipeline("image-classification", model=str(model_dir), device="cpu")
    for record, expected in zip(records, classifier([str(f) for f in files], top_k=5), strict=True):
        assert [item["label"] for item in record["top_k"]] == [item["label"] for item in expected]
        assert [item["score"] for item in record["top_k"]] == pytest.approx(
            [item["score"] for item in expected], abs=1e-5
        )

    one_batch, _ = run_predict(["--model_name_or_path", model_dir, "--top_k", "2", *files], capsys)
    for big, small in zip(one_batch, records, strict=True):
        assert big["label"] == small["label"] and big["score"] == pytest.approx(small["score"], abs=1e-6)
        assert len(big["top_k"]) == 2


def test_predictions_agree_with_the_evaluate_confusion_matrix(model_dir, colors_data, tmp_path, capsys):
    from imgft.commands import evaluate

    reset_accelerate()
    try:
        evaluate.main(
            ["--model_name_or_path", str(model_dir), "--train_dir", str(colors_data / "train"),
             "--validation_dir", str(colors_data / "validation"), "--output_dir", str(tmp_path)]
        )  # fmt: skip
    finally:
        reset_accelerate()
    capsys.readouterr()
    matrix = json.loads((tmp_path / "eval_results.json").read_text())["confusion_matrix"]
    records, _ = run_predict(["--model_name_or_path", model_dir, colors_data / "validation"], capsys)
    assert len(records) == 25
    pairs = Counter((r["path"].split("/")[-2], r["label"]) for r in records)
    names = matrix["labels"]
    counted = [[pairs[(true, predicted)] for predicted in names] for true in names]
    assert counted == matrix["matrix"]
    assert np.trace(np.array(counted)) < 25  # an untrained model: some are wrong, so the check has teeth


def test_globs_deduplication_and_csv_and_jsonl_output(model_dir, colors_data, tmp_path, capsys):
    validation = colors_data / "validation"
    pattern = str(validation / "re*" / "*.png")
    out = tmp_path / "predictions.csv"
    records, err = run_predict(
        ["--model_name_or_path", model_dir, pattern, validation / "red" / "000.png", "--output", out], capsys
    )
    assert records == []  # with --output, stdout stays empty
    assert f"Labelled 5 image(s); wrote {out}" in err  # red/000.png matched twice, labelled once
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "label", "score", "top_k"]
    assert [row["path"] for row in rows] == [str(validation / "red" / f"00{i}.png") for i in range(5)]
    for row in rows:
        top_k = json.loads(row["top_k"])
        assert top_k[0] == {"label": row["label"], "score": pytest.approx(float(row["score"]))}

    jsonl = tmp_path / "predictions.jsonl"
    run_predict(["--model_name_or_path", model_dir, pattern, "--output", jsonl, "--top_k", "1"], capsys)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in lines] == [row["path"] for row in rows]
    assert [r["label"] for r in lines] == [row["label"] for row in rows]
    assert all(len(r["top_k"]) == 1 for r in lines)


def test_progress_bar_appears_for_many_images(model_dir, tmp_path, capsys):
    write_color_imagefolder(tmp_path / "many", COLOR_NAMES[:2], predict.PROGRESS_MIN_IMAGES // 2, size=16)
    records, err = run_predict(
        ["--model_name_or_path", model_dir, tmp_path / "many", "--per_device_eval_batch_size", "64"], capsys
    )
    assert len(records) == predict.PROGRESS_MIN_IMAGES
    assert f"{predict.PROGRESS_MIN_IMAGES}/{predict.PROGRESS_MIN_IMAGES}" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top_k", "0", "x.png"], "--top_k must be at least 1"),
        (["--topk", "3", "x.png"], "unknown flag '--topk'; did you mean --top_k?"),
        (["--top_k", "three", "x.png"], "argument --top_k: invalid int value: 'three'"),
        (["--output", "out.txt", "x.png"], "--output out.txt: the file must end in .jsonl or .csv"),
        ([], "predict needs at least one image file"),
        (["/no/such/folder", "/no/*.png"], "no images found in /no/such/folder, /no/*.png"),
    ],
)
def test_bad_input_is_one_clear_error(model_dir, args, message, capsys):
    from imgft.errors import UserError

    with pytest.raises(UserError) as raised:
        predict.main(["--model_name_or_path", str(model_dir), *args])
    assert message in str(raised.value)


def test_command_line_exit_codes(model_dir, tmp_path):
    command = [sys.executable, "-m", "imgft", "predict"]
    missing = run_command([*command, "--model_name_or_path", model_dir, tmp_path / "nothing_here"])
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: no images found in" in missing.stderr and missing.stdout == ""
    bad_flag = run_command([*command, "--model_name_or_path", model_dir, "--batch_size", "4", tmp_path])
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr
    assert "error: unknown flag '--batch_size'" in bad_flag.stderr


def test_flag_suggestions_know_every_flag():
    parser = predict.make_parser()
    flags = {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}
    assert flags == set(predict.FLAGS)


def test_image_processor_name_loads_the_processor_from_elsewhere(model_dir, colors_data, tmp_path, capsys):
    from transformers import AutoImageProcessor, ViTForImageClassification, pipeline

    from imgft.commands import evaluate
    from imgft.errors import UserError

    bare = tmp_path / "weights_only"
    ViTForImageClassification.from_pretrained(model_dir).save_pretrained(bare)  # no preprocessor_config.json
    files = sorted((colors_data / "validation").rglob("*.png"))[::5]
    with pytest.raises(UserError, match="cannot load the image processor of"):
        predict.main(["--model_name_or_path", str(bare), *map(str, files)])
    records, _ = run_predict(["--model_name_or_path", bare, "--image_processor_name", model_dir, *files], capsys)
    classifier = pipeline(
        "image-classification", model=str(bare), image_processor=AutoImageProcessor.from_pretrained(model_dir)
    )
    for record, expected in zip(records, classifier([str(f) for f in files], top_k=5), strict=True):
        assert [item["label"] for item in record["top_k"]] == [item["label"] for item in expected]
        assert [item["score"] for item in record["top_k"]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    data = ["--train_dir", str(colors_data / "train"), "--validation_dir", str(colors_data / "validation")]
    reset_accelerate()
    try:
        evaluate.main(["--model_name_or_path", str(bare), "--image_processor_name", str(model_dir), *data])
    finally:
        reset_accelerate()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["eval_samples"] == 25


def test_an_existing_file_with_glob_characters_in_its_name_is_taken_as_it_is(tmp_path):
    image = tmp_path / "img [1].png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "folder [a]").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "folder [a]" / "x.png")
    files, problems, _ = predict.find_images([str(image), str(tmp_path / "folder [a]"), str(tmp_path / "*.jpg")])
    assert files == [str(image), str(tmp_path / "folder [a]" / "x.png")]
    assert problems == [(str(tmp_path / "*.jpg"), "matches no image file")]  # a real glob still globs


def test_a_processor_run_as_it_is_labels_each_batch_of_files_with_one_call(model_dir, tmp_path):
    from test_preprocessing import BatchRecorder, odd_sized_pngs, theirs
    from tqdm.auto import tqdm
    from transformers import ViTForImageClassification

    from imgft.transforms import build_transforms, normalizer

    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    processor = BatchRecorder(size={"height": 16, "width": 16})
    transform, normalize = build_transforms(processor, None, False, 1.0)[1], normalizer(processor)
    pictures = odd_sized_pngs(5)
    files = [tmp_path / f"{i}.png" for i in range(5)]
    for picture, path in zip(pictures, files, strict=True):
        picture.save(path)
    unreadable = [tmp_path / f"bad{i}.png" for i in range(3)]
    for path in unreadable:
        path.write_bytes(b"not an image")
    # Batches of 3: two images and an unreadable file, three images, then nothing readable (no call at all).
    paths = [str(path) for path in [*files[:2], unreadable[0], *files[2:], *unreadable[1:]]]
    processor.batch_sizes.clear()
    with tqdm(disable=True) as progress:
        records = list(predict.predict_files(model, transform, normalize, paths, 3, 5, progress))
    assert processor.batch_sizes == [2, 3]
    assert [record["path"] for record in records] == [str(path) for path in files]
    alone = torch.cat([theirs(processor, picture) for picture in pictures])
    with torch.no_grad():
        expected = model(pixel_values=alone).logits.softmax(dim=-1).max(dim=-1).values
    assert [record["score"] for record in records] == pytest.approx(expected.tolist(), abs=1e-6)
