"""Step 2: the dataset and its labels: Hub name, local data files or save_to_disk folder, or imagefolders
(classes from their top-level folders, the images among their files by imgft/image_files.py's rule, or from
metadata files), or a stream (--streaming), the split to evaluate on, label names, the subsets
--max_train_samples and --max_eval_samples keep, and the one decode pass that sets unreadable images aside
(and stores the training images shrunk), refusing a split left with none, numbering the validation rows as
loaded first (SOURCE_ROW_COLUMN). No transforms: see transforms.py."""

import contextlib
import json
import logging
import os
import re

import datasets
import numpy as np

from imgft import image_files, images
from imgft.args import label_names_list
from imgft.commands.demo_data import ensure_digits_imagefolder
from imgft.errors import UserError
from imgft.runtime import hub_offline, log_once

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
# A class folder listing's column: why a file is not read as an image ("" for an image), see _listed_split.
SKIP_REASON_COLUMN = "imgft_skip_reason"
# Each validation row's number in the split as loaded, kept through the unreadable images dropped and
# --max_eval_samples, so that a report can name a mistake whose image has no file path (imgft/report/reports.py).
SOURCE_ROW_COLUMN = "imgft_source_row"


def load_labeled_dataset(data_args, cache_dir, seed):
    """Step 2 in one call: (dataset, image_column, label_column, label_names); no image is decoded yet.

    Labels become a ClassLabel shared by both splits. With no dataset named, the digits demo is used.
    """
    if data_args.streaming:
        return load_labeled_stream(data_args, cache_dir, seed)
    dataset, validation_source = load_raw_datasets(data_args, cache_dir, seed, demo_dir_for(data_args))
    log_once(logging.INFO, f"Evaluating on {validation_source}")
    image_column, label_column = find_columns(dataset, data_args.image_column_name, data_args.label_column_name)
    dataset, label_names = encode_labels(dataset, label_column)
    return dataset, image_column, label_column, label_names


def refuse_streaming(data_args, command):
    """`command` loads datasets whole (into the datasets cache): never quietly for one meant to stream."""
    if data_args.streaming:
        raise UserError(f"{command} loads the dataset whole, it does not stream it: pass --streaming false")


