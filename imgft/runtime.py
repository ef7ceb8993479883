"""Process-level setup shared by train_loop.py and the CLI commands: logging and the CPU-DDP switch."""

import logging
import os

import torch

QUIET_LOGGERS = ("httpx", "datasets", "accelerate.checkpointing", "accelerate.accelerator")


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


def run_summary(train_samples, eval_samples, label_names, accelerator, train_args):
    per_device = train_args.per_device_train_batch_size
    accumulation = train_args.gradient_accumulation_steps
    total_batch = per_device * accelerator.num_processes * accumulation
    return (
        f"{train_samples} training / {eval_samples} validation examples, {len(label_names)} classes; "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}; batch {total_batch} = {per_device} per device "
        f"x {accelerator.num_processes} process(es) x {accumulation} accumulation"
    )
