"""Model EMA (--ema_decay): an exponential moving average of the weights, updated after every optimizer
step, evaluated beside the weights, and saved in their place when it scores better.

The update is torch's `get_ema_multi_avg_fn` (ema <- decay * ema + (1 - decay) * weights) with timm's
ModelEmaV3 warmup (warmup_gamma 1, warmup_power 2/3): update k = 1, 2, ... uses
decay_k = min(decay, 1 - k^(-2/3)), so the first update copies the weights, the 8th keeps 3/4 of the
average, and a short fine-tune is not averaged with its first, random-headed steps. Floating-point
parameters and buffers (BatchNorm statistics) are averaged, integer buffers copied, as ModelEmaV3 does.
The averaged copy is a model of its own: train_loop.py prepares it for evaluation (device, autocast, no
DDP), and `save_state` saves it beside the model, so a resume continues the same average.
"""

import copy
import itertools
import logging

import torch
from accelerate.utils import broadcast
from torch.optim.swa_utils import get_ema_multi_avg_fn

from imgft.best import greater_is_better, metric_key
from imgft.runtime import log_once

WARMUP_POWER = 2 / 3
EMA_PREFIX = "eval_ema_"


def averaged_copy(model, decay):
    """A copy of `model` to hold the average (evaluation mode, no gradients); None when `decay` is 0."""
    if not decay:
        return None
    return copy.deepcopy(model).requires_grad_(False).eval()


def decay_at(step, decay):
    """The decay of the `step`-th update (1-based): min(decay, 1 - step^(-2/3))."""
    return min(decay, 1.0 - step**-WARMUP_POWER)


@torch.no_grad()
def update_ema(ema_model, model, step, decay):
    """Move the average towards `model`'s weights after optimizer step `step`; nothing when EMA is off."""
    if ema_model is None:
        return
    averaged = []
    current = []
    # The same order in both: DDP and torch.compile wrappers list their module's tensors unchanged.
    ema_tensors = itertools.chain(ema_model.parameters(), ema_model.buffers())
    tensors = itertools.chain(model.parameters(), model.buffers())
    for ema_tensor, tensor in zip(ema_tensors, tensors, strict=True):
        if ema_tensor.is_floating_point():
            averaged.append(ema_tensor)
            current.append(tensor.detach())
        else:
            ema_tensor.copy_(tensor)  # e.g. BatchNorm's num_batches_tracked
    get_ema_multi_avg_fn(decay_at(step, decay))(averaged, current, None)


def broadcast_ema_buffers(ema_model):
    """Give every process the EMA buffers of process 0, before an evaluation (a collective: every process
    calls it). Under DDP each process updates its model's BatchNorm statistics with its own batches, so the
    averages of them differ between processes (DDP gives the model process 0's at each forward); the
    checkpoints and the saved model hold process 0's, and all processes evaluate those."""
    broadcast(list(ema_model.buffers()), from_process=0)


def ema_results(results):
    """An evaluation's results renamed for the EMA weights: eval_accuracy -> eval_ema_accuracy, ..."""
    renamed = {EMA_PREFIX + key.removeprefix("eval_"): value for key, value in results.items()}
    renamed.pop(EMA_PREFIX + "samples")  # the same images as eval_samples
    return renamed


def choose_weights(results, train_args):
    """Which weights to save, from `results` of an evaluation of both: "ema" when the EMA weights scored
    better on --metric_for_best_model, else "raw"; None without EMA. Logs the choice and the two scores."""
    key = metric_key(train_args)
    ema_key = EMA_PREFIX + key.removeprefix("eval_")
    if ema_key not in results:
        return None
    value = results[key]
    ema_value = results[ema_key]
    chosen = "ema" if (ema_value > value if greater_is_better(train_args) else ema_value < value) else "raw"
    weights = "EMA" if chosen == "ema" else "raw (not the EMA)"
    log_once(logging.INFO, f"Saving the {weights} weights: {ema_key} {ema_value:.4f}, {key} {value:.4f}")
    return chosen


def summary(saved_weights):
    """Which weights were saved, for all_results.json: {"saved_weights": "ema" or "raw"}; {} without EMA."""
    return {} if saved_weights is None else {"saved_weights": saved_weights}
