"""The optimizer's parameter groups with their learning rates: layer-wise learning-rate decay (--layer_decay,
as in BEiT and timm) and the classifier head's own rate (--head_learning_rate).

Each group carries its own `lr`. The schedule keeps the ratios: LambdaLR (what `get_scheduler` makes)
multiplies each group's initial lr by the same factor. Groups at --learning_rate come first, so the learning
rate the loop logs (the first group's) is --learning_rate's where any group has it.
"""

import logging

from imgft.layers import head_parameter_names, layer_ids
from imgft.optimizer import optimizer_param_groups
from imgft.runtime import log_once


def param_groups(model, train_args):
    """`optimizer_param_groups` (no weight decay on biases and norms), each split by learning rate; without
    --layer_decay and --head_learning_rate, exactly those two groups at --learning_rate."""
    groups = optimizer_param_groups(model, train_args.weight_decay)
    if train_args.layer_decay is None and train_args.head_learning_rate is None:
        return groups
    head = head_parameter_names(model)
    rates = learning_rates(model, head, train_args)
    rate_of = {id(param): rates[name] for name, param in model.named_parameters()}
    split = []
    for group in groups:
        for rate in sorted({rate_of[id(param)] for param in group["params"]}):
            params = [param for param in group["params"] if rate_of[id(param)] == rate]
            split.append({**group, "params": params, "lr": rate})
    split.sort(key=lambda group: (group["lr"] != train_args.learning_rate, -group["lr"]))
    log_once(logging.INFO, describe(rates, head, train_args))
    return split


def learning_rates(model, head, train_args):
    """{parameter name: peak learning rate}: --learning_rate * layer_decay ** (top layer - layer) in the
    backbone, --head_learning_rate (default --learning_rate) for the names in `head`."""
    ids = layer_ids(model) if train_args.layer_decay is not None else {}
    top = max(ids.values(), default=0)
    head_rate = train_args.head_learning_rate or train_args.learning_rate
    decay = train_args.layer_decay or 1.0
    return {
        name: head_rate if name in head else train_args.learning_rate * decay ** (top - ids.get(name, top))
        for name, _ in model.named_parameters()
    }


def describe(rates, head, train_args):
    """One log line: the range of the backbone's learning rates and the head's."""
    head_rate = train_args.head_learning_rate or train_args.learning_rate
    backbone_rates = sorted(rate for name, rate in rates.items() if name not in head)
    layers = f"layer_decay {train_args.layer_decay}, " if train_args.layer_decay is not None else ""
    return (
        f"Learning rates ({layers}peak): backbone {backbone_rates[0]:.3g} to {backbone_rates[-1]:.3g}, "
        f"head {head_rate:.3g}"
    )
