"""imgft.data: labels, columns, splits, image sizes, transforms and batches, on tiny in-memory datasets."""

import json
import os
import random
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import COLORS, write_color_imagefolder
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from transformers import CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from imgft.args import DataArguments
from imgft.data import (
    decode_once_dropping_unreadable,
    encode_labels,
    find_columns,
    load_labeled_dataset,
    load_raw_datasets,
    relabel,
    subsample,
)
from imgft.errors import UserError
from imgft.preprocessing import input_size, plan_for, with_image_size
from imgft.transforms import (
    build_transforms,
    collate_fn,
    crop_box,
    normalizer,
    stored_image_size,
    with_eval_transform,
)


def small_images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


def split_dict(train, validation, features=None):
    """A DatasetDict from two column dicts (same features for both splits when given)."""
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict(train, features=features),
        validation=datasets.Dataset.from_dict(validation, features=features),
    )


def labels_dataset(train_labels, validation_labels, feature=None):
    features = datasets.Features({"label": feature}) if feature is not None else None
    return split_dict({"label": train_labels}, {"label": validation_labels}, features)


def ids(split_dataset, column="label"):
    return list(split_dataset[column])


# --- encode_labels --------------------------------------------------------------------------------------------------


def test_encode_labels_keeps_a_class_label_column():
    feature = datasets.ClassLabel(names=["cat", "dog", "bird"])
    dataset = labels_dataset([0, 1, 2, 1], [2, 0], feature)
    encoded, names = encode_labels(dataset, "label")
    assert names == ["cat", "dog", "bird"]  # the dataset's own order, not sorted
    assert ids(encoded["train"]) == [0, 1, 2, 1]
    assert ids(encoded["validation"]) == [2, 0]
    assert encoded["train"].features["label"].names == names


def test_encode_labels_refuses_differing_class_labels_between_splits():
    dataset = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"label": [0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])})
        ),
        validation=datasets.Dataset.from_dict(
            {"label": [0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["b", "a"])})
        ),
    )
    with pytest.raises(UserError, match="validation split's 'label' classes differ"):
        encode_labels(dataset, "label")


def test_encode_labels_string_column_keeps_text_sorted():
    dataset = labels_dataset(["狗", "chat noir", "bird", "狗", "chat noir"], ["bird", "狗"])
    encoded, names = encode_labels(dataset, "label")
    assert names == sorted(["bird", "chat noir", "狗"]) == ["bird", "chat noir", "狗"]
    feature = encoded["train"].features["label"]
    assert isinstance(feature, datasets.ClassLabel)
    assert feature.names == names
    assert encoded["validation"].features["label"].names == names
    assert [names[i] for i in ids(encoded["train"])] == ["狗", "chat noir", "bird", "狗", "chat noir"]
    assert [names[i] for i in ids(encoded["validation"])] == ["bird", "狗"]


def test_encode_labels_int_column_sorts_numerically_and_remaps():
    dataset = labels_dataset([2, 10, 7, 2, 10], [7, 10])
    encoded, names = encode_labels(dataset, "label")
    assert names == ["2", "7", "10"]  # numeric order, not '10' < '2'
    assert ids(encoded["train"]) == [0, 2, 1, 0, 2]  # the rows labelled 10 get id 2
    assert ids(encoded["validation"]) == [1, 2]
    assert encoded["train"].features["label"].names == ["2", "7", "10"]
    assert encoded["validation"].features["label"].names == ["2", "7", "10"]


def test_encode_labels_int_column_small_ids_map_by_name_not_value():
    # The raw value 1 must become the id of class '1' (index 1 of ['0','1','5']), and 5 must not be read as an index.
    dataset = labels_dataset([5, 0, 1], [1, 5])
    encoded, names = encode_labels(dataset, "label")
    assert names == ["0", "1", "5"]
    assert ids(encoded["train"]) == [2, 0, 1]
    assert ids(encoded["validation"]) == [1, 2]


def test_encode_labels_class_only_in_validation_is_refused():
    dataset = labels_dataset(["a", "b", "a"], ["a", "c", "d"])
    with pytest.raises(UserError, match="validation classes missing from train: c, d"):
        encode_labels(dataset, "label")


def test_encode_labels_class_label_missing_from_train_is_refused():
    feature = datasets.ClassLabel(names=["a", "b", "c"])
    dataset = labels_dataset([0, 1, 0], [2, 0], feature)
    with pytest.raises(UserError, match="validation classes missing from train: c"):
        encode_labels(dataset, "label")


def test_encode_labels_class_missing_from_validation_is_fine():
    dataset = labels_dataset(["a", "b", "c"], ["a"])
    _, names = encode_labels(dataset, "label")
    assert names == ["a", "b", "c"]


@pytest.mark.parametrize(
    "dataset",
    [
        labels_dataset(["only", "only"], ["only"]),
        labels_dataset([3, 3, 3], [3]),
        labels_dataset([0, 0], [0], datasets.ClassLabel(names=["one"])),
    ],
    ids=["string", "int", "classlabel"],
)
def test_encode_labels_single_class_is_refused(dataset):
    with pytest.raises(UserError, match="single class"):
        encode_labels(dataset, "label")


