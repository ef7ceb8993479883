"""Data as users have it: linked class folders, images PIL reads whatever their extension (and what is skipped,
named), splits left with no readable image, CSVs with relative paths, multi-label columns, save_to_disk folders,
class folders given as --dataset_name, and the same image under two classes."""

import io
import logging
import os

import datasets
import numpy as np
import pytest
from conftest import COLORS, data_flags, vit_flags, write_color_imagefolder
from PIL import Image, features

from imgft.args import DataArguments
from imgft.commands import predict
from imgft.data import decode_once_dropping_unreadable, load_labeled_dataset
from imgft.errors import UserError

NAMES = list(COLORS)[:2]  # red, green


def load(tmp_path, **flags):
    """(dataset, label names) as training loads them, every image decoded once and the unreadable ones set aside."""
    data_args = DataArguments(
        **{name: str(value) if isinstance(value, os.PathLike) else value for name, value in flags.items()}
    )
    dataset, image_column, label_column, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    kept, _ = decode_once_dropping_unreadable(dataset, image_column, label_column, names, data_args)
    return kept, names


def counts(split, names):
    return np.bincount(split["label"], minlength=len(names)).tolist()


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def warnings_in(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


# --- 9. links ---------------------------------------------------------------------------------------------------------


def test_a_linked_class_folder_and_linked_images_count(tmp_path):
    write_color_imagefolder(tmp_path / "raw", ["red"], 5, seed=1)
    write_color_imagefolder(tmp_path / "train", ["green"], 4, seed=2)
    (tmp_path / "train" / "red").symlink_to(tmp_path / "raw" / "red")  # ln -s /data/raw/red train/red
    Image.new("RGB", (16, 16), COLORS["green"]).save(tmp_path / "extra.png")
    (tmp_path / "train" / "green" / "linked.png").symlink_to(tmp_path / "extra.png")
    write_color_imagefolder(tmp_path / "validation", NAMES, 2, seed=3)
    kept, names = load(tmp_path, train_dir=tmp_path / "train", validation_dir=tmp_path / "validation")
    assert names == ["green", "red"]
    assert counts(kept["train"], names) == [5, 5]  # red: the 5 behind the link; green: 4 and the linked file
    assert counts(kept["validation"], names) == [2, 2]


def test_a_link_loop_is_read_once_and_named(tmp_path, caplog):
    write_color_imagefolder(tmp_path / "train", NAMES, 3)
    (tmp_path / "train" / "red" / "loop").symlink_to(tmp_path / "train")  # back to the top
    (tmp_path / "train" / "green" / "twin").symlink_to(tmp_path / "train" / "red")
    caplog.set_level(logging.WARNING, logger="imgft")
    kept, names = load(tmp_path, train_dir=tmp_path / "train", train_val_split=0.5)
    assert sum(counts(kept["train"], names)) + sum(counts(kept["validation"], names)) == 6  # each image once
    said = [message for message in warnings_in(caplog) if "read once already" in message]
    assert len(said) == 1
    assert f"red/loop (a link to {tmp_path / 'train'}, read already as {tmp_path / 'train'})" in said[0]
    assert f"green/twin (a link to {tmp_path / 'train' / 'red'}, read already as " in said[0]


# --- 10. what PIL reads, and what is skipped --------------------------------------------------------------------------


def odd_files_folder(root):
    """root/train with red and green (3 PNGs each), red also holding an AVIF, a PNG without an extension, a
    .heic of random bytes (no plugin reads it), notes and a hidden file, and a blue folder holding only a .HEIC;
    root/validation plain."""
    write_color_imagefolder(root / "train", NAMES, 3, seed=4)
    write_color_imagefolder(root / "validation", NAMES, 1, seed=5)
    red = root / "train" / "red"
    (red / "photo.avif").write_bytes(encoded(Image.new("RGB", (16, 16), COLORS["red"]), "AVIF"))
    (red / "3f9a1c0b7d").write_bytes(encoded(Image.new("RGB", (16, 16), COLORS["red"]), "PNG"))
    (red / "IMG_0001.heic").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (red / "notes.txt").write_text("shot on the balcony")
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "blue").mkdir()  # a class of phone photos only, which no image is left in
    (root / "train" / "blue" / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(40))
    return root


