"""The lines the training loop logs: the training loss (and the learning rate its last step used) every
--logging_steps and at each epoch's end, and each evaluation, to the console, output_dir/metrics.jsonl, the
trackers (TensorBoard, W&B, ...) and the progress bar.

The loss is summed on the device between lines: reading it is the loop's only wait for the GPU, so it is read
here, when a line is due and before a checkpoint (which must hold the whole loss window), and nowhere else.
"""

import logging

from imgft import metrics, nonfinite, outputs
from imgft.runtime import log_once


def read_losses(accelerator, state, train_args):
    """Fold the loss window, summed over processes, into `state`, and count its NaN/inf losses.
    Returns the Stop a NaN calls for (with --on_nonfinite_loss stop), or None."""
    state.fold_window_loss(accelerator)
    return nonfinite.check_skipped_steps(state, train_args.on_nonfinite_loss, train_args.output_dir)


def log_train_loss(accelerator, state, train_args, lr_scheduler, progress):
    """`read_losses`, then log the mean loss since the last line. Returns what `read_losses` returns."""
    stop = read_losses(accelerator, state, train_args)
    mean_loss = state.end_log_window(accelerator.num_processes)
    if stop is None and mean_loss is not None:
        record = {
            "step": state.completed_steps,
            "epoch": state.epoch_position(),
            "loss": mean_loss,
            "learning_rate": rate_of_last_step(lr_scheduler),
        }
        write_record(accelerator, train_args.output_dir, record)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
    return stop


def rate_of_last_step(lr_scheduler):
    """The learning rate (of the first parameter group) that the last optimizer step used. The loop steps the
    schedule right after each optimizer step, so get_last_lr() is already the next step's rate: 0 after the
    last step of a linear schedule. transformers' schedules are LambdaLR, whose rate for the step after
    `last_epoch` schedule steps is base_lr * lambda(last_epoch): the same product, one step back."""
    return lr_scheduler.base_lrs[0] * lr_scheduler.lr_lambdas[0](max(lr_scheduler.last_epoch - 1, 0))


def log_evaluation(accelerator, state, results, speed, output_dir):
    """One line for an evaluation at the current step: its results, and the training speed before it."""
    record = {"step": state.completed_steps, "epoch": state.epoch_position(), **results, **speed}
    log_once(logging.INFO, metrics.format_results(record))
    write_record(accelerator, output_dir, record)


def write_record(accelerator, output_dir, record):
    outputs.append_metrics_line(accelerator, output_dir, record)
    accelerator.log(outputs.tracker_scalars(record), step=record["step"])