def test_encode_labels_empty_values_are_refused():
    dataset = labels_dataset(["a", None, "b"], ["a"])
    with pytest.raises(UserError, match="empty values"):
        encode_labels(dataset, "label")


# --- find_columns ---------------------------------------------------------------------------------------------------


def image_dataset(n=4, extra=None, label_feature=None, label_name="target"):
    features = {"idx": datasets.Value("int64"), "img": datasets.Image()}
    columns = {"idx": list(range(n)), "img": small_images(n)}
    if label_feature is not None:
        features[label_name] = label_feature
        columns[label_name] = [
            i % 2 if isinstance(label_feature, datasets.ClassLabel) else f"c{i % 2}" for i in range(n)
        ]
    columns.update(extra or {})
    features = datasets.Features(features)
    return split_dict(columns, columns, features)


def test_find_columns_detects_image_and_class_label():
    dataset = image_dataset(label_feature=datasets.ClassLabel(names=["x", "y"]))
    assert find_columns(dataset, None, None) == ("img", "target")


def test_find_columns_falls_back_to_a_column_named_label():
    dataset = image_dataset(label_feature=datasets.Value("string"), label_name="label")
    assert find_columns(dataset, None, None) == ("img", "label")


def test_find_columns_keeps_named_columns():
    dataset = image_dataset(label_feature=datasets.ClassLabel(names=["x", "y"]))
    assert find_columns(dataset, "img", "idx") == ("img", "idx")


@pytest.mark.parametrize(
    ("image_column", "label_column", "flag", "name"),
    [
        ("picture", None, "--image_column_name", "picture"),
        (None, "labels_typo", "--label_column_name", "labels_typo"),
    ],
)
def test_find_columns_refuses_a_missing_named_column(image_column, label_column, flag, name):
    dataset = image_dataset(label_feature=datasets.ClassLabel(names=["x", "y"]))
    with pytest.raises(UserError) as info:
        find_columns(dataset, image_column, label_column)
    message = str(info.value)
    assert flag in message
    assert f"'{name}'" in message
    assert "columns: idx, img, target" in message


def test_image_column_name_picks_one_of_two_image_columns(tmp_path):
    image = datasets.Image()
    features = datasets.Features({"photo": image, "sketch": image, "label": datasets.Value("string")})
    rows = {"photo": small_images(10), "sketch": small_images(10, seed=1), "label": ["cat", "dog"] * 5}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    for flag, column in ((None, "photo"), ("sketch", "sketch")):  # the first image column by default
        data_args = DataArguments(dataset_name=str(tmp_path / "data"), image_column_name=flag)
        assert load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)[1] == column


def test_find_columns_without_label_column_lists_columns():
    dataset = image_dataset()
    with pytest.raises(UserError, match=r"no label column found.*columns: idx, img"):
        find_columns(dataset, None, None)


def test_find_columns_without_image_column_lists_columns():
    dataset = labels_dataset(["a", "b"], ["a"])
    with pytest.raises(UserError, match=r"no image column found.*columns: label"):
        find_columns(dataset, None, None)


# --- load_raw_datasets ----------------------------------------------------------------------------------------------

CLASSES = ["a", "b", "c"]
PER_CLASS = 10


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    return write_color_imagefolder(tmp_path_factory.mktemp("imagefolder") / "train", CLASSES, PER_CLASS)


def image_paths(split_dataset):
    undecoded = split_dataset.cast_column("image", datasets.Image(decode=False))
    return [row["path"] for row in undecoded["image"]]


def load_split(train_folder, tmp_path, seed, split=0.2):
    data_args = DataArguments(train_dir=str(train_folder), train_val_split=split)
    dataset, _ = load_raw_datasets(data_args, str(tmp_path / "cache"), seed, str(tmp_path / "no_demo"))
    return dataset


def test_load_raw_datasets_holds_out_a_seeded_validation_split(train_folder, tmp_path):
    n = len(CLASSES) * PER_CLASS
    first = load_split(train_folder, tmp_path, seed=0)
    assert set(first) == {"train", "validation"}
    assert abs(len(first["validation"]) - round(n * 0.2)) <= 1
    assert len(first["train"]) + len(first["validation"]) == n
    train_paths, validation_paths = image_paths(first["train"]), image_paths(first["validation"])
    assert not set(train_paths) & set(validation_paths)
    assert first["train"].features["label"].names == CLASSES

    again = load_split(train_folder, tmp_path, seed=0)
    assert image_paths(again["validation"]) == validation_paths
    assert image_paths(again["train"]) == train_paths

    other = load_split(train_folder, tmp_path, seed=1)
    assert set(image_paths(other["validation"])) != set(validation_paths)


@pytest.mark.parametrize("split", [0.1, 0.5])
def test_load_raw_datasets_split_size_follows_train_val_split(train_folder, tmp_path, split):
    n = len(CLASSES) * PER_CLASS
    dataset = load_split(train_folder, tmp_path, seed=0, split=split)
    assert abs(len(dataset["validation"]) - round(n * split)) <= 1


