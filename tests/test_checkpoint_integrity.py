"""Checkpoints a requeue can trust: every file fsynced and recorded with its size and checksum; a damaged
checkpoint named in one line, refused when asked for by path, skipped by 'latest' for the newest intact one (which
then resumes exactly); random states that do not come back refuse the resume rather than make it inexact."""

import hashlib
import json
import logging
import os
import shutil
import sys

import pytest
import torch
from conftest import data_flags, launch_two_processes, reset_accelerate, run_command, vit_flags
from test_resume import assert_same_run

from imgft import checkpoint
from imgft.errors import UserError

# The tiny ViT on the colours: 60 images in batches of 6, 4 optimizer steps, a checkpoint after steps 2 and 4.
# Dropout draws from the random state a checkpoint restores: a resume with other random states ends elsewhere.
RUN = ["--per_device_train_batch_size", "6", "--max_train_steps", "4", "--checkpointing_steps", "2"]
RUN += ["--logging_steps", "1", "--random_flip", "--with_tracking", "--report_to", "tensorboard"]
RUN += ["--config_overrides", "hidden_dropout_prob=0.1,attention_probs_dropout_prob=0.1"]


def run_training(argv):
    """train_loop.main in this process, as the `train` fixture runs it (usable by a module-scoped fixture)."""
    import train_loop

    reset_accelerate()
    try:
        return train_loop.main([str(arg) for arg in argv])
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def flags(colors_data, tiny_vit):
    return [*data_flags(colors_data), *vit_flags(tiny_vit), *RUN]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, flags):
    """The run left alone, with its checkpoints step_2 and step_4."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_training([*flags, "--output_dir", out])
    assert sorted(os.path.basename(path) for path in checkpoint.list_checkpoints(out)) == ["step_2", "step_4"]
    return out


def killed_copy(finished_run, tmp_path):
    """The run as if killed after its last checkpoint: all_results.json, which marks it finished, not yet written."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / "all_results.json").unlink()
    return out


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def empty(path):
    path.write_bytes(b"")


def zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


def delete(path):
    path.unlink()


def flip_bytes_near_the_end(path):
    """XOR 1000 bytes that end 100 bytes before the end: a safetensors header, at the start, stays intact."""
    data = bytearray(path.read_bytes())
    for index in range(len(data) - 1100, len(data) - 100):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


# (file in step_4, damage, what the one line says of the file)
DAMAGES = [
    *[
        (name, damage, problem)
        for name in ("model.safetensors", "optimizer.bin")
        for damage, problem in (
            (truncate, "is truncated"),
            (empty, "is empty"),
            (zero_fill, "does not match its sha256 checksum"),
            (delete, "is missing"),
        )
    ],
    ("model.safetensors", flip_bytes_near_the_end, "does not match its sha256 checksum"),
    ("custom_checkpoint_1.pkl", delete, "is missing"),
    ("custom_checkpoint_0.pkl", empty, "is empty"),
    ("imgft_state.json", truncate, "is not valid JSON"),
    ("random_states_0.pkl", delete, "is missing"),
    ("random_states_0.pkl", flip_bytes_near_the_end, "does not match its sha256 checksum"),
]


def damage_id(case):
    return f"{case[0]}-{case[1].__name__}" if isinstance(case, tuple) else None


def assert_one_clean_line(message):
    assert "\n" not in message
    assert "weights_only" not in message and "pytorch_model.bin" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("name, damage, problem", DAMAGES, ids=[damage_id(case) for case in DAMAGES])
def test_a_damaged_checkpoint_is_refused_by_path_and_skipped_by_latest_which_resumes_exactly(
    finished_run, flags, tmp_path, caplog, name, damage, problem
):
    out = killed_copy(finished_run, tmp_path)
    damaged = out / "step_4"
    damage(damaged / name)
    metrics_before = (out / "metrics.jsonl").read_bytes()

    with pytest.raises(UserError) as refusal:
        run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", damaged])
    message = str(refusal.value)
    assert message.startswith(f"--resume_from_checkpoint {damaged} is damaged: {name} {problem}"), message
    assert_one_clean_line(message)
    assert (out / "metrics.jsonl").read_bytes() == metrics_before  # refused before anything was written

    caplog.clear()
    run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    [warning] = [record for record in caplog.records if record.module == "checkpoint"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"Checkpoint {damaged} is damaged: {name} {problem}")
    assert warning.getMessage().endswith(f"resuming from {out / 'step_2'}, the newest intact one")
    assert_one_clean_line(warning.getMessage())
    assert f"Resuming from {out / 'step_2'} at step 2" in caplog.text
    assert_same_run(finished_run, out)
    assert checkpoint.verify_checkpoint(damaged) == (None, True)  # saved again at step 4, whole


