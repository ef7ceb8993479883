"""--use_peft and --gradient_checkpointing: what trains, what is saved, that the merged model is the adapter
model, that checkpointing changes memory and not gradients, and that a LoRA run resumes bit for bit."""

import dataclasses
import json
import logging
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, data_flags, run_command
from safetensors.torch import load_file
from test_resume import kill_when, metrics_steps, without_timing
from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from imgft import peft_model
from imgft.args import ModelArguments
from imgft.errors import UserError
from imgft.optimizer import optimizer_param_groups
from imgft.outputs import ADAPTER_DIR, load_weights

# The merged model's logits against the adapter model's: float32 sums of the same numbers in another order.
LOGITS_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def model_args(**changes):
    return dataclasses.replace(ModelArguments(), **changes)


def tiny_vit_model(seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return ViTForImageClassification(config)


def perturb_adapter(model, seed=1):
    """Move every trainable weight away from its initial value, as training would: LoRA starts as the
    identity (B = 0), so that a freshly wrapped model would show nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def batch(seed=2, size=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.arange(size) % 5


# --- What an adapter goes into, per architecture -------------------------------------------------------


def small_model(model_type, **settings):
    config = AutoConfig.for_model(model_type, num_labels=3)
    for key, value in settings.items():
        setattr(config, key, value)
    return AutoModelForImageClassification.from_config(config)


SWIN = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "image_size": 32, "window_size": 4}
VIT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
CONVNEXT = {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}
RESNET = {"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8}


@pytest.mark.parametrize(
    ("model_type", "settings", "targets", "head"),
    [
        ("vit", VIT, ["q_proj", "v_proj"], ["classifier"]),
        ("dinov2", {**VIT, "image_size": 32}, ["q_proj", "v_proj"], ["classifier"]),
        ("swin", SWIN, ["q_proj", "v_proj"], ["classifier"]),
        ("swinv2", SWIN, ["query", "value"], ["classifier"]),
        ("convnext", CONVNEXT, ["pwconv1", "pwconv2"], ["classifier"]),
        ("resnet", RESNET, ["convolution"], ["classifier"]),
    ],
)
def test_default_targets_and_head_per_architecture(model_type, settings, targets, head):
    model = small_model(model_type, **settings)
    assert peft_model.target_modules(model, None) == targets
    assert peft_model.head_modules(model) == head
    adapted = peft_model.prepare_for_training(model, model_args(use_peft="lora", lora_r=2))
    trainable = [name for name, param in adapted.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert any(".modules_to_save." in name for name in trainable)  # the head trains whole


def test_a_layer_name_the_model_lacks_is_one_line_naming_the_ones_it_has():
    with pytest.raises(UserError, match=r"has no layer named query, value; .* named .*q_proj.*v_proj"):
        peft_model.target_modules(tiny_vit_model(), "query, value")
    assert peft_model.target_modules(tiny_vit_model(), "k_proj,mlp.fc2") == ["k_proj", "mlp.fc2"]
    all_linear = ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]  # not the head: it trains whole
    assert peft_model.target_modules(tiny_vit_model(), "all-linear") == all_linear


def test_gradient_checkpointing_on_a_model_without_it_is_one_line():
    resnet = small_model("resnet", hidden_sizes=[8], depths=[1], embedding_size=8)
    expected = "^--gradient_checkpointing: ResNetForImageClassification does not support gradient"
    with pytest.raises(UserError, match=expected):
        peft_model.prepare_for_training(resnet, model_args(gradient_checkpointing=True))


def test_lora_trains_adapter_and_head_only_with_decay_on_matrices_alone(caplog):
    with caplog.at_level(logging.INFO, logger="imgft"):
        model = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft="lora", lora_r=4))
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    # 2 layers x (query, value) x (A: 4x32, B: 32x4), and the 5-class head (5x32 + 5)
    assert sum(param.numel() for param in trainable.values()) == 2 * 2 * (4 * 32 + 32 * 4) + 5 * 32 + 5
    decay, no_decay = optimizer_param_groups(model, 0.05)
    grouped = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
    assert grouped == {id(p) for p in trainable.values()}
    assert [name for name, p in trainable.items() if any(p is q for q in no_decay["params"])] == [
        "base_model.model.classifier.modules_to_save.default.bias"
    ]
    total = sum(param.numel() for param in model.parameters())
    share = 100 * sum(param.numel() for param in trainable.values()) / total
    assert f"of {total:,} parameters trainable ({share:.2f}%)" in caplog.text


def test_lora_flags_set_the_adapted_layers_the_update_scale_and_the_dropout():
    def adapted(alpha):
        lora = {"lora_r": 4, "lora_alpha": alpha, "lora_dropout": 0.25, "lora_target_modules": "k_proj"}
        model = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft="lora", **lora))
        perturb_adapter(model)
        first_key_layer = next(m for name, m in model.named_modules() if name.endswith("0.attention.k_proj"))
        return model.eval(), first_key_layer

    model, half = adapted(alpha=4)
    whole = adapted(alpha=8)[1]
    adapted_layers = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert len(adapted_layers) == 2 and all(name.endswith("attention.k_proj") for name in adapted_layers)
    assert half.lora_dropout["default"].p == 0.25
    # The update is multiplied by lora_alpha / lora_r: with the same A and B, alpha 8 adds twice alpha 4's.
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        updates = [layer(x) - layer.base_layer(x) for layer in (half, whole)]
    assert updates[0].abs().max() > 1e-3
    torch.testing.assert_close(updates[1], 2 * updates[0])


def test_layer_decay_and_head_learning_rate_see_through_the_adapter():
    from imgft import layer_decay
    from imgft.args import TrainArguments

    model = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft="lora", lora_r=4))
    recipe = {"learning_rate": 0.01, "layer_decay": 0.5, "head_learning_rate": 0.1}
    groups = layer_decay.param_groups(model, dataclasses.replace(TrainArguments(), **recipe))
    rate_of = {id(param): group["lr"] for group in groups for param in group["params"]}
    rates = {name: rate_of[id(param)] for name, param in model.named_parameters() if param.requires_grad}
    assert rates["base_model.model.classifier.modules_to_save.default.weight"] == 0.1
    # blocks 1 and 2 of 2, under the top (3): 0.01 * 0.5 ** (3 - block)
    layers = "base_model.model.vit.layers"
    assert rates[f"{layers}.0.attention.q_proj.lora_A.default.weight"] == pytest.approx(0.0025)
    assert rates[f"{layers}.1.attention.v_proj.lora_B.default.weight"] == pytest.approx(0.005)


def test_an_adapter_cannot_go_with_freezing_the_backbone():
    from imgft.args import parse_args

    with pytest.raises(UserError, match="--use_peft already freezes the backbone"):
        parse_args(["--use_peft", "lora", "--freeze_backbone"])


@pytest.mark.parametrize(
    "launcher_variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")]
)
def test_an_adapter_is_refused_under_sharded_training_before_any_work(monkeypatch, launcher_variable, name):
    from imgft.args import parse_args

    parse_args(["--use_peft", "lora"])  # under DDP or one process: accepted
    monkeypatch.setenv(launcher_variable, "true")  # what accelerate launch sets for an FSDP/DeepSpeed config
    with pytest.raises(UserError, match=f"--use_peft cannot go with {name} yet"):
        parse_args(["--use_peft", "lora"])


@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_merged_model_gives_the_adapter_models_logits(method):
    model = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft=method, lora_r=4))
    perturb_adapter(model)
    model.eval()
    pixels, _ = batch()
    with torch.no_grad():
        adapter_logits = model(pixel_values=pixels).logits
        merged = model.merge_and_unload()
        assert type(merged) is ViTForImageClassification
        torch.testing.assert_close(merged(pixel_values=pixels).logits, adapter_logits, **LOGITS_TOLERANCE)
        assert not torch.allclose(tiny_vit_model()(pixel_values=pixels).logits, adapter_logits, atol=1e-3)


def test_best_model_of_an_adapter_model_is_the_merged_model_and_its_adapter_loads_back(tmp_path):
    from accelerate import Accelerator
    from conftest import reset_accelerate
    from transformers import ViTImageProcessor

    from imgft.outputs import save_best_model

    trained = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft="lora", lora_r=4))
    perturb_adapter(trained)
    before = {name: tensor.clone() for name, tensor in trained.state_dict().items()}
    reset_accelerate()
    try:  # what evaluate_and_record does with --load_best_model_at_end
        save_best_model(Accelerator(cpu=True), trained, ViTImageProcessor(size=16), tmp_path)
    finally:
        reset_accelerate()
    best = tmp_path / "best_model"
    # Issue 21.19: best_model/ held the adapter alone, which neither pipeline() nor evaluate could load.
    assert not (best / "adapter_config.json").exists()
    assert (best / "preprocessor_config.json").is_file()
    merged = AutoModelForImageClassification.from_pretrained(best).eval()
    assert type(merged) is ViTForImageClassification
    trained.eval()
    pixels, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(pixel_values=pixels).logits, trained(pixel_values=pixels).logits, **LOGITS_TOLERANCE
        )
    after = trained.state_dict()  # the model in training is left as it was: merged in a copy
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert peft_model.is_adapter_model(trained) and all(p.device.type == "cpu" for p in merged.parameters())
    current = peft_model.prepare_for_training(tiny_vit_model(), model_args(use_peft="lora", lora_r=4))
    load_weights(current, best)  # at the end of the run: the adapter alone, from best_model/adapter
    loaded = current.state_dict()
    assert loaded.keys() == before.keys()
    for name, param in before.items():
        assert torch.equal(param, loaded[name]), name


# --- Gradient checkpointing ----------------------------------------------------------------------------


def gradients_and_layer_calls(gradient_checkpointing, use_peft=None):
    """One training step's gradients, and how many times the first linear layer of the first transformer
    layer ran forward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    args = model_args(gradient_checkpointing=gradient_checkpointing, use_peft=use_peft, lora_r=4)
    model = peft_model.prepare_for_training(tiny_vit_model(), args)
    perturb_adapter(model)  # LoRA's B starts at zero, which would leave A without a gradient
    model.train()
    first_layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    # transformers checkpoints the layer's forward, not its __call__: a hook on a module inside it sees the
    # recomputation, one on the layer itself would not.
    first_linear = next(m for m in first_layer.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    first_linear.register_forward_hook(lambda *_: calls.append(1))
    pixels, labels = batch()
    torch.manual_seed(3)  # the same dropout masks (LoRA's) in both runs
    model(pixel_values=pixels, labels=labels).loss.backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return gradients, len(calls)


@pytest.mark.parametrize("use_peft", [None, "lora"])
def test_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(use_peft):
    plain, plain_calls = gradients_and_layer_calls(False, use_peft)
    checkpointed, checkpointed_calls = gradients_and_layer_calls(True, use_peft)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the second forward is the backward's recomputation
    assert plain.keys() == checkpointed.keys()
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in checkpointed.values())
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


# --- A LoRA run end to end -----------------------------------------------------------------------------

LORA_RUN = ["--use_peft", "lora", "--gradient_checkpointing", "--lora_r", "4", "--learning_rate", "1e-2"]
LORA_RUN += ["--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--random_flip"]
LORA_RUN += ["--logging_steps", "1", "--num_workers", "0", "--checkpointing_steps", "3"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, colors_data, tiny_vit):
    """A LoRA + gradient checkpointing fine-tune of the 5-class tiny ViT on the 5 colours (its head kept)."""
    from conftest import reset_accelerate

    import train_loop

    out = tmp_path_factory.mktemp("lora") / "out"
    reset_accelerate()
    argv = [*data_flags(colors_data), "--model_name_or_path", tiny_vit, *LORA_RUN, "--output_dir", out]
    assert train_loop.main([str(a) for a in argv]) == 0
    reset_accelerate()
    return out


def test_adapter_loads_in_peft_and_gives_the_merged_models_logits(lora_run, tiny_vit):
    from peft import PeftModel

    assert (lora_run / ADAPTER_DIR / "adapter_config.json").is_file()
    assert (lora_run / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    merged = AutoModelForImageClassification.from_pretrained(lora_run).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForImageClassification.from_pretrained(tiny_vit).eval()
    pixels, _ = batch()
    with torch.no_grad():
        base_logits = base(pixel_values=pixels).logits
        adapted = PeftModel.from_pretrained(base, lora_run / ADAPTER_DIR).eval()
        adapter_logits = adapted(pixel_values=pixels).logits
        torch.testing.assert_close(merged(pixel_values=pixels).logits, adapter_logits, **LOGITS_TOLERANCE)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter did train


def test_frozen_weights_equal_the_starting_checkpoint(lora_run, tiny_vit):
    start = AutoModelForImageClassification.from_pretrained(tiny_vit).state_dict()
    checkpoint = load_file(lora_run / "step_15" / "model.safetensors")  # the wrapped model, by its live names
    frozen = {}
    for name, tensor in checkpoint.items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        frozen[base_name.replace(".original_module", "")] = tensor
    assert frozen.keys() == start.keys()
    for name, tensor in start.items():
        assert torch.equal(frozen[name], tensor), name
    trained_head = checkpoint["base_model.model.classifier.modules_to_save.default.weight"]
    assert not torch.equal(trained_head, start["classifier.weight"])


def test_merged_model_loads_in_pipeline_without_peft(lora_run, colors_data):
    code = (
        "import json, sys\nfrom transformers import pipeline\n"
        "answer = pipeline('image-classification', model=sys.argv[1], device='cpu')(sys.argv[2])\n"
        "print(json.dumps({'labels': [a['label'] for a in answer], 'peft': 'peft' in sys.modules}))"
    )
    image = colors_data / "validation" / "red" / "000.png"
    result = run_command([sys.executable, "-c", code, lora_run, image], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["peft"] is False
    assert set(answer["labels"]) <= {"blue", "green", "purple", "red", "yellow"}


@pytest.mark.slow
def test_best_model_of_a_lora_run_loads_in_pipeline_evaluate_and_predict(
    train, tmp_path, colors_data, tiny_vit, capsys
):
    # Issue 21.19: best_model/ held the adapter alone, and evaluate said "no config.json, so no saved model".
    from test_architectures import assert_predict_matches_pipeline
    from test_evaluate import evaluate

    out = tmp_path / "out"
    flags = ["--use_peft", "lora", "--lora_r", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8"]
    flags += ["--eval_steps", "2", "--max_train_steps", "6", "--load_best_model_at_end", "--gradient_checkpointing"]
    flags += ["--metric_for_best_model", "loss", "--output_dir", out]
    train([*data_flags(colors_data), "--model_name_or_path", tiny_vit, *flags])
    best = out / "best_model"
    best_step = json.loads((out / "all_results.json").read_text())["best_model_step"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_loss = next(r["eval_loss"] for r in records if r["step"] == best_step and "eval_loss" in r)
    capsys.readouterr()
    code, results, err = evaluate(
        ["--model_name_or_path", best, "--validation_dir", colors_data / "validation"], capsys
    )
    assert code == 0, err
    assert results["eval_loss"] == pytest.approx(best_loss, rel=1e-5)  # the best evaluation's model
    assert_predict_matches_pipeline(best, sorted((colors_data / "validation").rglob("*.png")), capsys)
    assert (best / ADAPTER_DIR / "adapter_config.json").is_file() and not (best / "adapter_config.json").exists()


def test_model_card_says_lora_with_its_settings(lora_run):
    card = (lora_run / "README.md").read_text()
    assert "- lora" in card  # a tag in the metadata
    assert "## Adapter" in card and "Only a LoRA adapter" in card
    for row in ("| adapted layers | `q_proj`, `v_proj` |", "| fully trained | `classifier` |", "| r | `4` |"):
        assert row in card, row


# --- Exact resume --------------------------------------------------------------------------------------


def start_lora_run(out, colors_data, tiny_vit, log_name):
    command = [sys.executable, "train_loop.py", *data_flags(colors_data), "--model_name_or_path", tiny_vit]
    command += [*LORA_RUN, "--output_dir", out, "--resume_from_checkpoint", "latest"]
    with open(out.parent / f"{out.name}-{log_name}.txt", "w") as log:
        return subprocess.Popen([str(a) for a in command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def test_sigkilled_lora_run_resumes_bitwise(lora_run, colors_data, tiny_vit, tmp_path):
    out = tmp_path / "killed"
    process = start_lora_run(out, colors_data, tiny_vit, "1")
    step = 4 + random.Random(15).randint(0, 6)
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= step)
    assert not (out / "all_results.json").exists()
    assert start_lora_run(out, colors_data, tiny_vit, "2").wait(timeout=300) == 0, (
        tmp_path / "killed-2.txt"
    ).read_text()
    for name in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        reference, resumed = load_file(lora_run / name), load_file(out / name)
        assert reference.keys() == resumed.keys()
        for key, tensor in reference.items():
            assert torch.equal(tensor, resumed[key]), f"{name}: {key}"
    logs = [(folder / "metrics.jsonl").read_text().splitlines() for folder in (lora_run, out)]
    metrics = [without_timing(map(json.loads, lines)) for lines in logs]
    assert metrics[0] == metrics[1]
