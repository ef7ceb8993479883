"""End-to-end runs of train_loop.py, in this process, on tiny data and models the tests make."""

import json
import math
import os
from functools import partial

import pytest
import torch
from conftest import data_flags, vit_flags
from safetensors.torch import load_file

from imgft.errors import UserError


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, colors_data, tiny_vit):
    """One fine-tune of the 5-class tiny ViT on the colours, shared by the output tests below."""
    from conftest import reset_accelerate

    import train_loop

    out = tmp_path_factory.mktemp("run") / "out"
    reset_accelerate()
    train_loop.main(
        [str(a) for a in data_flags(colors_data) + vit_flags(tiny_vit)]
        + ["--output_dir", str(out), "--num_train_epochs", "6", "--per_device_train_batch_size", "8"]
        + ["--learning_rate", "3e-3", "--logging_steps", "5", "--random_flip"]
    )
    reset_accelerate()
    return out


def test_run_learns_and_writes_every_output(finished_run):
    results = json.loads((finished_run / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_samples", "train_loss", "train_runtime", "train_samples_per_second", "epoch"):
        assert key in results, key
    assert results["eval_samples"] == 25
    assert results["train_samples"] == 60
    assert results["epoch"] == 6
    assert results["train_steps"] == 6 * math.ceil(60 / 8)
    assert results["eval_accuracy"] >= 0.9, results
    assert "eval_top5_accuracy" not in results  # only with more than 5 classes
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "imgft_config.yaml"):
        assert (finished_run / name).is_file(), name


def test_metrics_log_has_every_log_step_and_evaluation(finished_run):
    records = read_jsonl(finished_run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4, 5, 6]
    # every 5th step, plus each epoch's end (8 steps an epoch)
    assert train_steps == sorted(set(train_steps))
    assert {5, 10, 15, 20, 25, 30, 35, 40, 45}.issubset(train_steps)
    assert {8, 16, 24, 32, 40, 48}.issubset(train_steps)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    # The rate the logged step used: a linear schedule with no warmup reaches zero after its last step,
    # which used 1/48 of the peak of 3e-3.
    assert records[-2]["learning_rate"] == pytest.approx(3e-3 / 48)


def test_saved_model_answers_with_class_names_in_pipeline(finished_run, colors_data):
    from transformers import pipeline

    config = json.loads((finished_run / "config.json").read_text())
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "purple", "3": "red", "4": "yellow"}
    classifier = pipeline("image-classification", model=str(finished_run), device="cpu")
    answer = classifier(str(colors_data / "validation" / "red" / "000.png"))
    assert answer[0]["label"] == "red"
    assert {a["label"] for a in answer} <= {"blue", "green", "purple", "red", "yellow"}


def test_saved_config_reruns_the_same_run(finished_run):
    from imgft.args import parse_args

    data_args, model_args, train_args = parse_args([str(finished_run / "imgft_config.yaml")])
    assert train_args.learning_rate == 3e-3
    assert train_args.logging_steps == 5
    assert data_args.random_flip is True
    assert "hub_token" not in (finished_run / "imgft_config.yaml").read_text()


def test_fine_tuning_5_class_checkpoint_on_10_classes_keeps_backbone(train, tmp_path, colors10_data, tiny_vit):
    out = tmp_path / "out"
    train(data_flags(colors10_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "1"])
    before, after = load_file(tiny_vit / "model.safetensors"), load_file(out / "model.safetensors")
    assert after["classifier.weight"].shape == (10, 32)
    assert before["classifier.weight"].shape == (5, 32)
    # One step of AdamW moves every weight a little; the backbone must start from (stay near) the checkpoint.
    for name, tensor in before.items():
        if not name.startswith("classifier"):
            assert torch.allclose(tensor, after[name], atol=0.05), name
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 10


def test_accumulation_counts_optimizer_steps_and_ends_schedule(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--num_train_epochs", "2", "--per_device_train_batch_size", "8"]
        + ["--gradient_accumulation_steps", "3", "--num_warmup_steps", "2", "--logging_steps", "1"]
    )
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    steps_per_epoch = math.ceil(math.ceil(60 / 8) / 3)  # 8 batches -> 3 optimizer steps
    assert [r["step"] for r in records] == list(range(1, 2 * steps_per_epoch + 1))
    # The rate each step used: 2 warmup steps from 0 up to the default peak of 2e-3 (transformers' warmup
    # gives the first step 0), then linear decay, to zero after the last step.
    assert [r["learning_rate"] for r in records] == pytest.approx([0.0, 1e-3, 2e-3, 1.5e-3, 1e-3, 0.5e-3])
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 2 * steps_per_epoch


