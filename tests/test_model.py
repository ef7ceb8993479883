"""imgft.model: config overrides, optimizer parameter groups, and loading models offline from configs and folders."""

import dataclasses
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from imgft.args import ModelArguments
from imgft.errors import UserError
from imgft.model import (
    check_model_source,
    load_model,
    load_saved_classifier,
    parse_config_overrides,
)
from imgft.optimizer import optimizer_param_groups

TEN = [chr(ord("a") + i) for i in range(10)]


def model_args(**changes):
    return dataclasses.replace(ModelArguments(), **changes)


# --- parse_config_overrides -----------------------------------------------------------------------------------------


def test_overrides_lists_keep_their_commas():
    assert parse_config_overrides(
        "embedding_size=32,hidden_sizes=[32,64,128,256],depths=[1, 1,1,1],layer_type=basic"
    ) == {
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
    }


def test_overrides_value_types():
    parsed = parse_config_overrides("a=3,b=0.25,c=true,d=False,e=none,f=hello,g=[[1,2],[3]],h=(4,5),i='quoted',j=-2")
    assert parsed == {
        "a": 3,
        "b": 0.25,
        "c": True,
        "d": False,
        "e": None,
        "f": "hello",
        "g": [[1, 2], [3]],
        "h": (4, 5),
        "i": "quoted",
        "j": -2,
    }
    assert type(parsed["a"]) is int
    assert type(parsed["b"]) is float
    assert parsed["c"] is True and parsed["d"] is False


def test_overrides_whitespace_empty_pairs_and_equals_in_value():
    assert parse_config_overrides(" a = 1 , b=x=y ,, ") == {"a": 1, "b": "x=y"}


@pytest.mark.parametrize("text", [None, ""])
def test_overrides_empty(text):
    assert parse_config_overrides(text) == {}


@pytest.mark.parametrize(("text", "pair"), [("a=1,b", "b"), ("=3", "=3"), ("hidden_sizes", "hidden_sizes")])
def test_overrides_pair_without_equals_is_refused(text, pair):
    with pytest.raises(UserError) as info:
        parse_config_overrides(text)
    assert f"'{pair}' is not key=value" in str(info.value)


# --- optimizer_param_groups -----------------------------------------------------------------------------------------

TINY_CONFIGS = {
    "vit": lambda: ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    ),
    "resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
}


def tiny_model(kind):
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(TINY_CONFIGS[kind]())


def group_names(model, groups):
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in groups]


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_param_groups_exclude_norms_and_biases_from_decay(kind):
    model = tiny_model(kind)
    groups = optimizer_param_groups(model, 0.05)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}

    norm_modules = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norm_modules, "the model should contain norm layers"
    norm_params = [p for m in norm_modules for p in m.parameters(recurse=False)]
    assert norm_params
    assert all(id(p) in no_decay_ids for p in norm_params)

    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert biases
    assert all(id(p) in no_decay_ids for p in biases)

    kernels = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.ndim >= 2
    ]
    assert kernels
    assert all(id(p) in decay_ids for p in kernels)


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_param_groups_hold_every_trainable_parameter_once(kind):
    model = tiny_model(kind)
    decay, no_decay = optimizer_param_groups(model, 0.1)
    grouped = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert decay["params"] and no_decay["params"]
    # Usable as given by AdamW.
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


def test_param_groups_vit_layernorm_before_and_after_are_not_decayed():
    model = tiny_model("vit")
    decay_names, no_decay_names = group_names(model, optimizer_param_groups(model, 0.01))
    for suffix in ("layernorm_before.weight", "layernorm_after.weight", "layernorm_before.bias"):
        matching = [name for name in no_decay_names if name.endswith(suffix)]
        assert len(matching) == 2, (suffix, no_decay_names)  # one per layer
        assert not [name for name in decay_names if name.endswith(suffix)]
    assert "classifier.weight" in decay_names
    assert "classifier.bias" in no_decay_names


def test_param_groups_resnet_batchnorm_weights_are_not_decayed():
    model = tiny_model("resnet")
    decay_names, no_decay_names = group_names(model, optimizer_param_groups(model, 0.01))
    batchnorm_weights = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorm_weights
    assert set(batchnorm_weights) <= set(no_decay_names)
    assert not [name for name in decay_names if "normalization" in name]


def test_param_groups_convnext_custom_layernorm_is_not_decayed():
    model = tiny_model("convnext")
    _, no_decay_names = group_names(model, optimizer_param_groups(model, 0.01))
    custom = [name for name, m in model.named_modules() if type(m).__name__ == "ConvNextLayerNorm"]
    assert custom
    for name in custom:
        assert f"{name}.weight" in no_decay_names