@pytest.mark.skipif(not features.check("avif"), reason="this PIL has no AVIF plugin")
def test_images_pil_reads_count_whatever_their_extension_and_the_rest_are_named(tmp_path, caplog):
    root = odd_files_folder(tmp_path / "data")
    caplog.set_level(logging.WARNING, logger="imgft")
    kept, names = load(tmp_path, train_dir=root / "train", validation_dir=root / "validation")
    assert names == ["green", "red"] and counts(kept["train"], names) == [3, 5]  # red: 3 PNGs, the AVIF, the hash
    said = [message for message in warnings_in(caplog) if "not images" in message]
    assert len(said) == 1
    assert "3 file(s) that are not images (2 .heic, 1 .txt)" in said[0]
    assert "blue/IMG_0002.HEIC (HEIC image, which this PIL has no plugin to read" in said[0]
    assert "red/IMG_0001.heic (HEIC image, which this PIL has no plugin to read" in said[0]
    assert "red/notes.txt (not an image PIL can open)" in said[0]
    assert said[0].endswith("; left with no image, these folders are no class: blue")
    assert ".DS_Store" not in caplog.text and "unreadable" not in caplog.text
    from imgft.commands.check_data import data_report

    caplog.clear()  # check-data sees and says the same
    data_args = DataArguments(train_dir=str(root / "train"), validation_dir=str(root / "validation"))
    lines, refusal = data_report(data_args, str(tmp_path / "cache"), 0)
    assert refusal is None and [line.split() for line in lines if line.startswith("  red ")] == [["red", "5", "/", "1"]]
    assert [message for message in warnings_in(caplog) if "not images" in message] == said


@pytest.mark.skipif(not features.check("avif"), reason="this PIL has no AVIF plugin")
def test_predict_finds_the_images_training_reads(tmp_path):
    root = odd_files_folder(tmp_path / "data")
    dataset, *_ = load_labeled_dataset(DataArguments(train_dir=str(root / "train"), train_val_split=0.2), None, 0)
    trained_on = {
        row["path"]
        for split in dataset.values()
        for row in split.cast_column("image", datasets.Image(decode=False))["image"]
    }
    files, problems, skipped = predict.find_images([str(root / "train")])
    assert set(files) == trained_on and len(files) == 8 and problems == []
    assert [(os.path.basename(path), reason.split(",")[0]) for path, reason in skipped] == [
        ("IMG_0002.HEIC", "HEIC image"),
        ("IMG_0001.heic", "HEIC image"),
        ("notes.txt", "not an image PIL can open"),
    ]
    globbed, _, skipped_by_glob = predict.find_images([str(root / "train" / "red" / "*")])
    assert sorted(map(os.path.basename, globbed)) == ["000.png", "001.png", "002.png", "3f9a1c0b7d", "photo.avif"]
    assert skipped_by_glob == skipped[1:]


def test_a_folder_of_files_pil_cannot_open_says_what_it_skipped(tmp_path):
    for name in NAMES:
        (tmp_path / "train" / name).mkdir(parents=True)
        for n in range(2):
            (tmp_path / "train" / name / f"IMG_{n}.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(40))
    with pytest.raises(UserError) as refused:
        load_labeled_dataset(DataArguments(train_dir=str(tmp_path / "train")), str(tmp_path / "cache"), 0)
    message = str(refused.value)
    assert "holds no image PIL can open: 4 file(s) that are not images (4 .heic)" in message
    assert "green/IMG_0.HEIC (HEIC image, which this PIL has no plugin to read" in message
    assert "put each class's images in a subfolder" not in message


def test_the_listing_decides_once_and_opens_only_files_without_an_image_extension(tmp_path, monkeypatch):
    from imgft import image_files

    root = odd_files_folder(tmp_path / "data")
    opened = []
    real_open = image_files.Image.open
    monkeypatch.setattr(
        image_files.Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k)
    )
    data_args = DataArguments(train_dir=str(root / "train"), validation_dir=str(root / "validation"))
    load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert sorted(os.path.basename(path) for path in opened) == [
        "3f9a1c0b7d",
        "IMG_0001.heic",
        "IMG_0002.HEIC",
        "notes.txt",
    ]
    opened.clear()
    load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert opened == []  # the verdicts come back from the datasets cache
    (root / "train" / "red" / "notes.txt").write_text("edited: the cache follows each file's size and time")
    load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert sorted(os.path.basename(path) for path in opened) == [
        "3f9a1c0b7d",
        "IMG_0001.heic",
        "IMG_0002.HEIC",
        "notes.txt",
    ]


# --- 12, 13. splits with no readable image ----------------------------------------------------------------------------


def broken_folder(root, names, per_class):
    for name in names:
        (root / name).mkdir(parents=True)
        for n in range(per_class):
            (root / name / f"{n}.png").write_bytes(b"not a png")
    return root


def test_a_validation_folder_of_unreadable_images_is_refused_before_training(train, tmp_path, tiny_vit):
    write_color_imagefolder(tmp_path / "data" / "train", NAMES, 4)
    broken_folder(tmp_path / "data" / "validation", NAMES, 2)
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        train(data_flags(tmp_path / "data") + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "1"])
    message = str(refused.value)
    assert message.startswith("none of the 4 images of the validation split can be read, so there is nothing to ")
    assert "evaluate on" in message and "0.png: not an image PIL can identify" in message
    assert len(message.splitlines()) == 1 and not out.exists()