def test_max_train_steps_max_grad_norm_and_eval_batch_size_do_what_they_say(
    train, tmp_path, colors_data, tiny_vit, monkeypatch
):
    from accelerate import Accelerator

    from imgft import metrics

    norms = []  # (gradient norm before clipping, after) at each optimizer step
    clip = Accelerator.clip_grad_norm_

    def recording_clip(accelerator, parameters, max_norm, **options):
        parameters = list(parameters)
        before = clip(accelerator, parameters, max_norm, **options)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
        norms.append((before.item(), after.item()))
        return before

    eval_batches = []  # the size of each evaluation batch
    add_batch = metrics.add_batch

    def recording_add_batch(tally, logits, labels):
        eval_batches.append(len(labels))
        return add_batch(tally, logits, labels)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(metrics, "add_batch", recording_add_batch)
    out = tmp_path / "out"
    flags = ["--max_train_steps", "3", "--max_grad_norm", "0.25", "--per_device_eval_batch_size", "10"]
    train(data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, *flags])
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 3
    assert results["epoch"] == pytest.approx(3 / math.ceil(60 / 32))
    assert len(norms) == 3 and all(after <= 0.25 * (1 + 1e-5) for _, after in norms)
    assert max(before for before, _ in norms) > 0.25  # there was something to clip
    assert eval_batches == [10, 10, 5] * 2  # 25 validation images, evaluated after epoch 1 and at the end


def test_sample_limits_and_seeded_split(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    train(
        ["--train_dir", colors_data / "train"]
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--max_train_steps", "1", "--train_val_split", "0.25", "--max_train_samples", "20"]
    )
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 15  # 25 % of 60
    assert results["train_samples"] == 20
    out2 = tmp_path / "out2"
    train(data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out2, "--max_train_steps", "1"])
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out2, "--overwrite_output_dir", "--max_train_steps", "1", "--max_eval_samples", "7"]
    )
    assert json.loads((out2 / "all_results.json").read_text())["eval_samples"] == 7


