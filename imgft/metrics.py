"""Evaluation metrics with torchmetrics, exact across processes: the tally that train_loop.evaluate fills,
the results and report details read from it (macro averages over the classes with validation images),
their log text, and eval_results.json.

Every process gathers all processes' logits (accelerator.gather_for_metrics) and updates its own
metrics with them, so each one holds the numbers of the full set. torchmetrics' own cross-process sync
is turned off: on top of the gather it would count every sample once per process (ratios survive
that, the confusion matrix and supports do not).
"""

import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from imgft.outputs import json_safe

NUM_MISTAKES = 16
# A list of numbers that json.dumps spread over lines: a raw newline never occurs inside a JSON string.
NUMBER_LIST = re.compile(r"\[\n[-+\d.eE,\s]*\]")
SUMMARY_METRICS = ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1")
CLASS_METRICS = ("precision", "recall", "f1")


def make_metrics(num_labels):
    """Top-1 (and top-5 above 5 classes) accuracy, per-class precision/recall/F1 (a 0/0 counts 0, as in
    torchmetrics) and the confusion matrix (rows: true class, columns: predicted). The macro averages are
    made from them in `finish_tally`."""
    options = {"num_classes": num_labels, "sync_on_compute": False}  # inputs are already gathered
    metrics = {"accuracy": MulticlassAccuracy(top_k=1, average="micro", **options)}
    if num_labels > 5:
        metrics["top5_accuracy"] = MulticlassAccuracy(top_k=5, average="micro", **options)
    metrics["precision"] = MulticlassPrecision(average="none", **options)
    metrics["recall"] = MulticlassRecall(average="none", **options)
    metrics["f1"] = MulticlassF1Score(average="none", **options)
    metrics["confusion_matrix"] = MulticlassConfusionMatrix(**options)
    # compute_groups=False: by default a MetricCollection merges metrics whose states look alike after the
    # first update, and top-1 and top-5 accuracy keep the same kind of state, so from then on top-5 was
    # computed from top-1's counts (all_results.json once reported top-5 equal to top-1).
    return MetricCollection(metrics, compute_groups=False)


def start_tally(label_names, device):
    """An empty evaluation tally: the metrics, the summed loss and each sample's (score, prediction, label).
    train_loop.evaluate feeds it gathered batches (`add_batch`) and reads it with `finish_tally`."""
    return {
        "metrics": make_metrics(len(label_names)).to(device),
        "loss_sum": torch.zeros((), device=device, dtype=torch.float64),
        "samples": 0,
        "scores": [],
        "predictions": [],
        "labels": [],
    }


def add_batch(tally, logits, labels):
    """Add one batch of logits and labels, gathered from every process, to the tally."""
    tally["metrics"].update(logits, labels)
    tally["loss_sum"] += F.cross_entropy(logits.float(), labels, reduction="sum")
    tally["samples"] += labels.numel()
    # Kept on the device (a few bytes per image): copying each batch to the CPU would stall a GPU.
    score, prediction = logits.float().softmax(dim=-1).max(dim=-1)
    tally["scores"].append(score)
    tally["predictions"].append(prediction)
    tally["labels"].append(labels)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: `results`, the numbers logged and written to all_results.json, and `details`, what
    the report draws from them (see `finish_tally`). With --ema_decay, `ema_details` are the EMA weights'
    details (their results join `results` as eval_ema_*), for the report when those weights are saved."""

    results: dict
    details: dict
    ema_details: dict | None = None


def finish_tally(tally, label_names, num_mistakes=NUM_MISTAKES):
    """The Evaluation of a finished tally:

        results = {"eval_accuracy", "eval_top5_accuracy" (above 5 classes), "eval_macro_precision",
                   "eval_macro_recall", "eval_macro_f1", "eval_loss", "eval_samples"}
        details = {
            "per_class": {name: {"precision", "recall", "f1", "support"}},
            "confusion_matrix": {"labels": label_names, "matrix": [[count]]},  # rows true, columns predicted
            "mistakes": [{"index", "true_label", "predicted_label", "score"}],  # most confident first
        }

    A class with no validation images (support 0) has None for precision, recall and F1, and the macro
    averages are the unweighted means over the classes that have some (NaN where none has): a class
    missing from a small validation set neither counts as a zero nor pulls them down. (torchmetrics'
    macro average counts such a class as 0 once it is predicted; sklearn's classification_report, with
    labels=the classes with images, averages as here.)

    `label_names` are the model's classes in id order; a mistake's `index` is its row in the evaluated
    dataset (an unshuffled evaluation loader is sharded in whole batches, process by process, and
    gather_for_metrics puts them back in that order).
    """
    scores = _on_cpu(tally["scores"])
    predictions = _on_cpu(tally["predictions"])
    labels = _on_cpu(tally["labels"])
    computed = tally["metrics"].compute()
    matrix = computed["confusion_matrix"].cpu()
    support = matrix.sum(dim=1).tolist()
    by_class = {metric: computed[metric].cpu().tolist() for metric in CLASS_METRICS}
    # A class without validation images is not evaluated: its recall is 0/0, and its precision and F1 would
    # only count the images wrongly given its name, which the other classes' recall counts already.
    per_class = {
        name: {
            **{metric: by_class[metric][i] if support[i] else None for metric in CLASS_METRICS},
            "support": support[i],
        }
        for i, name in enumerate(label_names)
    }
    details = {
        "per_class": per_class,
        "confusion_matrix": {"labels": list(label_names), "matrix": matrix.tolist()},
        "mistakes": most_confident_mistakes(scores, predictions, labels, label_names, num_mistakes),
    }
    results = {f"eval_{name}": computed[name].item() for name in ("accuracy", "top5_accuracy") if name in computed}
    evaluated = [i for i, count in enumerate(support) if count]
    for metric in CLASS_METRICS:  # unweighted means over the classes with validation images
        values = [by_class[metric][i] for i in evaluated]
        results[f"eval_macro_{metric}"] = sum(values) / len(values) if values else math.nan
    results["eval_loss"] = (tally["loss_sum"] / max(tally["samples"], 1)).item()
    results["eval_samples"] = tally["samples"]
    return Evaluation(results, details)


def _on_cpu(batches):
    return torch.cat(batches).cpu() if batches else torch.zeros(0)


def most_confident_mistakes(scores, predictions, labels, label_names, count):
    """The `count` wrong predictions with the highest predicted-class probability, ties broken by index."""
    wrong = (predictions != labels).nonzero().flatten()
    # A stable sort keeps equal scores in dataset order, so the same mistakes come out in the same order each time.
    order = scores[wrong].argsort(descending=True, stable=True)[:count]
    return [
        {
            "index": int(i),
            "true_label": label_names[int(labels[i])],
            "predicted_label": label_names[int(predictions[i])],
            "score": float(scores[i]),
        }
        for i in wrong[order]
    ]


def write_eval_results(path, results, details):
    """eval_results.json: the summary numbers, then per-class metrics, the confusion matrix and the mistakes."""
    text = json.dumps({**json_safe(results), **details}, indent=2, ensure_ascii=False)
    # One line per confusion-matrix row rather than one per number, so 100 classes stay 100 lines.
    text = NUMBER_LIST.sub(lambda match: " ".join(match.group(0).split()).replace("[ ", "[").replace(" ]", "]"), text)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    return path


def format_results(results):
    return ", ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in results.items()
    )
