"""Checkpoints: `output_dir/step_N` or `epoch_N`, when one is due, written whole or not at all, found by step,
rotated safely; and the run's identity saved beside them, which refuses a resume that would not be exact."""

import contextlib
import json
import os
import re
import shutil

from imgft.args import field_defaults
from imgft.errors import UserError, failing_together, write_failure_reason

STATE_FILE = "imgft_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_\d+$")
STAGING_PREFIX = ".tmp-"
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
    "tta",
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


def run_identity(config, label_names, train_samples, accelerator, max_train_steps):
    """What a checkpoint records of its run: the arguments, plus numbers derived from the data and launch."""
    return {
        "config": config,
        "label_names": list(label_names),
        "train_samples": train_samples,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "max_train_steps": max_train_steps,
    }


# Changes that are the point of a resume, or of resuming elsewhere: not worth a warning.
EXPECTED_CHANGES = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint"}


def compare_runs(saved, current):
    """(changes that make a resume inexact, harmless changes worth a warning), each as 'name: then -> now'."""
    unsafe, safe = [], []
    # A flag added to imgft after the checkpoint was saved is missing from it: the run had its default.
    defaults = field_defaults()
    saved_config = {**defaults, **saved.get("config", {})}
    config = {**defaults, **current.get("config", {})}
    # A value the launch resolves (mixed_precision, max_train_steps) is recorded beside the flag that sets it:
    # where both changed, the resolved change alone is named.
    resolved_changes = {key for key, value in current.items() if key != "config" and saved.get(key) != value}
    for key in sorted(set(saved_config) | set(config)):
        if saved_config.get(key) != config.get(key) and key not in resolved_changes:
            change = f"{key}: {saved_config.get(key)!r} -> {config.get(key)!r}"
            if key not in SAFE_TO_CHANGE:
                unsafe.append(change)
            elif key not in EXPECTED_CHANGES:
                safe.append(change)
    for key, value in current.items():
        if key != "config" and saved.get(key) != value:
            unsafe.append(f"{key}: {saved.get(key)!r} -> {value!r}")
    return unsafe, safe


def step_due(interval, completed_steps):
    """Whether a step checkpoint is due after `completed_steps`, for an `args.checkpoint_interval`."""
    return isinstance(interval, int) and completed_steps % interval == 0


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
    if not os.path.exists(resume_from_checkpoint):
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is not an imgft checkpoint "
            f"(no {STATE_FILE}); use a step_N/epoch_N folder or 'latest'"
        )
    return resume_from_checkpoint


@contextlib.contextmanager
def staged_checkpoint(accelerator, output_dir, name, completed_steps, identity, metrics_log):
    """`with staged_checkpoint(...) as folder: accelerator.save_state(folder)` writes `output_dir/name` whole
    or not at all. Every process writes into a staging folder; the main process adds imgft_state.json last
    and renames the folder into place, so a kill during a save never leaves a folder that 'latest' would pick.

    A full disk (or any other OS error while writing) on any process removes the staging folder and becomes a
    UserError on every process, naming the folder and the problem (`errors.failing_together`): the earlier
    checkpoints are untouched.
    """
    final_path = os.path.join(output_dir, name)
    staging_path = os.path.join(output_dir, STAGING_PREFIX + name)

    def failed(err):
        return save_failed_message(f"checkpoint {name}", output_dir, err)

    if accelerator.is_main_process:
        shutil.rmtree(staging_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with failing_together(failed):  # every process writes its part
            yield staging_path
        with failing_together(failed):
            if accelerator.is_main_process:
                # The metrics log's length is saved so that a resume drops the lines written after this point.
                saved = {"completed_steps": completed_steps, "metrics_log_lines": _count_lines(metrics_log)}
                _write_json_durably(os.path.join(staging_path, STATE_FILE), {**saved, "run_identity": identity})
                if os.path.exists(final_path):
                    shutil.rmtree(final_path)
                os.rename(staging_path, final_path)
    except UserError:
        if accelerator.is_main_process:
            shutil.rmtree(staging_path, ignore_errors=True)
        raise


def save_failed_message(what, output_dir, err):
    checkpoints = list_checkpoints(output_dir)
    kept = f"the last complete checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint"
    return (
        f"cannot save {what} in {output_dir}: {write_failure_reason(err, output_dir)}; {kept}. "
        "Free some space, then rerun the same command with --resume_from_checkpoint latest"
    )


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


def check_resumable(path, identity):
    """Refuse a checkpoint that a changed run could not continue exactly; return the harmless changes
    ('name: then -> now') for the caller to report."""
    unsafe, safe = compare_runs(read_state(path).get("run_identity", {}), identity)
    if unsafe:
        raise UserError(
            f"cannot resume exactly from {path}, the run changed: {'; '.join(unsafe)}. "
            "Use the original settings, or start a new run (another --output_dir, or --overwrite_output_dir)"
        )
    return safe


def delete_oldest_checkpoints(accelerator, output_dir, limit, keep=()):
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
