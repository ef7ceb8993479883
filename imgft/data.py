"""Step 2: the dataset and its labels: Hub name or imagefolders, the validation split, label names, and the
one decode pass that sets unreadable images aside (and stores the rest shrunk). No transforms: see transforms.py."""

import logging
import os

import datasets
import numpy as np
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from imgft import images
from imgft.commands.demo_data import ensure_digits_imagefolder
from imgft.errors import UserError
from imgft.runtime import hub_offline, log_once

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
# The extensions the imagefolder loader reads (it ignores every other file).
IMAGE_EXTENSIONS = {ext.lower() for ext in ImageFolder.EXTENSIONS}


def load_labeled_dataset(data_args, cache_dir, seed):
    """Step 2 in one call: (dataset, image_column, label_column, label_names); no image is decoded yet.

    Labels become a ClassLabel shared by both splits. With no dataset named, the digits demo is used.
    """
    dataset = load_raw_datasets(data_args, cache_dir, seed, demo_dir_for(data_args))
    image_column, label_column = find_columns(dataset, data_args.image_column_name, data_args.label_column_name)
    dataset, label_names = encode_labels(dataset, label_column)
    return dataset, image_column, label_column, label_names


def preprocessing_processes(data_args):
    return data_args.num_workers or os.cpu_count()


def decode_once_dropping_unreadable(dataset, image_column, label_column, label_names, data_args, stored_size=None):
    """(dataset without unreadable images, how many were left out): each is named in a warning, or with
    --strict_data the data is refused. With `stored_size`, the same single decode of every image also
    stores it shrunk (`images.resize_once`); without, it only checks (`images.inspect_images`).
    """
    num_proc = preprocessing_processes(data_args)
    if stored_size:
        checked = {
            split: images.resize_once(part, image_column, stored_size, num_proc) for split, part in dataset.items()
        }
        verdicts = checked
    else:
        checked = dict(dataset)
        verdicts = {split: images.inspect_images(part, image_column, num_proc) for split, part in dataset.items()}
    bad_rows, problems = {}, []
    for split, verdict in verdicts.items():
        reasons, paths = verdict[images.ERROR_COLUMN], verdict[images.PATH_COLUMN]
        bad_rows[split] = [row for row, reason in enumerate(reasons) if reason]
        problems += [f"{paths[row] or f'{split} row {row}'}: {reasons[row]}" for row in bad_rows[split]]
    if problems and data_args.strict_data:
        listing = "\n  ".join(problems)
        raise UserError(f"{len(problems)} unreadable image(s), refused by --strict_data:\n  {listing}")
    for problem in problems:
        log_once(logging.WARNING, f"Skipping unreadable image {problem}")
    kept = {}
    for split, part in checked.items():
        if bad_rows[split]:
            bad = set(bad_rows[split])
            part = part.select([row for row in range(len(part)) if row not in bad])
        verdict_columns = [c for c in (images.ERROR_COLUMN, images.PATH_COLUMN) if c in part.column_names]
        kept[split] = part.remove_columns(verdict_columns)
    kept = datasets.DatasetDict(kept)
    if problems:  # a class may have lost all its training images
        _check_class_counts(kept, label_column, label_names)
    return kept, len(problems)


def demo_dir_for(data_args):
    """The digits demo folder, written first if missing, when `data_args` name no dataset; else None."""
    if data_args.dataset_name or data_args.train_dir:
        return None
    demo_dir = os.path.join(os.environ.get("IMGFT_HOME", os.path.expanduser("~/.cache/imgft")), "digits")
    log_once(logging.INFO, f"No dataset given: using the digits demo in {demo_dir}")
    ensure_digits_imagefolder(demo_dir)
    return demo_dir


