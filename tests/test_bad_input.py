"""Real-world bad input: skipped and named, converted correctly, or refused before any work, never a traceback."""

import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import COLORS, data_flags, vit_flags, write_color_imagefolder
from PIL import Image
from safetensors.torch import load_file

from imgft import images
from imgft.errors import UserError, exit_on_user_error

# --- making the files ------------------------------------------------------------------------------------------------


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def decompression_bomb_png():
    """A valid PNG header announcing 20000 x 20000 pixels (PIL refuses it at open, before decoding)."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


BAD_FILES = {
    "empty.jpg": b"",
    "truncated.png": encoded(noise(64), "PNG")[:900],
    "truncated.jpg": encoded(noise(64), "JPEG", quality=95)[:700],
    "random.png": np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
    "bomb.png": decompression_bomb_png(),
}
BAD_REASONS = {
    "empty.jpg": "empty file",
    "truncated.png": "cannot decode",
    "truncated.jpg": "cannot decode",
    "random.png": "not an image PIL can identify",
    "bomb.png": "decompression-bomb limit",
}


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """The 5-colour imagefolder, plus one unreadable file of each kind in train and a truncated one in validation."""
    root = tmp_path / "data"
    names = list(COLORS)[:5]
    write_color_imagefolder(root / "train", names, 8, seed=5)
    write_color_imagefolder(root / "validation", names, 3, seed=6)
    for name, content in BAD_FILES.items():
        (root / "train" / "red" / name).write_bytes(content)
    (root / "validation" / "blue" / "cut.png").write_bytes(BAD_FILES["truncated.png"])
    return root


# --- 1. unreadable files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_kind_of_unreadable_file_gets_its_reason(name):
    reason, *_ = images.inspect_file(data=BAD_FILES[name])
    assert BAD_REASONS[name] in reason


def test_unreadable_files_are_skipped_named_and_counted(train, tmp_path, folder_with_bad_files, tiny_vit, caplog):
    out = tmp_path / "out"
    train(data_flags(folder_with_bad_files) + vit_flags(tiny_vit) + ["--output_dir", out, "--num_train_epochs", "1"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["unreadable_images"] == 6
    assert results["train_samples"] == 40 and results["eval_samples"] == 15
    for name, reason in BAD_REASONS.items():
        named = [line for line in caplog.text.splitlines() if name in line]
        assert named and reason in named[0], name
    assert "cut.png" in caplog.text


def test_strict_data_refuses_before_training_listing_every_file(train, tmp_path, folder_with_bad_files, tiny_vit):
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        train(data_flags(folder_with_bad_files) + vit_flags(tiny_vit) + ["--output_dir", out, "--strict_data"])
    message = str(refused.value)
    assert "6 unreadable image(s)" in message
    for name in [*BAD_FILES, "cut.png"]:
        assert name in message
    assert not out.exists()


# --- 2. awkward but readable images --------------------------------------------------------------------------------


def rgb_of(content):
    return np.asarray(images.to_rgb(images.open_image(data=content)))


def test_cmyk_jpeg_becomes_the_right_colour():
    pixels = rgb_of(encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert pixels.shape == (16, 16, 3)
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 60 and pixels[..., 2].mean() < 60


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert gray.mode == "I;16"
    pixels = rgb_of(encoded(gray, "PNG"))
    assert np.all(np.abs(pixels.astype(int) - 128) <= 1)  # PIL's plain convert("RGB") gives 255 here


def test_grayscale_and_bilevel_become_three_equal_channels():
    for image in (Image.new("L", (4, 4), 77), Image.new("1", (4, 4), 1)):
        pixels = rgb_of(encoded(image, "PNG"))
        assert pixels.shape == (4, 4, 3)
        assert np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2])


def drawing_on_transparent(stroke, hidden, mode="RGBA"):
    """A 12 x 12 image: an opaque `stroke`-coloured cross on transparent pixels that store `hidden`."""
    pixels = np.zeros((12, 12, 4), dtype=np.uint8)
    pixels[..., :3] = hidden
    pixels[5:7, :, :3] = pixels[:, 5:7, :3] = stroke
    pixels[5:7, :, 3] = pixels[:, 5:7, 3] = 255
    image = Image.fromarray(pixels, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_get_a_background_that_keeps_the_drawing_visible(mode):
    # Issue 21: white strokes on transparent pixels became a blank white image, 4 of 6 mistakes in one run.
    for stroke, background in (((255, 255, 255), [0, 0, 0]), ((0, 0, 0), [255, 255, 255])):
        for hidden in ((255, 255, 255), (0, 0, 0), (200, 30, 30)):  # what the file stores under alpha 0
            pixels = rgb_of(encoded(drawing_on_transparent(stroke, hidden, mode), "PNG"))
            assert pixels[0, 0].tolist() == background, (stroke, hidden)  # the same whatever is hidden
            assert pixels[5, 0].tolist() == list(stroke)  # the drawing shows, on a background it stands out from
    half = np.zeros((4, 4, 4), dtype=np.uint8)
    half[..., 0], half[..., 3] = 255, 128  # red at half opacity: dark on average, so blended onto white
    assert rgb_of(encoded(Image.fromarray(half, "RGBA"), "PNG"))[0, 0].tolist() == [255, 127, 127]
    nothing = rgb_of(encoded(Image.new("RGBA", (4, 4), (90, 0, 0, 0)), "PNG"))
    assert nothing.min() == 255  # fully transparent: white


def test_a_palette_with_a_transparent_colour_gets_the_same_background_rule():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 (transparent) stores white
    palette.putpixel((3, 3), 1)
    pixels = rgb_of(encoded(palette, "PNG", transparency=0))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[3, 3].tolist() == [0, 0, 0]  # black dot on white
    palette.putpalette([0, 0, 0, 240, 240, 240] + [0] * 762)  # a light dot over transparent black
    pixels = rgb_of(encoded(palette, "PNG", transparency=0))
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[3, 3].tolist() == [240, 240, 240]


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    content = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    pixels = rgb_of(content)
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


def test_exif_orientation_is_honoured():
    wide = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image = images.open_image(data=encoded(wide, "JPEG", exif=exif))
    assert image.size == (10, 20)


def test_tiny_and_extreme_aspect_ratio_images_give_full_size_tensors(tiny_vit):
    from transformers import AutoImageProcessor

    from imgft.transforms import build_transforms

    train_transform, eval_transform = build_transforms(AutoImageProcessor.from_pretrained(tiny_vit), None, True, 0.08)
    for size in ((1, 1), (1, 500), (500, 1)):
        image = images.to_rgb(Image.new("RGB", size, (10, 200, 30)))
        assert train_transform(image, random.Random(0)).shape == (16, 16, 3)
        assert eval_transform([image])[0].shape == (16, 16, 3)


def test_every_format_and_extension_case_is_read_and_junk_is_named_not_counted(train, tmp_path, tiny_vit, caplog):
    root = tmp_path / "data"
    names = list(COLORS)[:2]
    write_color_imagefolder(root / "train", names, 6, seed=7)
    write_color_imagefolder(root / "validation", names, 2, seed=8)
    red = root / "train" / "red"
    green = Image.new("RGB", (16, 16), (30, 200, 30))
    (red / "a.WEBP").write_bytes(encoded(Image.new("RGB", (16, 16), (220, 30, 30)), "WEBP"))
    (red / "b.BMP").write_bytes(encoded(Image.new("RGB", (16, 16), (220, 30, 30)), "BMP"))
    (red / "c.JPG").write_bytes(encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    (root / "train" / "green" / "d.Png").write_bytes(encoded(green.convert("P"), "PNG"))
    (red / "notes.txt").write_text("not an image")
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "__MACOSX" / "red").mkdir(parents=True)
    (root / "train" / "__MACOSX" / "red" / "._e.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (red / "._f.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    out = tmp_path / "out"
    train(data_flags(root) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "1", "--strict_data"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 12 + 4
    assert results["unreadable_images"] == 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["label2id"]) == ["green", "red"]  # no __MACOSX class
    assert "Skipping unreadable" not in caplog.text  # --strict_data let the notes pass: they are not images
    skipped = [line for line in caplog.text.splitlines() if "not images" in line]
    assert len(skipped) == 1 and "1 file(s) that are not images (1 .txt): red/notes.txt" in skipped[0]
    assert ".DS_Store" not in caplog.text and "AppleDouble" not in caplog.text and "._f.jpg" not in caplog.text


# --- 3. structural problems: one clear message, exit code 2, nothing written -----------------------------------


def run_cleanly(argv, capsys):
    from conftest import reset_accelerate

    import train_loop

    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as stopped:
            exit_on_user_error(train_loop.main, [str(a) for a in argv])
    finally:
        reset_accelerate()
    captured = capsys.readouterr()
    assert stopped.value.code == 2
    assert "Traceback" not in captured.err
    assert "error: " in captured.err
    return captured.err[captured.err.index("error: ") :]


def one_class_folder(tmp_path):
    write_color_imagefolder(tmp_path / "one" / "train", ["red"], 4)
    return tmp_path / "one"


STRUCTURAL = {
    "missing folder": (lambda t: ["--train_dir", t / "nope"], ["--train_dir", "is not a folder"]),
    "empty folder": (lambda t: ["--train_dir", (t / "empty").mkdir() or t / "empty"], ["holds no images"]),
    "single class": (lambda t: ["--train_dir", one_class_folder(t) / "train"], ["a single class (red)", "two classes"]),
    "unknown column": (lambda t: ["--label_column_name", "species"], ["'species' is not a column", "label"]),
    "negative learning rate": (lambda t: ["--learning_rate", "-1e-3"], ["--learning_rate must be a non-negative"]),
    "zero batch size": (lambda t: ["--per_device_train_batch_size", "0"], ["must be at least 1"]),
    "accumulation below 1": (lambda t: ["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    "split outside (0,1)": (lambda t: ["--train_val_split", "1.5"], ["strictly between 0 and 1"]),
    "resume from nothing": (lambda t: ["--resume_from_checkpoint", t / "nothing"], ["nothing does not exist"]),
    "missing model path": (lambda t: ["--model_name_or_path", t / "no_model"], ["no such local folder"]),
    "hub id offline": (lambda t: ["--model_name_or_path", "google/vit-base-patch16-224"], ["HF_HUB_OFFLINE"]),
    "model folder without config.json": (
        lambda t: ["--model_name_or_path", (t / "no_model").mkdir() or t / "no_model"],
        ["holds no config.json"],
    ),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_problems_stop_before_any_work(case, tmp_path, capsys):
    make_args, fragments = STRUCTURAL[case]
    out = tmp_path / "out"
    message = run_cleanly([*make_args(tmp_path), "--output_dir", out], capsys)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert len(message.strip().splitlines()) <= 2
    assert not out.exists()


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_vit, capsys):
    from imgft.commands import evaluate, lr_find

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    for output_dir, says in [
        (tmp_path / "notes.txt", "notes.txt is a file, not a folder"),
        (tmp_path / "notes.txt" / "run", f"run lies under {tmp_path / 'notes.txt'}, which is a file"),
        (tmp_path / "link", f"link is a link to the missing {tmp_path / 'gone'}, not a folder"),
    ]:
        assert says in run_cleanly(["--train_dir", tmp_path / "nope", "--output_dir", output_dir], capsys)
        for command in (evaluate.main, lr_find.main):  # each once wrote only after all its work
            with pytest.raises(UserError, match=says):
                command(["--model_name_or_path", str(tiny_vit), "--output_dir", str(output_dir)])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_validation_classes_missing_from_train_are_named(tmp_path, capsys):
    write_color_imagefolder(tmp_path / "train", ["red", "green"], 4)
    write_color_imagefolder(tmp_path / "validation", ["red", "green", "blue", "cyan"], 2)
    message = run_cleanly(
        [
            "--train_dir",
            tmp_path / "train",
            "--validation_dir",
            tmp_path / "validation",
            "--output_dir",
            tmp_path / "o",
        ],
        capsys,
    )
    assert "validation classes missing from train: blue, cyan" in message


def test_unknown_config_key_is_named_with_the_closest_one(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nnum_train_epoch: 3\n")
    message = run_cleanly([config, "--output_dir", tmp_path / "o"], capsys)
    assert "unknown key" in message and "num_train_epoch" in message and "did you mean num_train_epochs" in message


def test_mixed_precision_the_hardware_cannot_do_is_one_line(tmp_path, capsys, monkeypatch):
    import train_loop

    def no_bf16(**kwargs):
        raise ValueError("bf16 mixed precision requires PyTorch >= 1.10 and a supported device.")

    monkeypatch.setattr(train_loop, "Accelerator", no_bf16)
    message = run_cleanly(["--mixed_precision", "bf16", "--output_dir", tmp_path / "o"], capsys)
    assert "--mixed_precision bf16" in message and "supported device" in message


# --- 4. class names with spaces and other scripts ----------------------------------------------------------------


def test_class_names_with_spaces_and_non_ascii_work_end_to_end(train, tmp_path, tiny_vit):
    from transformers import pipeline

    names = ["chat noir", "狗", "red panda"]
    write_color_imagefolder(tmp_path / "data" / "train", names, 10, seed=9)
    write_color_imagefolder(tmp_path / "data" / "validation", names, 3, seed=10)
    out = tmp_path / "out"
    train(
        data_flags(tmp_path / "data")
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--num_train_epochs", "8", "--per_device_train_batch_size", "6"]
        + ["--learning_rate", "3e-3"]
    )
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert sorted(config["id2label"].values()) == sorted(names)
    answers = pipeline("image-classification", model=str(out), device="cpu")(
        str(tmp_path / "data" / "validation" / "狗" / "000.png")
    )
    assert {answer["label"] for answer in answers} == set(names)
    assert answers[0]["label"] == "狗"


# --- 6. NaN / inf loss ------------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--per_device_train_batch_size", "8"]
    # A sane first step (checkpointed), then a learning rate large enough to blow the weights up.
    with pytest.raises(UserError) as stopped:
        train(common + ["--learning_rate", "1e30", "--max_train_steps", "6", "--checkpointing_steps", "1"])
    message = str(stopped.value)
    assert "non-finite loss" in message and "at step 2" in message
    assert "step_1" in message
    assert not (out / "all_results.json").exists()
    assert not (out / "step_2").exists()  # nothing trained on the NaN is ever saved


def test_nonfinite_loss_stops_at_the_next_log_step_naming_the_span(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    flags = data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--per_device_train_batch_size", "8"]
    # No GPU read per step: the NaN steps (2, 3, 4) are skipped on the device and seen at the step-4 log.
    with pytest.raises(UserError) as stopped:
        train(flags + ["--learning_rate", "1e30", "--max_train_steps", "6", "--logging_steps", "4"])
    assert "non-finite loss (NaN or inf) in 3 of steps 1-4" in str(stopped.value)
    assert "there is no checkpoint yet" in str(stopped.value)
    assert not (out / "model.safetensors").exists() and not (out / "all_results.json").exists()


def test_nonfinite_loss_can_skip_steps_instead(train, tmp_path, colors_data, tiny_vit, caplog):
    out = tmp_path / "out"
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--learning_rate", "1e30", "--max_train_steps", "4", "--on_nonfinite_loss", "skip"]
    )
    results = json.loads((out / "all_results.json").read_text())  # valid JSON: a NaN metric is written as null
    # Step 1 blows the weights up and every later loss is NaN; the count is read at log steps and epoch ends
    # (2 steps an epoch here), not after every step.
    assert results["skipped_nonfinite_steps"] == 3
    assert "Skipped 1 of steps 1-2: non-finite loss" in caplog.text
    assert "Skipped 2 of steps 3-4: non-finite loss" in caplog.text
    # No update from a NaN: the saved weights are step 1's, huge but finite.
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# --- 7. check-data ----------------------------------------------------------------------------------------------------


def check_data(argv, capsys):
    from imgft.commands.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["check-data", *[str(a) for a in argv]])
        raise SystemExit(0)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return stopped.value.code, captured.out, captured.err


def test_check_data_decodes_each_image_once_when_labels_need_encoding(tmp_path, monkeypatch):
    import datasets

    from imgft.args import DataArguments
    from imgft.commands import check_data

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rows = {"image": [encoded(Image.new("RGB", (8, 8), (i * 20, 0, 0)), "PNG") for i in range(12)]}
    rows["label"] = ["cat", "dog"] * 6  # strings: encoding them as a ClassLabel changes the fingerprint
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / f"{split}.parquet"))
    decoded = []
    inspect_file = images.inspect_file
    monkeypatch.setattr(images, "inspect_file", lambda *args: decoded.append(1) or inspect_file(*args))
    lines, refusal = check_data.data_report(DataArguments(dataset_name=str(tmp_path / "data")), None, 42)
    assert refusal is None and "Classes (2), train / validation:" in lines
    assert len(decoded) == 24  # 12 train + 12 validation images, each decoded once


def test_check_data_reports_counts_problems_duplicates_and_sizes(folder_with_bad_files, capsys):
    root = folder_with_bad_files
    (root / "validation" / "red" / "copy.png").write_bytes((root / "train" / "red" / "003.png").read_bytes())
    code, out, _ = check_data(data_flags(root), capsys)
    assert code == 0, out
    assert "Images: 45 train, 17 validation" in out
    assert "Classes (5), train / validation:" in out
    assert [line.split() for line in out.splitlines() if line.strip().startswith("red ")] == [["red", "8", "/", "4"]]
    assert "Imbalance (train): largest class 8, smallest 8 (1.0x)" in out
    assert "Unreadable images: 6" in out
    for name, reason in BAD_REASONS.items():
        assert any(name in line and reason in line for line in out.splitlines()), name
    assert "Duplicates across train and validation (same bytes): 1" in out
    assert "copy.png = " in out and "003.png" in out
    assert "width 16 / 16 / 16" in out
    assert "Training would accept this data." in out

    code, out, err = check_data(data_flags(root) + ["--strict_data"], capsys)
    assert code == 2 and "training would refuse this data" in err and "bomb.png" in err


def test_check_data_exits_non_zero_on_a_single_class(tmp_path, capsys):
    code, _, err = check_data(["--train_dir", one_class_folder(tmp_path) / "train"], capsys)
    assert code == 2 and "single class" in err