def strip_checksums(folder):
    """Make `folder` a checkpoint as imgft wrote them before it recorded checksums."""
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    state.pop("files", None)
    (folder / checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.slow
def test_a_checkpoint_without_checksums_resumes_with_a_warning_and_exactly(finished_run, flags, tmp_path, caplog):
    out = killed_copy(finished_run, tmp_path)
    strip_checksums(out / "step_4")
    run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    [warning] = [record for record in caplog.records if record.module == "checkpoint"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"Checkpoint {out / 'step_4'} holds no checksums (an older imgft wrote it), so it cannot be verified: "
        "resuming from it as it is"
    )
    assert_same_run(finished_run, out)


@pytest.mark.slow
def test_a_checkpoint_without_checksums_that_cannot_resume_exactly_is_refused_in_one_line(
    finished_run, flags, tmp_path
):
    out = killed_copy(finished_run, tmp_path)
    strip_checksums(out / "step_4")
    # Its random states are missing: Accelerate would only log that at INFO, and go on with other random states.
    (out / "step_4" / "random_states_0.pkl").unlink()
    with pytest.raises(UserError) as refusal:
        run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert str(refusal.value).startswith(f"cannot resume exactly from {out / 'step_4'}: random_states_0.pkl is missing")
    assert_one_clean_line(str(refusal.value))
    # A missing model file: Accelerate looks for a pytorch_model.bin instead, which imgft never writes.
    strip_checksums(out / "step_2")
    (out / "step_2" / "model.safetensors").unlink()
    with pytest.raises(UserError) as refusal:
        run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", out / "step_2"])
    assert str(refusal.value).startswith(f"cannot resume from {out / 'step_2'}: a file in it is damaged or missing")
    assert_one_clean_line(str(refusal.value))


@pytest.mark.slow
def test_random_states_that_load_state_fails_to_restore_stop_the_resume(finished_run, flags, tmp_path, monkeypatch):
    # An intact checkpoint, but the restore fails (as on a torch whose generator state differs): Accelerate
    # catches the error and logs it at INFO only.
    out = killed_copy(finished_run, tmp_path)

    def cannot_restore(state):
        raise RuntimeError("no such generator state")

    monkeypatch.setattr(torch, "set_rng_state", cannot_restore)
    with pytest.raises(UserError, match=r"random states in random_states_0.pkl were not restored"):
        run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", "latest"])


@pytest.mark.slow
def test_rotation_after_a_fallback_keeps_the_checkpoint_just_saved(finished_run, flags, tmp_path, monkeypatch):
    # Resumed from step_2 past a damaged step_4, checkpointing every step with a limit of 1: step_3, just saved,
    # is the newest intact checkpoint, which a relaunch would need; the damaged step_4 holds a later step.
    out = killed_copy(finished_run, tmp_path)
    truncate(out / "step_4" / "model.safetensors")
    rotate = checkpoint.delete_oldest_checkpoints
    left = []

    def rotate_and_record(accelerator, output_dir, limit, keep=()):
        removed = rotate(accelerator, output_dir, limit, keep)
        left.append(sorted(os.path.basename(path) for path in checkpoint.list_checkpoints(output_dir)))
        return removed

    monkeypatch.setattr(checkpoint, "delete_oldest_checkpoints", rotate_and_record)
    limit = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "1"]
    run_training([*flags, "--output_dir", out, "--resume_from_checkpoint", "latest", *limit])
    # Kept besides the one just saved: step_2, which this run resumed from.
    assert left == [["step_2", "step_3"], ["step_2", "step_4"]]
    assert_same_run(finished_run, out)