def test_param_groups_leave_out_frozen_parameters():
    model = tiny_model("vit")
    for param in model.vit.embeddings.parameters():
        param.requires_grad = False
    decay, no_decay = optimizer_param_groups(model, 0.1)
    grouped = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in model.vit.embeddings.parameters()}


# --- load_model from scratch ----------------------------------------------------------------------------------------


def test_load_model_from_scratch_builds_the_demo_resnet():
    model, processor = load_model(ModelArguments(), TEN)
    assert isinstance(model, ResNetForImageClassification)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.1e6 < n_params < 1.3e6
    assert model.config.id2label == dict(enumerate(TEN))
    assert model.config.label2id == {name: i for i, name in enumerate(TEN)}
    assert model.config.num_labels == 10
    assert list(model.config.hidden_sizes) == [32, 64, 128, 256]
    assert model.config.layer_type == "basic"
    assert isinstance(processor, ViTImageProcessor)
    assert (processor.size["height"], processor.size["width"]) == (32, 32)
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10)


def test_load_model_from_scratch_image_size():
    _, processor = load_model(model_args(image_size=48), ["x", "y"])
    assert (processor.size["height"], processor.size["width"]) == (48, 48)


def test_load_model_from_scratch_other_type_with_overrides():
    overrides = (
        "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,image_size=16,patch_size=8"
    )
    model, _ = load_model(model_args(model_type="vit", config_overrides=overrides), ["x", "y", "z"])
    assert isinstance(model, ViTForImageClassification)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.classifier.weight.shape == (3, 32)


def test_load_model_unknown_model_type():
    with pytest.raises(UserError, match="--model_type 'not_a_model' is not a transformers model type"):
        load_model(model_args(model_type="not_a_model"), ["x", "y"])


def test_load_model_unknown_override_key():
    with pytest.raises(UserError) as info:
        load_model(model_args(config_overrides="embedding_size=8,hidden_sizez=[8]"), ["x", "y"])
    message = str(info.value)
    assert "'hidden_sizez'" in message
    assert "ResNetConfig" in message


# --- load_model from a checkpoint -----------------------------------------------------------------------------------


# transformers 5 saves ViT under its classic key names and renames them when loading.
LEGACY_VIT_KEYS = (
    ("vit.encoder.layer.", "vit.layers."),
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    (".output.dense", ".mlp.fc2"),
)


def saved_as_model_keys(saved, model_keys):
    """The checkpoint's tensors under the model's state_dict names."""
    renamed = {}
    for key, tensor in saved.items():
        if key not in model_keys:
            for old, new in LEGACY_VIT_KEYS:
                key = key.replace(old, new)
        renamed[key] = tensor
    assert len(renamed) == len(saved)
    return renamed


def test_fine_tuning_keeps_the_backbone_and_replaces_the_head(tiny_vit):
    saved = load_file(str(tiny_vit / "model.safetensors"))
    model, processor = load_model(model_args(model_name_or_path=str(tiny_vit), ignore_mismatched_sizes=True), TEN)
    assert isinstance(model, ViTForImageClassification)
    state = model.state_dict()
    saved = saved_as_model_keys(saved, state)
    backbone = sorted(key for key in saved if not key.startswith("classifier"))
    assert backbone == sorted(key for key in state if not key.startswith("classifier"))
    assert len(backbone) > 10
    for key in backbone:
        assert torch.equal(state[key], saved[key]), key
    assert saved["classifier.weight"].shape == (5, 32)
    assert model.classifier.weight.shape == (10, 32)
    assert model.classifier.bias.shape == (10,)
    assert model.config.num_labels == 10
    assert model.config.id2label == dict(enumerate(TEN))
    assert model.config.label2id == {name: i for i, name in enumerate(TEN)}
    assert isinstance(processor, ViTImageProcessor)
    assert (processor.size["height"], processor.size["width"]) == (16, 16)


def test_fine_tuning_same_class_count_keeps_the_head(tiny_vit):
    saved = load_file(str(tiny_vit / "model.safetensors"))
    names = ["v", "w", "x", "y", "z"]
    model, _ = load_model(model_args(model_name_or_path=str(tiny_vit)), names)
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    assert model.config.id2label == dict(enumerate(names))


def test_fine_tuning_applies_explicit_overrides_only(tiny_vit):
    # The default overrides (the demo ResNet's) would fail on a ViT config, so loading proves they are skipped.
    model, _ = load_model(model_args(model_name_or_path=str(tiny_vit)), [f"old{i}" for i in range(5)])
    assert model.config.hidden_size == 32
    model, _ = load_model(
        model_args(model_name_or_path=str(tiny_vit), config_overrides="hidden_dropout_prob=0.3"),
        [f"old{i}" for i in range(5)],
    )
    assert model.config.hidden_dropout_prob == 0.3
    with pytest.raises(UserError, match="ViTConfig has no setting 'nope'"):
        load_model(model_args(model_name_or_path=str(tiny_vit), config_overrides="nope=1"), ["a", "b"])


