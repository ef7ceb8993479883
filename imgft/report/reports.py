"""The reports a person reads: an evaluation's eval_results.json, confusion_matrix.png and mistakes.png (each
mistake named by its file, or its row in the split as loaded); after training, those, training_curves.png and
the model card."""

import os

import datasets
from accelerate import PartialState

from imgft import images, metrics, runtime, stream
from imgft.data import SOURCE_ROW_COLUMN
from imgft.outputs import (
    CONFUSION_MATRIX_FILE,
    EVAL_RESULTS_FILE,
    METRICS_LOG,
    MISTAKES_FILE,
    TRAINING_CURVES_FILE,
)
from imgft.report import model_card, plots


def write_evaluation_report(output_dir, results, details, split, image_column, stream_loader_settings=None):
    """Write the three report files to `output_dir` (created if needed); return their paths.

    `results` and `details` are an evaluation's (`metrics.Evaluation`); `split` is the evaluated dataset as
    evaluated (same rows, same order) but without the image transform, so the mistakes' images can be
    read back by row, and named (`named_mistakes`). A streamed split is read again, through a loader of the
    evaluation's `stream_loader_settings` = (batch size, workers); its mistakes are not named. Call it on
    the main process only.
    """
    os.makedirs(output_dir, exist_ok=True)
    mistakes = details["mistakes"]
    rows = [mistake["index"] for mistake in mistakes]
    if isinstance(split, datasets.IterableDataset):
        found = stream.images_in_evaluation_order(split, image_column, rows, *stream_loader_settings)
        mistake_images = [found[row] for row in rows]
    else:
        mistake_images = [images.to_rgb(split[row][image_column]) for row in rows]
        mistakes = named_mistakes(mistakes, split, image_column)
    confusion = details["confusion_matrix"]
    return [
        metrics.write_eval_results(
            os.path.join(output_dir, EVAL_RESULTS_FILE), results, {**details, "mistakes": mistakes}
        ),
        plots.plot_confusion_matrix(
            confusion["matrix"], confusion["labels"], os.path.join(output_dir, CONFUSION_MATRIX_FILE)
        ),
        plots.plot_mistakes(mistake_images, mistakes, os.path.join(output_dir, MISTAKES_FILE)),
    ]


def named_mistakes(mistakes, split, image_column):
    """`mistakes`, each with what finds its image again: "path", its file as the dataset names it, else "row",
    its row in the split as loaded (data.SOURCE_ROW_COLUMN: before unreadable images were dropped and
    --max_eval_samples picked), for data that holds images without file names."""
    if not mistakes:
        return mistakes
    picked = split.select([mistake["index"] for mistake in mistakes])
    if isinstance(picked.features[image_column], datasets.Image):
        picked = picked.cast_column(image_column, datasets.Image(decode=False))  # {"bytes", "path"}, not read
    source_rows = picked[SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in picked.column_names else [None] * len(picked)
    named = []
    for mistake, value, source_row in zip(mistakes, picked[image_column], source_rows, strict=True):
        path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
        if path:
            named.append({**mistake, "path": path})
        elif source_row is not None:
            named.append({**mistake, "row": source_row})
        else:
            named.append(mistake)
    return named


def write_training_report(output_dir, config, results, details, eval_rows, image_column, num_processes):
    """After training, on the main process: the evaluation report, the training curves (from the run's
    metrics.jsonl) and the model card."""
    workers = runtime.dataloader_workers(config["num_workers"], PartialState().device, num_processes)
    eval_loader = (config["per_device_eval_batch_size"], workers)  # as train_loop.py made it, for a stream
    write_evaluation_report(output_dir, results, details, eval_rows, image_column, eval_loader)
    metrics_log = os.path.join(output_dir, METRICS_LOG)
    plots.plot_training_curves(metrics_log, os.path.join(output_dir, TRAINING_CURVES_FILE))
    labels = details["confusion_matrix"]["labels"]
    model_card.write_model_card(output_dir, config, results, labels, details["per_class"], num_processes)
