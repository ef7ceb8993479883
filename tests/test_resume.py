"""Exact, preemption-safe resume: real SIGKILLs and SIGTERMs on real processes, compared bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, data_flags, vit_flags
from safetensors.torch import load_file

from imgft.checkpoint import list_checkpoints

# The digits demo, cut down: 400 training images, 13 optimizer steps an epoch, 2 epochs, random augmentation.
RUN = ["--max_train_samples", "400", "--num_train_epochs", "2", "--per_device_train_batch_size", "16"]
RUN += ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "5", "--random_flip", "--logging_steps", "2"]
RUN += ["--with_tracking", "--report_to", "tensorboard"]
RUN += ["--resume_from_checkpoint", "latest"]  # a scheduler's blind relaunch: fresh start when there is no checkpoint


def start(out, extra=(), log_name="log"):
    command = [sys.executable, "train_loop.py", *RUN, "--output_dir", str(out), *extra]
    with open(out.parent / f"{out.name}-{log_name}.txt", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def finish(out, extra=()):
    process = start(out, extra, "final")
    assert process.wait(timeout=300) == 0, (out.parent / f"{out.name}-final.txt").read_text()[-3000:]


def kill_when(process, condition, timeout=300):
    """SIGKILL `process` as soon as `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    raise TimeoutError


def metrics_steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def staging_folders(out):
    return [name for name in os.listdir(out) if name.startswith(".tmp-")] if out.exists() else []


# Wall-clock measurements differ between any two runs, interrupted or not; everything else must match.
TIMING_KEYS = ("train_images_per_second", "data_wait_fraction")


def without_timing(records):
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def tensorboard_scalars(out):
    """{tag: [(step, value), ...]} as TensorBoard shows it (it drops steps orphaned by a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "imgft"))
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags()["scalars"] if not tag.endswith(("images_per_second", "wait_fraction"))]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


def assert_same_run(reference, resumed):
    weights, resumed_weights = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    metrics = [
        without_timing(map(json.loads, (d / "metrics.jsonl").read_text().splitlines())) for d in (reference, resumed)
    ]
    assert metrics[0] == metrics[1]
    assert tensorboard_scalars(resumed) == tensorboard_scalars(reference)
    results, resumed_results = (json.loads((d / "all_results.json").read_text()) for d in (reference, resumed))
    for key in ("eval_accuracy", "eval_loss", "eval_samples", "train_loss", "train_steps", "epoch"):
        assert resumed_results[key] == results[key], key


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The same runs left alone, with 0 and with 2 DataLoader workers."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for workers in ("0", "2"):
        finish(root / f"workers{workers}", ["--num_workers", workers])
        runs[workers] = root / f"workers{workers}"
    # Augmentation does not depend on the workers either: both runs are the same run.
    assert_same_run(runs["0"], runs["2"])
    return runs


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_anywhere_then_resume_latest_is_bitwise_identical(references, tmp_path, workers):
    out = tmp_path / "killed"
    extra = ["--num_workers", workers]
    rng = random.Random(int(workers))

    # 1. Killed in the middle of writing its first checkpoint.
    process = start(out, extra, "1")
    assert kill_when(process, lambda: staging_folders(out))
    assert staging_folders(out), "the kill should land mid-save"
    assert list_checkpoints(out) == []  # a half-written checkpoint is never taken for one

    # 2. Killed between checkpoints, at a random moment after step 7.
    process = start(out, extra, "2")
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= 7 + rng.randint(0, 3))

    # 3. Killed right after a checkpoint in the second epoch.
    process = start(out, extra, "3")
    assert kill_when(process, lambda: (out / "step_20").exists())

    finish(out, extra)
    assert_same_run(references[workers], out)

    # A blind relaunch of the finished run changes nothing and exits 0.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    finish(out, extra)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# Every fine-tuning recipe on at once. Recipes that draw random numbers or keep state add their flags here.
EVERY_RECIPE = ["--label_smoothing_factor", "0.1", "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"]
EVERY_RECIPE += ["--mixup_prob", "0.8", "--ema_decay", "0.9", "--balanced_sampling", "--class_weighted_loss"]
EVERY_RECIPE += ["--layer_decay", "0.75", "--head_learning_rate", "0.003"]
EVERY_RECIPE += ["--auto_augment", "randaugment", "--random_erasing", "0.25"]
EVERY_RECIPE += ["--freeze_backbone", "--unfreeze_after_epochs", "1"]


def test_resume_is_exact_with_every_recipe_and_speed_option_on(tmp_path, colors_data, tiny_vit):
    # The tiny ViT on the colours, cheaper than RUN's demo: 60 images in 10 batches of 6, 5 optimizer steps an
    # epoch, 10 in all, a checkpoint every 3; killed at a random step. With every recipe, and the speed options
    # too: resize-once (the default), DataLoader workers, bf16 autocast and channels-last memory.
    extra = [*data_flags(colors_data), *vit_flags(tiny_vit), "--per_device_train_batch_size", "6"]
    extra += ["--num_workers", "2", "--mixed_precision", "bf16", "--channels_last"]
    extra += ["--checkpointing_steps", "3", *EVERY_RECIPE]
    # ViT has no drop path; its dropout draws from the same random state, mid-epoch, as drop path would.
    extra += ["--config_overrides", "hidden_dropout_prob=0.1,attention_probs_dropout_prob=0.1"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    finish(reference, extra)
    process = start(out, extra, "1")
    kill_at_step = 4 + random.Random(14).randint(0, 4)
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= kill_at_step)
    assert list_checkpoints(out)
    finish(out, extra)
    assert_same_run(reference, out)
    results, resumed_results = (json.loads((d / "all_results.json").read_text()) for d in (reference, out))
    for key in ("eval_ema_accuracy", "eval_ema_loss", "saved_weights"):
        assert resumed_results[key] == results[key], key


def test_sigterm_saves_and_exits_then_resumes_exactly(references, tmp_path):
    out = tmp_path / "preempted"
    process = start(out, ["--num_workers", "0"], "term")
    deadline = time.monotonic() + 300
    while max(metrics_steps(out), default=0) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 20
    output = (tmp_path / "preempted-term.txt").read_text()
    assert "SIGTERM" in output and "--resume_from_checkpoint latest" in output
    assert "Traceback" not in output
    saved = list_checkpoints(out)
    assert saved, output
    step = json.loads((out / os.path.basename(saved[-1]) / "imgft_state.json").read_text())["completed_steps"]
    assert 3 <= step < 26
    assert not (out / "all_results.json").exists()
    finish(out, ["--num_workers", "0"])
    assert_same_run(references["0"], out)


def test_second_sigint_stops_at_once(tmp_path):
    out = tmp_path / "interrupted"
    # Large batches, so that a step lasts long enough for the second Ctrl-C to land inside it.
    extra = ["--num_workers", "0", "--max_train_samples", "1400", "--per_device_train_batch_size", "128"]
    process = start(out, extra, "int")
    log_path = tmp_path / "interrupted-int.txt"
    deadline = time.monotonic() + 300
    while not metrics_steps(out) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    while "finishing this optimizer step" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 128 + signal.SIGINT
    output = log_path.read_text()
    assert "Second interrupt" in output
    assert "Traceback" not in output


# --- Killed in the last seconds of a run: after its last checkpoint, or while it saves the final model.


def test_killed_after_the_last_epoch_checkpoint_resumes_to_the_same_run(references, tmp_path):
    # The final evaluation, the model save and the report take a few seconds after epoch_2 is written:
    # a preemption lands there. The resume used to crash with a NameError.
    out = tmp_path / "killed"
    extra = ["--num_workers", "0", "--checkpointing_steps", "epoch"]
    process = start(out, extra, "1")
    assert kill_when(process, lambda: (out / "epoch_2").exists())
    assert not (out / "all_results.json").exists(), "the kill should land before the run finished"
    finish(out, extra)
    assert_same_run(references["0"], out)


def test_killed_during_the_final_save_resumes_to_the_same_run(references, tmp_path):
    out = tmp_path / "killed"
    extra = ["--num_workers", "0"]
    process = start(out, extra, "1")
    assert kill_when(process, lambda: (out / "model.safetensors").exists())
    assert not (out / "all_results.json").exists(), "the kill should land before the run finished"
    finish(out, extra)
    assert_same_run(references["0"], out)


def test_a_checkpoint_at_the_last_step_resumes_without_an_extra_step(tmp_path):
    # 7 of an epoch's 13 steps: the resumed run used to train an 8th step and end with other weights.
    extra = ["--num_workers", "0", "--max_train_steps", "7", "--checkpointing_steps", "7"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    finish(reference, extra)
    process = start(out, extra, "1")
    assert kill_when(process, lambda: (out / "step_7").exists())
    assert not (out / "all_results.json").exists(), "the kill should land before the run finished"
    finish(out, extra)
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 7
    assert_same_run(reference, out)


# --- A full disk: one line, the earlier checkpoints intact, and a resume once there is room again.


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 40 MB: room for two of the demo's 15 MB checkpoints, not three."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def assert_stopped_for_a_full_disk(process, log, folder):
    """Exit 2 with one `error:` line naming the folder and the problem, and no traceback; the line."""
    assert process.wait(timeout=300) == 2
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    # The line may follow a progress bar's last, unfinished line.
    [message] = [line[line.index("error: ") :] for line in output.splitlines() if "error: " in line]
    assert str(folder) in message and "No space left on device" in message, message
    assert "--resume_from_checkpoint latest" in message, message
    return message


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_resumes_exactly(references, small_disk):
    out = small_disk / "run"
    process = start(out, ["--num_workers", "0"], "1")
    message = assert_stopped_for_a_full_disk(process, small_disk / "run-1.txt", out)
    assert (
        "cannot save checkpoint step_15" in message and f"the last complete checkpoint is {out / 'step_10'}" in message
    )
    assert [os.path.basename(path) for path in list_checkpoints(out)] == ["step_5", "step_10"]
    assert staging_folders(out) == []  # the half-written step_15 is gone, never taken for 'latest'
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
    finish(out, ["--num_workers", "0"])
    assert_same_run(references["0"], out)


def test_a_full_disk_at_the_final_save_stops_in_one_line_and_resumes_exactly(references, small_disk):
    # 18 MB: room for the one 15 MB checkpoint at the last step, not for the 5 MB model after it.
    subprocess.run(["mount", "-o", "remount,size=18m", str(small_disk)], check=True)
    out = small_disk / "run"
    extra = ["--num_workers", "0", "--checkpointing_steps", "26"]
    process = start(out, extra, "1")
    message = assert_stopped_for_a_full_disk(process, small_disk / "run-1.txt", out)
    assert "cannot save the final model and results" in message
    assert f"the last complete checkpoint is {out / 'step_26'}" in message
    assert not (out / "all_results.json").exists()
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
    finish(out, extra)
    assert_same_run(references["0"], out)
