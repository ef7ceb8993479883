"""`python -m imgft lr-find`: the learning-rate range test (Smith 2015, fastai's `lr_find`) on a training
run's own data, model and optimizer, read from the same flags or config file as train_loop.py.

From the starting weights, one optimizer step per learning rate, the rate growing exponentially from
--start_lr to --end_lr over --num_steps steps; the sweep stops early once the loss diverges (four times its
lowest smoothed value, as fastai stops, or NaN). It writes only `output_dir/lr_find.png`, so it can run
beside a run in the same folder, and prints the suggested --learning_rate: where the smoothed loss falls
fastest within its longest descent, once the smoothing has warmed up (`suggest`).
The rate swept is --learning_rate's: with --layer_decay or --head_learning_rate, every parameter group keeps
its ratio to it; with --freeze_backbone or --unfreeze_after_epochs, the backbone is frozen as in epoch 0.
"""

import argparse
import bisect
import json
import math
import os
import sys

import numpy as np

from imgft.args import DATA_FLAGS, Command
from imgft.errors import UserError

PLOT_FILE = "lr_find.png"
# fastai smooths with 0.98 over its sweeps; 0.9 averages about 10 steps, a tenth of the default sweep.
SMOOTHING = 0.9
# The debiased average of the first n losses is about their plain mean, so each early loss moves it by up to 1/n
# of its noise: over its first 1 / (1 - SMOOTHING) points, noise alone can fall faster than a real descent.
SMOOTHING_WARMUP = round(1 / (1 - SMOOTHING))
DIVERGENCE_FACTOR = 4  # the sweep stops once the smoothed loss exceeds this many times its lowest value
SWEEP_DEFAULTS = {"num_steps": 100, "start_lr": 1e-7, "end_lr": 10.0}

LR_FIND_COMMAND = Command(
    "python -m imgft lr-find",
    "Sweep the learning rate exponentially over a few optimizer steps from the starting weights, write "
    "output_dir/lr_find.png (loss against learning rate) and print a suggested --learning_rate. Takes a "
    "training config file and flags; training flags not listed are ignored.",
    DATA_FLAGS
    + ("max_train_samples", "random_flip", "crop_scale_min", "resize_once", "stored_image_size")
    + ("streaming", "shuffle_buffer_size", "label_names")
    + ("model_name_or_path", "model_type", "config_overrides", "image_processor_name", "image_size")
    + ("ignore_mismatched_sizes", "trust_remote_code", "model_revision", "cache_dir", "drop_path_rate")
    + ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay")
    + ("max_grad_norm", "mixed_precision", "channels_last", "seed", "output_dir")
    + ("layer_decay", "head_learning_rate", "freeze_backbone", "unfreeze_after_epochs"),
)


def sweep_parser():
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    sweep = parser.add_argument_group("the sweep's own flags")
    sweep.add_argument(
        "--num_steps",
        type=int,
        default=SWEEP_DEFAULTS["num_steps"],
        help="Optimizer steps swept (default: 100).",
    )
    sweep.add_argument(
        "--start_lr",
        type=float,
        default=SWEEP_DEFAULTS["start_lr"],
        help="First learning rate (default: 1e-7).",
    )
    sweep.add_argument(
        "--end_lr", type=float, default=SWEEP_DEFAULTS["end_lr"], help="Last learning rate (default: 10)."
    )
    return parser


def help_text():
    from imgft.args import help_text as arguments_help

    return arguments_help(LR_FIND_COMMAND) + "\n" + sweep_parser().format_help().split("\n\n", 1)[1]


def split_sweep_flags(argv):
    """(the sweep's flags, checked; the other tokens, for imgft.args.parse_args)."""
    own, rest = [], []
    tokens = iter(argv)
    for token in tokens:
        name = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
        if name in SWEEP_DEFAULTS:
            value = token.split("=", 1)[1] if "=" in token else next(tokens, "")
            own.append(f"--{name}={value}")
        else:
            rest.append(token)
    try:
        sweep = sweep_parser().parse_args(own)
    except argparse.ArgumentError as err:
        raise UserError(str(err)) from None
    if sweep.num_steps < 3:
        raise UserError(f"--num_steps must be at least 3 (got {sweep.num_steps})")
    if not 0 < sweep.start_lr < sweep.end_lr < math.inf:
        raise UserError(f"lr-find needs 0 < --start_lr < --end_lr (got {sweep.start_lr} and {sweep.end_lr})")
    return sweep, rest


