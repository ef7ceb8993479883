"""Checkpoints: `output_dir/step_N` or `epoch_N`, written whole or not at all, found by step, rotated safely."""

import json
import os
import re
import shutil

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
}


def run_identity(label_names, train_samples, train_args, num_processes, max_train_steps):
    """What must not change between a checkpoint and its resume, or the resumed run would be a different one."""
    return {
        "max_train_steps": max_train_steps,
        "label_names": list(label_names),
        "train_samples": train_samples,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "num_processes": num_processes,
        "seed": train_args.seed,
    }


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


def load_checkpoint(accelerator, path, run_identity):
    """Restore all states saved by `save_checkpoint`; refuse a checkpoint from a run that differs."""
    train_state = read_state(path)
    saved_identity = train_state.get("run_identity", {})
    changed = [key for key, value in run_identity.items() if saved_identity.get(key) != value]
    if changed:
        details = "; ".join(f"{key}: {saved_identity.get(key)!r} then, {run_identity[key]!r} now" for key in changed)
        raise UserError(f"cannot resume exactly from {path}: the run changed ({details})")
    accelerator.load_state(path)
    return train_state


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
