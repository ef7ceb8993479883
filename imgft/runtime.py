"""Process-level setup shared by train_loop.py and the CLI commands: logging and the CPU-DDP switch."""

import logging
import os
import signal
import sys
import time

import torch

from imgft.errors import UserError

QUIET_LOGGERS = ("httpx", "datasets", "accelerate.checkpointing", "accelerate.accelerator")


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def log_once(level, message):
    """Log from the main process only; also usable with no Accelerator at all (a plain script, a test)."""
    from accelerate import PartialState

    if not PartialState._shared_state or PartialState().is_main_process:
        logging.getLogger("imgft").log(level, message)


def setup_logging():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    # Set on our logger too: basicConfig does nothing when the root logger already has handlers.
    logging.getLogger("imgft").setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def distributed_without_gpu():
    """True when a launcher started several processes on a machine with no GPU.

    Accelerate only joins CPU processes into one gloo DDP group when told `cpu=True`; without it each
    of `accelerate launch --multi_gpu --num_processes N` (or torchrun) processes would train alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not has_gpu


def dataloader_workers(requested, device, num_processes):
    """--num_workers, else a default that keeps an accelerator fed without starving a CPU-only run.

    Measured on 2 cores: a worker brings the data wait from 27 % to 7 % of the step but slows the run,
    since it takes CPU time from the model's own step. With a GPU, the cores are free for decoding.
    """
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // num_processes - 1))


def run_summary(train_dataset, eval_dataset, label_names, accelerator, train_args, max_train_steps):
    per_device = train_args.per_device_train_batch_size
    accumulation = train_args.gradient_accumulation_steps
    total_batch = per_device * accelerator.num_processes * accumulation
    return (
        f"{len(train_dataset)} training / {len(eval_dataset)} validation examples, {len(label_names)} classes; "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}; batch {total_batch} = {per_device} per device "
        f"x {accelerator.num_processes} process(es) x {accumulation} accumulation; {max_train_steps} optimizer steps"
    )


def preemption_check(accelerator):
    """Install SIGTERM/SIGINT handlers; return a function giving the signal any process received (0: none).

    The first signal only records itself, so the loop can finish its optimizer step and save a checkpoint.
    A second SIGINT (Ctrl-C twice) exits at once. With several processes the signal is all-reduced over a
    CPU (gloo) group, so every process stops at the same step without a GPU sync in the hot loop.
    """
    received = {"signum": 0}

    def handle(signum, frame):
        if received["signum"]:
            if signum == signal.SIGINT:
                print("Second interrupt: stopping now, without a checkpoint.", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        received["signum"] = signum
        name = signal.Signals(signum).name
        print(f"{name}: finishing this optimizer step, then saving a checkpoint.", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if accelerator.num_processes == 1:
        return lambda: received["signum"]
    group = torch.distributed.new_group(backend="gloo")

    def signal_on_any_process():
        signum = torch.tensor([received["signum"]])
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(signum.item())

    return signal_on_any_process


def any_nonfinite(accelerator, nonfinite_losses):
    """1.0 if a loss since the last optimizer step was NaN/inf on any process, else 0.0, on the device; resets the
    count. Fused AdamW takes it as `found_inf` and skips the step without the CPU waiting for the GPU."""
    total = accelerator.reduce(nonfinite_losses, "sum") if accelerator.num_processes > 1 else nonfinite_losses
    found_inf = (total > 0).float()
    nonfinite_losses.zero_()
    return found_inf


def read_skipped_steps(
    skipped_on_device, skipped_before, steps_checked, completed_steps, on_nonfinite_loss, output_dir
):
    """How many steps were skipped for a NaN/inf loss so far. New ones since step `steps_checked` stop the run
    (--on_nonfinite_loss stop: a UserError naming them and the last checkpoint) or are logged (skip)."""
    skipped = int(skipped_on_device.item())
    if skipped > skipped_before:
        first, count = steps_checked + 1, skipped - skipped_before
        steps = f"step {completed_steps}" if first == completed_steps else f"{count} of steps {first}-{completed_steps}"
        if on_nonfinite_loss == "stop":
            raise UserError(nonfinite_message(("at " if first == completed_steps else "in ") + steps, output_dir))
        log_once(logging.WARNING, f"Skipped {steps}: non-finite loss, no update made")
    return skipped


def nonfinite_message(where, output_dir):
    from imgft.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    last = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint yet"
    return (
        f"non-finite loss (NaN or inf) {where}: no update was made from it, and the run stopped; {last}. "
        "Lower --learning_rate or check the data, or pass --on_nonfinite_loss skip to go on without such steps"
    )


def timed(batches, wait):
    """Yield from `batches`, adding the seconds spent waiting for each one to wait["seconds"]."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        wait["seconds"] += time.perf_counter() - start
        yield batch


def throughput(images, seconds, wait):
    """An epoch's training speed: images per second end to end, and the share of it spent waiting for data."""
    seconds = max(seconds, 1e-9)
    return {"train_images_per_second": images / seconds, "data_wait_fraction": min(wait["seconds"] / seconds, 1.0)}
