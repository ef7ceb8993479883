"""The model-side fine-tuning recipes: layer-wise learning-rate decay and the head's learning rate, freezing
and gradual unfreezing (also under DDP and across a resume), stochastic depth, the learning-rate finder."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, data_flags, launch_two_processes, reset_accelerate, vit_flags
from safetensors.torch import load_file
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    CvtConfig,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PretrainedConfig,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_scheduler,
)

from imgft import freezing, optimizer
from imgft.args import ModelArguments, TrainArguments, parse_args
from imgft.drop_path import set_drop_path_rate
from imgft.errors import UserError
from imgft.layer_decay import param_groups
from imgft.model import load_model
from imgft.optimizer import optimizer_param_groups

LABELS = ["a", "b", "c"]
TINY_VIT = "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,image_size=16"
TINY_SWIN = "embed_dim=8,depths=[1,2],num_heads=[1,2],image_size=16,patch_size=4,window_size=2"
TINY_CONVNEXT = "hidden_sizes=[8,16],depths=[1,2],num_stages=2"
VIT_SIZES = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 16}
SWIN_SIZES = {"embed_dim": 8, "depths": [1, 2], "num_heads": [1, 2], "image_size": 16, "patch_size": 4}


def train_args(**changes):
    return dataclasses.replace(TrainArguments(), **changes)


def vit():
    return ViTForImageClassification(ViTConfig(**VIT_SIZES, num_hidden_layers=2))


def swin():
    return SwinForImageClassification(SwinConfig(**SWIN_SIZES, window_size=2))


def convnext():
    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2))


def deit():
    return DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT_SIZES, num_hidden_layers=3))


# --- layer-wise learning-rate decay ------------------------------------------------------------------------------

# Hand-counted layers, as the power of layer_decay each parameter's learning rate carries: embeddings are
# layer 0, block i layer i, the final norm the top (num_blocks + 1). Swin's patch merging and ConvNeXt's
# downsampling sit between two stages and go with the block before them.
DECAY_POWERS = {
    vit: {
        "vit.embeddings.cls_token": 3,
        "vit.embeddings.patch_embeddings.projection.weight": 3,
        "vit.layers.0.attention.q_proj.weight": 2,
        "vit.layers.1.mlp.fc2.bias": 1,
        "vit.layernorm.weight": 0,
    },
    swin: {
        "swin.embeddings.patch_embeddings.projection.weight": 4,
        "swin.encoder.layers.0.blocks.0.attention.q_proj.weight": 3,
        "swin.encoder.layers.0.downsample.reduction.weight": 3,
        "swin.encoder.layers.1.blocks.0.layernorm_before.weight": 2,
        "swin.encoder.layers.1.blocks.1.layernorm_after.bias": 1,
        "swin.layernorm.bias": 0,
    },
    convnext: {
        "convnext.embeddings.patch_embeddings.weight": 4,
        "convnext.encoder.stages.0.layers.0.dwconv.weight": 3,
        "convnext.encoder.stages.1.downsampling_layer.1.weight": 3,
        "convnext.encoder.stages.1.layers.0.layer_scale_parameter": 2,
        "convnext.encoder.stages.1.layers.1.pwconv2.weight": 1,
        "convnext.layernorm.weight": 0,
    },
    deit: {
        "deit.embeddings.distillation_token": 4,
        "deit.layers.0.mlp.fc1.weight": 3,
        "deit.layers.2.mlp.fc1.weight": 1,
        "deit.layernorm.bias": 0,
    },
}
HEADS = {vit: ["classifier"], swin: ["classifier"], convnext: ["classifier"], deit: ["cls_", "distillation_"]}


@pytest.mark.parametrize("build", DECAY_POWERS, ids=lambda build: build.__name__)
def test_layer_decay_gives_each_layer_its_learning_rate_and_the_schedule_keeps_the_ratios(build):
    torch.manual_seed(0)
    model = build()
    args = train_args(learning_rate=1e-3, layer_decay=0.5, head_learning_rate=4e-3, weight_decay=0.03)
    groups = param_groups(model, args)
    group_of = {id(param): group for group in groups for param in group["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every parameter in exactly one group
    for name, power in DECAY_POWERS[build].items():
        assert group_of[id(names[name])]["lr"] == pytest.approx(1e-3 * 0.5**power), name
    heads = [name for name in names if name.startswith(tuple(HEADS[build]))]
    assert heads and all(group_of[id(names[name])]["lr"] == 4e-3 for name in heads)
    # The no-decay rule holds in every group: biases and norm weights get none, the rest --weight_decay.
    for name, param in names.items():
        expected = 0.0 if param.ndim <= 1 or "norm" in name else 0.03
        assert group_of[id(param)]["weight_decay"] == expected, name
    # The logged learning rate is the first group's: --learning_rate's, held by the final norm.
    assert groups[0]["lr"] == 1e-3

    adamw = optimizer.adamw(groups, args.learning_rate, "no")
    peaks = [group["lr"] for group in adamw.param_groups]
    schedule = get_scheduler("linear", adamw, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        adamw.step()
        schedule.step()
    # After 3 steps of a 2-step warmup and a linear decay to step 10: (10 - 3) / (10 - 2) of each peak.
    assert [group["lr"] for group in adamw.param_groups] == pytest.approx([peak * 7 / 8 for peak in peaks])


def test_without_layer_decay_or_head_rate_the_groups_are_the_two_plain_ones():
    model = vit()
    groups, plain = param_groups(model, train_args()), optimizer_param_groups(model, 0.05)
    assert [group["params"] for group in groups] == [group["params"] for group in plain]
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert all("lr" not in group for group in groups)
    # --head_learning_rate alone: the backbone at --learning_rate, the head at its own.
    head_only = train_args(learning_rate=1e-4, head_learning_rate=1e-2)
    rates = {group["lr"] for group in param_groups(model, head_only)}
    assert rates == {1e-4, 1e-2}


def test_a_model_whose_layers_cannot_be_numbered_is_refused_in_one_line():
    model = MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.25, image_size=32))
    with pytest.raises(UserError, match="cannot number the layers of MobileNetV2ForImage") as info:
        param_groups(model, train_args(layer_decay=0.75))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layer_decay", "0"], "--layer_decay must lie in"),
        (["--layer_decay", "1.5"], "--layer_decay must lie in"),
        (["--layer_decay", "nan"], "--layer_decay must lie in"),
        (["--head_learning_rate", "0"], "--head_learning_rate must be a positive number"),
        (["--drop_path_rate", "1"], "--drop_path_rate must lie in"),
        (["--unfreeze_after_epochs", "0"], "--unfreeze_after_epochs must be at least 1"),
        (["--unfreeze_after_epochs", "5"], "would never unfreeze in 5 epochs"),
    ],
)
def test_recipe_flags_out_of_range_are_refused(flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags)


# --- freezing and gradual unfreezing ------------------------------------------------------------------------


def one_step(model, adamw):
    torch.manual_seed(1)
    model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    adamw.step()
    adamw.zero_grad()
    return grads


def test_frozen_backbone_gets_no_gradients_until_the_unfreeze_and_the_head_trains_throughout():
    torch.manual_seed(0)
    model = vit()
    args = train_args(unfreeze_after_epochs=2, learning_rate=0.01)
    adamw = optimizer.adamw(param_groups(model, args), args.learning_rate, "no")
    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    backbone = [name for name in start if name.startswith("vit.")]
    for epoch in (0, 1):
        freezing.apply_unfreeze_schedule(model, epoch, args)
        grads = one_step(model, adamw)
        assert all(grads[name] is None for name in backbone)
        assert grads["classifier.weight"] is not None
    after_frozen = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all(torch.equal(after_frozen[name], start[name]) for name in backbone)
    assert not torch.equal(after_frozen["classifier.weight"], start["classifier.weight"])
    assert not adamw.state[model.vit.layernorm.weight]  # AdamW kept no moments for what was frozen

    freezing.apply_unfreeze_schedule(model, 2, args)
    grads = one_step(model, adamw)
    assert all(grads[name] is not None for name in backbone) and grads["classifier.weight"] is not None
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, after_frozen[name])]
    assert set(changed) == set(start)
    # --freeze_backbone alone: a linear probe, frozen in every epoch.
    freezing.apply_unfreeze_schedule(model, 7, train_args(freeze_backbone=True))
    assert not any(param.requires_grad for param in model.vit.parameters())
    assert all(param.requires_grad for param in model.classifier.parameters())


def test_unfreezing_in_the_loop_is_exact_across_a_resume(train, tmp_path, colors_data, tiny_vit):
    # 60 images in batches of 16: 4 steps an epoch; the backbone trains from step 5 on.
    common = data_flags(colors_data) + vit_flags(tiny_vit) + ["--num_train_epochs", "2"]
    common += ["--per_device_train_batch_size", "16", "--unfreeze_after_epochs", "1", "--layer_decay", "0.75"]
    full = tmp_path / "full"
    train(common + ["--output_dir", full, "--checkpointing_steps", "2"])
    pretrained = ViTForImageClassification.from_pretrained(tiny_vit).state_dict()  # the names the model uses
    saved = {step: load_file(full / f"step_{step}" / "model.safetensors") for step in (2, 4, 6)}
    backbone = [name for name in pretrained if name.startswith("vit.")]
    for step in (2, 4):  # frozen: the backbone is the checkpoint's, the head trains
        assert all(torch.equal(saved[step][name], pretrained[name]) for name in backbone), step
    assert not torch.equal(saved[2]["classifier.weight"], saved[4]["classifier.weight"])
    assert not any(torch.equal(saved[6][name], pretrained[name]) for name in backbone)

    # Resumed mid-way through the unfrozen epoch: the backbone must be trainable again at once.
    resumed = tmp_path / "resumed"
    train(common + ["--output_dir", resumed, "--resume_from_checkpoint", full / "step_6"])
    weights, resumed_weights = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(tensor, resumed_weights[name]) for name, tensor in weights.items())


def test_under_ddp_frozen_parameters_stay_put_and_unfrozen_ones_stay_equal_on_every_process():
    result = launch_two_processes([REPO / "tests" / "ddp_freezing_check.py"])
    assert result.returncode == 0, result.stderr[-3000:]
    frozen_epoch, unfrozen_epoch = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]
    assert frozen_epoch == {
        "epoch": 0,
        "changed": ["classifier.weight", "classifier.bias"],
        "same_on_both": True,
    }
    assert "vit.layers.0.mlp.fc1.weight" in unfrozen_epoch["changed"] and unfrozen_epoch["same_on_both"]


# --- stochastic depth ---------------------------------------------------------------------------------------


def model_args(**changes):
    return dataclasses.replace(ModelArguments(), **changes)


def deepest_drop_rate(model):
    return max(module.drop_prob for module in model.modules() if hasattr(module, "drop_prob"))


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("swin", TINY_SWIN),
        ("convnext", TINY_CONVNEXT),
        ("beit", TINY_VIT),
        ("bit", "embedding_size=8,hidden_sizes=[8,16],depths=[1,1],num_groups=4"),  # ResNet v2
    ],
)
def test_drop_path_rate_is_set_on_the_config_before_the_model_is_built(model_type, overrides):
    args = model_args(model_type=model_type, config_overrides=overrides, drop_path_rate=0.3)
    model, _ = load_model(args, LABELS)
    assert model.config.drop_path_rate == 0.3
    assert deepest_drop_rate(model) == pytest.approx(0.3)  # the rate grows with depth up to the flag's


def test_drop_path_rate_applies_to_a_checkpoint_and_unset_keeps_its_own(tmp_path):
    # Saved with Swin's default drop_path_rate, 0.1.
    SwinForImageClassification(SwinConfig(**SWIN_SIZES, window_size=2)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    model, _ = load_model(model_args(model_name_or_path=str(tmp_path), ignore_mismatched_sizes=True), LABELS)
    assert deepest_drop_rate(model) == pytest.approx(0.1)
    args = model_args(model_name_or_path=str(tmp_path), ignore_mismatched_sizes=True, drop_path_rate=0.25)
    model, _ = load_model(args, LABELS)
    assert model.config.drop_path_rate == 0.25 and deepest_drop_rate(model) == pytest.approx(0.25)


@pytest.mark.parametrize(("model_type", "overrides"), [("vit", TINY_VIT), ("resnet", None)])
def test_drop_path_rate_on_an_architecture_without_one_is_refused_by_name(model_type, overrides):
    config_name = {"vit": "ViTConfig", "resnet": "ResNetConfig"}[model_type]
    args = model_args(
        model_type=model_type, drop_path_rate=0.1, **({"config_overrides": overrides} if overrides else {})
    )
    with pytest.raises(UserError, match=f"--drop_path_rate: {config_name} has no stochastic depth setting"):
        load_model(args, LABELS)


def test_drop_path_rate_finds_other_names_and_refuses_a_per_stage_list():
    config = PretrainedConfig(stochastic_depth_prob=0.0)  # a torchvision-style remote-code config
    set_drop_path_rate(config, 0.2)
    assert config.stochastic_depth_prob == 0.2
    with pytest.raises(UserError, match="CvtConfig's drop_path_rate is a list"):
        set_drop_path_rate(CvtConfig(), 0.2)


# --- the learning-rate finder ------------------------------------------------------------------------------------


def run_lr_find(argv, capsys):
    from imgft.commands import lr_find

    reset_accelerate()
    try:
        lr_find.main([str(arg) for arg in argv])
    finally:
        reset_accelerate()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_lr_find_sweeps_writes_its_plot_suggests_a_rate_in_range_and_touches_nothing_else(
    tmp_path, colors_data, tiny_vit, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    earlier = {
        "all_results.json": b'{"eval_accuracy": 0.9}\n',
        "model.safetensors": b"weights",
        "config.json": b"{}",
    }
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    flags = data_flags(colors_data) + vit_flags(tiny_vit)
    flags += ["--output_dir", out, "--per_device_train_batch_size", "8"]
    summary = run_lr_find(flags + ["--num_steps", "24", "--start_lr", "1e-4", "--end_lr", "100"], capsys)
    assert summary["method"] == "steepest descent of the smoothed loss"
    assert 1e-4 <= summary["suggested_learning_rate"] <= 100
    assert summary["stopped_early"] and 3 <= summary["steps"] < 24  # AdamW at lr 100 diverges
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in out.iterdir()) == sorted([*earlier, "lr_find.png"])
    assert all((out / name).read_bytes() == content for name, content in earlier.items())


def test_lr_find_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    from imgft.commands.lr_find import smooth, suggest

    rates = [10 ** (-6 + i / 10) for i in range(61)]  # 1e-6 .. 1
    losses = [2 - math.tanh(3 * (math.log10(rate) + 3)) for rate in rates]  # falls fastest at 1e-3
    assert suggest(rates, losses)[0] == pytest.approx(1e-3)
    # Smoothing lags the fall by a few steps, to the right of the true steepest point.
    assert 1e-3 <= suggest(rates, smooth(losses))[0] <= 10**-2.5
    rising = [1 + rate for rate in rates]
    assert suggest(rates, rising) == (
        1e-6,
        "the loss never fell: the lowest rate swept; try a lower --start_lr",
    )


def digits_like_sweep(seed=0):
    """(rates, clean loss, noisy losses) over lr-find's default sweep, shaped like the digits' curve: flat at
    2.3 up to 1e-4, about half at 1e-2, diverging past 3e-2; each step's loss off by a little noise."""
    rates = np.geomspace(1e-7, 10, 100).tolist()
    clean = [
        2.3 - 0.575 * (1 + math.tanh(1.5 * (math.log10(rate) + 3))) + max(0, math.log10(rate) + 1.5) ** 2
        for rate in rates
    ]
    noise = np.random.default_rng(seed).normal(0, 0.03, len(rates))
    return rates, clean, (np.asarray(clean) + noise).tolist()