def test_load_raw_datasets_uses_the_validation_dir(train_folder, tmp_path):
    validation = write_color_imagefolder(tmp_path / "validation", CLASSES, 2, seed=5)
    data_args = DataArguments(train_dir=str(train_folder), validation_dir=str(validation))
    dataset, source = load_raw_datasets(data_args, str(tmp_path / "cache"), 0, str(tmp_path / "no_demo"))
    assert source == f"--validation_dir {validation}"
    assert (tmp_path / "cache" / "generator").is_dir()  # --cache_dir holds the datasets cache of the listing
    assert len(dataset["train"]) == len(CLASSES) * PER_CLASS
    assert len(dataset["validation"]) == len(CLASSES) * 2
    assert all(path.startswith(str(validation)) for path in image_paths(dataset["validation"]))


def test_load_raw_datasets_missing_folder(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(UserError, match="--train_dir .*does_not_exist is not a folder"):
        load_raw_datasets(DataArguments(train_dir=str(missing)), str(tmp_path / "cache"), 0, str(tmp_path))


def test_load_raw_datasets_missing_validation_folder(train_folder, tmp_path):
    data_args = DataArguments(train_dir=str(train_folder), validation_dir=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="--validation_dir .*nope is not a folder"):
        load_raw_datasets(data_args, str(tmp_path / "cache"), 0, str(tmp_path))


def test_load_raw_datasets_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)  # a class folder, but no files at all
    with pytest.raises(UserError, match="holds no images"):
        load_raw_datasets(DataArguments(train_dir=str(empty)), str(tmp_path / "cache"), 0, str(tmp_path))


def test_load_raw_datasets_folder_without_images(tmp_path):
    folder = tmp_path / "no_images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError):
        load_raw_datasets(DataArguments(train_dir=str(folder)), str(tmp_path / "cache"), 0, str(tmp_path))


def test_load_labeled_dataset_on_an_imagefolder(colors_data, tmp_path):
    data_args = DataArguments(train_dir=str(colors_data / "train"), validation_dir=str(colors_data / "validation"))
    dataset, image_column, label_column, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert (image_column, label_column) == ("image", "label")
    assert names == sorted(list(COLORS)[:5])
    assert len(dataset["train"]) == 5 * 12
    assert len(dataset["validation"]) == 5 * 5
    assert np.bincount(ids(dataset["validation"]), minlength=5).tolist() == [5] * 5


def test_a_validation_folder_may_hold_one_of_the_two_classes(tmp_path):
    # The rule of two classes is training's: a validation set that lacks a class is still one.
    train = write_color_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    validation = write_color_imagefolder(tmp_path / "validation", ["dog"], 3, seed=5)
    data_args = DataArguments(train_dir=str(train), validation_dir=str(validation))
    dataset, _, _, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert names == ["cat", "dog"]
    assert ids(dataset["validation"]) == [1, 1, 1]
    with pytest.raises(UserError, match="--train_dir .*: found a single class \\(dog\\)"):
        load_labeled_dataset(DataArguments(train_dir=str(validation)), str(tmp_path / "cache"), 0)


def test_resize_once_stores_shrunk_images_and_sets_unreadable_ones_aside(tmp_path):
    from conftest import write_color_imagefolder

    write_color_imagefolder(tmp_path / "train", ["red", "green"], 3, size=60)
    (tmp_path / "train" / "red" / "broken.png").write_bytes(b"not a png")
    data_args = DataArguments(train_dir=str(tmp_path / "train"), train_val_split=0.34)
    dataset, image_column, label_column, names = load_labeled_dataset(data_args, None, 0)
    kept, unreadable = decode_once_dropping_unreadable(
        dataset, image_column, label_column, names, data_args, stored_size=20
    )
    assert unreadable == 1
    assert len(kept["train"]) + len(kept["validation"]) == 6
    assert {image.size for image in kept["train"][image_column]} == {(20, 20)}
    assert kept["train"].column_names == dataset["train"].column_names  # the verdict columns are gone
    # The same pass without resizing only checks: the images stay as they were.
    checked, unreadable = decode_once_dropping_unreadable(dataset, image_column, label_column, names, data_args)
    assert unreadable == 1
    assert {image.size for image in checked["train"][image_column]} == {(60, 60)}


def test_stored_image_size_covers_what_the_transforms_need():
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    vit = ViTImageProcessor(size={"height": 224, "width": 224})
    assert stored_image_size(vit, None, DataArguments()) == 256
    assert stored_image_size(vit, 64, DataArguments()) == 74
    convnext = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    assert stored_image_size(convnext, None, DataArguments()) == 256
    assert stored_image_size(vit, None, DataArguments(stored_image_size=300)) == 300
    assert stored_image_size(vit, None, DataArguments(resize_once=False)) is None


# --- input sizes ---------------------------------------------------------------------------------------------------


def model_input_size(processor):
    return input_size(processor, plan_for(processor))


def test_input_size_height_width():
    processor = ViTImageProcessor(size={"height": 24, "width": 32})
    assert model_input_size(processor) == (24, 32)


