"""Every reported evaluation number, checked against a count made by hand from the same logits."""

import math

import numpy as np
import pytest
import torch

from imgft import metrics

NAMES = [f"class{i}" for i in range(8)]


def hand_count(logits, labels, num_classes):
    """Top-1 and top-5 accuracy, per-class precision/recall/F1 (None for a class with no images), their macro
    averages (over the classes with images), the confusion matrix and the mean cross-entropy, in plain numpy."""
    logits, labels = logits.numpy().astype(np.float64), labels.numpy()
    predicted = logits.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true, guess in zip(labels, predicted, strict=True):
        matrix[true, guess] += 1
    precision, recall, f1 = [], [], []
    for k in range(num_classes):
        true_positive = matrix[k, k]
        predicted_k, actual_k = matrix[:, k].sum(), matrix[k, :].sum()
        p = true_positive / predicted_k if predicted_k else 0.0
        r = true_positive / actual_k if actual_k else 0.0
        precision.append(p if actual_k else None)
        recall.append(r if actual_k else None)
        f1.append((2 * p * r / (p + r) if p + r else 0.0) if actual_k else None)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "accuracy": float((predicted == labels).mean()),
        "top5_accuracy": float(np.mean([label in row for label, row in zip(labels, top5, strict=True)])),
        "macro_precision": float(np.mean([value for value in precision if value is not None])),
        "macro_recall": float(np.mean([value for value in recall if value is not None])),
        "macro_f1": float(np.mean([value for value in f1 if value is not None])),
        "loss": float(-log_softmax[np.arange(len(labels)), labels].mean()),
        "matrix": matrix,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def tally_of(batches):
    tally = metrics.start_tally(NAMES, "cpu")
    for logits, labels in batches:
        metrics.add_batch(tally, logits, labels)
    return metrics.finish_tally(tally, NAMES)


def test_top5_is_not_top1_when_the_first_batch_gets_every_answer_right():
    # The bug: a first batch where top-1 and top-5 agree made torchmetrics' compute groups merge the two
    # metrics, and top-5 then reported top-1's counts for good.
    generator = torch.Generator().manual_seed(0)
    first_labels = torch.arange(8)
    first_logits = torch.randn(8, 8, generator=generator) + 10 * torch.nn.functional.one_hot(first_labels, 8)
    second_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    # The right class is second best in every row: top-1 wrong, top-5 right.
    second_logits = torch.zeros(8, 8)
    second_logits[torch.arange(8), (second_labels + 1) % 8] = 5.0
    second_logits[torch.arange(8), second_labels] = 4.0
    results = tally_of([(first_logits, first_labels), (second_logits, second_labels)]).results
    assert results["eval_accuracy"] == pytest.approx(0.5)
    assert results["eval_top5_accuracy"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reported_metric_matches_a_hand_count(seed):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (16, 16, 5):  # a short last batch, as a validation set has
        labels = torch.randint(0, 7, (size,), generator=generator)  # class7 never occurs as a label
        logits = torch.randn(size, 8, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 8)
        logits[0, 7] += 9  # class7 is predicted all the same
        batches.append((logits, labels))
    evaluation = tally_of(batches)
    results = evaluation.results
    details = evaluation.details
    expected = hand_count(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), 8)
    for name in ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "loss"):
        assert results[f"eval_{name}"] == pytest.approx(expected[name], abs=1e-6), name
    assert results["eval_samples"] == 37
    assert details["confusion_matrix"]["matrix"] == expected["matrix"].tolist()
    for k, name in enumerate(NAMES):
        per_class = details["per_class"][name]
        assert per_class["support"] == int(expected["matrix"][k].sum())
        for key in ("precision", "recall", "f1"):
            if expected[key][k] is None:
                assert per_class[key] is None, (name, key)
            else:
                assert per_class[key] == pytest.approx(expected[key][k], abs=1e-6), (name, key)
    assert details["per_class"]["class7"]["support"] == 0  # never a label: no precision, recall or F1
    assert expected["matrix"][:, 7].sum() >= 3  # though it was predicted


def test_mistakes_are_the_most_confident_wrong_answers_in_dataset_order_on_ties():
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.zeros(4, 8)
    logits[0, 1] = 9.0  # wrong, confident
    logits[1, 1] = 9.0  # right
    logits[2, 0] = 5.0  # wrong, less confident
    logits[3, 7] = 9.0  # wrong, as confident as row 0: after it, in dataset order
    details = tally_of([(logits, labels)]).details
    softmax_nine = math.exp(9) / (math.exp(9) + 7)
    assert [m["index"] for m in details["mistakes"]] == [0, 3, 2]
    assert details["mistakes"][0] == {
        "index": 0,
        "true_label": "class0",
        "predicted_label": "class1",
        "score": pytest.approx(softmax_nine),
    }
