"""`python -m imgft check-data`: what training would see of a dataset, before a long run finds out."""

import numpy as np

from imgft import data, images
from imgft.errors import UserError

# From this ratio of the largest training class to the smallest, the report suggests the imbalance recipes.
IMBALANCE_HINT_RATIO = 3.0
IMBALANCE_HINT = (
    "  The classes are imbalanced: consider --balanced_sampling (draws every class equally often) or "
    "--class_weighted_loss (weighs each class's loss by its rarity)"
)


def data_report(data_args, cache_dir, seed):
    """(lines to print, refusal message or None): counts, imbalance, sizes, unreadable files, duplicates across
    the splits, and the same image under two classes in train.

    The image pass is the one training makes (cached by datasets), so checking first costs training nothing.
    """
    dataset, validation_source = data.load_raw_datasets(data_args, cache_dir, seed, data.demo_dir_for(data_args))
    image_column, label_column = data.find_columns(dataset, data_args.image_column_name, data_args.label_column_name)
    refusal, label_names = None, None
    try:
        dataset, label_names = data.encode_labels(dataset, label_column)
    except UserError as err:
        refusal = str(err)
    # Inspected after the labels are encoded (which changes the fingerprint), so that decode_once_dropping_unreadable's
    # own inspection below is this one, read back from the datasets cache rather than a second decode.
    num_proc = data.preprocessing_processes(data_args)
    inspected = {split: images.inspect_images(part, image_column, num_proc) for split, part in dataset.items()}
    lines = [
        f"Images: {len(dataset['train'])} train, {len(dataset['validation'])} validation",
        f"Evaluation images: {validation_source}",
    ]
    if label_names is not None:
        try:
            kept, _ = data.decode_once_dropping_unreadable(dataset, image_column, label_column, label_names, data_args)
            lines += _class_lines(kept, label_column, label_names)
        except UserError as err:
            refusal = str(err)
    for split, part in inspected.items():
        lines += _size_lines(split, np.asarray(part["width"]), np.asarray(part["height"]))
    lines += _unreadable_lines(inspected)
    lines += _duplicate_lines(inspected["train"], inspected["validation"])
    if label_names is not None:
        labels = data.labels_of(dataset["train"], label_column)
        lines += _class_conflict_lines(inspected["train"], labels, label_names)
    return lines, refusal


def _class_lines(dataset, label_column, label_names):
    counts = {split: data.label_counts(dataset[split], label_column, len(label_names)) for split in dataset}
    width = max(len(name) for name in label_names)
    lines = [f"Classes ({len(label_names)}), train / validation:"]
    for i, name in enumerate(label_names):
        lines.append(f"  {name:<{width}}  {counts['train'][i]:>7} / {counts['validation'][i]}")
    smallest, largest = counts["train"].min(), counts["train"].max()
    ratio = f"{largest / smallest:.1f}x" if smallest else "a class has no training images"
    lines.append(f"Imbalance (train): largest class {largest}, smallest {smallest} ({ratio})")
    if smallest and largest / smallest >= IMBALANCE_HINT_RATIO:
        lines.append(IMBALANCE_HINT)
    return lines


def _size_lines(split, widths, heights):
    readable = widths > 0
    if not readable.any():
        return []
    w, h = widths[readable], heights[readable]
    return [
        f"Image sizes ({split}, min / median / max): width {w.min()} / {int(np.median(w))} / {w.max()}, "
        f"height {h.min()} / {int(np.median(h))} / {h.max()}"
    ]


def _unreadable_lines(inspected):
    found = [
        (path or f"{split} row {row}", reason)
        for split, part in inspected.items()
        for row, (path, reason) in enumerate(zip(part[images.PATH_COLUMN], part[images.ERROR_COLUMN], strict=True))
        if reason
    ]
    note = " (training skips them; --strict_data refuses them)" if found else ""
    return [f"Unreadable images: {len(found)}{note}"] + [f"  {path}: {reason}" for path, reason in found]


def _duplicate_lines(train, validation):
    """Readable validation images whose bytes also stand in train (they inflate validation accuracy)."""
    first_train_path = {}
    for path, digest, reason in zip(train[images.PATH_COLUMN], train["sha1"], train[images.ERROR_COLUMN], strict=True):
        if not reason:
            first_train_path.setdefault(digest, path)
    pairs = [
        (path, first_train_path[digest])
        for path, digest in zip(validation[images.PATH_COLUMN], validation["sha1"], strict=True)
        if digest in first_train_path
    ]
    return [f"Duplicates across train and validation (same bytes): {len(pairs)}"] + [
        f"  {validation_path} = {train_path}" for validation_path, train_path in pairs
    ]


def _class_conflict_lines(train, labels, label_names):
    """Readable training images whose bytes also stand in train under another class: one of the two labels is
    wrong (a cheap label-noise check, from the hashes the image pass took anyway)."""
    first_seen = {}
    pairs = []
    columns = (train[images.PATH_COLUMN], train["sha1"], train[images.ERROR_COLUMN], labels)
    for path, digest, reason, label in zip(*columns, strict=True):
        if reason:
            continue
        first_path, first_label = first_seen.setdefault(digest, (path, label))
        if first_label != label:
            pairs.append(f"  {path} ({label_names[label]}) = {first_path} ({label_names[first_label]})")
    return [f"Same image under two classes in train (same bytes): {len(pairs)}"] + pairs


def main(argv):
    """Report on the data as training would see it; a UserError (exit 2) where training would refuse it."""
    from accelerate import PartialState

    from imgft import runtime
    from imgft.args import parse_args

    data_args, model_args, train_args = parse_args(argv)
    PartialState()  # accelerate's logging, used by the data functions, needs it
    runtime.setup_logging()
    lines, refusal = data_report(data_args, model_args.cache_dir, train_args.seed)
    print("\n".join(lines))
    if refusal:
        raise UserError(f"training would refuse this data: {refusal}")
    print("Training would accept this data.")
