"""Checkpoints: `output_dir/step_N` or `epoch_N`, written whole or not at all, found by step, rotated safely."""

import json
import os
import re
import shutil

from imgft.best import NO_BEST
from imgft.errors import UserError

STATE_FILE = "imgft_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_\d+$")
STAGING_PREFIX = ".tmp-"
# Where a run without a checkpoint starts: the counters a checkpoint restores.
NEW_RUN_STATE = {
    "completed_steps": 0,
    "epoch": 0,
    "batch_in_epoch": 0,
    "train_loss_sum": 0.0,
    "train_loss_count": 0,
    "metrics_log_lines": 0,
    "best": NO_BEST,
}


# Arguments that may change between a checkpoint and its resume: they do not change what is trained.
# Any other changed argument makes a resume inexact, and it is refused.
SAFE_TO_CHANGE = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "train_dir",
    "validation_dir",
    "cache_dir",
    "num_workers",
    "per_device_eval_batch_size",
    "max_eval_samples",
    "num_train_epochs",
    "max_train_steps",
    "logging_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "with_tracking",
    "report_to",
    "push_to_hub",
    "hub_model_id",
}


def run_identity(config, label_names, train_samples, num_processes, mixed_precision, max_train_steps):
    """What a checkpoint records of its run: the arguments, plus numbers derived from the data and launch."""
    return {
        "config": config,
        "label_names": list(label_names),
        "train_samples": train_samples,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "max_train_steps": max_train_steps,
    }


def compare_runs(saved, current):
    """(changes that make a resume inexact, harmless changes), each as 'name: then -> now' strings."""
    unsafe, safe = [], []
    saved_config, config = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(saved_config) | set(config)):
        if saved_config.get(key) != config.get(key):
            change = f"{key}: {saved_config.get(key)!r} -> {config.get(key)!r}"
            (safe if key in SAFE_TO_CHANGE else unsafe).append(change)
    for key, value in current.items():
        if key != "config" and saved.get(key) != value:
            unsafe.append(f"{key}: {saved.get(key)!r} -> {value!r}")
    return unsafe, safe


def read_state(path):
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
        return json.load(file)


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first, ordered by the optimizer step they hold."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        # The state file is written last, so a folder without it is not a checkpoint.
        if CHECKPOINT_NAME.match(name) and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((read_state(path)["completed_steps"], name, path))
    return [path for _, _, path in sorted(found)]


def resolve_resume(resume_from_checkpoint, output_dir):
    """The checkpoint folder to resume from, or None. 'latest' with no checkpoint yet means a fresh start."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is not an imgft checkpoint "
            f"(no {STATE_FILE}); use a step_N/epoch_N folder or 'latest'"
        )
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir, name, counters, identity, metrics_log):
    """Save model, optimizer, scheduler, scaler and RNG states plus the loop's counters to `output_dir/name`.

    Every process writes into a staging folder; the main process renames it into place only once all
    of it is on disk, so a kill during a save never leaves a folder that 'latest' would pick.
    """
    final_path = os.path.join(output_dir, name)
    staging_path = os.path.join(output_dir, STAGING_PREFIX + name)
    if accelerator.is_main_process:
        shutil.rmtree(staging_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The metrics log's length is saved so that a resume drops the lines written after this point.
        train_state = {**counters, "metrics_log_lines": _count_lines(metrics_log), "run_identity": identity}
        _write_json_durably(os.path.join(staging_path, STATE_FILE), train_state)
        if os.path.exists(final_path):
            shutil.rmtree(final_path)
        os.rename(staging_path, final_path)
    accelerator.wait_for_everyone()
    return final_path


def _count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as file:
        return sum(1 for _ in file)


def _write_json_durably(path, value):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2)
        file.flush()
        os.fsync(file.fileno())


def load_checkpoint(accelerator, path, identity):
    """Restore all states saved by `save_checkpoint`; refuse one that a changed run could not continue exactly.

    Returns the saved counters and the list of harmless changes, for the caller to report.
    """
    train_state = read_state(path)
    unsafe, safe = compare_runs(train_state.get("run_identity", {}), identity)
    if unsafe:
        raise UserError(
            f"cannot resume exactly from {path}, the run changed: {'; '.join(unsafe)}. "
            "Use the original settings, or start a new run (another --output_dir, or --overwrite_output_dir)"
        )
    accelerator.load_state(path)
    return train_state, safe


def rotate_checkpoints(accelerator, output_dir, limit, keep=()):
    """Delete the oldest checkpoints beyond `limit`; never the newest, nor any path in `keep`."""
    checkpoints = list_checkpoints(output_dir)
    if not limit or not checkpoints or not accelerator.is_main_process:
        return []
    protected = {os.path.abspath(path) for path in (*keep, checkpoints[-1]) if path}
    excess = len(checkpoints) - limit
    removed = []
    for path in checkpoints:
        if excess <= 0:
            break
        if os.path.abspath(path) not in protected:
            shutil.rmtree(path)
            removed.append(path)
            excess -= 1
    return removed
