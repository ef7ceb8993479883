"""PNG pictures of a run: training curves, the confusion matrix and the most confident mistakes.

Figures are built with matplotlib's object API (`Figure`, saved through the Agg canvas), never pyplot:
no global figure state, no display needed, nothing to close, and safe beside a training loop.
Class names are shortened so that they stay distinct (`short_names`), and drawn in a font that has their
characters where one is installed (`name_font_families`), else with a warning that they will show as boxes.
"""

import contextlib
import json
import logging
import math
import os

import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure

DPI = 100
ANNOTATE_MAX_CLASSES = 30  # above this, counts in the cells are too small to read and only clutter
MAX_LABEL_CHARS = 24
MAX_FILE_CHARS = 30  # a mistake's file name under its tile: about the tile's width at the title's font size
TILE_PIXELS = 224  # mistake thumbnails are shrunk to this before plotting, so huge photos stay cheap
# Families (as matplotlib names them, matched by prefix) of fonts with Chinese, Japanese and Korean characters,
# looked for when the default font lacks some characters of the class names.
CJK_FONT_FAMILIES = (
    "Noto Sans CJK",
    "Noto Serif CJK",
    "Source Han Sans",
    "WenQuanYi",
    "Droid Sans Fallback",
    "AR PL",
    "IPAexGothic",
    "IPAGothic",
    "TakaoGothic",
    "NanumGothic",
    "Microsoft YaHei",
    "SimHei",
    "Malgun Gothic",
    "PingFang",
    "Hiragino Sans",
    "Apple SD Gothic Neo",
    "Arial Unicode MS",
)
logger = logging.getLogger("imgft")
_warned_characters = set()  # each character that no font has is warned about once per process


def read_metrics_log(path):
    """(training log records, evaluation records) from a metrics.jsonl, each sorted by step."""
    train = []
    evals = []
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
    names = short_names(label_names)
    font = _font_of(label_names)
    axes.set_xticks(range(n), names, rotation=90, fontsize=tick_size, **font)
    axes.set_yticks(range(n), names, fontsize=tick_size, **font)
    axes.set_xlabel("predicted", fontsize=text_size)
    axes.set_ylabel("true", fontsize=text_size)
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    axes.set_title(f"{title}: {total} images, accuracy {accuracy:.3f}", fontsize=text_size * 1.2)
    if n <= ANNOTATE_MAX_CLASSES:
        cell_size = 10 if n <= 10 else 8 if n <= 20 else 6
        for (row, column), count in np.ndenumerate(counts):
            if count or row == column:
                color = "white" if fractions[row, column] > 0.5 else "black"
                axes.text(column, row, str(count), ha="center", va="center", fontsize=cell_size, color=color)
    return figure


def short_names(names, width=MAX_LABEL_CHARS):
    """`names` cut to at most `width` characters each and still told apart. A long name keeps its start and
    its end (`a_rather…g_species_n12`), the end getting the larger share, since names that share a long
    prefix differ at the end; the split moves where that is not enough. Names told apart only by a middle
    that no split keeps end in `…#i` instead, i their place in `names` (for a confusion matrix, the class id)."""
    names = [str(name) for name in names]
    distinct = len(set(names))
    preferred_head = width // 3
    for head in sorted(range(width), key=lambda length: abs(length - preferred_head)):
        shortened = [_cut(name, head, width) for name in names]
        if len(set(shortened)) == distinct:
            return shortened
    shortened = [_cut(name, preferred_head, width) for name in names]
    counts = {name: shortened.count(name) for name in shortened}
    return [
        cut if counts[cut] == 1 or cut == name else f"{name[: width - 2 - len(str(i))]}…#{i}"
        for i, (name, cut) in enumerate(zip(names, shortened, strict=True))
    ]


def _cut(name, head, width):
    if len(name) <= width:
        return name
    tail = width - 1 - head
    return name[:head] + "…" + name[len(name) - tail :]


def name_font_families(names):
    """Font families that draw every character of `names`: None where matplotlib's default font does, else the
    default then an installed font that has the rest (Chinese, Japanese and Korean fonts are looked for).
    Where no font has them, a warning (once per character) says they will show as boxes and how to fix it."""
    default = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    missing = _lacking("".join(str(name) for name in names), default)
    if not missing:
        return None
    for family, path in _cjk_fonts():
        if not _lacking("".join(missing), font_manager.get_font(path)):
            return [default.family_name, family]
    unwarned = sorted(set(missing) - _warned_characters)
    if unwarned:
        _warned_characters.update(unwarned)
        logger.warning(
            f"No installed font has the characters {''.join(unwarned[:10])!r} of some class names: the pictures "
            "will show them as boxes. For Chinese, Japanese or Korean names, install a font that has them, e.g. "
            "`apt-get install fonts-noto-cjk` on Debian or Ubuntu; "
            "imgft finds it on the next run."
        )
    return None