def load_raw_datasets(data_args, cache_dir, seed, demo_dir):
    """A DatasetDict with exactly `train` and `validation`, from the Hub, a dataset folder or imagefolders.

    `demo_dir` holds the digits demo, used when no dataset is named (see `demo_dir_for`).
    """
    if data_args.dataset_name:
        dataset = _load_named(data_args.dataset_name, data_args.dataset_config_name, cache_dir)
    else:
        train_dir, validation_dir = (data_args.train_dir, data_args.validation_dir)
        if not train_dir:
            train_dir, validation_dir = (
                os.path.join(demo_dir, "train"),
                os.path.join(demo_dir, "validation"),
            )
        data_files = {"train": _image_files(train_dir, "--train_dir")}
        if validation_dir:
            data_files["validation"] = _image_files(validation_dir, "--validation_dir")
        # imagefolder turns each file's parent folder name into its label.
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    if "train" not in dataset:
        raise UserError(f"the dataset has no 'train' split (it has: {', '.join(dataset)})")
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in dataset), None)
    if validation_name:
        return datasets.DatasetDict(train=dataset["train"], validation=dataset[validation_name])
    # Seeded, so every process and every rerun holds out the same images.
    split = dataset["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def _load_named(name, config_name, cache_dir):
    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except (
        FileNotFoundError,
        ConnectionError,
        datasets.exceptions.DatasetNotFoundError,
    ) as err:
        offline = " (HF_HUB_OFFLINE is set: Hub datasets cannot be downloaded)" if hub_offline() else ""
        raise UserError(f"cannot load dataset '{name}'{offline}: {err}") from None


def _image_files(folder, flag):
    """Every image file under `folder`, whatever the case of its extension; hidden files and folders
    (.DS_Store, ._photo.jpg) and macOS archive leftovers (__MACOSX/) are passed over quietly."""
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is not a folder")
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith(".") and name != "__MACOSX")
        files += [
            os.path.join(root, name)
            for name in sorted(names)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    if not files:
        raise UserError(f"{flag} {folder} holds no images: put each class's images in a subfolder named after it")
    classes = sorted({os.path.basename(os.path.dirname(path)) for path in files})
    if os.path.normpath(os.path.dirname(files[0])) == os.path.normpath(folder) or len(classes) < 2:
        found = f"a single class ({classes[0]})" if len(classes) == 1 else "images outside class subfolders"
        raise UserError(
            f"{flag} {folder}: found {found}; classification needs at least two classes, "
            "one subfolder of images per class"
        )
    return files


def find_columns(dataset, image_column, label_column):
    """The image and label column names: the ones given, else the Image / ClassLabel features."""
    features = dataset["train"].features
    columns = list(features)
    if image_column is None:
        image_column = next(
            (name for name, feature in features.items() if isinstance(feature, datasets.Image)),
            None,
        )
        if image_column is None:
            raise UserError(f"no image column found; name it with --image_column_name (columns: {', '.join(columns)})")
    if label_column is None:
        label_column = next(
            (name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)),
            next((name for name in ("label", "labels") if name in features), None),
        )
        if label_column is None:
            raise UserError(f"no label column found; name it with --label_column_name (columns: {', '.join(columns)})")
    for flag, name in (
        ("--image_column_name", image_column),
        ("--label_column_name", label_column),
    ):
        for split, split_dataset in dataset.items():
            if name not in split_dataset.features:
                raise UserError(f"{flag} '{name}' is not a column of {split} (columns: {', '.join(columns)})")
    return image_column, label_column


def encode_labels(dataset, label_column):
    """Make the label column a ClassLabel shared by both splits; return the dataset and the class names.

    String labels keep their text as the class name; integer labels are sorted numerically.
    """
    feature = dataset["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        other = dataset["validation"].features[label_column]
        if not isinstance(other, datasets.ClassLabel) or other.names != names:
            raise UserError(f"the validation split's '{label_column}' classes differ from train's")
    else:
        values = set()
        for split_dataset in dataset.values():
            values.update(split_dataset.unique(label_column))
        if None in values:
            raise UserError(f"the label column '{label_column}' has empty values")
        if all(isinstance(value, (int, np.integer)) for value in values):
            ordered = sorted(values)
        else:
            ordered = sorted(str(value) for value in values)
        names = [str(value) for value in ordered]
        # Cast through strings so that integer labels map by name, not by their raw value.
        dataset = dataset.cast_column(label_column, datasets.Value("string"))
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=names))
    _check_class_counts(dataset, label_column, names)
    return dataset, names


def labels_of(split_dataset, label_column):
    """The class index of every row, as an int64 array."""
    return np.asarray(split_dataset.with_format("numpy")[label_column], dtype=np.int64)


def label_counts(split_dataset, label_column, num_classes):
    return np.bincount(labels_of(split_dataset, label_column), minlength=num_classes)


def _check_class_counts(dataset, label_column, names):
    if len(names) < 2:
        raise UserError(f"found a single class ({names[0] if names else 'none'}): classification needs at least two")
    train_counts = label_counts(dataset["train"], label_column, len(names))
    validation_counts = label_counts(dataset["validation"], label_column, len(names))
    missing = [names[i] for i in range(len(names)) if train_counts[i] == 0 and validation_counts[i] > 0]
    if missing:
        raise UserError(f"validation classes missing from train: {', '.join(missing)}")


def relabel(split_dataset, label_column, label_names, label2id):
    """Renumber labels to a trained model's `label2id`, matching classes by name."""
    model_names = sorted(label2id, key=label2id.get)
    if label_names == model_names:
        return split_dataset
    unknown = [name for name in label_names if name not in label2id]
    if unknown:
        raise UserError(
            f"classes not known to the model: {', '.join(unknown[:10])} "
            f"(the model knows: {', '.join(model_names[:10])})"
        )
    new_ids = [label2id[name] for name in label_names]
    features = split_dataset.features.copy()
    features[label_column] = datasets.ClassLabel(names=model_names)
    return split_dataset.map(
        lambda batch: {label_column: [new_ids[i] for i in batch[label_column]]},
        batched=True,
        features=features,
        desc="Matching labels to the model's classes",
    )


def subsample(split_dataset, max_samples, seed):
    if max_samples is None or max_samples >= len(split_dataset):
        return split_dataset
    return split_dataset.shuffle(seed=seed).select(range(max_samples))