def test_checkpoints_rotate_and_resume_is_exact(train, tmp_path, colors_data, tiny_vit):
    import shutil

    common = data_flags(colors_data) + vit_flags(tiny_vit)
    common += ["--max_train_steps", "12", "--per_device_train_batch_size", "8", "--checkpointing_steps", "4"]
    common += ["--random_flip", "--gradient_accumulation_steps", "2", "--logging_steps", "3"]
    full = tmp_path / "full"
    train(common + ["--output_dir", full])
    assert sorted(p.name for p in full.glob("step_*")) == ["step_12", "step_4", "step_8"]

    # An interrupted run: what the same command had written when it was killed just after step 6.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "step_4", part / "step_4")
    full_log = read_jsonl(full / "metrics.jsonl")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full_log if r["step"] <= 6))
    train(common + ["--output_dir", part, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2"])
    full_weights, resumed_weights = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for name, tensor in full_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    timing = ("train_images_per_second", "data_wait_fraction")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(part / "metrics.jsonl")] == [
        {k: v for k, v in r.items() if k not in timing} for r in full_log
    ]
    full_results = json.loads((full / "all_results.json").read_text())
    resumed_results = json.loads((part / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_steps"):
        assert resumed_results[key] == full_results[key], key
    # Rotation keeps the newest and the one resumed from, deleting step_8.
    assert sorted(p.name for p in part.glob("step_*")) == ["step_12", "step_4"]


def test_resume_refuses_a_changed_run_and_a_missing_checkpoint(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "2"]
    train(common + ["--checkpointing_steps", "1"])
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        train(common + ["--resume_from_checkpoint", str(out / "step_1"), "--per_device_train_batch_size", "4"])
    with pytest.raises(UserError, match="nowhere does not exist"):
        train(common + ["--resume_from_checkpoint", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an imgft checkpoint"):
        train(common + ["--resume_from_checkpoint", str(tmp_path / "empty")])


def test_finished_run_is_left_alone(train, tmp_path, colors_data, tiny_vit, caplog):
    out = tmp_path / "out"
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "2"]
    train(common + ["--checkpointing_steps", "2"])
    before = (out / "model.safetensors").read_bytes(), (out / "all_results.json").read_text()
    train(common + ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"])
    assert ((out / "model.safetensors").read_bytes(), (out / "all_results.json").read_text()) == before
    assert "nothing to do" in caplog.text
    # Asked to train longer, the same command once said "nothing to do" too, and exited 0 after 2 steps.
    longer = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
    with pytest.raises(UserError, match=r"a finished run with other settings \(max_train_steps: 2 -> 3\)"):
        train(common + longer)
    assert ((out / "model.safetensors").read_bytes(), (out / "all_results.json").read_text()) == before


def test_output_dir_is_guarded(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--max_train_steps", "2"]
    train(common + ["--checkpointing_steps", "1"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="finished run"):
        train(common)
    (out / "all_results.json").unlink()
    with pytest.raises(UserError, match="--resume_from_checkpoint latest"):
        train(common)
    train(common + ["--overwrite_output_dir"])
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob("step_*"))  # the old run's checkpoints are gone
    assert (out / "all_results.json").is_file()


def test_files_named_as_a_run_names_its_own_are_not_overwritten_unless_told(train, tmp_path, tiny_vit):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    # Refused before the data is read (there is none here): the model card and config.json replaced them.
    flags = ["--train_dir", tmp_path / "no_data", *vit_flags(tiny_vit), "--output_dir", out]
    with pytest.raises(UserError, match="holds README.md, config.json, not written by an imgft run"):
        train(flags)
    assert (out / "README.md").read_text() == "my notes" and (out / "config.json").read_text() == "{}"
    with pytest.raises(UserError, match="no_data is not a folder"):  # told: it goes on, to the data
        train([*flags, "--overwrite_output_dir"])


def test_tensorboard_tracking_writes_event_files(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--max_train_steps", "2", "--logging_steps", "1"]
        + ["--with_tracking", "--report_to", "tensorboard"]
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((out / "imgft").rglob("events.out.tfevents*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/accuracy"} <= tags


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(train, tmp_path, colors_data, tiny_vit, precision, caplog):
    out = tmp_path / "out"
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--max_train_steps", "2", "--mixed_precision", precision]
    )
    assert f"mixed precision {precision}" in caplog.text
    assert math.isfinite(json.loads((out / "all_results.json").read_text())["train_loss"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_puts_weights_and_batches_in_channels_last_memory(
    train, tmp_path, colors_data, tiny_vit, monkeypatch, channels_last
):
    seen = []  # (input is channels_last, weight is channels_last) at every convolution while training
    conv_forward = torch.nn.Conv2d.forward

    def recording_forward(conv, pixel_values):
        if conv.training:
            seen.append(
                tuple(
                    t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                    for t in (pixel_values, conv.weight)
                )
            )
        return conv_forward(conv, pixel_values)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    out = tmp_path / "out"
    flags = ["--output_dir", out, "--max_train_steps", "2"] + (["--channels_last"] if channels_last else [])
    train(data_flags(colors_data) + vit_flags(tiny_vit) + flags)
    assert len(seen) == 2  # one patch-embedding convolution per step
    assert set(seen) == {(channels_last, channels_last)}
    assert math.isfinite(json.loads((out / "all_results.json").read_text())["train_loss"])


def test_push_to_hub_offline_is_refused_before_anything_is_written(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="offline"):
        train(data_flags(colors_data) + vit_flags(tiny_vit) + ["--output_dir", out, "--push_to_hub"])
    assert not out.exists()


def test_push_uploads_the_final_files_to_hub_model_id_with_hub_token(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from imgft import outputs
    from imgft.args import TrainArguments
    from imgft.report import model_card

    calls = []

    class RecordingApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))
            return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls.append(("upload", repo_id, folder_path, {"step_*", "epoch_*"} <= set(ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run = str(tmp_path / "colors-run")
    told = TrainArguments(output_dir=run, push_to_hub=True, hub_model_id="org/colors", hub_token="hf_flag")
    assert outputs.push_to_hub(told) == "org/colors"
    assert calls == [("token", "hf_flag"), ("create", "org/colors"), ("upload", "org/colors", run, True)]
    calls.clear()
    # The defaults: HF_TOKEN's token, and a repository of the token's account named after output_dir,
    # which the model card's usage snippet then loads.
    model_card.write_model_card(run, {"output_dir": run, "push_to_hub": True}, {}, ["a", "b"])
    monkeypatch.setenv("HF_TOKEN", "hf_environment")
    assert outputs.push_to_hub(TrainArguments(output_dir=run, push_to_hub=True)) == "me/colors-run"
    assert calls[:2] == [("token", "hf_environment"), ("create", "colors-run")]
    assert calls[2] == ("upload", "me/colors-run", run, True)
    assert (
        'pipeline("image-classification", model="me/colors-run")' in (tmp_path / "colors-run" / "README.md").read_text()
    )


def test_local_dataset_folder_with_string_labels_and_named_columns(train, tmp_path, tiny_vit):
    """--dataset_name with a local folder of parquet files whose labels are strings in custom columns."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    names = ["chat noir", "狗"]
    rows = {"photo": [], "species": []}
    for i in range(24):
        name = names[i % 2]
        pixels = np.full((16, 16, 3), 30 if name == "狗" else 220, dtype=np.uint8) + rng.integers(0, 20, (16, 16, 3))
        rows["photo"].append(Image.fromarray(pixels.astype(np.uint8)))
        rows["species"].append(name)
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features({"photo": datasets.Image(), "species": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "data" / "train.parquet"))
    out = tmp_path / "out"
    train(
        ["--dataset_name", folder, "--image_column_name", "photo", "--label_column_name", "species"]
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--num_train_epochs", "4", "--per_device_train_batch_size", "4"]
        + ["--learning_rate", "3e-3", "--train_val_split", "0.25"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "chat noir", "1": "狗"}
    assert config["label2id"] == {"chat noir": 0, "狗": 1}
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] == 6


def metrics_lines(out):
    """metrics.jsonl, without the wall-clock fields that differ between any two runs."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timing = ("train_images_per_second", "data_wait_fraction")
    return [{key: value for key, value in line.items() if key not in timing} for line in lines]


def test_one_epoch_number_everywhere_when_a_run_ends_mid_epoch(train, tmp_path, colors_data, tiny_vit):
    # 60 images in batches of 8: 8 batches an epoch. 11 steps end the run 3/8 into the second epoch.
    out = tmp_path / "out"
    train(
        data_flags(colors_data)
        + vit_flags(tiny_vit)
        + ["--output_dir", out, "--per_device_train_batch_size", "8", "--max_train_steps", "11"]
        + ["--eval_steps", "4", "--logging_steps", "4", "--checkpointing_steps", "epoch"]
    )
    positions = [(line["step"], line["epoch"], "loss" in line) for line in metrics_lines(out)]
    assert positions == [
        (4, 0.5, True),
        (4, 0.5, False),
        (8, 1.0, True),
        (8, 1.0, False),
        (11, 1.375, True),  # the last steps' losses, and the final evaluation
        (11, 1.375, False),
    ]
    assert json.loads((out / "all_results.json").read_text())["epoch"] == 1.375
    # A checkpoint named epoch_N holds N whole epochs: the run's end mid-epoch is not one.
    assert sorted(path.name for path in out.glob("epoch_*")) == ["epoch_1"]


def test_resuming_from_another_folders_checkpoint_keeps_its_metrics_history(
    train, tmp_path, colors_data, tiny_vit, caplog
):
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--max_train_steps", "4", "--logging_steps", "1"]
    common += ["--per_device_train_batch_size", "16"]
    first, second = tmp_path / "first", tmp_path / "second"
    train(common + ["--output_dir", first, "--checkpointing_steps", "2"])
    caplog.clear()
    train(common + ["--output_dir", second, "--resume_from_checkpoint", first / "step_2"])
    assert metrics_lines(second) == metrics_lines(first)
    # Changing the folder or asking to resume is what a resume is for: no warning about either.
    assert "output_dir" not in caplog.text and "resume_from_checkpoint:" not in caplog.text


def test_dataloader_workers_start_once_per_run_not_once_per_epoch(train, tmp_path, colors_data, tiny_vit, monkeypatch):
    # Each batch records the pid of the worker that made it. With persistent workers, the 2 batches of each
    # of 3 epochs come from the same 2 training workers, and the 1 validation batch of each evaluation from
    # one evaluation worker: 3 in all. A DataLoader rebuilt each epoch (skip_first_batches with nothing to
    # skip) would start 2 new training workers every epoch: 7.
    from imgft import transforms

    pids_file = tmp_path / "pids.txt"
    for name in ("apply_transform", "apply_eval_transform"):  # training's batches, then evaluation's
        monkeypatch.setattr(transforms, name, partial(recording_pid, pids_file, getattr(transforms, name)))
    flags = ["--output_dir", tmp_path / "out", "--num_train_epochs", "3", "--num_workers", "2"]
    train(data_flags(colors_data) + vit_flags(tiny_vit) + flags)
    pids = set(pids_file.read_text().split())
    assert len(pids) == 3 and str(os.getpid()) not in pids, pids


def recording_pid(pids_file, make_batch, *args, **kwargs):
    """`make_batch(*args, **kwargs)`, after appending this process's pid to `pids_file`."""
    with open(pids_file, "a") as file:
        file.write(f"{os.getpid()}\n")
    return make_batch(*args, **kwargs)