def test_every_training_image_unreadable_is_refused_by_check_data_and_training(train, tmp_path, tiny_vit, capsys):
    from test_bad_input import check_data

    broken_folder(tmp_path / "data" / "train", NAMES, 3)
    write_color_imagefolder(tmp_path / "data" / "validation", NAMES, 2)
    code, out, err = check_data(data_flags(tmp_path / "data"), capsys)
    assert code == 2 and "Training would accept" not in out
    assert "training would refuse this data: none of the 6 images of the train split can be read" in err
    with pytest.raises(
        UserError, match="none of the 6 images of the train split can be read, so there is nothing to train on"
    ):
        train(data_flags(tmp_path / "data") + vit_flags(tiny_vit) + ["--output_dir", tmp_path / "out"])


def csv_dataset(root, name_column="image"):
    """root/train.csv and root/validation.csv naming images under root/pictures/ by paths relative to root."""
    write_color_imagefolder(root / "pictures", NAMES, 3)
    for split, rows in (("train", range(2)), ("validation", range(2, 3))):
        lines = [f"{name_column},label"] + [f"pictures/{name}/{n:03d}.png,{name}" for name in NAMES for n in rows]
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_csv_image_paths_are_read_relative_to_the_csv(tmp_path, monkeypatch):
    root = csv_dataset(tmp_path / "csv")
    monkeypatch.chdir(tmp_path)  # not the CSV's folder
    kept, names = load(tmp_path, dataset_name=root, image_column_name="image")
    assert names == ["green", "red"]
    assert counts(kept["train"], names) == [2, 2] and counts(kept["validation"], names) == [1, 1]
    monkeypatch.chdir(root)  # paths the working directory reads are read there, as datasets does
    kept, names = load(tmp_path, dataset_name="../csv", image_column_name="image")
    assert counts(kept["train"], names) == [2, 2]


def test_relative_csv_paths_of_one_split_in_csvs_of_several_folders_are_refused_in_one_line(tmp_path):
    root = csv_dataset(tmp_path / "csv")
    (root / "train.csv").rename(root / "train-0.csv")
    (root / "more").mkdir()
    (root / "more" / "train-1.csv").write_text("image,label\npictures/red/002.png,red\n")
    with pytest.raises(UserError) as refused:
        load(tmp_path, dataset_name=root, image_column_name="image")
    assert str(refused.value) == (
        "the image paths of the 'train' split are relative (pictures/red/002.png), and its data files lie in "
        f"several folders ({root}, {root / 'more'}): make them relative to one folder, or absolute"
    )


# --- 14. multi-label --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequence_of_class_labels", "lists_of_names"])
def test_multi_label_data_is_refused_in_one_line(tmp_path, kind):
    pictures = [Image.new("RGB", (8, 8), COLORS[name]) for name in NAMES * 2]
    if kind == "sequence_of_class_labels":
        label = datasets.Sequence(datasets.ClassLabel(names=NAMES))
        labels = [[0], [1], [0, 1], [1]]
    else:
        label = datasets.List(datasets.Value("string"))
        labels = [["red"], ["green"], ["red", "green"], []]
    feature_set = datasets.Features({"image": datasets.Image(), "labels": label})
    (tmp_path / "data").mkdir()
    table = datasets.Dataset.from_dict({"image": pictures, "labels": labels}, features=feature_set)
    table.to_parquet(str(tmp_path / "data" / "train.parquet"))
    with pytest.raises(UserError) as refused:
        load_labeled_dataset(DataArguments(dataset_name=str(tmp_path / "data")), str(tmp_path / "cache"), 0)
    assert str(refused.value) == (
        "the label column 'labels' holds a list of labels per image (multi-label data): imgft trains "
        "single-label classifiers, one label per image"
    )


# --- 15. save_to_disk folders -----------------------------------------------------------------------------------------


def saved_dataset(rows, seed):
    pictures = [Image.new("RGB", (8, 8), COLORS[NAMES[n % 2]]) for n in range(rows)]
    feature_set = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green"])})
    return datasets.Dataset.from_dict({"image": pictures, "label": [n % 2 for n in range(rows)]}, features=feature_set)


