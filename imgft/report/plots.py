"""PNG pictures of a run: training curves, the confusion matrix and the most confident mistakes.

Figures are built with matplotlib's object API (`Figure`, saved through the Agg canvas), never pyplot:
no global figure state, no display needed, nothing to close, and safe beside a training loop.
"""

import json
import math

import numpy as np
from matplotlib.figure import Figure

DPI = 100
ANNOTATE_MAX_CLASSES = 30  # above this, counts in the cells are too small to read and only clutter
MAX_LABEL_CHARS = 24
TILE_PIXELS = 224  # mistake thumbnails are shrunk to this before plotting, so huge photos stay cheap


def read_metrics_log(path):
    """(training log records, evaluation records) from a metrics.jsonl, each sorted by step."""
    train, evals = [], []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            record = json.loads(line)
            if "eval_accuracy" in record:
                evals.append(record)
            elif "loss" in record:
                train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def plot_training_curves(metrics_log, png_path):
    """One PNG from a metrics.jsonl, three panels sharing the step axis: training loss and learning rate
    per log step, validation accuracy per evaluation."""
    return save(training_curves_figure(*read_metrics_log(metrics_log)), png_path)


def training_curves_figure(train, evals):
    figure = Figure(figsize=(8, 8), dpi=DPI, layout="constrained")
    loss_axes, lr_axes, accuracy_axes = figure.subplots(3, 1, sharex=True)
    steps = [r["step"] for r in train]
    _line(loss_axes, steps, [r["loss"] for r in train], "training loss", "C0")
    _line(lr_axes, steps, [r.get("learning_rate") for r in train], "learning rate", "C1")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    eval_steps = [r["step"] for r in evals]
    accuracy = _line(accuracy_axes, eval_steps, [r["eval_accuracy"] for r in evals], "validation accuracy", "C2", "o")
    accuracy_axes.set_ylim(0, 1.02)
    if accuracy:  # the final value, written out: the number people look for
        step, value = accuracy[-1]
        accuracy_axes.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, -14), ha="center")
    accuracy_axes.set_xlabel("optimizer step")
    figure.suptitle("Training curves")
    return figure


def _line(axes, x, y, title, color, marker=None):
    """Plot the finite points (a diverged run logs null or NaN) and return them."""
    axes.set_title(title, loc="left", fontsize=10)
    axes.grid(alpha=0.3)
    points = [(a, b) for a, b in zip(x, y, strict=True) if b is not None and math.isfinite(b)]
    if not points:
        axes.text(0.5, 0.5, "nothing logged", transform=axes.transAxes, ha="center", va="center", color="grey")
        return points
    axes.plot(*zip(*points, strict=True), color=color, marker=marker or ("o" if len(points) == 1 else None))
    return points


def plot_confusion_matrix(matrix, label_names, png_path):
    """The confusion matrix (rows true, columns predicted) as a PNG; see `confusion_matrix_figure`."""
    return save(confusion_matrix_figure(matrix, label_names), png_path)


def confusion_matrix_figure(matrix, label_names, title="Confusion matrix"):
    """Rows are true classes, columns predictions; colours are each row's fractions (the recall per class
    on the diagonal), so a rare class reads as clearly as a common one. Counts are written in the cells
    when there are few classes; with many, the figure grows and the labels shrink to stay legible."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(label_names)
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    side = min(max(6.0, 0.28 * n + 2.5), 40.0)
    # Tick labels as tall as a little under half a cell (in points), so neighbours never overlap.
    tick_size = min(10.0, max(3.0, 0.45 * 72 * 0.8 * side / n))
    text_size = max(10.0, side * 0.45)  # titles and axis names grow with the figure
    figure = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("fraction of the true class", fontsize=text_size)
    colorbar.ax.tick_params(labelsize=text_size * 0.8)
    names = [_short(name) for name in label_names]
    axes.set_xticks(range(n), names, rotation=90, fontsize=tick_size)
    axes.set_yticks(range(n), names, fontsize=tick_size)
    axes.set_xlabel("predicted", fontsize=text_size)
    axes.set_ylabel("true", fontsize=text_size)
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    axes.set_title(f"{title}: {total} images, accuracy {accuracy:.3f}", fontsize=text_size * 1.2)
    if n <= ANNOTATE_MAX_CLASSES:
        cell_size = 10 if n <= 10 else 8 if n <= 20 else 6
        for (row, column), count in np.ndenumerate(counts):
            if count or row == column:
                dark = fractions[row, column] > 0.5
                axes.text(column, row, str(count), ha="center", va="center", fontsize=cell_size,
                          color="white" if dark else "black")  # fmt: skip
    return figure


def _short(name):
    name = str(name)
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def plot_mistakes(images, mistakes, png_path):
    """The most confident mistakes as a PNG grid; see `mistakes_figure`."""
    return save(mistakes_figure(images, mistakes), png_path)


def mistakes_figure(images, mistakes, columns=4):
    """A grid of the most confident mistakes: each tile is the image, titled "true: X / pred: Y (score)".

    `images` are PIL images in the order of `mistakes` (dicts with true_label, predicted_label, score).
    With no mistakes, the picture says so.
    """
    count = len(mistakes)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    if not count:
        figure = Figure(figsize=(5, 1.5), dpi=DPI)
        figure.text(0.5, 0.5, "No mistakes:\nevery image was classified correctly", ha="center", va="center")
        return figure
    height = 3.4 * rows + 0.6
    figure = Figure(figsize=(3.2 * columns, height), dpi=DPI)
    # Fixed margins, not layout="constrained": on 16 tiles that layout took longer than the drawing (measured).
    # Each row is 2.8 in of image and 0.6 in for its two-line title (hspace is a fraction of the image height).
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.1 / height, top=1 - 1.0 / height, wspace=0.08, hspace=0.6 / 2.8
    )
    figure.suptitle("Most confident mistakes", fontsize=13, y=1 - 0.15 / height)
    axes_grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes in axes_grid:
        axes.axis("off")
    for axes, image, mistake in zip(axes_grid, images, mistakes, strict=False):
        thumbnail = image.copy()
        thumbnail.thumbnail((TILE_PIXELS, TILE_PIXELS))
        # Tiny images are blown up with visible pixels rather than blurred.
        interpolation = "nearest" if max(thumbnail.size) < 64 else "antialiased"
        axes.imshow(np.asarray(thumbnail), interpolation=interpolation)
        axes.set_title(
            f"true: {_short(mistake['true_label'])}\npred: {_short(mistake['predicted_label'])} "
            f"({mistake['score']:.2f})",
            fontsize=10,
            color="firebrick",
        )
    return figure


def save(figure, png_path):
    figure.savefig(png_path)
    return png_path
