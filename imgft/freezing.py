"""Training only the classifier head (--freeze_backbone, a linear probe), and unfreezing the backbone after
--unfreeze_after_epochs epochs, as fastai's `fine_tune` does.

The optimizer holds every parameter from the start; a frozen one has requires_grad off, so it gets no
gradient, and AdamW leaves it (and its moments) alone. At the switch the backbone's requires_grad is turned
on and the same optimizer and schedule go on: the backbone joins at the schedule's current learning rate.
Which parameters are frozen is a function of the epoch, set at each epoch's start, so a resume (which
restarts an epoch) freezes exactly what the interrupted run froze.
DDP builds its gradient buckets once, when it wraps the model: the model is wrapped with every parameter
trainable, and `ddp_kwargs_handlers` has DDP look for parameters without a gradient at each step
(find_unused_parameters), which a frozen one is; its gradient then stays None on every process.
"""

import logging

from accelerate.utils import DistributedDataParallelKwargs

from imgft.layers import backbone
from imgft.runtime import log_once


def freezes(train_args):
    """Whether the run freezes the backbone in any epoch."""
    return train_args.freeze_backbone or train_args.unfreeze_after_epochs is not None


def backbone_frozen(epoch, train_args):
    """Whether the backbone is frozen in `epoch` (0-based)."""
    if train_args.unfreeze_after_epochs is not None:
        return epoch < train_args.unfreeze_after_epochs
    return train_args.freeze_backbone


def ddp_kwargs_handlers(train_args):
    """The Accelerator's kwargs_handlers: with freezing, DDP tolerates parameters that get no gradient."""
    return [DistributedDataParallelKwargs(find_unused_parameters=True)] if freezes(train_args) else []


def apply_unfreeze_schedule(model, epoch, train_args):
    """At the start of each epoch: freeze or unfreeze the backbone of `model` (unwrapped) for `epoch`."""
    if not freezes(train_args):
        return
    frozen = backbone_frozen(epoch, train_args)
    params = list(backbone(model).parameters())
    if all(param.requires_grad != frozen for param in params):
        return  # already as this epoch wants it
    for param in params:
        param.requires_grad_(not frozen)
    count = sum(param.numel() for param in params)
    change = "frozen" if frozen else "unfrozen"
    trained = "only the head" if frozen else "the whole model"
    log_once(logging.INFO, f"Epoch {epoch}: backbone {change} ({count:,} parameters); training {trained}")
