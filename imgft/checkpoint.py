"""Checkpoints: `output_dir/step_N` or `epoch_N`, when one is due, written whole or not at all, durably, with
the size and checksum of every file they hold; found by step, verified before a resume (which falls back to the
newest intact one), restored only if their random states come back, and rotated safely; and the run's identity
saved beside them, which refuses a resume that would not be exact."""

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from imgft.args import field_defaults
from imgft.errors import UserError, failing_together, write_failure_reason

logger = logging.getLogger("imgft")

STATE_FILE = "imgft_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_\d+$")
STAGING_PREFIX = ".tmp-"
# The checksum of every file, recorded in STATE_FILE: the fastest of hashlib's algorithms on CPUs with SHA
# instructions (OpenSSL's sha256 read 400 MB at 526 MB/s on 2 loaded cores, blake2b at 309 MB/s).
CHECKSUM = "sha256"
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
# Arguments that change the evaluation's numbers (the batch size, eval_loss in its last digits): they are not
# safe to change, for the evaluations choose the best model, stop early and choose EMA or raw weights.
EVALUATION_ONLY = {"per_device_eval_batch_size", "max_eval_samples"}


def run_identity(config, label_names, train_samples, accelerator, max_train_steps, image_processor):
    """What a checkpoint records of its run: the arguments, plus what was worked out from them, the data and the
    launch (the steps from the epochs, the image processor from --image_size and the model's own)."""
    return {
        "config": config,
        "label_names": list(label_names),
        "train_samples": train_samples,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "max_train_steps": max_train_steps,
        "image_processor": json.loads(image_processor.to_json_string()),
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
    # Where both runs recorded the image processor they resolved, it says whether --image_size changed anything:
    # --image_size 32 where the processor's own size is 32 is the same run.
    processor_changes = None
    if "image_processor" in saved and "image_processor" in current:
        processor_changes = _changes(saved["image_processor"], current["image_processor"])
    # A value the launch resolves (mixed_precision, max_train_steps) is recorded beside the flag that sets it:
    # where both changed, the resolved change alone is named, below.
    resolved = {key for key, value in current.items() if key in saved and saved[key] != value}
    for key in sorted(set(saved_config) | set(config)):
        if saved_config.get(key) == config.get(key) or key in resolved:
            continue
        if key == "image_size" and processor_changes == []:
            continue
        change = f"{key}: {saved_config.get(key)!r} -> {config.get(key)!r}"
        if key in EVALUATION_ONLY:
            unsafe.append(f"{change} (it changes the evaluations, which pick the best model and stop early)")
        elif key not in SAFE_TO_CHANGE:
            unsafe.append(change)
        elif key not in EXPECTED_CHANGES:
            safe.append(change)
    if processor_changes and saved_config["image_size"] == config["image_size"]:  # its files changed, say
        unsafe.append(f"image processor: {'; '.join(processor_changes)}")
    for key, value in current.items():
        # An entry that imgft began to record after the checkpoint was saved is not compared: its flag was, above.
        if key in ("config", "image_processor") or key not in saved or saved[key] == value:
            continue
        if key == "max_train_steps":
            unsafe.append(length_change(saved_config, config, saved[key], value))
        else:
            unsafe.append(f"{key}: {saved[key]!r} -> {value!r}")
    return unsafe, safe


def _changes(saved, current):
    """'key: then -> now' for each entry of two dicts that both hold and that differs (another version of
    transformers may save more entries: those are not compared)."""
    return [
        f"{key}: {saved[key]!r} -> {current[key]!r}"
        for key in sorted(saved.keys() & current.keys())
        if saved[key] != current[key]
    ]


def training_length_changes(saved, config):
    """A run's length flags against another's, as 'name: then -> now' (`saved` and `config`: `args.to_dict`s).
    --num_train_epochs counts only where --max_train_steps, which overrides it, is set in neither."""
    defaults = field_defaults()
    before = {**defaults, **saved}
    now = {**defaults, **config}
    names = ["max_train_steps"]
    if not (before["max_train_steps"] and now["max_train_steps"]):
        names.append("num_train_epochs")
    return [f"{name}: {before[name]!r} -> {now[name]!r}" for name in names if before[name] != now[name]]


def length_change(saved_config, config, saved_steps, steps):
    """A changed number of optimizer steps (the schedule's length), named by the flag that changed it."""
    flags = training_length_changes(saved_config, config)
    if not flags:  # another change, named on its own, changed the steps an epoch takes
        return f"optimizer steps: {saved_steps} -> {steps}"
    return f"{'; '.join(flags)} ({saved_steps} -> {steps} optimizer steps)"


def step_due(interval, completed_steps):
    """Whether a step checkpoint is due after `completed_steps`, for an `args.checkpoint_interval`."""
    return isinstance(interval, int) and completed_steps % interval == 0


def read_state(path):
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
        return json.load(file)


def _read_state_or_problem(path):
    """(the checkpoint's state, None), or (None, what is wrong with its state file)."""
    try:
        state = read_state(path)
    except OSError as err:
        return None, f"{STATE_FILE} cannot be read ({err.strerror})"
    except json.JSONDecodeError as err:
        return None, f"{STATE_FILE} is not valid JSON ({err})"
    except ValueError:
        return None, f"{STATE_FILE} is not text"
    if not isinstance(state, dict) or not isinstance(state.get("completed_steps"), int):
        return None, f"{STATE_FILE} holds no step count"
    return state, None


def _scan(output_dir):
    """(complete checkpoints, oldest first by the optimizer step they hold; [(path, what is wrong)] for those whose
    state file cannot be read). The state file is written last, so a folder without it is not a checkpoint."""
    if not os.path.isdir(output_dir):
        return [], []
    found, unreadable = [], []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if CHECKPOINT_NAME.match(name) and os.path.isfile(os.path.join(path, STATE_FILE)):
            state, problem = _read_state_or_problem(path)
            if problem:
                unreadable.append((path, problem))
            else:
                found.append((state["completed_steps"], name, path))
    return [path for _, _, path in sorted(found)], sorted(unreadable)


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first, ordered by the optimizer step they hold; not those whose
    state file cannot be read (`has_checkpoints` counts them)."""
    return _scan(output_dir)[0]


def has_checkpoints(output_dir):
    """Whether `output_dir` holds checkpoints, readable or not."""
    checkpoints, unreadable = _scan(output_dir)
    return bool(checkpoints or unreadable)


def verify_checkpoint(path):
    """(what is wrong with checkpoint `path`, in a few words that name the file, or None; whether it was checked).

    Its state file must be readable, and every file it records must be there with its size and checksum. A
    checkpoint from before imgft recorded them is checked for its state file alone. Sizes are checked first: a
    truncated or missing file is found before any file is read."""
    state, problem = _read_state_or_problem(path)
    if problem:
        return problem, True
    files = state.get("files")
    if files is None:
        return None, False
    try:
        recorded = sorted((name, record["bytes"], record[CHECKSUM]) for name, record in files.items())
    except (AttributeError, KeyError, TypeError):
        return f"{STATE_FILE} holds a malformed list of files", True
    for name, size, _ in recorded:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return f"{name} is missing", True
        found = os.path.getsize(file_path)
        if found != size:
            what = "is empty" if found == 0 else "is truncated" if found < size else "has grown"
            return f"{name} {what} ({found} bytes, {size} when saved)", True
    found = _in_parallel(_checksum, [os.path.join(path, name) for name, _, _ in recorded])
    for (name, _, checksum), found_checksum in zip(recorded, found, strict=True):
        if found_checksum != checksum:
            return f"{name} does not match its {CHECKSUM} checksum: its bytes changed after it was saved", True
    return None, True


def _checksum(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, CHECKSUM).hexdigest()


def _in_parallel(function, paths):
    """[function(path) for path in paths], on threads: hashlib lets go of the GIL while it hashes, so the files of a
    checkpoint (the optimizer's, twice the model's, sets the time) are read at once on as many cores."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(function, paths))


def choose_checkpoint(resume_from_checkpoint, output_dir):
    """The verified checkpoint folder to resume from, or None. 'latest' with no checkpoint yet means a fresh start.

    'latest' takes the newest intact checkpoint: each damaged one is named in a warning, and when none is intact
    the run is refused (nothing is deleted, and starting over is for the user to choose). A path that is damaged is
    refused. A checkpoint without checksums (an older imgft's) is resumed as it is, with a warning.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return _newest_intact_checkpoint(output_dir)
    if not os.path.exists(resume_from_checkpoint):
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is not an imgft checkpoint "
            f"(no {STATE_FILE}); use a step_N/epoch_N folder or 'latest'"
        )
    problem, checked = verify_checkpoint(resume_from_checkpoint)
    if problem:
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint} is damaged: {problem}. Resume from another "
            "checkpoint (--resume_from_checkpoint latest takes the newest intact one in --output_dir)"
        )
    if not checked:
        _warn_unchecked(resume_from_checkpoint)
    return resume_from_checkpoint


def _newest_intact_checkpoint(output_dir):
    checkpoints, damaged = _scan(output_dir)
    for path in reversed(checkpoints):
        problem, checked = verify_checkpoint(path)
        if problem:
            damaged.append((path, problem))
            continue
        for damaged_path, problem in damaged:
            logger.warning(
                f"Checkpoint {damaged_path} is damaged: {problem}; resuming from {path}, the newest intact one"
            )
        if not checked:
            _warn_unchecked(path)
        return path
    if not damaged:
        return None
    listed = "; ".join(f"{os.path.basename(path)}: {problem}" for path, problem in damaged)
    raise UserError(
        f"no intact checkpoint to resume from in {output_dir} ({listed}). Nothing was deleted: restore the files, or "
        "pass --overwrite_output_dir to delete the checkpoints and start over"
    )


def _warn_unchecked(path):
    logger.warning(
        f"Checkpoint {path} holds no checksums (an older imgft wrote it), so it cannot be verified: "
        "resuming from it as it is"
    )


def resolve_resume(accelerator, resume_from_checkpoint, output_dir):
    """`choose_checkpoint` on the main process alone (verifying reads every file of a checkpoint), its answer or its
    refusal given to every process: all resume from the same checkpoint, or all stop with exit code 2 and one
    `error:` line from each machine."""
    if resume_from_checkpoint is None or accelerator.num_processes == 1:
        return choose_checkpoint(resume_from_checkpoint, output_dir)
    from accelerate.utils import broadcast_object_list

    answer = [None, None]  # the checkpoint, the refusal
    if accelerator.is_main_process:
        try:
            answer = [choose_checkpoint(resume_from_checkpoint, output_dir), None]
        except UserError as err:
            answer = [None, str(err)]
    path, refusal = broadcast_object_list(answer)
    if refusal is not None:
        if accelerator.is_local_main_process:
            print(f"error: {refusal}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return path


@contextlib.contextmanager
def restoring(accelerator, path):
    """`with restoring(accelerator, path): accelerator.load_state(path)` resumes exactly, or not at all.

    Accelerate catches a failure to restore the random states and only logs it (at INFO): afterwards, every process
    compares its random states with those its file holds, and all stop in one line if one differs. A checkpoint
    without checksums (an older imgft's) that fails to load is reported in one line rather than a traceback.
    """
    try:
        yield
    except Exception as err:
        if verify_checkpoint(path)[1]:  # a verified checkpoint: not damage, but a failure to report as it is
            raise
        raise UserError(
            f"cannot resume from {path}: a file in it is damaged or missing ({type(err).__name__}), and it holds no "
            "checksums to say which (an older imgft wrote it). Resume from another checkpoint"
        ) from None
    problem = _random_states_problem(path, accelerator.process_index)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problem = next((each for each in gather_object([problem]) if each), None)
    if problem:
        raise UserError(
            f"cannot resume exactly from {path}: {problem}, so the run would not continue as it would have. Resume "
            "from another checkpoint, or start over with --overwrite_output_dir"
        )


def _random_states_problem(path, process_index):
    """What keeps this process's random states from being those saved in checkpoint `path`, or None."""
    from accelerate.utils import load

    name = f"random_states_{process_index}.pkl"
    if not os.path.isfile(os.path.join(path, name)):
        return f"{name} is missing"
    try:
        saved = load(os.path.join(path, name))
        restored = _same_random_states(saved)
    except Exception as err:  # any unpickling error: the file is not what save_state wrote
        return f"{name} cannot be read ({type(err).__name__})"
    return None if restored else f"the random states in {name} were not restored"


def _same_random_states(saved):
    """Whether Python's, NumPy's, torch's and the accelerator's random states are those `save_state` saved."""
    from accelerate.utils import get_torch_accelerator_backend

    numpy_state, saved_numpy = np.random.get_state(), saved["numpy_random_seed"]
    same = (
        random.getstate() == saved["random_state"]
        and numpy_state[0] == saved_numpy[0]
        and np.array_equal(numpy_state[1], saved_numpy[1])
        and tuple(numpy_state[2:]) == tuple(saved_numpy[2:])
        and torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
    )
    device_type, device_module = get_torch_accelerator_backend()
    key = f"torch_{device_type}_manual_seed"
    if same and key in saved and hasattr(device_module, "get_rng_state_all"):  # CUDA, XPU, ... (saved per device)
        now = device_module.get_rng_state_all()
        same = len(now) == len(saved[key]) and all(map(torch.equal, now, saved[key]))
    return same


@contextlib.contextmanager
def staged_checkpoint(accelerator, output_dir, name, completed_steps, identity, metrics_log):
    """`with staged_checkpoint(...) as folder: accelerator.save_state(folder)` writes `output_dir/name` whole
    or not at all. Every process writes into a staging folder; the main process fsyncs every file, records its
    size and checksum in imgft_state.json, written last, and renames the folder into place, fsyncing the folders
    too: a kill never leaves a folder that 'latest' would pick, and a power loss no 'complete' one of empty files.

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
                files = _sync_and_record_files(staging_path)
                # The metrics log's length is saved so that a resume drops the lines written after this point.
                saved = {"completed_steps": completed_steps, "metrics_log_lines": _count_lines(metrics_log)}
                saved.update(run_identity=identity, files=files)
                _write_json_durably(os.path.join(staging_path, STATE_FILE), saved)
                _sync_folder(staging_path)  # the state file's entry in it
                if os.path.exists(final_path):
                    shutil.rmtree(final_path)
                os.rename(staging_path, final_path)
                _sync_folder(output_dir)  # the rename
    except UserError:
        if accelerator.is_main_process:
            shutil.rmtree(staging_path, ignore_errors=True)
        raise


def _sync_and_record_files(folder):
    """{path under `folder`: {"bytes": its size, CHECKSUM: its checksum}} for every file under `folder`, each file
    and folder fsynced (every process's files: they all wrote into this one folder)."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    records = _in_parallel(_sync_and_record, paths)
    for root, _, _ in os.walk(folder):
        _sync_folder(root)
    return {os.path.relpath(path, folder): record for path, record in zip(paths, records, strict=True)}


def _sync_and_record(path):
    with open(path, "rb") as file:
        checksum = hashlib.file_digest(file, CHECKSUM).hexdigest()
        os.fsync(file.fileno())
        return {"bytes": os.fstat(file.fileno()).st_size, CHECKSUM: checksum}


def _sync_folder(path):
    """fsync a folder, which makes the entries in it (new files, a rename) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync folders: nothing to do
            raise
    finally:
        os.close(descriptor)


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
    """Delete the oldest checkpoints beyond `limit`, never one in `keep`: the caller keeps the checkpoint it just
    saved (the newest intact one, even where a damaged one from before a fallback resume holds a later step) and
    the one it resumed from."""
    checkpoints = list_checkpoints(output_dir)
    if not limit or not checkpoints or not accelerator.is_main_process:
        return []
    protected = {os.path.abspath(path) for path in keep if path}
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