def test_input_size_shortest_edge_with_crop_pct():
    processor = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    assert model_input_size(processor) == (224, 224)


def test_input_size_shortest_edge_with_crop_size():
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    assert model_input_size(processor) == (224, 224)


def test_input_size_shortest_edge_with_other_crop_size():
    processor = CLIPImageProcessor(size={"shortest_edge": 160}, crop_size={"height": 128, "width": 144})
    assert model_input_size(processor) == (128, 144)


@pytest.mark.parametrize(
    "processor",
    [
        ViTImageProcessor(size={"height": 24, "width": 32}),
        ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875),
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        CLIPImageProcessor(size={"shortest_edge": 160}, crop_size={"height": 128, "width": 144}),
    ],
    ids=["vit", "convnext", "clip", "clip-oblong-crop"],
)
def test_image_size_override_forces_a_square(processor):
    assert model_input_size(with_image_size(processor, 48)) == (48, 48)


# --- build_transforms, normalizer ----------------------------------------------------------------------------------

MEAN = [0.2, 0.4, 0.6]
STD = [0.5, 0.25, 0.1]


def as_batch(array):
    """One H x W x 3 uint8 transform output as the 1 x 3 x H x W uint8 batch collate_fn makes."""
    return collate_fn([{"pixel_values": array, "labels": 0}])["pixel_values"]


def test_transforms_give_uint8_images_of_the_crop_size_and_normalizer_makes_model_input():
    processor = ViTImageProcessor(size={"height": 24, "width": 32}, image_mean=MEAN, image_std=STD)
    train, evaluation = build_transforms(processor, None, random_flip=True, crop_scale_min=0.5)
    color = (255, 0, 128)
    image = Image.new("RGB", (50, 40), color)  # width 50, height 40
    for out in (train(image, random.Random(0)), evaluation([image])[0]):
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.uint8
        assert out.shape == (24, 32, 3)
        assert (out == np.array(color, dtype=np.uint8)).all()
    out = normalizer(processor)(as_batch(evaluation([image])[0]))
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 3, 24, 32)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, MEAN, STD, strict=True)])
    assert torch.allclose(out[0], expected.view(3, 1, 1).expand_as(out[0]), atol=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.2) / 0.5, abs=1e-5)
    assert out[0, 1, 0, 0].item() == pytest.approx((0.0 - 0.4) / 0.25, abs=1e-5)


def test_normalizer_channels_last_gives_the_same_numbers_in_channels_last_memory():
    processor = ViTImageProcessor(image_mean=MEAN, image_std=STD)
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)  # contiguous, as a user's own batch may be
    plain, channels_last = normalizer(processor)(batch), normalizer(processor, channels_last=True)(batch)
    assert plain.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    assert torch.equal(plain, channels_last)


def test_normalizer_builds_its_device_statistics_once():
    from imgft.transforms import _channel_statistics

    normalize = normalizer(ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]))
    _channel_statistics.cache_clear()
    for _ in range(3):
        normalize(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))
    info = _channel_statistics.cache_info()
    assert (info.misses, info.hits) == (1, 2)  # no host-to-device copy after the first batch


def test_eval_transform_with_clip_processor():
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    color = (10, 200, 90)
    out = normalizer(processor)(as_batch(evaluation([Image.new("RGB", (60, 45), color)])[0]))[0]
    assert tuple(out.shape) == (3, 32, 32)
    mean, std = processor.image_mean, processor.image_std
    for channel in range(3):
        expected = (color[channel] / 255 - mean[channel]) / std[channel]
        assert torch.allclose(out[channel], torch.full((32, 32), expected), atol=1e-5)


def test_eval_transform_resizes_the_shortest_edge_then_crops_the_centre():
    processor = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    # 80 x 40 -> 40 x 20, of which the middle 20 columns are kept: the bright band (16-64, so 8-32 after the
    # resize) fills the crop, and the dark sides are cut off.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 16:64] = 255
    out = evaluation([Image.fromarray(pixels)])[0]
    assert out.shape == (20, 20, 3)
    assert out.min() == 255


def test_normalizer_without_normalize_keeps_zero_one_range():
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, do_normalize=False)
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    out = normalizer(processor)(as_batch(evaluation([Image.new("RGB", (16, 16), (255, 0, 51))])[0]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]), atol=1e-5)


def test_transforms_with_image_size_override():
    processor = ViTImageProcessor(size={"height": 24, "width": 32})
    train, evaluation = build_transforms(processor, 20, random_flip=False, crop_scale_min=0.6)
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    assert evaluation([image])[0].shape == (20, 20, 3)
    assert train(image, random.Random(0)).shape == (20, 20, 3)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64)])