def load_labeled_stream(data_args, cache_dir, seed):
    """`load_labeled_dataset` for --streaming: train and validation as IterableDatasets, read when used.

    Nothing is read here but the features: the class names come from a ClassLabel column or --label_names,
    since finding them in the data would take a pass over it. Labels become ids on the fly; an example whose
    label is not a class is dropped and its label named once. Train goes through a shuffle buffer of
    --shuffle_buffer_size examples per DataLoader worker, which also orders the first pass's shards by
    `seed`; datasets reorders them for each later pass (`IterableDataset.set_epoch`).
    """
    name = data_args.dataset_name
    config_name = data_args.dataset_config_name
    try:
        streams = datasets.load_dataset(name, config_name, cache_dir=cache_dir, streaming=True)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (HF_HUB_OFFLINE is set: Hub datasets cannot be streamed)" if hub_offline() else ""
        raise UserError(f"cannot stream dataset '{name}'{offline}: {err}") from None
    except ValueError as err:  # a configuration it cannot pick, said in one line; any other as it is
        refusal = _configuration_refusal(data_args, err)
        if refusal is None:
            raise
        raise refusal from None
    train = _train_split(streams)
    if data_args.eval_split == "train":
        raise UserError("--eval_split train: training would be evaluated on its own images")
    if not data_args.eval_split and not any(n in streams for n in (*VALIDATION_SPLIT_NAMES, "test")):
        raise UserError(
            f"--streaming: the dataset has no validation or test split (it has: {', '.join(streams)}), "
            "and a stream cannot be split at random: name the split to evaluate on with --eval_split"
        )
    _, validation, source = _named_splits(streams, data_args, seed)
    log_once(logging.INFO, f"Evaluating on {source}, streamed")
    dataset = datasets.IterableDatasetDict(train=train, validation=validation)
    if any(split.features is None for split in dataset.values()):
        raise UserError(f"--streaming: the columns of '{name}' are unknown before reading; store as parquet")
    named_columns = (data_args.image_column_name, data_args.label_column_name)
    image_column, label_column = find_columns(dataset, *named_columns)
    label_names = stream_label_names(train.features[label_column], label_column, data_args.label_names)
    # Images stay undecoded until the transform, which names the unreadable ones instead of failing on them.
    if isinstance(train.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = datasets.IterableDatasetDict(
        {split: _label_ids_on_the_fly(part, label_column, label_names) for split, part in dataset.items()}
    )
    if data_args.shuffle_buffer_size:
        log_once(
            logging.INFO,
            f"Shuffling the training stream through a buffer of {data_args.shuffle_buffer_size} examples per "
            "DataLoader worker: a resume refills it, so it is not exact (--shuffle_buffer_size 0 is)",
        )
        # Each buffer fills from one shard at a time: with several (datasets' default is 10), a DataLoader
        # worker cannot load its saved position (IndexError in datasets 5.2).
        dataset["train"] = dataset["train"].shuffle(
            seed=seed, buffer_size=data_args.shuffle_buffer_size, max_buffer_input_shards=1
        )
    return dataset, image_column, label_column, label_names


def stream_label_names(feature, label_column, label_names_flag):
    """The class names of a stream: its ClassLabel's, else --label_names; refused when neither is there."""
    given = label_names_list(label_names_flag) if label_names_flag else None
    if isinstance(feature, datasets.ClassLabel):
        if given and given != feature.names:
            raise UserError(
                f"--label_names {label_names_flag} differs from the classes the dataset names in "
                f"'{label_column}': {', '.join(feature.names)}; drop --label_names"
            )
        return feature.names
    if not given:
        raise UserError(
            f"--streaming: the label column '{label_column}' does not name its classes (it is not a "
            "ClassLabel), and finding them would take a pass over the stream: give them with "
            "--label_names a,b,c"
        )
    return given


def _label_ids_on_the_fly(split, label_column, label_names):
    """The stream with its label column a ClassLabel of `label_names`: ids made as examples are read."""
    features = split.features.copy()
    if isinstance(features[label_column], datasets.ClassLabel):
        return split
    features[label_column] = datasets.ClassLabel(names=label_names)
    return split.map(
        _label_ids_batch,
        batched=True,
        fn_kwargs={"label_column": label_column, "label_names": label_names},
        features=features,
    )


_labels_named = set()  # the labels this process has already warned about


def _label_ids_batch(batch, label_column, label_names):
    """Ids for a batch of labels: a text label is matched by name, a number is the id itself. Rows with a
    label that is not a class are dropped, each such label named once per process."""
    ids = {name: i for i, name in enumerate(label_names)}
    keep = []
    for row, value in enumerate(batch[label_column]):
        label = ids.get(value) if isinstance(value, str) else value
        if isinstance(label, (int, np.integer)) and 0 <= label < len(label_names):
            batch[label_column][row] = int(label)
            keep.append(row)
        elif repr(value) not in _labels_named:
            _labels_named.add(repr(value))
            logging.getLogger("imgft").warning(
                f"Skipping examples labelled {value!r}: not one of the {len(label_names)} --label_names"
            )
    return {column: [values[row] for row in keep] for column, values in batch.items()}


def num_rows(split):
    """The number of examples of a split; None for a stream, whose length is unknown until it is read."""
    return None if isinstance(split, datasets.IterableDataset) else len(split)


def load_evaluation_split(data_args, cache_dir, seed, label2id):
    """(split, image_column, label_column) to evaluate a trained model on, labelled with the model's ids.

    Needs no training data: the labels come from the model (`label2id`), matched by class name. The split
    is --validation_dir alone, else the one training evaluates on (`load_raw_datasets`' choice), which
    is part of train only when the dataset has no split to evaluate on.
    """
    refuse_streaming(data_args, "evaluate")
    if data_args.validation_dir:
        flag = "--validation_dir"
        dataset = _load_imagefolders({"validation": (data_args.validation_dir, flag)}, data_args, cache_dir, 1)
        split, source = dataset["validation"], f"{flag} {data_args.validation_dir}"
    elif data_args.dataset_name:
        _, split, source = _named_splits(_load_named(data_args, cache_dir), data_args, seed)
    else:
        dataset, source = load_raw_datasets(data_args, cache_dir, seed, demo_dir_for(data_args))
        split = dataset["validation"]
    log_once(logging.INFO, f"Evaluating on {source}")
    dataset = datasets.DatasetDict(validation=split)
    image_column, label_column = find_columns(dataset, data_args.image_column_name, data_args.label_column_name)
    dataset, label_names = _class_labels(dataset, label_column)
    return relabel(dataset["validation"], label_column, label_names, label2id), image_column, label_column


def preprocessing_processes(data_args):
    return data_args.num_workers or os.cpu_count()


def decode_once_dropping_unreadable(dataset, image_column, label_column, label_names, data_args, stored_size=None):
    """(dataset without unreadable images, how many were left out): each is named in a warning, or with
    --strict_data the data is refused. With `stored_size`, the same single decode of every training image
    also stores it shrunk (`images.resize_once`); every other split, and every split without it, is only
    checked (`images.inspect_images`) and later read from its files as they are.

    Evaluation images are never stored shrunk: a shrink before the processor's own resize (and a JPEG's
    draft-mode decode) changes the pixels the model sees, so evaluation would no longer answer as
    `predict` and `pipeline()` do on the same files. Training crops at random anyway.
    The validation split gains SOURCE_ROW_COLUMN, numbered before the drop (after the check, whose cached
    result is keyed by the split as it was loaded).
    """
    if data_args.streaming:  # a stream is never read ahead: its unreadable images are dropped as they come
        return dataset, None
    num_proc = preprocessing_processes(data_args)
    checked, verdicts = {}, {}
    for split, part in dataset.items():
        if stored_size and split == "train":
            checked[split] = verdicts[split] = images.resize_once(part, image_column, stored_size, num_proc)
        else:
            checked[split], verdicts[split] = part, images.inspect_images(part, image_column, num_proc)
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
        if split == "validation":
            part = part.add_column(SOURCE_ROW_COLUMN, list(range(len(part))))
        if bad_rows[split]:
            bad = set(bad_rows[split])
            part = part.select([row for row in range(len(part)) if row not in bad])
        verdict_columns = [c for c in (images.ERROR_COLUMN, images.PATH_COLUMN) if c in part.column_names]
        kept[split] = part.remove_columns(verdict_columns)
    kept = datasets.DatasetDict(kept)
    _refuse_splits_left_empty(verdicts, bad_rows, kept)
    if problems and "train" in kept:  # a class may have lost all its training images
        _check_class_counts(kept, label_column, label_names)
    return kept, len(problems)


def _refuse_splits_left_empty(verdicts, bad_rows, kept):
    """Refuse a split whose every image is unreadable, naming the first: training would crash on no batches, and
    an evaluation of no images would report a loss of 0, the best there is."""
    for split, part in kept.items():
        if bad_rows[split] and len(part) == 0:
            first = verdicts[split][0]
            where = first[images.PATH_COLUMN] or f"{split} row 0"
            purpose = "train on" if split == "train" else "evaluate on"
            raise UserError(
                f"none of the {len(bad_rows[split])} images of the {split} split can be read, so there is nothing "
                f"to {purpose} (the first, {where}: {first[images.ERROR_COLUMN]})"
            )


def demo_dir_for(data_args):
    """The digits demo folder, written first if missing, when `data_args` name no dataset; else None."""
    if data_args.dataset_name or data_args.train_dir:
        return None
    demo_dir = os.path.join(os.environ.get("IMGFT_HOME", os.path.expanduser("~/.cache/imgft")), "digits")
    log_once(logging.INFO, f"No dataset given: using the digits demo in {demo_dir}")
    ensure_digits_imagefolder(demo_dir)
    return demo_dir


def load_raw_datasets(data_args, cache_dir, seed, demo_dir):
    """(DatasetDict with exactly `train` and `validation`, where validation came from, said for a person).

    From the Hub, a dataset folder or imagefolders; `demo_dir` holds the digits demo, used when no dataset
    is named (see `demo_dir_for`). Validation is --validation_dir, --eval_split, the dataset's validation
    split, else its test split, else a seeded part of train.
    """
    refuse_streaming(data_args, "check-data")
    if data_args.dataset_name:
        dataset = _load_named(data_args, cache_dir)
        _train_split(dataset)  # refuses a dataset without one: evaluate needs none, training does
        if data_args.eval_split == "train":
            raise UserError("--eval_split train: training would be evaluated on its own images")
        train, validation, source = _named_splits(dataset, data_args, seed)
        return datasets.DatasetDict(train=train, validation=validation), source
    if data_args.eval_split:
        raise UserError("--eval_split names a split of --dataset_name; with folders, give --validation_dir")
    train_dir, validation_dir = (data_args.train_dir, data_args.validation_dir)
    if not train_dir:
        train_dir, validation_dir = (os.path.join(demo_dir, "train"), os.path.join(demo_dir, "validation"))
    folders = {"train": (train_dir, "--train_dir")}
    if validation_dir:
        folders["validation"] = (validation_dir, "--validation_dir")
    dataset = _load_imagefolders(folders, data_args, cache_dir, 2)
    if validation_dir:
        given = "--validation_dir" if data_args.train_dir else "the digits demo's validation images in"
        return dataset, f"{given} {validation_dir}"
    held_out, source = _hold_out(dataset["train"], data_args, seed, f"--train_dir {train_dir}")
    return datasets.DatasetDict(train=held_out["train"], validation=held_out["test"]), source


def _named_splits(dataset, data_args, seed):
    """(train, the split to evaluate on, where that came from) of a --dataset_name: --eval_split, else a
    validation split, else `test`, else a seeded part of train. train is None where the dataset has none."""
    if data_args.eval_split and data_args.eval_split not in dataset:
        raise UserError(
            f"--eval_split {data_args.eval_split}: the dataset has no such split (it has: {', '.join(dataset)})"
        )
    name = data_args.eval_split or next((n for n in (*VALIDATION_SPLIT_NAMES, "test") if n in dataset), None)
    if name is None:
        held_out, source = _hold_out(_train_split(dataset), data_args, seed, "'train'")
        return held_out["train"], held_out["test"], source
    if data_args.eval_split:
        source = f"the dataset's '{name}' split (--eval_split)"
    elif name == "test":
        source = "the dataset's 'test' split (it has no validation split)"
    else:
        source = f"the dataset's '{name}' split"
    return dataset.get("train"), dataset[name], source


def _train_split(dataset):
    if "train" not in dataset:
        raise UserError(f"the dataset has no 'train' split (it has: {', '.join(dataset)})")
    return dataset["train"]


def _hold_out(train, data_args, seed, whole):
    """(train_test_split's train and test, where the held-out part came from, said for a person)."""
    # Seeded, so every process and every rerun holds out the same images.
    split = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
    return split, f"{data_args.train_val_split:.0%} of {whole}, held out at random (seed {seed})"


def _load_named(data_args, cache_dir):
    """The DatasetDict of --dataset_name: a Hub name, or a local folder of data files, of class folders (read
    by imgft's class-folder rule, as --train_dir is) or one written by datasets' save_to_disk."""
    name = data_args.dataset_name
    if not os.path.isdir(name):
        with _load_errors(data_args):
            return datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir)
    saved = _saved_to_disk_files(name)
    if saved:
        # The files as they are, copied into the datasets cache as load_dataset copies any other (load_from_disk
        # would write the cache of every later pass into the user's folder).
        return datasets.load_dataset("arrow", data_files=saved, cache_dir=cache_dir)
    with _load_errors(data_args):
        builder = datasets.load_dataset_builder(name, data_args.dataset_config_name, cache_dir=cache_dir)
    data_files = builder.config.data_files or {}
    has_metadata = any(image_files.is_metadata(path) for files in data_files.values() for path in files)
    if builder.name == "imagefolder" and not has_metadata:
        # datasets labels an image by its parent folder, and not at all when images lie at different depths:
        # each image's class is its top-level folder instead, as with --train_dir.
        folders = {split: (folder, "--dataset_name") for split, folder in _split_folders(name, data_files).items()}
        return _load_imagefolders(folders, data_args, cache_dir, 2)
    with _load_errors(data_args):
        dataset = datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir)
    _refuse_metadata_without_labels(dataset, data_args.label_column_name, [name])
    return _with_image_paths_from_data_files(dataset, data_args.image_column_name, data_files)


