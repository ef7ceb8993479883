"""FSDP2 through Accelerate, on two CPU processes: sharded checkpoints that resume bitwise, a final model
gathered whole that pipeline() loads, and the best evaluation's weights saved, then loaded back into the
sharded model.

Accelerate only shards over GPUs, so the runs go through tests/fsdp_on_cpu.py, which has Accelerate take its
GPU path over gloo with the CPU as device; the FSDP code itself is Accelerate's and torch's."""

import json
import shutil
import sys

import torch
from conftest import REPO, _free_port, data_flags, run_command, vit_flags
from safetensors.torch import load_file

RUN = ["--max_train_steps", "6", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "5"]
RUN += ["--logging_steps", "1", "--checkpointing_steps", "3", "--eval_steps", "3", "--num_workers", "0"]
# The higher loss counts as best: the first evaluation's (the loss falls), so that the final model is loaded
# back from best_model/ into the sharded one.
RUN += ["--load_best_model_at_end", "--metric_for_best_model", "loss", "--greater_is_better", "true"]
RUN += ["--resume_from_checkpoint", "latest"]
TIMING_KEYS = ("train_images_per_second", "data_wait_fraction")


def launch_fsdp(args):
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", REPO / "configs" / "accelerate" / "fsdp.yaml", "--num_processes", "2"]
    launcher += ["--mixed_precision", "no", "--main_process_port", _free_port()]
    return run_command([*launcher, REPO / "tests" / "fsdp_on_cpu.py", *args])


def metrics(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def test_fsdp_checkpoints_are_sharded_resume_exactly_and_the_model_is_whole(tmp_path, colors_data, tiny_vit):
    out = tmp_path / "run"
    flags = [*data_flags(colors_data), *vit_flags(tiny_vit), *RUN]
    result = launch_fsdp([*flags, "--output_dir", out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP was asked for" not in result.stderr  # sharded for real, not DDP
    # Each process saved its shard of the model and the optimizer (torch.distributed.checkpoint folders).
    for checkpoint in ("step_3", "step_6"):
        assert (out / checkpoint / "pytorch_model_fsdp_0").is_dir()
        assert (out / checkpoint / "optimizer_0").is_dir()
        assert not (out / checkpoint / "model.safetensors").exists()

    # The final model is whole: the weights a plain save of this 5-class ViT holds, at their full shapes.
    weights = load_file(out / "model.safetensors")
    plain = load_file(tiny_vit / "model.safetensors")
    assert {name: t.shape for name, t in weights.items()} == {name: t.shape for name, t in plain.items()}
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(out))
    image = next((colors_data / "validation" / "red").iterdir())
    assert classify(str(image))[0]["label"] in {"red", "green", "blue", "yellow", "purple"}

    # The best evaluation's weights were gathered into best_model/ and became the final model.
    results = json.loads((out / "all_results.json").read_text())
    [first, last] = [record for record in metrics(out) if "eval_loss" in record]
    assert first["eval_loss"] > last["eval_loss"] and results["best_model_step"] == 3
    assert results["eval_loss"] == first["eval_loss"]  # the final evaluation is of the weights loaded back
    best_weights = load_file(out / "best_model" / "model.safetensors")
    assert all(torch.equal(best_weights[name], tensor) for name, tensor in weights.items())

    # A kill right after step_3 leaves that checkpoint, the metrics log and config, and best_model/ with the
    # weights of step 3, as at the end.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("step_3", "best_model"):
        shutil.copytree(out / name, resumed / name)
    for name in ("metrics.jsonl", "imgft_config.yaml"):
        shutil.copy(out / name, resumed / name)
    result = launch_fsdp([*flags, "--output_dir", resumed])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {resumed / 'step_3'} at step 3" in result.stderr
    resumed_weights = load_file(resumed / "model.safetensors")
    assert all(torch.equal(resumed_weights[name], tensor) for name, tensor in weights.items())
    assert metrics(resumed) == metrics(out)