def test_crop_box_draws_torchvisions_crops_from_the_given_generator(size):
    width, height = size
    scale, ratio = (0.25, 0.75), (3 / 4, 4 / 3)
    boxes = [crop_box(width, height, scale, ratio, random.Random(seed)) for seed in range(200)]
    assert boxes == [crop_box(width, height, scale, ratio, random.Random(seed)) for seed in range(200)]
    assert len(set(boxes)) > 150  # different seeds, different crops
    for top, left, crop_height, crop_width in boxes:
        assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width
        # Rounding to whole pixels moves area and ratio a little off the drawn values.
        assert 0.24 * width * height <= crop_height * crop_width <= 0.76 * width * height
        assert 0.7 <= crop_width / crop_height <= 1.4
    # torchvision's own sampler, on torch's generator: the same distribution (mean crop area within 5 %).
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(2000)]
    ours = [crop_box(width, height, scale, ratio, random.Random(seed)) for seed in range(2000)]
    mean_area = [np.mean([h * w for _, _, h, w in boxes_]) for boxes_ in (theirs, ours)]
    assert mean_area[1] == pytest.approx(mean_area[0], rel=0.05)


def test_crop_box_falls_back_to_a_centre_crop_for_extreme_shapes():
    # A 1000 x 10 strip: no 3/4..4/3 crop fits, so the centre crop of the widest allowed ratio.
    top, left, crop_height, crop_width = crop_box(1000, 10, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert (crop_height, crop_width) == (10, 13)
    assert (top, left) == (0, (1000 - 13) // 2)


def left_bright_image(size=32):
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 255
    return Image.fromarray(pixels)


def is_flipped(array):
    half = array.shape[1] // 2
    return array[:, :half].mean() < array[:, half:].mean()


def test_no_flip_when_random_flip_is_off():
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    train, _ = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    image = left_bright_image()
    draws = [train(image, random.Random(seed)) for seed in range(30)]
    assert not any(is_flipped(out) for out in draws)
    # And the whole image was kept: left half bright, right half dark.
    assert all(out[:, :12].min() > 230 and out[:, 20:].max() < 25 for out in draws)


def test_flip_happens_when_random_flip_is_on():
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    train, _ = build_transforms(processor, None, random_flip=True, crop_scale_min=1.0)
    image = left_bright_image()
    flips = [is_flipped(train(image, random.Random(seed))) for seed in range(30)]
    assert any(flips)
    assert not all(flips)


# --- with_image_transform and collate_fn ----------------------------------------------------------------------------


def test_collate_fn_makes_a_batch():
    labels = [1, 0, 2, 1, 0]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    images = small_images(5, size=12)
    images[2] = images[2].convert("L")  # greyscale images are converted to RGB
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    transformed = with_eval_transform(dataset, evaluation, "image", "label")
    batch = collate_fn([transformed[i] for i in range(4)])
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == labels[:4]

    loader = torch.utils.data.DataLoader(transformed, batch_size=2, collate_fn=collate_fn)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == labels


def test_collate_fn_on_plain_examples():
    examples = [{"pixel_values": np.full((4, 5, 3), i, dtype=np.uint8), "labels": i} for i in range(3)]
    examples[1]["pixel_values"][0, 0] = (10, 20, 30)  # H x W x 3 in, B x 3 x H x W out
    batch = collate_fn(examples)
    assert batch["pixel_values"].shape == (3, 3, 4, 5)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"][2].unique().tolist() == [2]
    assert batch["pixel_values"][1, :, 0, 0].tolist() == [10, 20, 30]
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 1, 2]


# --- subsample ------------------------------------------------------------------------------------------------------


def test_subsample_is_seeded():
    dataset = datasets.Dataset.from_dict({"x": list(range(50))})
    first = subsample(dataset, 10, seed=0)
    assert len(first) == 10
    rows = list(first["x"])
    assert len(set(rows)) == 10 and set(rows) <= set(range(50))
    assert list(subsample(dataset, 10, seed=0)["x"]) == rows
    assert list(subsample(dataset, 10, seed=1)["x"]) != rows
    assert rows != list(range(10))  # a random subset, not the first rows


@pytest.mark.parametrize("max_samples", [None, 50, 80])
def test_subsample_keeps_everything_when_not_smaller(max_samples):
    dataset = datasets.Dataset.from_dict({"x": list(range(50))})
    assert subsample(dataset, max_samples, seed=0) is dataset


# --- relabel --------------------------------------------------------------------------------------------------------


def class_label_split(names, labels):
    features = datasets.Features({"label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"label": labels}, features=features)


def test_relabel_maps_by_name_to_the_models_ids():
    split = class_label_split(["cat", "dog"], [0, 1, 1, 0])
    label2id = {"dog": 0, "cat": 1, "bird": 2}
    relabeled = relabel(split, "label", ["cat", "dog"], label2id)
    assert list(relabeled["label"]) == [1, 0, 0, 1]
    assert relabeled.features["label"].names == ["dog", "cat", "bird"]
    names = relabeled.features["label"].names
    assert [names[i] for i in relabeled["label"]] == ["cat", "dog", "dog", "cat"]


def test_relabel_with_the_same_classes_changes_nothing():
    split = class_label_split(["a", "b"], [1, 0])
    assert relabel(split, "label", ["a", "b"], {"a": 0, "b": 1}) is split


def test_relabel_refuses_unknown_classes():
    split = class_label_split(["cat", "fish"], [0, 1])
    with pytest.raises(UserError) as info:
        relabel(split, "label", ["cat", "fish"], {"cat": 0, "dog": 1})
    message = str(info.value)
    assert "classes not known to the model: fish" in message
    assert "the model knows: cat, dog" in message


@pytest.mark.parametrize(
    ("num_proc", "rows", "megabytes_each", "expected"),
    [(16, 320, 0.7, 6), (2, 320, 0.7, 2), (16, 80, 0.2, None), (2, 1800, 0.0003, None), (None, 10_000, 1, None)],
)
def test_decode_pass_gets_a_process_per_32_mb_of_files(tmp_path, num_proc, rows, megabytes_each, expected):
    from imgft.images import worth_processes

    path = tmp_path / "image.jpg"
    path.write_bytes(b"x" * int(megabytes_each * 2**20))
    undecoded = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(path)}] * rows})
    assert worth_processes(num_proc, undecoded, "image") == expected