def _font_of(names):
    """Text properties that draw `names` in a font with their characters ({} for matplotlib's default)."""
    families = name_font_families(names)
    return {"fontfamily": families} if families else {}


def _lacking(text, font):
    charmap = font.get_charmap()
    return "".join(sorted({char for char in text if not char.isspace() and ord(char) not in charmap}))


def _cjk_fonts():
    """(family, file) of the installed CJK fonts, in CJK_FONT_FAMILIES order. A font installed since
    matplotlib cached its font list is found on disk and added, so that installing one is enough."""
    known = {os.path.realpath(entry.fname) for entry in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts():
        if os.path.realpath(path) not in known:
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # a file matplotlib cannot read
                font_manager.fontManager.addfont(path)
    found = {}
    for entry in font_manager.fontManager.ttflist:
        rank = next((i for i, prefix in enumerate(CJK_FONT_FAMILIES) if entry.name.startswith(prefix)), None)
        if rank is not None:
            found.setdefault(entry.name, (rank, entry.fname))
    return [(family, path) for family, (_, path) in sorted(found.items(), key=lambda item: item[1][0])]


def plot_mistakes(images, mistakes, png_path):
    """The most confident mistakes as a PNG grid; see `mistakes_figure`."""
    return save(mistakes_figure(images, mistakes), png_path)


def mistakes_figure(images, mistakes, columns=4):
    """A grid of the most confident mistakes: each tile is the image, titled "true: X / pred: Y (score)" and
    the image's file name, or its row where it has none (`mistake_source`).

    `images` are PIL images in the order of `mistakes` (dicts with true_label, predicted_label, score, and
    path or row where known). With no mistakes, the picture says so.
    """
    count = len(mistakes)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    if not count:
        figure = Figure(figsize=(5, 1.5), dpi=DPI)
        figure.text(0.5, 0.5, "No mistakes:\nevery image was classified correctly", ha="center", va="center")
        return figure
    height = 3.65 * rows + 0.6
    figure = Figure(figsize=(3.2 * columns, height), dpi=DPI)
    # Fixed margins, not layout="constrained": on 16 tiles that layout took longer than the drawing (measured).
    # Each row is 2.8 in of image and 0.85 in for its three-line title (hspace is a fraction of the image height).
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.1 / height, top=1 - 1.25 / height, wspace=0.08, hspace=0.85 / 2.8
    )
    figure.suptitle("Most confident mistakes", fontsize=13, y=1 - 0.15 / height)
    axes_grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes in axes_grid:
        axes.axis("off")
    shown = sorted({m["true_label"] for m in mistakes} | {m["predicted_label"] for m in mistakes}, key=str)
    short = dict(zip(shown, short_names(shown), strict=True))
    font = _font_of(shown)
    for axes, image, mistake in zip(axes_grid, images, mistakes, strict=False):
        thumbnail = image.copy()
        thumbnail.thumbnail((TILE_PIXELS, TILE_PIXELS))
        # Tiny images are blown up with visible pixels rather than blurred.
        interpolation = "nearest" if max(thumbnail.size) < 64 else "antialiased"
        axes.imshow(np.asarray(thumbnail), interpolation=interpolation)
        title = (
            f"true: {short[mistake['true_label']]}\npred: {short[mistake['predicted_label']]} ({mistake['score']:.2f})"
        )
        source = mistake_source(mistake)
        if source:
            title += f"\n{source}"
        axes.set_title(title, fontsize=10, color="firebrick", **font)
    return figure


def mistake_source(mistake):
    """What a tile names a mistake's image by: its file's name (the whole path is in eval_results.json), cut
    to MAX_FILE_CHARS keeping its end, where the numbers that tell files apart usually are; "row N" for an
    image without a file; "" where neither is known."""
    if mistake.get("path"):
        return _cut(os.path.basename(mistake["path"]), MAX_FILE_CHARS // 3, MAX_FILE_CHARS)
    if mistake.get("row") is not None:
        return f"row {mistake['row']}"
    return ""


def save(figure, png_path):
    figure.savefig(png_path)
    return png_path
