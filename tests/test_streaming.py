"""--streaming: parquet shards read as a stream, never materialised; unreadable images skipped and named; a
run killed at a random step resumes with the next unseen example, bitwise; two processes read their own
shares."""

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


def write_shards(folder, sizes, seed, broken=False):
    """folder/part-N.parquet of sizes[N] noisy coloured squares with a ClassLabel; with `broken`, one file in
    part-1 is no image."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for shard, size in enumerate(sizes):
        images, labels = [], []
        for n in range(size):
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
    """train: 4 shards of 20 examples, one unreadable; validation: 1 shard of 24. A pass is 9 batches of 8
    (each DataLoader worker leaves its last partial batch out): 79 // 8 with no worker, 40 // 8 + 39 // 8
    with two."""
    root = tmp_path_factory.mktemp("shards")
    (root / "train").mkdir()
    (root / "validation").mkdir()
    write_shards(root / "train", [20] * 4, seed=1, broken=True)
    write_shards(root / "validation", [24], seed=2)
    return root


# 12 optimizer steps of 2 batches of 8: 2 passes and 6 batches, the first pass ending inside an accumulation
# window.
RUN = ["--streaming", "--max_train_steps", "12", "--per_device_train_batch_size", "8"]
RUN += ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", "--logging_steps", "2"]
RUN += ["--random_flip", "--shuffle_buffer_size", "0", "--resume_from_checkpoint", "latest"]


def run_flags(shards, out, workers):
    return ["--dataset_name", shards, *RUN, "--output_dir", out, "--num_workers", workers]


def assert_same_run(reference, resumed):
    weights = load_file(reference / "model.safetensors")
    resumed_weights = load_file(resumed / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert metrics_lines(reference) == metrics_lines(resumed)
    results = json.loads((reference / "all_results.json").read_text())
    resumed_results = json.loads((resumed / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_loss", "eval_samples", "train_loss", "train_steps", "epoch"):
        assert resumed_results[key] == results[key], key


def metrics_lines(out):
    return without_timing(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_at_a_random_step_then_resume_latest_is_identical(shards, tmp_path, train, caplog, workers):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    train(run_flags(shards, reference, workers))
    results = json.loads((reference / "all_results.json").read_text())
    assert results["train_steps"] == 12 and results["epoch"] == 2
    assert results["eval_samples"] == 24
    evaluated_at = [line["step"] for line in metrics_lines(reference) if "eval_accuracy" in line]
    # The end of pass 1 (9 batches: 4 steps and a batch into the 5th), of pass 2 (18 batches), of the run.
    assert evaluated_at == [4, 9, 12]
    if workers == "0":  # named by this process (with workers, by the worker that read it)
        assert [r.message for r in caplog.records if BROKEN in r.message] == [
            f"Skipping unreadable image {BROKEN}: not an image PIL can identify"
        ]

    command = [sys.executable, "train_loop.py", *map(str, run_flags(shards, out, workers))]
    with open(tmp_path / "killed.txt", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    kill_step = 5 + random.Random(int(workers)).randint(0, 5)  # after step_4: in the second pass or the third
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= kill_step)
    assert not (out / "all_results.json").exists()
    train(run_flags(shards, out, workers))
    assert_same_run(reference, out)


def test_lr_find_reads_a_stream_as_training_does(shards, tmp_path, capsys):
    from test_finetune_recipes import run_lr_find

    # The demo's ResNet on the stream: 12 steps of 8 images outlast a pass (9 batches), so the sweep reads on.
    stream = ["--dataset_name", shards, "--streaming", "--max_train_steps", "12", "--output_dir", tmp_path]
    sweep = ["--num_steps", "12", "--start_lr", "1e-5", "--end_lr", "1e-2"]
    summary = run_lr_find([*stream, *sweep, "--per_device_train_batch_size", "8"], capsys)
    assert summary["steps"] == 12 and not summary["stopped_early"]
    assert (tmp_path / "lr_find.png").is_file()


def test_two_processes_read_their_own_shares_and_resume_exactly(tmp_path):
    # 3 shards on 2 processes: one reads two, the other one (its pass is then 4 batches of 8). An unreadable
    # image in the second shard puts the processes' positions at step 3 apart: 24 examples read against 25.
    # Loading the other process's position would skip or repeat one (checked: the test then fails).
    three = tmp_path / "three"
    for split in ("train", "validation"):
        (three / split).mkdir(parents=True)
    write_shards(three / "train", [24, 40, 32], seed=3, broken=True)
    write_shards(three / "validation", [24], seed=2)
    flags = ["--streaming", "--max_train_steps", "6", "--per_device_train_batch_size", "8"]
    flags += ["--logging_steps", "1", "--shuffle_buffer_size", "0", "--num_workers", "0", "--random_flip"]
    flags += ["--dataset_name", three, "--checkpointing_steps", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = launch_two_processes(["train_loop.py", *flags, "--output_dir", whole])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((whole / "all_results.json").read_text())
    assert results["epoch"] == 1 and results["eval_samples"] == 24  # each validation image once, not twice
    resume = ["--output_dir", resumed, "--resume_from_checkpoint", whole / "step_3"]
    done = launch_two_processes(["train_loop.py", *flags, *resume])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(whole, resumed)


# --- The loader alone: what a resume restores, with and without a shuffle buffer.


def numbers_stream(buffer_size):
    stream_of_ids = datasets.Dataset.from_dict({"id": list(range(96))}).to_iterable_dataset(num_shards=4)
    if not buffer_size:
        return stream_of_ids
    return stream_of_ids.shuffle(seed=0, buffer_size=buffer_size, max_buffer_input_shards=1)  # as in data.py


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


STREAM = ["--dataset_name", "d", "--streaming", "--max_train_steps", "5"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "d", "--streaming"], "--streaming needs --max_train_steps"),
        (["--streaming", "--max_train_steps", "5"], "--streaming reads --dataset_name"),
        (["--dataset_name", "d", "--label_names", "a,b"], "--label_names is read with --streaming only"),
        ([*STREAM, "--label_names", "a"], "at least two"),
        ([*STREAM, "--max_train_samples", "9"], "--max_train_samples cannot cut a stream"),
        ([*STREAM, "--strict_data"], "--strict_data checks every image before training"),
        ([*STREAM, "--checkpointing_steps", "epoch", "--gradient_accumulation_steps", "2"], "every epoch"),
        ([*STREAM, "--balanced_sampling"], "--balanced_sampling counts each class's training images"),
        ([*STREAM, "--class_weighted_loss"], "--class_weighted_loss counts each class's training images"),
    ],
)
def test_streaming_flags_are_checked(flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags)


# --- Labels and names, read from the stream without training.


def write_rows(path, rows):
    """One parquet shard of {"image": file bytes, "label": text} rows: labels that name no classes."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def png(color):
    image = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(image, "PNG")
    return image.getvalue()