def test_decode_pass_counts_the_bytes_of_images_stored_in_the_dataset():
    from imgft.images import worth_processes

    one_megabyte = {"bytes": b"x" * 2**20, "path": None}
    assert worth_processes(4, datasets.Dataset.from_dict({"image": [one_megabyte] * 70}), "image") == 2
    assert worth_processes(4, datasets.Dataset.from_dict({"image": [one_megabyte] * 60}), "image") is None


# --- imagefolders: classes from the top-level folders, metadata files -------------------------------------------------


def class_of_each_row(split_dataset, root):
    """(class name, top-level folder under `root`) of each row: the two must agree."""
    names = split_dataset.features["label"].names
    return [
        (names[label], os.path.relpath(path, root).split(os.sep)[0])
        for label, path in zip(split_dataset["label"], image_paths(split_dataset), strict=True)
    ]


def nested_imagefolder(root, per_batch=(2, 3, 4, 1, 3)):
    """root/digit<k>/batch_<x>/*.png: 3 classes whose batch folders share names (batch_a in every class), all
    at one depth; digit0 holds per_batch[0] + per_batch[1] images, digit1 per_batch[2], digit2 the last two."""
    layout = [("digit0", "batch_a"), ("digit0", "batch_b"), ("digit1", "batch_a"), ("digit2", "batch_a")]
    layout.append(("digit2", "batch_b"))
    for seed, ((name, batch), count) in enumerate(zip(layout, per_batch, strict=True)):
        if count:
            write_color_imagefolder(root / name, [batch], count, seed=seed)
    return root


def test_nested_folders_take_their_class_from_the_top_level_folder(tmp_path):
    train_dir = nested_imagefolder(tmp_path / "train")
    validation_dir = nested_imagefolder(tmp_path / "validation", per_batch=(1, 1, 1, 0, 1))
    data_args = DataArguments(train_dir=str(train_dir), validation_dir=str(validation_dir))
    dataset, _, label_column, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert label_column == "label" and names == ["digit0", "digit1", "digit2"]
    assert np.bincount(ids(dataset["train"]), minlength=3).tolist() == [5, 4, 4]
    assert np.bincount(ids(dataset["validation"]), minlength=3).tolist() == [2, 1, 1]
    for split, root in (("train", train_dir), ("validation", validation_dir)):
        assert all(name == folder for name, folder in class_of_each_row(dataset[split], str(root)))


@pytest.mark.parametrize(
    ("train_dir", "validation_dir"),
    [
        ("data/train", "elsewhere/held/out/val"),
        ("data/train", "ABSOLUTE/elsewhere/held/out/val"),
        ("data/train", "./data/validation"),
        ("data/train", "data//validation"),
        ("./data/train", "data/validation/"),
    ],
)
def test_train_and_validation_folders_at_different_depths_keep_their_labels(
    tmp_path, monkeypatch, train_dir, validation_dir
):
    monkeypatch.chdir(tmp_path)
    write_color_imagefolder(tmp_path / "data" / "train", CLASSES, 3, seed=1)
    validation_dir = validation_dir.replace("ABSOLUTE", str(tmp_path))
    write_color_imagefolder(tmp_path / validation_dir, ["c", "a"], 2, seed=2)
    data_args = DataArguments(train_dir=train_dir, validation_dir=validation_dir)
    dataset, _, label_column, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert label_column == "label" and names == CLASSES
    assert np.bincount(ids(dataset["train"]), minlength=3).tolist() == [3, 3, 3]
    assert np.bincount(ids(dataset["validation"]), minlength=3).tolist() == [2, 0, 2]
    rows = class_of_each_row(dataset["validation"], str(tmp_path / validation_dir))
    assert all(name == folder for name, folder in rows)


def test_images_outside_class_folders_are_refused_naming_them(tmp_path):
    write_color_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    (tmp_path / "train" / "loose.png").write_bytes((tmp_path / "train" / "cat" / "000.png").read_bytes())
    with pytest.raises(UserError, match=r"--train_dir .*: found images outside class subfolders \(loose.png\)"):
        load_raw_datasets(DataArguments(train_dir=str(tmp_path / "train")), str(tmp_path / "cache"), 0, None)