@contextlib.contextmanager
def _load_errors(data_args):
    """datasets' errors on a dataset it cannot find or read, and on a configuration it cannot pick, in one
    line; any other ValueError as it is."""
    try:
        yield
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (HF_HUB_OFFLINE is set: Hub datasets cannot be downloaded)" if hub_offline() else ""
        hint = ""
        if isinstance(err, datasets.exceptions.DataFilesNotFoundError) and os.path.isdir(data_args.dataset_name):
            hint = "; for class folders of images give --train_dir, which reads every image PIL opens (.avif too)"
        raise UserError(f"cannot load dataset '{data_args.dataset_name}'{offline}: {err}{hint}") from None
    except ValueError as err:
        refusal = _configuration_refusal(data_args, err)
        if refusal is None:
            raise
        raise refusal from None


def _saved_to_disk_files(folder):
    """{split: its Arrow files} of a folder written by datasets' save_to_disk, a Dataset's (one split, named
    as it was saved, else train) or a DatasetDict's; None for any other folder."""

    def arrow_files(split_folder):
        with open(os.path.join(split_folder, datasets.config.DATASET_STATE_JSON_FILENAME)) as file:
            state = json.load(file)
        return [os.path.join(split_folder, entry["filename"]) for entry in state["_data_files"]]

    if os.path.isfile(os.path.join(folder, datasets.config.DATASET_STATE_JSON_FILENAME)):
        with open(os.path.join(folder, datasets.config.DATASET_STATE_JSON_FILENAME)) as file:
            split = json.load(file).get("_split") or "train"
        return {split: arrow_files(folder)}
    if os.path.isfile(os.path.join(folder, datasets.config.DATASETDICT_JSON_FILENAME)):
        with open(os.path.join(folder, datasets.config.DATASETDICT_JSON_FILENAME)) as file:
            splits = json.load(file)["splits"]
        return {split: arrow_files(os.path.join(folder, split)) for split in splits}
    return None