@pytest.mark.slow
def test_damage_refusals_exit_2_in_one_line_and_delete_nothing(finished_run, flags, tmp_path):
    out = killed_copy(finished_run, tmp_path)
    zero_fill(out / "step_4" / "optimizer.bin")
    command = [sys.executable, "train_loop.py", *flags, "--output_dir", out]
    result = run_command([*command, "--resume_from_checkpoint", out / "step_4"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: --resume_from_checkpoint {out / 'step_4'} is damaged: optimizer.bin does not match its sha256 "
        "checksum: its bytes changed after it was saved. Resume from another checkpoint (--resume_from_checkpoint "
        "latest takes the newest intact one in --output_dir)"
    )
    # No intact checkpoint left: refused, for starting over would discard the training done and its log.
    delete(out / "step_2" / "random_states_0.pkl")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = run_command([*command, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: no intact checkpoint to resume from in {out} (step_4: optimizer.bin does not match its sha256 "
        "checksum: its bytes changed after it was saved; step_2: random_states_0.pkl is missing). Nothing was "
        "deleted: restore the files, or pass --overwrite_output_dir to delete the checkpoints and start over"
    )
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_two_processes_resume_together_from_the_newest_intact_checkpoint(tmp_path, flags):
    # Rank 1's random states are damaged in step_4: the main process verifies every rank's files, and both
    # ranks resume from step_2.
    reference, out = tmp_path / "reference", tmp_path / "out"
    result = launch_two_processes(["train_loop.py", *flags, "--output_dir", reference])
    assert result.returncode == 0, result.stderr[-3000:]
    out = killed_copy(reference, tmp_path)
    truncate(out / "step_4" / "random_states_1.pkl")
    result = launch_two_processes(["train_loop.py", *flags, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    [warning] = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert f"Checkpoint {out / 'step_4'} is damaged: random_states_1.pkl is truncated" in warning
    assert f"Resuming from {out / 'step_2'} at step 2" in result.stderr
    assert_same_run(reference, out)


class MainProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_a_checkpoint_records_every_file_and_fsyncs_them_and_its_folders(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    synced = []  # (path, whether the checkpoint is in place yet), at each fsync
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append((os.readlink(f"/proc/self/fd/{descriptor}"), (out / "step_3").exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with checkpoint.staged_checkpoint(MainProcess(), out, "step_3", 3, {"config": {}}, out / "metrics.jsonl") as folder:
        os.makedirs(os.path.join(folder, "shards"))
        written = {"model.safetensors": b"weights" * 1000, "random_states_0.pkl": b"", "shards/0.distcp": b"x"}
        for name, data in written.items():
            with open(os.path.join(folder, name), "wb") as file:
                file.write(data)
    state = checkpoint.read_state(out / "step_3")
    assert state["files"] == {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in written.items()
    }
    staging = str(out / ".tmp-step_3")
    synced_before_rename = {path for path, in_place in synced if not in_place}
    expected = {os.path.join(staging, name) for name in [*written, checkpoint.STATE_FILE]}
    assert expected | {staging, os.path.join(staging, "shards")} <= synced_before_rename
    assert synced[-1] == (str(out), True)  # the rename, made durable last
    assert checkpoint.verify_checkpoint(out / "step_3") == (None, True)


def make_checkpoint(root, name, completed_steps, state_text=None):
    path = root / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    state_text = state_text or json.dumps({"completed_steps": completed_steps})
    (path / checkpoint.STATE_FILE).write_text(state_text)
    return path


def test_listing_checkpoints_skips_one_whose_state_file_is_cut_short(tmp_path):
    from imgft.outputs import check_output_dir

    make_checkpoint(tmp_path, "step_2", 2)
    make_checkpoint(tmp_path, "step_4", 4, state_text='{"completed_steps": 4, "metrics_log')
    assert checkpoint.list_checkpoints(tmp_path) == [str(tmp_path / "step_2")]
    # A fresh run over it is still refused: step_4 is a checkpoint, however damaged.
    shutil.rmtree(tmp_path / "step_2")
    with pytest.raises(UserError, match="holds checkpoints of an unfinished run"):
        check_output_dir(str(tmp_path), False, False, {})


def test_rotation_keeps_what_it_is_told_to_and_deletes_a_damaged_later_checkpoint_first_in_line(tmp_path):
    for step in (5, 10, 15, 20):
        make_checkpoint(tmp_path, f"step_{step}", step)
    keep = [str(tmp_path / "step_15"), str(tmp_path / "step_10")]  # just saved, resumed from (step_20: damaged)
    removed = checkpoint.delete_oldest_checkpoints(MainProcess(), tmp_path, 2, keep=keep)
    assert sorted(os.path.basename(path) for path in removed) == ["step_20", "step_5"]
    assert sorted(os.listdir(tmp_path)) == ["step_10", "step_15"]
