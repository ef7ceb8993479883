"""--streaming: parquet shards read as a stream, never materialised; unreadable images skipped and named; a run
killed at a random step resumes with the next unseen example, bitwise; two processes read their own shares."""

import io
import itertools
import json
import random
import subprocess
import sys
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from conftest import COLORS, REPO, launch_two_processes
from PIL import Image
from safetensors.torch import load_file
from test_resume import kill_when, metrics_steps, without_timing

from imgft import stream
from imgft.args import parse_args
from imgft.errors import UserError

CLASSES = list(COLORS)[:3]
BROKEN = "broken.png"


def write_shards(folder, shards, per_shard, seed, broken=False):
    """folder/part-N.parquet: noisy coloured squares with a ClassLabel; with `broken`, one file that is no image."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for shard in range(shards):
        images, labels = [], []
        for n in range(per_shard):
            label = (shard + n) % len(CLASSES)
            pixels = np.array(COLORS[CLASSES[label]]) + rng.integers(-25, 26, size=(16, 16, 3))
            png = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(png, "PNG")
            images.append({"bytes": png.getvalue(), "path": f"{shard}-{n}.png"})
            labels.append(label)
        if broken and shard == 1:
            images[3] = {"bytes": b"not an image", "path": BROKEN}
        rows = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        rows.to_parquet(str(folder / f"part-{shard}.parquet"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 4 shards of 20 examples, one unreadable; validation: 1 shard of 24. A pass is 9 batches of 8 (each
    DataLoader worker leaves its last partial batch out): 79 // 8 with no worker, 40 // 8 + 39 // 8 with two."""
    root = tmp_path_factory.mktemp("shards")
    (root / "train").mkdir()
    (root / "validation").mkdir()
    write_shards(root / "train", 4, 20, seed=1, broken=True)
    write_shards(root / "validation", 1, 24, seed=2)
    return root


# 12 optimizer steps of 2 batches of 8: 2 passes and 6 batches, the first pass ending inside an accumulation window.
RUN = ["--streaming", "--max_train_steps", "12", "--per_device_train_batch_size", "8"]
RUN += ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", "--logging_steps", "2"]
RUN += ["--random_flip", "--shuffle_buffer_size", "0", "--resume_from_checkpoint", "latest"]


def run_flags(shards, out, workers):
    return ["--dataset_name", shards, *RUN, "--output_dir", out, "--num_workers", workers]


def assert_same_run(reference, resumed):
    weights, resumed_weights = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    metrics = [without_timing(map(json.loads, (d / "metrics.jsonl").read_text().splitlines())) for d in (reference, resumed)]
    assert metrics[0] == metrics[1]
    results, resumed_results = (json.loads((d / "all_results.json").read_text()) for d in (reference, resumed))
    for key in ("eval_accuracy", "eval_loss", "eval_samples", "train_loss", "train_steps", "epoch"):
        assert resumed_results[key] == results[key], key


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_at_a_random_step_then_resume_latest_is_bitwise_identical(shards, tmp_path, train, caplog, workers):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    train(run_flags(shards, reference, workers))
    results = json.loads((reference / "all_results.json").read_text())
    assert results["train_steps"] == 12 and results["epoch"] == 2
    assert results["eval_samples"] == 24
    evaluated_at = [line["step"] for line in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                    if "eval_accuracy" in line]
    # The end of pass 1 (9 batches: 4 steps and a batch into the 5th), of pass 2 (18 batches), of the run.
    assert evaluated_at == [4, 9, 12]
    if workers == "0":  # named by this process (with workers, by the worker that read it)
        assert [r.message for r in caplog.records if BROKEN in r.message] == [
            f"Skipping unreadable image {BROKEN}: not an image PIL can identify"
        ]

    command = [sys.executable, "train_loop.py", *map(str, run_flags(shards, out, workers))]
    with open(tmp_path / "killed.txt", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    kill_step = 5 + random.Random(int(workers)).randint(0, 5)  # after step_4: in the second pass, or the third
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= kill_step)
    assert not (out / "all_results.json").exists()
    train(run_flags(shards, out, workers))
    assert_same_run(reference, out)


def test_two_processes_read_their_own_shares_and_resume_exactly(shards, tmp_path):
    # 3 shards on 2 processes: one reads two, the other one; a pass ends for both when the second runs out.
    three = tmp_path / "three"
    (three / "train").mkdir(parents=True)
    write_shards(three / "train", 3, 40, seed=3)
    (three / "validation").symlink_to(shards / "validation")
    flags = ["--streaming", "--max_train_steps", "8", "--per_device_train_batch_size", "8", "--logging_steps", "1"]
    flags += ["--shuffle_buffer_size", "0", "--num_workers", "0", "--random_flip", "--dataset_name", three]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = launch_two_processes(["train_loop.py", *flags, "--output_dir", whole, "--checkpointing_steps", "3"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((whole / "all_results.json").read_text())
    assert results["eval_samples"] == 24  # every validation example once, though both processes evaluate
    assert results["epoch"] == 1  # a pass: 5 batches of the one-shard process (40 / 8), and so 5 of the other's
    done = launch_two_processes(
        ["train_loop.py", *flags, "--output_dir", resumed, "--resume_from_checkpoint", whole / "step_6"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(whole, resumed)


# --- The loader alone: what a resume restores, with and without a shuffle buffer.


def numbers_stream(buffer_size):
    stream_of_ids = datasets.Dataset.from_dict({"id": list(range(96))}).to_iterable_dataset(num_shards=4)
    if not buffer_size:
        return stream_of_ids
    return stream_of_ids.shuffle(seed=0, buffer_size=buffer_size, max_buffer_input_shards=1)  # as data.py does


def ids_of(loader, batches=None):
    """The ids in the first `batches` batches (all: None), read without fetching one more."""
    return [number for batch in itertools.islice(loader, batches) for number in batch["id"].tolist()]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("buffer_size", [0, 10])
def test_a_resumed_pass_continues_with_the_next_unseen_example(workers, buffer_size):
    one_process = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    options = {"num_workers": workers, "persistent_workers": workers > 0}

    def loader():
        made = stream.StreamLoader(numbers_stream(buffer_size), 8, options, one_process)
        made.set_epoch(1)
        return made

    whole_pass = ids_of(loader())
    assert sorted(whole_pass) == list(range(96))
    interrupted = loader()
    before = ids_of(interrupted, batches=5)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    after = ids_of(resumed)
    if buffer_size == 0:
        assert before + after == whole_pass  # the same order, from the next unseen example
    else:
        # Not exact: the buffers' content is not saved (datasets refills them, and may read a few examples
        # again). What holds: the pass goes on rather than starting over, and loses at most the buffers.
        assert len(before + after) <= 96
        assert len(set(before + after)) >= 96 - buffer_size * max(workers, 1)


def test_a_changed_worker_count_is_refused_on_resume():
    one_process = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    saved = stream.StreamLoader(numbers_stream(0), 8, {"num_workers": 0}, one_process).state_dict()
    other = stream.StreamLoader(numbers_stream(0), 8, {"num_workers": 2}, one_process)
    with pytest.raises(UserError, match="--num_workers 0"):
        other.load_state_dict(saved)


# --- Flags.


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "d", "--streaming"], "--streaming needs --max_train_steps"),
        (["--streaming", "--max_train_steps", "5"], "--streaming reads --dataset_name"),
        (["--dataset_name", "d", "--label_names", "a,b"], "--label_names is read with --streaming only"),
        (["--dataset_name", "d", "--streaming", "--max_train_steps", "5", "--label_names", "a"], "at least two"),
    ],
)
def test_streaming_flags_are_checked(flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags)