def write_metadata_folder(root, label_column="species", kind="csv", per_class=3, seed=0):
    """root/<n>.png, all in one folder, with their classes (red, green) only in root/metadata.<kind>."""
    rows = []
    write_color_imagefolder(root / "flat", ["red", "green"], per_class, seed=seed)
    for name in ("red", "green"):
        for image in sorted((root / "flat" / name).iterdir()):
            image.rename(root / f"{name}_{image.name}")
            rows.append({"file_name": f"{name}_{image.name}", label_column: name})
    for name in ("red", "green"):
        (root / "flat" / name).rmdir()
    (root / "flat").rmdir()
    if kind == "csv":
        lines = [f"file_name,{label_column}"] + [f"{row['file_name']},{row[label_column]}" for row in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def labels_by_file(split_dataset, label_column):
    names = split_dataset.features[label_column].names
    return sorted(
        (os.path.basename(path), names[label])
        for path, label in zip(image_paths(split_dataset), split_dataset[label_column], strict=True)
    )


def test_metadata_labels_are_used_the_same_through_train_dir_and_dataset_name(tmp_path):
    write_metadata_folder(tmp_path / "meta" / "train", per_class=3, seed=1)
    write_metadata_folder(tmp_path / "meta" / "validation", per_class=2, seed=2)
    folders = DataArguments(
        train_dir=str(tmp_path / "meta" / "train"),
        validation_dir=str(tmp_path / "meta" / "validation"),
        label_column_name="species",
    )
    named = DataArguments(dataset_name=str(tmp_path / "meta"), label_column_name="species")
    loaded = [load_labeled_dataset(args, str(tmp_path / "cache"), 0) for args in (folders, named)]
    for dataset, _, label_column, names in loaded:
        assert label_column == "species" and names == ["green", "red"]
        assert len(dataset["train"]) == 6 and len(dataset["validation"]) == 4
        # Each file's class is the one its metadata row gives (its name starts with it).
        for split in ("train", "validation"):
            assert all(file.startswith(label) for file, label in labels_by_file(dataset[split], "species"))
    for split in ("train", "validation"):
        assert labels_by_file(loaded[0][0][split], "species") == labels_by_file(loaded[1][0][split], "species")


def test_metadata_jsonl_label_column_is_found_without_a_flag(tmp_path):
    write_metadata_folder(tmp_path / "train", label_column="label", kind="jsonl", per_class=5)
    data_args = DataArguments(train_dir=str(tmp_path / "train"), train_val_split=0.2)
    dataset, _, label_column, names = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
    assert label_column == "label" and names == ["green", "red"]
    assert len(dataset["train"]) + len(dataset["validation"]) == 10
    assert all(file.startswith(label) for file, label in labels_by_file(dataset["train"], "label"))


def test_metadata_without_a_label_column_says_so_naming_the_file(tmp_path):
    write_metadata_folder(tmp_path / "train", label_column="caption")
    with pytest.raises(UserError) as refused:
        load_labeled_dataset(DataArguments(train_dir=str(tmp_path / "train")), str(tmp_path / "cache"), 0)
    message = str(refused.value)
    assert "no label column" in message and "metadata.csv" in message and "--label_column_name" in message
    assert "columns: image, caption" in message


def test_metadata_in_only_one_of_train_and_validation_is_refused(tmp_path):
    write_metadata_folder(tmp_path / "train")
    write_color_imagefolder(tmp_path / "validation", ["red", "green"], 2)
    data_args = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
    with pytest.raises(UserError, match=r"--train_dir .*metadata.csv.* --validation_dir .* has none"):
        load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)


# --- which split evaluates --------------------------------------------------------------------------------------------


def write_parquet_dataset(root, sizes):
    """root/<split>.parquet for each split in `sizes` ({split: rows}), labels cat/dog alternating."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    for index, (split, rows) in enumerate(sizes.items()):
        columns = {
            "image": small_images(rows, seed=index),
            "label": ["cat", "dog"] * (rows // 2) + ["cat"] * (rows % 2),
        }
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / f"{split}.parquet"))
    return root


def test_a_test_split_evaluates_when_there_is_no_validation_split(tmp_path, caplog):
    import logging

    root = write_parquet_dataset(tmp_path / "data", {"train": 12, "test": 5})
    caplog.set_level(logging.INFO, logger="imgft")
    dataset, _, _, names = load_labeled_dataset(DataArguments(dataset_name=str(root)), str(tmp_path / "cache"), 0)
    assert (len(dataset["train"]), len(dataset["validation"])) == (12, 5)  # all of train, all of test
    assert names == ["cat", "dog"]
    said = [record.getMessage() for record in caplog.records if "'test' split" in record.getMessage()]
    assert len(said) == 1 and said[0].startswith("Evaluating on")


def test_eval_split_overrides_the_validation_split(tmp_path):
    root = write_parquet_dataset(tmp_path / "data", {"train": 12, "validation": 4, "test": 6})
    data_args = DataArguments(dataset_name=str(root))
    dataset, source = load_raw_datasets(data_args, str(tmp_path / "cache"), 0, None)
    assert len(dataset["validation"]) == 4 and "'validation' split" in source
    data_args = DataArguments(dataset_name=str(root), eval_split="test")
    dataset, source = load_raw_datasets(data_args, str(tmp_path / "cache"), 0, None)
    assert (len(dataset["train"]), len(dataset["validation"])) == (12, 6) and "'test' split" in source
    with pytest.raises(UserError, match=r"--eval_split holdout: the dataset has no such split \(it has: "):
        load_raw_datasets(DataArguments(dataset_name=str(root), eval_split="holdout"), None, 0, None)
    with pytest.raises(UserError, match="--eval_split train"):
        load_raw_datasets(DataArguments(dataset_name=str(root), eval_split="train"), None, 0, None)


def config_entry(name):
    """A dataset card's `configs` entry: the configuration `name`, its splits in the folder `name`."""
    files = [f"  - split: {split}\n    path: {name}/{split}.parquet\n" for split in ("train", "validation")]
    return f"- config_name: {name}\n  data_files:\n{''.join(files)}"