def main(argv):
    """Run the sweep; print the suggestion, then one JSON object on the last line."""
    if any(token in ("-h", "--help") for token in argv):
        print(help_text(), end="")
        return
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from imgft import data, freezing, layer_decay, optimizer, outputs, runtime, transforms
    from imgft.args import parse_args
    from imgft.model import check_model_source, load_model

    sweep, training_argv = split_sweep_flags(argv)
    data_args, model_args, train_args = parse_args(training_argv)
    check_model_source(model_args)
    outputs.check_output_dir_can_be_a_folder(train_args.output_dir)
    cpu = runtime.distributed_without_gpu()  # launched on several processes, so refused just below
    accelerator = Accelerator(cpu=cpu, mixed_precision=train_args.mixed_precision)
    if accelerator.num_processes > 1:
        raise UserError("lr-find runs in one process: run python -m imgft lr-find, not accelerate launch")
    runtime.setup_logging()
    set_seed(train_args.seed)
    dataset, image_column, label_column, label_names = data.load_labeled_dataset(
        data_args, model_args.cache_dir, train_args.seed
    )
    model, image_processor = load_model(model_args, label_names)
    stored_size = transforms.stored_image_size(image_processor, model_args.image_size, data_args)
    dataset, _ = data.decode_once_dropping_unreadable(
        dataset, image_column, label_column, label_names, data_args, stored_size
    )
    train_transform, _ = transforms.build_transforms(
        image_processor, model_args.image_size, data_args.random_flip, data_args.crop_scale_min
    )
    augmentation_epoch = transforms.shared_epoch()
    train_dataset = transforms.with_image_transform(
        data.subsample(dataset["train"], data_args.max_train_samples, train_args.seed),
        train_transform,
        image_column,
        label_column,
        seed=train_args.seed,
        epoch=augmentation_epoch,
    )
    workers = runtime.dataloader_workers(data_args.num_workers, accelerator.device, 1)
    dataloader = DataLoader(
        train_dataset,
        train_args.per_device_train_batch_size,
        shuffle=not data_args.streaming,  # a stream is shuffled as training's is, by its buffer (data.py)
        generator=torch.Generator().manual_seed(train_args.seed),
        collate_fn=transforms.collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    if train_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    param_groups = layer_decay.param_groups(model, train_args)
    adamw = optimizer.adamw(param_groups, train_args.learning_rate, accelerator.mixed_precision)
    model, adamw = accelerator.prepare(model, adamw)
    freezing.apply_unfreeze_schedule(accelerator.unwrap_model(model), 0, train_args)
    learning_rates = np.geomspace(sweep.start_lr, sweep.end_lr, sweep.num_steps).tolist()
    losses = sweep_losses(
        model,
        adamw,
        endless_batches(dataloader, augmentation_epoch),
        transforms.normalizer(image_processor, train_args.channels_last),
        accelerator,
        train_args,
        learning_rates,
    )
    if not losses:
        raise UserError(f"the loss was NaN or inf at the first step (--start_lr {sweep.start_lr})")
    learning_rates = learning_rates[: len(losses)]
    smoothed = smooth(losses)
    suggestion, method = suggest(learning_rates, smoothed)
    os.makedirs(train_args.output_dir, exist_ok=True)
    plot_path = os.path.join(train_args.output_dir, PLOT_FILE)
    sweep_figure(learning_rates, losses, smoothed, suggestion).savefig(plot_path)
    print(f"Suggested --learning_rate {suggestion:.2g} ({method}); the plot is {plot_path}", file=sys.stderr)
    summary = {
        "suggested_learning_rate": suggestion,
        "method": method,
        "steps": len(losses),
        "stopped_early": len(losses) < sweep.num_steps,
        "start_lr": sweep.start_lr,
        "end_lr": sweep.end_lr,
        "plot": plot_path,
    }
    print(json.dumps(summary))
    accelerator.end_training()


def endless_batches(dataloader, augmentation_epoch):
    """The DataLoader's batches, epoch after epoch (the sweep may outlast one), each epoch's augmentation
    seeded by its number as in training."""
    epoch = 0
    while True:
        augmentation_epoch.fill_(epoch)
        yield from dataloader
        epoch += 1


def sweep_losses(model, adamw, batches, normalize, accelerator, train_args, learning_rates):
    """The training loss of one optimizer step at each learning rate in turn (each group at its ratio to
    --learning_rate), until the loss diverges: the finite losses, one per step taken."""
    ratios = [group["lr"] / train_args.learning_rate for group in adamw.param_groups]
    accumulation = train_args.gradient_accumulation_steps
    losses = []
    model.train()
    for learning_rate in learning_rates:
        for group, ratio in zip(adamw.param_groups, ratios, strict=True):
            group["lr"] = learning_rate * ratio
        step_loss = 0.0
        for _ in range(accumulation):
            batch = next(batches)
            pixel_values = normalize(batch["pixel_values"].to(accelerator.device))
            loss = model(pixel_values=pixel_values, labels=batch["labels"].to(accelerator.device)).loss
            accelerator.backward(loss / accumulation)
            step_loss += loss.item() / accumulation
        if train_args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
        adamw.step()
        adamw.zero_grad()
        if not math.isfinite(step_loss):
            break
        losses.append(step_loss)
        smoothed = smooth(losses)
        if smoothed[-1] > DIVERGENCE_FACTOR * min(smoothed):
            break
    return losses


def smooth(losses):
    """The exponential moving average of `losses`, debiased (divided by 1 - SMOOTHING ** n) as fastai's."""
    smoothed = []
    average = 0.0
    for count, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING**count))
    return smoothed