def _split_folders(root, data_files):
    """{split: its folder} for the splits datasets found in the folder `root`: the deepest folder holding all
    of a split's files that is named as a split is (train/, validation/, test-2024/), else `root` itself."""
    keywords = "|".join(re.escape(word) for words in datasets.data_files.SPLIT_KEYWORDS.values() for word in words)
    folders = {}
    for split, files in data_files.items():
        common = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files])
        parts = os.path.relpath(common, os.path.abspath(root)).split(os.sep)
        named = [i for i, part in enumerate(parts) if re.fullmatch(rf"({keywords})([-._ 0-9].*)?", part.lower())]
        folders[str(split)] = os.path.join(root, *parts[: named[-1] + 1]) if named else root
    return folders


def _with_image_paths_from_data_files(dataset, image_column, data_files):
    """`dataset` with relative image paths read from the folder of the data file that names them (a CSV's
    own folder), as the imagefolder loader reads a metadata file's; datasets would read them from the working
    directory. Paths that are found there and not in the data file's folder are kept as they are."""
    features = next(iter(dataset.values())).features
    if image_column is None:
        image_column = next((name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)
    feature = features.get(image_column)
    is_path_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not (is_path_text or isinstance(feature, datasets.Image)):
        return dataset
    resolved = {}
    for split, part in dataset.items():
        if isinstance(feature, datasets.Image):
            part = part.cast_column(image_column, datasets.Image(decode=False))
        first = next((path for path in map(_path_of, part[:100][image_column]) if path), None)
        folders = sorted({os.path.dirname(os.path.abspath(path)) for path in data_files.get(split, [])})
        if first is None or os.path.isabs(first) or "://" in first or not folders:
            resolved[split] = dataset[split]
            continue
        if not os.path.exists(os.path.join(folders[0], first)) and os.path.exists(first):
            resolved[split] = dataset[split]  # relative to the working directory, which datasets reads them from
            continue
        if len(folders) > 1:
            raise UserError(
                f"the image paths of the '{split}' split are relative ({first}), and its data files lie in "
                f"several folders ({', '.join(folders)}): make them relative to one folder, or absolute"
            )
        part = part.map(
            _paths_joined,
            batched=True,
            fn_kwargs={"image_column": image_column, "folder": folders[0]},
            desc="Reading relative image paths from the data files' folder",
        )
        resolved[split] = part.cast_column(image_column, feature) if isinstance(feature, datasets.Image) else part
    return datasets.DatasetDict(resolved)


def _path_of(value):
    """The file path an image column's value is read from: the text itself, or an undecoded Image's path where
    it holds no bytes (an embedded image's path is only its name)."""
    if isinstance(value, dict):
        return value.get("path") if value.get("bytes") is None else None
    return value


def _paths_joined(batch, image_column, folder):
    def joined(path):
        return path if not path or os.path.isabs(path) or "://" in path else os.path.join(folder, path)

    values = batch[image_column]
    if values and isinstance(values[0], dict):
        return {image_column: [{**value, "path": joined(_path_of(value)) or value["path"]} for value in values]}
    return {image_column: [joined(path) for path in values]}


def _configuration_refusal(data_args, err):
    """load_dataset's ValueError as a UserError where it names a configuration it cannot pick (none given
    where the dataset has several, or one it lacks) and those it has; None for any other ValueError."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines or not lines[0].startswith(("Config name is missing", "BuilderConfig ")):
        return None
    given = data_args.dataset_config_name
    flag = f"--dataset_config_name {given}" if given else "no --dataset_config_name"
    return UserError(f"dataset '{data_args.dataset_name}' with {flag}: {' '.join(lines[:2])}")


def _load_imagefolders(folders, data_args, cache_dir, min_classes):
    """A DatasetDict of `folders` ({split: (folder, flag)}); the train folder must hold `min_classes` classes,
    the others one at least (a validation set may lack some classes).

    Each image's class is the top-level subfolder of its split's folder that holds it, at any depth, as
    torchvision's ImageFolder has it (datasets' imagefolder loader labels an image by its parent folder, and
    not at all when images lie at different depths). Which files are images is `image_files`' rule, and
    those skipped are named in one warning. Folders with metadata files (metadata.csv, .jsonl, .parquet) take
    their rows and columns, labels included, from them instead, read by the imagefolder loader as
    `load_dataset(folder)` reads them.
    """
    found = {split: _folder_files(folder, flag) for split, (folder, flag) in folders.items()}
    with_metadata = [split for split, (_, metadata) in found.items() if metadata]
    if 0 < len(with_metadata) < len(found):  # the loader would read the folder without metadata as empty
        has = with_metadata[0]
        lacks = next(split for split in found if split != has)
        raise UserError(
            f"{folders[has][1]} {folders[has][0]} has metadata ({', '.join(found[has][1])}) but "
            f"{folders[lacks][1]} {folders[lacks][0]} has none: give both folders metadata files, or neither"
        )
    if with_metadata:
        # Every file, so that the loader's cache follows changes to any of them; it reads those the metadata names.
        data_files = {split: files + metadata for split, (files, metadata) in found.items()}
        try:
            dataset = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=True, cache_dir=cache_dir)
        except ValueError as err:  # the loader's word on metadata files it cannot use
            raise UserError(f"cannot read the metadata files: {err}") from None
        _refuse_metadata_without_labels(dataset, data_args.label_column_name, [f for f, _ in folders.values()])
        return dataset
    dataset = {}
    for split, (folder, flag) in folders.items():
        classes_needed = min_classes if split == "train" else 1
        dataset[split] = _class_folder_images(found[split][0], folder, flag, cache_dir, classes_needed)
    return _label_by_class_folder(
        datasets.DatasetDict(dataset), {split: folder for split, (folder, _) in folders.items()}
    )


def _class_folder_images(files, folder, flag, cache_dir, min_classes):
    """The images among `files` (every visible file of a class folder tree) as an undecoded Image column; the
    skipped files named in one warning, and refused where none is left. See `_listed_split`."""
    listed = _listed_split(files, cache_dir)
    reasons = list(listed[SKIP_REASON_COLUMN])
    skipped = [(path, reason) for path, reason in zip(files, reasons, strict=True) if reason]
    images = [path for path, reason in zip(files, reasons, strict=True) if not reason]
    if not images:
        raise UserError(f"{flag} {folder} holds no image PIL can open: {image_files.skipped_summary(skipped, folder)}")
    if skipped:
        emptied = sorted(
            {_class_folder(path, folder) for path, _ in skipped}
            - {_class_folder(path, folder) for path in images}
            - {None}
        )
        lost = f"; left with no image, these folders are no class: {', '.join(emptied)}" if emptied else ""
        summary = image_files.skipped_summary(skipped, folder)
        log_once(logging.WARNING, f"Skipping, in {flag} {folder}, {summary}{lost}")
    _check_class_folders(images, folder, flag, min_classes)
    if skipped:
        listed = listed.select([row for row, reason in enumerate(reasons) if not reason])
    return listed.remove_columns(SKIP_REASON_COLUMN)


def _class_folder(path, folder):
    """The top-level subfolder of `folder` that holds the file `path`; None for a file directly in `folder`."""
    parts = os.path.relpath(path, folder).split(os.sep)
    return parts[0] if len(parts) > 1 else None


def _listed_split(files, cache_dir):
    """A dataset of `files`, an undecoded Image column and why each is skipped ("" for an image), decided once by
    `image_files.skip_reason`: it is cached (datasets' Generator builder) under the files' paths, sizes and
    modification times, so a later run reads the verdicts back instead of opening files again, and every
    later pass's cache (the decode pass's) follows a change to any file, as the imagefolder loader's does."""
    listed = tuple((os.path.abspath(path), *_size_and_modified(path)) for path in files)
    features = datasets.Features({"image": datasets.Image(), SKIP_REASON_COLUMN: datasets.Value("string")})
    # A tuple: datasets would split a list into one generator call per file.
    return datasets.Dataset.from_generator(
        _listed_rows, features=features, gen_kwargs={"listed": listed}, cache_dir=cache_dir
    )