def read_stream(folder, *flags):
    from imgft import data, transforms

    flags = ["--dataset_name", str(folder), "--streaming", "--max_train_steps", "1", *flags]
    data_args, _, _ = parse_args(flags)
    dataset, image_column, label_column, label_names = data.load_labeled_dataset(data_args, None, 0)
    examples = transforms.with_stream_transform(dataset["train"], np.asarray, image_column, label_column)
    return label_names, [example["labels"] for example in examples]


def test_text_labels_are_matched_to_label_names_and_unknown_ones_skipped(tmp_path, caplog):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        rows = [{"image": png("red"), "label": name} for name in ("dog", "cat", "zebra", "dog", "zebra")]
        write_rows(tmp_path / split / "part-0.parquet", rows)
    with pytest.raises(UserError, match="give them with --label_names a,b,c"):
        read_stream(tmp_path)
    label_names, labels = read_stream(tmp_path, "--label_names", "cat, dog", "--shuffle_buffer_size", "0")
    assert label_names == ["cat", "dog"] and labels == [1, 0, 1]
    assert [r.message for r in caplog.records if "zebra" in r.message] == [
        "Skipping examples labelled 'zebra': not one of the 2 --label_names"
    ]


def test_an_unreadable_image_in_a_webdataset_shard_is_skipped_and_named_with_its_shard(tmp_path, caplog):
    import tarfile

    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        with tarfile.open(tmp_path / split / "shard-0.tar", "w") as tar:
            examples = [(png("red"), b"0"), (b"truncated", b"1"), (png("blue"), b"1")]
            for key, (image, label) in enumerate(examples):
                for suffix, content in (("png", image), ("cls", label)):
                    member = tarfile.TarInfo(f"{key:03d}.{suffix}")
                    member.size = len(content)
                    tar.addfile(member, io.BytesIO(content))
    flags = ["--label_column_name", "cls", "--label_names", "red,blue", "--shuffle_buffer_size", "0"]
    assert read_stream(tmp_path, *flags) == (["red", "blue"], [0, 1])
    shard = tmp_path / "train" / "shard-0.tar"
    assert f"Skipping unreadable image 001.png (in {shard}): not an image PIL can identify" in caplog.text


def test_a_stream_without_a_split_to_evaluate_on_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    write_rows(tmp_path / "train" / "part-0.parquet", [{"image": png("red"), "label": "cat"}])
    with pytest.raises(UserError, match="name the split to evaluate on with --eval_split"):
        read_stream(tmp_path, "--label_names", "cat,dog")


def test_evaluate_and_check_data_do_not_load_a_streamed_dataset_whole():
    from imgft import data

    data_args, _, _ = parse_args(STREAM)
    with pytest.raises(UserError, match="evaluate loads the dataset whole"):
        data.load_evaluation_split(data_args, None, 0, {"a": 0, "b": 1})
    with pytest.raises(UserError, match="check-data loads the dataset whole"):
        data.load_raw_datasets(data_args, None, 0, None)


def test_the_report_reads_a_streamed_splits_images_in_the_order_it_was_evaluated(shards):
    from accelerate import Accelerator
    from conftest import reset_accelerate

    from imgft import transforms

    split = datasets.load_dataset(str(shards), streaming=True)["train"]  # 4 shards, one unreadable image
    split = split.cast_column("image", datasets.Image(decode=False))
    reset_accelerate()
    try:
        as_evaluated = transforms.with_stream_transform(split, np.asarray, "image", "label")
        loader = torch.utils.data.DataLoader(as_evaluated, 8, num_workers=2, collate_fn=transforms.collate_fn)
        loader = Accelerator(cpu=True).prepare(loader)  # as train_loop.py prepares the evaluation's loader
        evaluated = torch.cat([batch["pixel_values"] for batch in loader])  # N x 3 x 16 x 16
        rows = [0, 9, 42, len(evaluated) - 1]
        found = stream.images_in_evaluation_order(split, "image", rows, 8, 2)
    finally:
        reset_accelerate()
    assert len(evaluated) == 79
    for row in rows:
        assert torch.equal(torch.from_numpy(np.asarray(found[row])).permute(2, 0, 1), evaluated[row])
