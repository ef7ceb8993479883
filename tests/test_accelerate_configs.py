"""The shipped Accelerate configs read as Accelerate reads them, with the settings imgft relies on; and a run
that asks for FSDP where Accelerate cannot shard says so."""

import logging
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import REPO

from imgft import runtime

CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def read(path):
    return load_config_from_file(str(path))


def test_the_configs_are_the_ones_the_multi_gpu_docs_name():
    names = {path.name for path in CONFIGS}
    assert names == {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
        "fsdp.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
    }
    multi_gpu_docs = (REPO / "docs" / "multi-gpu.md").read_text(encoding="utf-8")
    for name in names:
        assert f"configs/accelerate/{name}" in multi_gpu_docs, name


@pytest.mark.parametrize("path", [*CONFIGS, REPO / "accelerate_config.yaml"], ids=lambda path: path.name)
def test_accelerate_reads_each_config(path):
    config = read(path)  # raises on a key Accelerate does not know
    assert config.mixed_precision == "bf16" and not config.use_cpu


def test_the_top_level_config_is_multi_gpu_yaml():
    # Older commands (train_loop.py's docstring, docs/streaming.md) use accelerate_config.yaml: the same settings.
    assert read(REPO / "accelerate_config.yaml").to_dict() == read(CONFIG_DIR / "multi_gpu.yaml").to_dict()


def test_fsdp_and_deepspeed_configs_hold_what_imgft_needs():
    fsdp = read(CONFIG_DIR / "fsdp.yaml")
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2  # per-parameter sharding keeps imgft's weight-decay groups
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    for stage in (2, 3):
        deepspeed = read(CONFIG_DIR / f"deepspeed_zero{stage}.yaml")
        assert deepspeed.deepspeed_config["zero_stage"] == stage
        # Set here, Accelerate would override --gradient_accumulation_steps with it.
        assert "gradient_accumulation_steps" not in deepspeed.deepspeed_config
    # accelerator.get_state_dict, which gathers the final model, needs it under ZeRO-3.
    assert read(CONFIG_DIR / "deepspeed_zero3.yaml").deepspeed_config["zero3_save_16bit_model"]


def run_summary(accelerator, caplog):
    train_args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    with caplog.at_level(logging.WARNING, logger="imgft"):
        runtime.log_run_summary(range(64), range(16), ["a", "b"], accelerator, train_args, max_train_steps=8)
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_fsdp_asked_for_on_cpu_is_said_to_run_as_plain_data_parallel(monkeypatch, caplog):
    cpu = {"num_processes": 2, "device": torch.device("cpu"), "mixed_precision": "no"}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for fsdp.yaml
    [warning] = run_summary(SimpleNamespace(**cpu, distributed_type=DistributedType.MULTI_CPU), caplog)
    assert warning.startswith("FSDP was asked for, but Accelerate shards only on GPUs: on cpu this run is")
    caplog.clear()
    assert run_summary(SimpleNamespace(**cpu, distributed_type=DistributedType.FSDP), caplog) == []
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert run_summary(SimpleNamespace(**cpu, distributed_type=DistributedType.MULTI_CPU), caplog) == []