def _size_and_modified(path):
    try:
        status = os.stat(path)
    except OSError:  # a link to nothing: the skip reason says so
        return 0, 0
    return status.st_size, status.st_mtime_ns


def _listed_rows(listed):
    for path, _, _ in listed:
        yield {"image": path, SKIP_REASON_COLUMN: image_files.skip_reason(path)}


def _label_by_class_folder(dataset, folders):
    """`dataset` with a `label` ClassLabel: each image's top-level subfolder of its split's folder in `folders`.

    The classes of all splits make one sorted list, so a validation class missing from train is seen.
    """
    classes = {}
    for split, part in dataset.items():
        root = os.path.abspath(folders[split])  # the listing stores absolute paths
        classes[split] = [os.path.relpath(path, root).split(os.sep)[0] for path in _image_paths(part)]
    names = sorted({name for split_classes in classes.values() for name in split_classes})
    ids = {name: i for i, name in enumerate(names)}
    feature = datasets.ClassLabel(names=names)
    return datasets.DatasetDict(
        {
            split: part.add_column("label", [ids[name] for name in classes[split]], feature=feature)
            for split, part in dataset.items()
        }
    )


def _image_paths(split_dataset, image_column="image"):
    """Each row's file path, read without decoding the images."""
    undecoded = split_dataset.cast_column(image_column, datasets.Image(decode=False))
    return [image["path"] for image in undecoded[image_column]]