def test_save_to_disk_folders_load_by_dataset_name_and_train_dir_names_that_flag(tmp_path):
    whole = datasets.DatasetDict(train=saved_dataset(10, 0), validation=saved_dataset(4, 1))
    whole.save_to_disk(str(tmp_path / "dict"))
    whole["train"].save_to_disk(str(tmp_path / "one"))  # one split, as ds["train"].save_to_disk gives
    dataset, _, _, names = load_labeled_dataset(DataArguments(dataset_name=str(tmp_path / "dict")), None, 0)
    assert names == ["red", "green"] and (len(dataset["train"]), len(dataset["validation"])) == (10, 4)
    data_args = DataArguments(dataset_name=str(tmp_path / "one"), train_val_split=0.2)
    dataset, _, _, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert names == ["red", "green"] and (len(dataset["train"]), len(dataset["validation"])) == (8, 2)
    assert not any(name.startswith("cache-") for name in os.listdir(tmp_path / "one"))  # the user's folder untouched
    for folder in ("dict", "one"):
        with pytest.raises(UserError) as refused:
            load_labeled_dataset(DataArguments(train_dir=str(tmp_path / folder)), None, 0)
        assert str(refused.value) == (
            f"--train_dir {tmp_path / folder} is a dataset written by datasets' save_to_disk: give it as --dataset_name"
        )


# --- 16a. class folders as --dataset_name -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["one_class_nested_deeper", "every_class_nested_alike"])
def test_class_folders_given_as_dataset_name_take_classes_from_their_top_level_folder(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "one_class_nested_deeper":
        write_color_imagefolder(root / "train", ["red", "green"], 3)
        write_color_imagefolder(root / "train" / "red", ["more"], 2, seed=1)  # red: 3 + 2
        write_color_imagefolder(root / "validation", ["red", "green"], 1, seed=2)
        expected = {"train": [3, 5], "validation": [1, 1]}
    else:  # datasets would label these by their parent folder: batch_a, batch_b
        for index, (name, batch) in enumerate((("red", "batch_a"), ("green", "batch_a"), ("green", "batch_b"))):
            write_color_imagefolder(root / "train" / name, [batch], 2, seed=index)
            write_color_imagefolder(root / "validation" / name, [batch], 1, seed=10 + index)
        expected = {"train": [4, 2], "validation": [2, 1]}
    named, _, _, names = load_labeled_dataset(DataArguments(dataset_name=str(root)), str(tmp_path / "cache"), 0)
    folders = DataArguments(train_dir=str(root / "train"), validation_dir=str(root / "validation"))
    as_folders, _, _, folder_names = load_labeled_dataset(folders, str(tmp_path / "cache"), 0)
    assert names == folder_names == ["green", "red"]
    for split in ("train", "validation"):
        assert counts(named[split], names) == counts(as_folders[split], names) == expected[split]


def test_class_folders_of_formats_datasets_does_not_list_as_dataset_name_point_to_train_dir(tmp_path):
    for name in NAMES:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "3f9a1c0b7d").write_bytes(encoded(Image.new("RGB", (8, 8), COLORS[name]), "PNG"))
    with pytest.raises(
        UserError, match=r"No \(supported\) data files found .*; for class folders of images give --train_dir"
    ):
        load_labeled_dataset(DataArguments(dataset_name=str(tmp_path / "data")), str(tmp_path / "cache"), 0)


def test_class_folders_without_split_folders_as_dataset_name(tmp_path):
    write_color_imagefolder(tmp_path / "data", ["red", "green"], 5)
    write_color_imagefolder(tmp_path / "data" / "green", ["deeper"], 5, seed=1)
    data_args = DataArguments(dataset_name=str(tmp_path / "data"), train_val_split=0.2)
    dataset, _, _, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert names == ["green", "red"]
    both = zip(counts(dataset["train"], names), counts(dataset["validation"], names), strict=True)
    assert [train + validation for train, validation in both] == [10, 5]


# --- 21. the same image under two classes -----------------------------------------------------------------------------


def test_check_data_names_the_same_image_under_two_classes_in_train(tmp_path):
    from imgft.commands.check_data import data_report

    write_color_imagefolder(tmp_path / "train", NAMES, 3)
    write_color_imagefolder(tmp_path / "validation", NAMES, 1, seed=9)
    train = tmp_path / "train"
    (train / "green" / "also_red.png").write_bytes((train / "red" / "001.png").read_bytes())
    (train / "red" / "twice.png").write_bytes((train / "red" / "002.png").read_bytes())  # one class: no conflict
    data_args = DataArguments(train_dir=str(train), validation_dir=str(tmp_path / "validation"))
    lines, refusal = data_report(data_args, str(tmp_path / "cache"), 0)
    assert refusal is None
    at = lines.index("Same image under two classes in train (same bytes): 1")
    assert lines[at + 1 :] == [f"  {train / 'red' / '001.png'} (red) = {train / 'green' / 'also_red.png'} (green)"]