@pytest.mark.parametrize("odd_batch_step", [None, 20, 35])
def test_lr_find_suggestion_lies_where_the_loss_falls_despite_a_noisy_start_or_an_odd_batch(odd_batch_step):
    from imgft.commands.lr_find import smooth, suggest

    rates, clean, losses = digits_like_sweep()
    losses[0] += 0.3  # the first batch's loss a little high: the debiased average then drops steeply
    if odd_batch_step is not None:
        losses[odd_batch_step] -= 1  # one easy batch on the plateau, past the smoothing's warmup
    suggestion, method = suggest(rates, smooth(losses))
    assert method == "steepest descent of the smoothed loss"
    assert 1e-4 <= suggestion <= 1e-2, suggestion  # the clean curve falls from 2.25 to 1.2 there
    assert rates.index(suggestion) < int(np.argmin(clean))


@pytest.mark.slow
def test_lr_find_on_the_digits_suggests_a_rate_where_its_smoothed_loss_falls(tmp_path, capsys, monkeypatch):
    from imgft.commands import lr_find

    curves = []
    real_suggest = lr_find.suggest
    monkeypatch.setattr(
        lr_find, "suggest", lambda rates, smoothed: curves.append((rates, smoothed)) or real_suggest(rates, smoothed)
    )
    summary = run_lr_find([REPO / "configs" / "digits.yaml", "--output_dir", tmp_path], capsys)
    ((rates, smoothed),) = curves
    at = rates.index(summary["suggested_learning_rate"])
    plateau = float(np.mean(smoothed[10:20]))  # 1e-7 .. 5e-7: the untrained model's loss
    lowest = int(np.argmin(smoothed))
    assert at < lowest
    assert smoothed[at] < plateau - 0.1 * (plateau - smoothed[lowest])  # already falling, not on the plateau
    assert smoothed[at + 1] < smoothed[at - 1]


def test_lr_find_help_lists_its_own_flags_and_the_training_flags_it_reads(capsys):
    from imgft.commands.cli import main

    main(["lr-find", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--num_steps",
        "--start_lr",
        "--end_lr",
        "--layer_decay",
        "--freeze_backbone",
        "--learning_rate",
        "--streaming",
    ):
        assert flag in text
    assert "--eval_steps" not in text


def test_lr_find_refuses_a_bad_sweep_in_one_line(capsys):
    with pytest.raises(UserError, match="0 < --start_lr < --end_lr"):
        run_lr_find(["--start_lr", "1", "--end_lr", "0.1"], capsys)
