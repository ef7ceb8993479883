"""Step 5's evaluation: torchmetrics accuracy over the whole validation set, exact across processes."""

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


def make_metrics(num_labels):
    metrics = {"accuracy": MulticlassAccuracy(num_classes=num_labels, top_k=1, average="micro")}
    if num_labels > 5:
        metrics["top5_accuracy"] = MulticlassAccuracy(num_classes=num_labels, top_k=5, average="micro")
    return MetricCollection(metrics)


@torch.no_grad()
def evaluate(model, dataloader, accelerator, num_labels):
    """`eval_accuracy` (+ `eval_top5_accuracy`), `eval_loss`, `eval_samples`; leaves the model in eval mode."""
    model.eval()
    metrics = make_metrics(num_labels).to(accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    samples = 0
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        # gather_for_metrics replaces a hand-written all_gather: it also drops the duplicate samples that
        # pad the last batch so every process gets one, which would otherwise be counted twice.
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        metrics.update(logits, labels)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        samples += labels.numel()
    results = {f"eval_{name}": value.item() for name, value in metrics.compute().items()}
    results["eval_loss"] = (loss_sum / max(samples, 1)).item()
    results["eval_samples"] = samples
    return results


def format_results(results):
    return ", ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in results.items()
    )