def test_fine_tuning_head_size_mismatch_needs_the_flag(tiny_vit):
    with pytest.raises(UserError) as info:
        load_model(model_args(model_name_or_path=str(tiny_vit)), TEN)
    message = str(info.value)
    assert "--ignore_mismatched_sizes" in message
    assert "10" in message


def test_missing_local_path_is_a_user_error(tmp_path):
    path = tmp_path / "no_such_checkpoint"
    with pytest.raises(UserError) as info:
        load_model(model_args(model_name_or_path=str(path)), ["a", "b"])
    assert str(path) in str(info.value)


def test_missing_local_path_hint_when_online(tmp_path, monkeypatch):
    # An absolute path fails repo-id validation before any network access, and huggingface_hub read
    # HF_HUB_OFFLINE=1 at import, so this stays offline; only imgft's hint sees the changed variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    path = tmp_path / "no_such_checkpoint"
    with pytest.raises(UserError, match="no such local folder"):
        load_model(model_args(model_name_or_path=str(path)), ["a", "b"])


def test_missing_local_path_says_no_such_local_folder_while_offline(tmp_path):
    path = tmp_path / "no_such_checkpoint"
    with pytest.raises(UserError) as info:
        load_model(model_args(model_name_or_path=str(path)), ["a", "b"])
    assert "no such local folder" in str(info.value)
    assert "HF_HUB_OFFLINE" not in str(info.value)


def test_hub_id_while_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_model(model_args(model_name_or_path="someone/not-a-model"), ["a", "b"])
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message
    assert "'someone/not-a-model'" in message


# --- load_saved_classifier ------------------------------------------------------------------------------------------


def test_load_saved_classifier(tiny_vit):
    saved = load_file(str(tiny_vit / "model.safetensors"))
    model, processor = load_saved_classifier(model_args(model_name_or_path=str(tiny_vit)))
    assert isinstance(model, ViTForImageClassification)
    assert model.config.id2label == {i: f"old{i}" for i in range(5)}
    state = model.state_dict()
    saved = saved_as_model_keys(saved, state)
    assert set(state) == set(saved)
    assert all(torch.equal(state[key], saved[key]) for key in saved)
    assert isinstance(processor, ViTImageProcessor)
    assert (processor.size["height"], processor.size["width"]) == (16, 16)


def test_load_saved_classifier_missing(tmp_path):
    start = time.perf_counter()
    for name in (str(tmp_path / "nope"), "someone/not-a-model"):
        with pytest.raises(UserError, match="cannot load model"):
            load_saved_classifier(model_args(model_name_or_path=name))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "load",
    [check_model_source, load_saved_classifier, lambda args: load_model(args, ["a", "b"])],
    ids=["check_model_source", "load_saved_classifier", "load_model"],
)
def test_a_folder_without_config_json_is_one_line_that_tells_an_unfinished_run(tmp_path, load):
    # transformers' own answer is a ValueError traceback about a missing model_type.
    with pytest.raises(UserError, match="the folder holds no config.json, so no saved model"):
        load(model_args(model_name_or_path=str(tmp_path)))
    (tmp_path / "step_4").mkdir()
    (tmp_path / "step_2").mkdir()
    with pytest.raises(UserError, match=r"only checkpoints \(step_2, step_4\) of a run not finished yet"):
        load(model_args(model_name_or_path=str(tmp_path)))


@pytest.mark.parametrize(
    "load",
    [check_model_source, load_saved_classifier, lambda args: load_model(args, ["a", "b"])],
    ids=["check_model_source", "load_saved_classifier", "load_model"],
)
def test_a_checkpoint_or_an_adapter_given_as_a_model_is_one_line_that_says_where_the_model_is(tmp_path, load):
    # Issue 21.19: "the folder holds no config.json, so no saved model", with no hint what to do.
    run = tmp_path / "out"
    (run / "step_30").mkdir(parents=True)
    (run / "step_30" / "model.safetensors").write_bytes(b"")
    checkpoint = model_args(model_name_or_path=str(run / "step_30"))
    with pytest.raises(UserError) as refused:
        load(checkpoint)
    assert str(refused.value) == (
        f"cannot load model '{run / 'step_30'}': it is a checkpoint to resume the run from (--resume_from_checkpoint), "
        f"not a saved model; the run saves its model in {run} when it ends"
    )
    for folder in (run, run / "best_model"):
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        load(checkpoint)
    assert str(refused.value).endswith(f"the run's model is {run} (its best evaluation: {run / 'best_model'})")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        load(model_args(model_name_or_path=str(run / "adapter")))
    assert str(refused.value) == (
        f"cannot load model '{run / 'adapter'}': it holds an adapter alone (adapter_config.json); "
        f"{run} holds the model with it merged in"
    )
