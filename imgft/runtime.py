"""Process-level setup and run control shared by train_loop.py and the commands: logging (and the run's
summary line), whether the Hub is offline, the CPU-DDP switch, the main process's turn first, DataLoader
workers, the stop signals (SIGTERM/SIGINT) and why a run stops, and the training-speed clock."""

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType
from datasets import IterableDataset

from imgft.batches import effective_batch
from imgft.errors import UserError

QUIET_LOGGERS = (
    "httpx",
    "datasets",
    "accelerate.checkpointing",
    "accelerate.accelerator",
    "accelerate.utils.fsdp_utils",  # a line per saved shard at every FSDP checkpoint
)


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


@contextlib.contextmanager
def main_process_first(accelerator):
    """`accelerator.main_process_first()`, where a UserError in the main process's turn (bad data, a model
    that cannot load) stops every process with exit code 2 and one `error:` line from each machine. With
    Accelerate's own, the others, left waiting for the main process at a barrier, ended in a gloo or NCCL
    traceback once it had gone. The others take their turn only after the main process ended its own well.
    """
    if accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process:
        refusal = None
        try:
            yield
        except UserError as err:
            refusal = str(err)
            # Before the broadcast: the launcher ends every process as soon as one exits, message or not.
            print(f"error: {refusal}", file=sys.stderr, flush=True)
        if broadcast_object_list([refusal])[0] is not None:
            raise SystemExit(2)
        return
    refusal = broadcast_object_list([None])[0]  # waits for the main process's turn to end
    if refusal is not None:
        if accelerator.is_local_main_process:  # the main process said it on its machine
            print(f"error: {refusal}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    yield


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


def log_run_summary(train_dataset, eval_dataset, label_names, accelerator, train_args, max_train_steps):
    """Log what the run is about to do: data, classes, processes, precision, the real batch and the steps;
    and warn when accumulation spans more batches than an epoch has or the data is smaller than a batch
    (`batches.effective_batch`), when a launch for several GPUs runs on a machine without any
    (`warn_processes_without_gpu`), or when FSDP was asked for where Accelerate cannot shard (it does so only
    on GPUs and other accelerators)."""
    per_device = train_args.per_device_train_batch_size
    accumulation = train_args.gradient_accumulation_steps
    processes = accelerator.num_processes
    if isinstance(train_dataset, IterableDataset):  # a stream: its length is unknown
        log_once(
            logging.INFO,
            f"Streaming training and validation examples, {len(label_names)} classes; {processes} "
            f"process(es) on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}; batch "
            f"{per_device * processes * accumulation} = {per_device} per device x {processes} process(es) x "
            f"{accumulation} accumulated; {max_train_steps} optimizer steps",
        )
        warn_processes_without_gpu(accelerator, per_device * processes * accumulation)
        return
    batches_per_epoch = math.ceil(len(train_dataset) / (per_device * processes))  # as the sharded loader has it
    images_per_step, warning = effective_batch(
        batches_per_epoch, per_device, processes, accumulation, len(train_dataset)
    )
    log_once(
        logging.INFO,
        f"{len(train_dataset)} training / {len(eval_dataset)} validation examples, {len(label_names)} classes; "
        f"{processes} process(es) on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}; "
        f"batch {images_per_step} = {per_device} per device x {processes} process(es) x "
        f"{min(accumulation, batches_per_epoch)} accumulation; {max_train_steps} optimizer steps",
    )
    if warning:
        log_once(logging.WARNING, warning)
    warn_processes_without_gpu(accelerator, images_per_step)
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        log_once(
            logging.WARNING,
            f"FSDP was asked for, but Accelerate shards only on GPUs: on {accelerator.device.type} this run "
            "is plain data parallel, every process holding the whole model and optimizer state",
        )


def warn_processes_without_gpu(accelerator, images_per_step):
    """Say so when a launch meant for GPUs (`accelerate launch --multi_gpu`, or a config such as the shipped
    accelerate_config.yaml, whose distributed_type is MULTI_GPU) started several processes on a machine with
    none: they then train as CPU processes (`distributed_without_gpu`), each with a whole batch of its own."""
    if not distributed_without_gpu():
        return
    precision = "" if accelerator.mixed_precision == "no" else f" in mixed precision {accelerator.mixed_precision},"
    log_once(
        logging.WARNING,
        f"No GPU on this machine: the {accelerator.num_processes} processes this launch started (one per GPU it "
        f"asked for) train on its {os.cpu_count()} CPU cores instead,{precision} and each optimizer step takes "
        f"{images_per_step} images; for one CPU process, run `python train_loop.py` with the same arguments",
    )


def install_signal_handlers_and_start_signal_group(accelerator, state, max_train_steps):
    """Install SIGTERM/SIGINT handlers; return a function, called after each optimizer step, giving the signal
    any process received (0: none).

    The first signal only records itself, so the loop can finish its optimizer step and save a checkpoint.
    A second SIGINT (Ctrl-C twice) exits at once. With several processes this starts a CPU (gloo) process
    group over which the signal is all-reduced, so every process stops at the same step without a GPU sync.

    Each machine's main process alone says what the signal will do, once: the DataLoader workers it forked
    (which share its process group, and so a Ctrl-C or a launcher's SIGTERM) and the machine's other processes
    keep quiet. After the last step's check (`state.completed_steps` against `max_train_steps`) no checkpoint
    comes: the run finishes.
    """
    received = {"signum": 0}
    checked = {"steps": state.completed_steps}  # completed steps at the last check of the signal
    owner = os.getpid()

    def handle(signum, frame):
        speaks = os.getpid() == owner and accelerator.is_local_main_process
        if received["signum"]:
            if signum == signal.SIGINT:
                if speaks:
                    print("Second interrupt: stopping now, without a checkpoint.", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        received["signum"] = signum
        if not speaks:
            return
        name = signal.Signals(signum).name
        if checked["steps"] >= max_train_steps:
            announcement = f"{name}: the last optimizer step is done; finishing the final evaluation and save."
        else:
            announcement = f"{name}: finishing this optimizer step, then saving a checkpoint."
        print(announcement, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    group = None if accelerator.num_processes == 1 else torch.distributed.new_group(backend="gloo")

    def signal_on_any_process():
        checked["steps"] = state.completed_steps
        if group is None:
            return received["signum"]
        signum = torch.tensor([received["signum"]])
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(signum.item())

    return signal_on_any_process


@dataclass(frozen=True)
class Stop:
    """Why the loop ends before its last step. A stop with an exit code ends the run without the final
    evaluation and save (a signal, after its checkpoint; a NaN loss, with nothing after it saved)."""

    reason: str  # "signal", "nonfinite_loss" or "early_stopping"
    message: str
    exit_code: int = 0


def stop_for_signal(signum):
    return Stop(
        "signal",
        f"Stopped by {signal.Signals(signum).name}; "
        "to continue, rerun the same command with --resume_from_checkpoint latest",
        exit_code=128 + signum,
    )


@dataclass
class SpeedClock:
    """Training speed since the clock started: time, images, and the seconds spent waiting for batches."""

    samples_at_start: int
    started: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    batches_ran_out: bool = False  # set by `timed` when its batches ran out (rather than being left)

    def seconds(self):
        return time.perf_counter() - self.started

    def speed(self, samples_now, num_processes):
        """images per second end to end (all processes), and the share of that time spent waiting for data."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        images = (samples_now - self.samples_at_start) * num_processes
        return {"train_images_per_second": images / seconds, "data_wait_fraction": min(self.data_wait / seconds, 1.0)}


def timed(batches, clock):
    """Yield from `batches`, adding the seconds spent waiting for each one to `clock.data_wait` (a
    SpeedClock), and noting in `clock.batches_ran_out` when they run out: the end of a stream's epoch."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            clock.batches_ran_out = True
            return
        clock.data_wait += time.perf_counter() - start
        yield batch
