"""The training loop's counters, in one object that a checkpoint saves and a resume restores.

train_loop.py registers a TrainState with `accelerator.register_for_checkpointing`, so `save_state` and
`load_state` carry it beside the model, optimizer and schedule. Its fields are plain numbers (and the best
evaluation), identical on every process. Not saved: the current epoch's speed clock, and three running sums
kept on the device: the loss since the last fold, the NaN/inf losses since the last optimizer step and the
steps skipped since the last check. A checkpoint is only taken at an optimizer step after
`train_log.read_losses` (which folds the loss and reads the skips), so all three are empty then.
"""

import dataclasses
from dataclasses import InitVar, dataclass, field

import torch

from imgft.best import NO_BEST
from imgft.runtime import SpeedClock


@dataclass
class TrainState:
    device: InitVar[torch.device | str] = "cpu"
    batches_per_epoch: InitVar[int | None] = 1  # this process's share of an epoch; None: a stream's, unknown
    completed_steps: int = 0  # optimizer steps taken (a step skipped for a NaN loss or an fp16 overflow counts)
    epoch: int = 0  # whole epochs done
    batch_in_epoch: int = 0  # batches of the current epoch done; a resume skips this many
    samples_seen: int = 0  # training images this process has seen, for the images-per-second figure
    loss_sum: float = 0.0  # summed over processes and over every batch whose loss was logged
    loss_batches: int = 0
    window_loss_sum: float = 0.0  # summed over processes, since the last log line
    window_batches: int = 0
    skipped_steps: int = 0  # steps whose update was skipped for a NaN/inf loss, counted up to steps_checked
    steps_checked: int = 0
    evaluated_at: int | None = None  # completed_steps at the last evaluation
    best: dict = field(default_factory=lambda: dict(NO_BEST))

    def __post_init__(self, device, batches_per_epoch):
        self.batches_in_an_epoch = batches_per_epoch
        self.epoch_clock = SpeedClock(self.samples_seen)
        # float64: sums of float32 losses stay exact, so folding them at a checkpoint or at a log step
        # gives the same numbers, and a resumed run logs what an uninterrupted one does.
        self.loss_on_device = torch.zeros((), dtype=torch.float64, device=device)
        self.batches_on_device = 0
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_on_device = torch.zeros((), device=device)

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, saved):
        for name, value in saved.items():
            setattr(self, name, value)

    def epoch_position(self):
        """The epoch as a number: 1.5 is halfway through the second epoch. The one definition that every log
        line, metrics.jsonl and all_results.json use. A stream's, whose length is unknown: the passes done."""
        if self.batches_in_an_epoch is None:
            return self.epoch
        return round(self.epoch + self.batch_in_epoch / self.batches_in_an_epoch, 4)

    def epoch_done(self):
        """Whether the epoch's batches are all done: counted, or for a stream, when its batches ran out."""
        if self.batches_in_an_epoch is None:
            return self.epoch_clock.batches_ran_out
        return self.batch_in_epoch == self.batches_in_an_epoch

    def start_epoch_clock(self):
        """Measure the training speed from here: images per second and the time spent waiting for data."""
        self.epoch_clock = SpeedClock(self.samples_seen)

    def add_batch_loss(self, loss, batch_size):
        """Count one training batch. Kept on the device: reading a loss every step would stall a GPU."""
        loss = loss.detach()
        self.loss_on_device += loss.double().nan_to_num(0.0, 0.0, 0.0)
        self.nonfinite_losses += ~loss.isfinite()
        self.batches_on_device += 1
        self.batch_in_epoch += 1
        self.samples_seen += batch_size

    def fold_window_loss(self, accelerator):
        """Move the device's loss sum, summed over processes, into the log window (a collective: every process
        calls it). Done at log steps and before every checkpoint, so a checkpoint holds the whole window."""
        if not self.batches_on_device:
            return
        self.window_loss_sum += accelerator.reduce(self.loss_on_device, "sum").item()
        self.window_batches += self.batches_on_device
        self.loss_on_device.zero_()
        self.batches_on_device = 0

    def end_log_window(self, num_processes):
        """The mean training loss since the last log line (None if no batch was seen), and start a new window."""
        if not self.window_batches:
            return None
        mean_loss = self.window_loss_sum / (self.window_batches * num_processes)
        self.loss_sum += self.window_loss_sum
        self.loss_batches += self.window_batches * num_processes
        self.window_loss_sum = 0.0
        self.window_batches = 0
        return mean_loss

    def mean_train_loss(self):
        return self.loss_sum / max(self.loss_batches, 1)

    def end_epoch(self):
        self.epoch += 1
        self.batch_in_epoch = 0
