"""The training loss: cross-entropy, and the recipes that change it (label smoothing, class weights).

imgft computes the loss itself rather than reading the model's `.loss`: with no recipe on it is the very
same number (transformers' single-label loss is `F.cross_entropy(logits, labels)`), and the recipes need
what the model's loss cannot take: soft targets (Mixup/CutMix, imgft/recipes/mixing.py), a smoothing factor,
class weights. Every loss-side recipe goes through `training_loss`; evaluation's loss stays plain
cross-entropy (imgft/metrics.py).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossOptions:
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None  # one per class, on the device; None: every class weighs 1


def loss_options(train_args, train_labels, num_classes, device):
    """The LossOptions that --label_smoothing_factor and --class_weighted_loss ask for."""
    weights = class_weights(train_labels, num_classes).to(device) if train_args.class_weighted_loss else None
    return LossOptions(label_smoothing=train_args.label_smoothing_factor, class_weights=weights)


def class_weights(labels, num_classes):
    """Per-class loss weights, n / (k * n_c) for n training images, k classes present and n_c images of
    class c (scikit-learn's 'balanced'): each class weighs the same in total, and the average training
    image weighs 1, so the loss keeps its scale. A class with no training image gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def training_loss(logits, targets, options):
    """Mean over the batch's images of -sum_c w_c t_c log softmax(logits)_c.

    `targets` are class indices (B) or, after Mixup/CutMix, probabilities (B x C); label smoothing makes
    them (1 - eps) t + eps / C, and w are the class weights (all 1 without them). With class indices and
    weights, PyTorch would divide by the batch's summed weights instead of its size: the indices become
    one-hot probabilities first, so that a mixed batch and a plain one are averaged alike.
    """
    if options.class_weights is not None and targets.ndim == 1:
        targets = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    smoothing = options.label_smoothing
    return F.cross_entropy(logits, targets, weight=options.class_weights, label_smoothing=smoothing)