def _folder_files(folder, flag):
    """(files, metadata files) under `folder`: every visible file, links followed (`image_files.visible_files`);
    the links passed over, to folders read already, are named in one warning."""
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is not a folder")
    if _saved_to_disk_files(folder):
        raise UserError(f"{flag} {folder} is a dataset written by datasets' save_to_disk: give it as --dataset_name")
    files, repeats = image_files.visible_files(folder)
    if repeats:
        listing = "; ".join(f"{os.path.relpath(path, folder)} ({why})" for path, why in repeats)
        log_once(logging.WARNING, f"Skipping, in {flag} {folder}, folders read once already: {listing}")
    metadata = [path for path in files if image_files.is_metadata(path)]
    files = [path for path in files if not image_files.is_metadata(path)]
    if not files:
        raise UserError(f"{flag} {folder} holds no images: put each class's images in a subfolder named after it")
    return files, metadata


def _check_class_folders(images, folder, flag, min_classes):
    """Refuse images outside class subfolders (their class would be their own file name), and fewer classes
    than `min_classes`."""
    relative = [os.path.relpath(path, folder) for path in images]
    loose = [path for path in relative if os.sep not in path]
    if loose:
        raise UserError(
            f"{flag} {folder}: found images outside class subfolders ({', '.join(loose[:3])}); "
            "put each class's images in a subfolder named after it, or name their classes in a metadata.csv"
        )
    classes = sorted({path.split(os.sep)[0] for path in relative})
    if len(classes) < min_classes:
        raise UserError(
            f"{flag} {folder}: found a single class ({classes[0]}); classification needs at least two classes, "
            "one subfolder of images per class"
        )