def suggest(learning_rates, smoothed):
    """(suggested learning rate, how it was chosen): where the smoothed loss falls fastest against log(lr)
    within its longest descent (as fastai's `valley`), the smoothing's warmup left out (at most a third of a
    short sweep); the first rate swept where the loss never falls after the warmup.

    Each slope spans half the smoothing's window on either side (a quarter of the descent at most): one odd
    batch moves the average at once and then fades, a real descent keeps falling across the span."""
    skip = min(SMOOTHING_WARMUP, len(smoothed) // 3)
    first, last = (skip + index for index in longest_descent(smoothed[skip:]))
    if last - first < 2:
        return learning_rates[0], "the loss never fell: the lowest rate swept; try a lower --start_lr"
    values = np.asarray(smoothed[first : last + 1])
    log_rates = np.log10(learning_rates[first : last + 1])
    reach = max(1, min(SMOOTHING_WARMUP // 2, (last - first) // 4))
    positions = np.arange(len(values))
    before = np.maximum(positions - reach, 0)
    after = np.minimum(positions + reach, len(values) - 1)
    slopes = (values[after] - values[before]) / (log_rates[after] - log_rates[before])
    return learning_rates[first + int(np.argmin(slopes))], "steepest descent of the smoothed loss"


def longest_descent(values):
    """(first index, last index) of the longest strictly falling subsequence of `values`: the span where the
    curve comes down, which a noisy dip elsewhere is too short to outdo (patience sorting, O(n log n))."""
    # tail_heights[k]: the highest last value of a falling subsequence of length k + 1 seen so far, negated so
    # that the list ascends for bisect; tail_indices[k]: where that subsequence ends.
    tail_heights, tail_indices, previous = [], [], []
    for index, value in enumerate(values):
        length = bisect.bisect_left(tail_heights, -value)
        previous.append(tail_indices[length - 1] if length else None)
        if length == len(tail_heights):
            tail_heights.append(-value)
            tail_indices.append(index)
        else:
            tail_heights[length] = -value
            tail_indices[length] = index
    first = last = tail_indices[-1]
    while previous[first] is not None:
        first = previous[first]
    return first, last


def sweep_figure(learning_rates, losses, smoothed, suggestion):
    """Loss against learning rate (log axis): each step's loss, the smoothed loss and the suggestion."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    axes.plot(learning_rates, losses, color="C0", alpha=0.3, label="loss")
    axes.plot(learning_rates, smoothed, color="C0", label="smoothed loss")
    suggested_loss = smoothed[learning_rates.index(suggestion)]
    axes.plot([suggestion], [suggested_loss], "o", color="C3", label=f"suggested: {suggestion:.2g}")
    axes.set_xscale("log")
    axes.set_ylim(top=1.2 * max(smoothed))  # a diverging step's raw loss would flatten the rest of the curve
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.suptitle("Learning-rate range test")
    return figure