def test_dataset_config_name_chooses_the_configuration_and_a_missing_one_is_one_line(tmp_path):
    root = tmp_path / "data"
    for name, sizes in (("small", {"train": 4, "validation": 2}), ("large", {"train": 8, "validation": 6})):
        (root / name).mkdir(parents=True)
        write_parquet_dataset(root / name, sizes)
    (root / "README.md").write_text(f"---\nconfigs:\n{config_entry('small')}{config_entry('large')}---\n")
    for config_name, rows in (("small", (4, 2)), ("large", (8, 6))):
        data_args = DataArguments(dataset_name=str(root), dataset_config_name=config_name)
        dataset, _, _, _ = load_labeled_dataset(data_args, str(tmp_path / "cache"), 0)
        assert (len(dataset["train"]), len(dataset["validation"])) == rows, config_name
    assert (tmp_path / "cache" / "data").is_dir()  # --cache_dir holds the datasets cache
    available = re.escape("['small', 'large']")
    with pytest.raises(UserError, match=f"no --dataset_config_name: Config name is missing.*{available}$"):
        load_labeled_dataset(DataArguments(dataset_name=str(root)), str(tmp_path / "cache"), 0)
    streamed = DataArguments(dataset_name=str(root), dataset_config_name="tiny", streaming=True)
    unknown = f"--dataset_config_name tiny: BuilderConfig 'tiny' not found.*{available}"
    with pytest.raises(UserError, match=unknown):
        load_labeled_dataset(streamed, str(tmp_path / "cache"), 0)


def test_eval_split_is_refused_with_folders(train_folder, tmp_path):
    data_args = DataArguments(train_dir=str(train_folder), eval_split="test")
    with pytest.raises(UserError, match="--eval_split names a split of --dataset_name"):
        load_raw_datasets(data_args, str(tmp_path / "cache"), 0, None)


# --- classes left without training images ---------------------------------------------------------------------------


def test_classes_left_without_training_images_are_named_once(caplog):
    import logging

    from imgft.data import warn_classes_without_training_images

    names = [f"class{i:03d}" for i in range(120)]
    train = class_label_split(names, [i % 50 for i in range(50)])  # 50 images, one each of classes 0-49
    caplog.set_level(logging.WARNING, logger="imgft")
    warn_classes_without_training_images(train, "label", names)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "70 of 120 classes have no training image" in warnings[0]
    assert "class050, class051, class052" in warnings[0] and "class049" not in warnings[0]
    caplog.clear()
    warn_classes_without_training_images(class_label_split(["a", "b"], [0, 1, 1]), "label", ["a", "b"])
    assert not caplog.records


# --- check-data ------------------------------------------------------------------------------------------------------


def test_check_data_reports_the_top_level_classes_of_nested_folders(tmp_path):
    from imgft.commands.check_data import data_report

    nested_imagefolder(tmp_path / "train")
    write_color_imagefolder(tmp_path / "train" / "digit2" / "batch_c", ["deeper"], 2, seed=7)  # digit2: 4 + 2
    write_color_imagefolder(tmp_path / "validation", ["digit0", "digit1", "digit2"], 1, seed=8)
    data_args = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
    lines, refusal = data_report(data_args, str(tmp_path / "cache"), 0)
    assert refusal is None
    assert "Classes (3), train / validation:" in lines
    counts = [line.split() for line in lines if line.strip().startswith(("digit", "batch"))]
    assert counts == [["digit0", "5", "/", "1"], ["digit1", "4", "/", "1"], ["digit2", "6", "/", "1"]]
    assert f"Evaluation images: --validation_dir {tmp_path / 'validation'}" in lines


def test_check_data_names_the_split_that_evaluates(tmp_path):
    from imgft.commands.check_data import data_report

    root = write_parquet_dataset(tmp_path / "data", {"train": 12, "test": 5})
    lines, refusal = data_report(DataArguments(dataset_name=str(root)), str(tmp_path / "cache"), 0)
    assert refusal is None and "Images: 12 train, 5 validation" in lines
    assert [line for line in lines if line.startswith("Evaluation images:")] == [
        "Evaluation images: the dataset's 'test' split (it has no validation split)"
    ]