def _refuse_metadata_without_labels(dataset, label_column, folders):
    """A dataset read from metadata files with no label column: refused naming the files, which hold the columns."""
    features = next(iter(dataset.values())).features
    if label_column or _default_label_column(features):
        return
    metadata = [
        path for folder in folders for path in image_files.visible_files(folder)[0] if image_files.is_metadata(path)
    ]
    if metadata:
        raise UserError(
            f"no label column found in the metadata ({', '.join(metadata)}; columns: {', '.join(features)}): "
            "name it with --label_column_name"
        )


def find_columns(dataset, image_column, label_column):
    """The image and label column names: the ones given, else the Image / ClassLabel features."""
    features = next(iter(dataset.values())).features
    columns = list(features)
    if image_column is None:
        image_column = next(
            (name for name, feature in features.items() if isinstance(feature, datasets.Image)),
            None,
        )
        if image_column is None:
            raise UserError(f"no image column found; name it with --image_column_name (columns: {', '.join(columns)})")
    if label_column is None:
        label_column = _default_label_column(features)
        if label_column is None:
            raise UserError(f"no label column found; name it with --label_column_name (columns: {', '.join(columns)})")
    for flag, name in (
        ("--image_column_name", image_column),
        ("--label_column_name", label_column),
    ):
        for split, split_dataset in dataset.items():
            if name not in split_dataset.features:
                raise UserError(f"{flag} '{name}' is not a column of {split} (columns: {', '.join(columns)})")
    if isinstance(features[label_column], (datasets.List, datasets.LargeList, list)):
        raise UserError(
            f"the label column '{label_column}' holds a list of labels per image (multi-label data): imgft trains "
            "single-label classifiers, one label per image"
        )
    return image_column, label_column


def _default_label_column(features):
    """The ClassLabel column, else one named label or labels; None if there is none."""
    return next(
        (name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)),
        next((name for name in ("label", "labels") if name in features), None),
    )


def encode_labels(dataset, label_column):
    """Make the label column a ClassLabel shared by both splits; return the dataset and the class names."""
    feature = dataset["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        other = dataset["validation"].features[label_column]
        if not isinstance(other, datasets.ClassLabel) or other.names != feature.names:
            raise UserError(f"the validation split's '{label_column}' classes differ from train's")
    dataset, names = _class_labels(dataset, label_column)
    _check_class_counts(dataset, label_column, names)
    return dataset, names


def _class_labels(dataset, label_column):
    """(dataset, class names) with the label column a ClassLabel in every split, as it is or made from its values.

    String labels keep their text as the class name; integer labels are sorted numerically.
    """
    feature = next(iter(dataset.values())).features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return dataset, feature.names
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
    return dataset.cast_column(label_column, datasets.ClassLabel(names=names)), names


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
    if isinstance(split_dataset, datasets.IterableDataset):  # a stream's first examples
        return split_dataset if max_samples is None else split_dataset.take(max_samples)
    if max_samples is None or max_samples >= len(split_dataset):
        return split_dataset
    return split_dataset.shuffle(seed=seed).select(range(max_samples))


def warn_classes_without_training_images(train_dataset, label_column, label_names):
    """One warning naming how many classes have no training image (after --max_train_samples, say), and a few.
    A stream is not counted: that would take a pass over it."""
    if isinstance(train_dataset, datasets.IterableDataset):
        return
    counts = label_counts(train_dataset, label_column, len(label_names))
    empty = [name for name, count in zip(label_names, counts, strict=True) if count == 0]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        log_once(
            logging.WARNING,
            f"{len(empty)} of {len(label_names)} classes have no training image (the model cannot learn them): "
            f"{', '.join(empty[:5])}{more}",
        )
