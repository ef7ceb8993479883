"""Step 3: the config, model and image processor, and the optimizer's parameter groups."""

import ast
import logging
import os

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTImageProcessor,
)

from imgft.args import DEMO_CONFIG_OVERRIDES
from imgft.drop_path import set_drop_path_rate
from imgft.errors import UserError
from imgft.runtime import hub_offline, log_once

OFFLINE_REASON = "HF_HUB_OFFLINE is set, so Hub ids cannot be downloaded (and this one is not in the local cache)"

SCRATCH_IMAGE_SIZE = 32
FROM_SCRATCH_NOTE = (
    "Training a {model_type} model from scratch (random weights, no download). To fine-tune a pretrained one "
    "instead, pass e.g. --model_name_or_path google/vit-base-patch16-224-in21k --ignore_mismatched_sizes"
)
NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
)


def parse_config_overrides(text):
    """`a=1,b=[1,2],c=basic` -> {"a": 1, "b": [1, 2], "c": "basic"}; commas inside brackets do not split."""
    if not text:
        return {}
    pairs, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            pairs.append(text[start:i].strip())
            start = i + 1
    overrides = {}
    for pair in filter(None, pairs):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--config_overrides: '{pair}' is not key=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _parse_value(text):
    words = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _apply_overrides(config, overrides):
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"--config_overrides: {type(config).__name__} has no setting '{key}'")
        setattr(config, key, value)


def _is_hub_id(name):
    # A Hub id is `name` or `owner/name`; anything else can only be a local path.
    return not (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1)


def _load_error(what, name, err):
    """A one-line reason for a failed load, telling a missing local folder from an unreachable Hub id."""
    if not os.path.exists(name) and not _is_hub_id(name):
        return UserError(f"cannot load {what} '{name}': no such local folder")
    if not os.path.exists(name) and hub_offline():
        return UserError(f"cannot load {what} '{name}': {OFFLINE_REASON}")
    return UserError(f"cannot load {what} '{name}': {err}")


def check_model_source(model_args):
    """Fail fast, before any data is loaded, on a checkpoint that cannot be had: a missing local folder,
    or a Hub id while offline that is not in the local cache."""
    sources = (
        ("model", model_args.model_name_or_path, "config.json"),
        ("image processor", model_args.image_processor_name, "preprocessor_config.json"),
    )
    for what, name, probe_file in sources:
        if name is None or os.path.isdir(name):
            continue
        if not _is_hub_id(name):
            raise UserError(f"cannot load {what} '{name}': no such local folder")
        cached = try_to_load_from_cache(
            name, probe_file, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
        if hub_offline() and not isinstance(cached, str):
            raise UserError(f"cannot load {what} '{name}': {OFFLINE_REASON}")


def load_model(model_args, label_names):
    """Return (model, image_processor), with the class names written into the config.

    A pretrained checkpoint keeps its backbone; with `ignore_mismatched_sizes` its head is replaced
    by a new one sized for `label_names`.
    """
    # num_labels follows from id2label; passing both makes transformers warn on every checkpoint load.
    label_maps = {
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    overrides = parse_config_overrides(model_args.config_overrides)
    path = model_args.model_name_or_path
    if path is None:
        try:
            config = AutoConfig.for_model(model_args.model_type, **label_maps)
        except ValueError:
            raise UserError(f"--model_type '{model_args.model_type}' is not a transformers model type") from None
        _apply_overrides(config, overrides)
        set_drop_path_rate(config, model_args.drop_path_rate)
        model = AutoModelForImageClassification.from_config(config)
        if model_args.image_processor_name:
            image_processor = _load_processor(model_args.image_processor_name, hub)
        else:
            size = model_args.image_size or SCRATCH_IMAGE_SIZE
            # Only size and normalisation matter to our transforms; saved with the model so pipeline() works.
            image_processor = ViTImageProcessor(
                size={"height": size, "width": size},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
            )
        log_once(logging.INFO, FROM_SCRATCH_NOTE.format(model_type=model_args.model_type))
        return model, image_processor
    try:
        config = AutoConfig.from_pretrained(path, finetuning_task="image-classification", **label_maps, **hub)
    except OSError as err:
        raise _load_error("model", path, err) from None
    if model_args.config_overrides != DEMO_CONFIG_OVERRIDES:
        _apply_overrides(config, overrides)
    set_drop_path_rate(config, model_args.drop_path_rate)
    try:
        model = AutoModelForImageClassification.from_pretrained(
            path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub,
        )
    except (RuntimeError, ValueError) as err:
        if "size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err):
            raise UserError(
                f"'{path}' has a classifier head for a different number of classes than the {len(label_names)} "
                "in your data; pass --ignore_mismatched_sizes to replace the head"
            ) from None
        raise
    image_processor = _load_processor(model_args.image_processor_name or path, hub)
    return model, image_processor


def load_saved_classifier(model_args):
    """A trained image classifier and its processor, as saved by imgft or any transformers checkpoint."""
    path = model_args.model_name_or_path
    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    try:
        model = AutoModelForImageClassification.from_pretrained(path, **hub)
    except OSError as err:
        raise _load_error("model", path, err) from None
    return model, _load_processor(model_args.image_processor_name or path, hub)


def _load_processor(name, hub):
    try:
        return AutoImageProcessor.from_pretrained(name, **hub)
    except OSError as err:
        raise _load_error("the image processor of", name, err) from None


def optimizer_param_groups(model, weight_decay):
    """Two AdamW groups: weight decay for weight matrices and kernels, none for biases and norm parameters.

    Matching by module type and shape rather than by name: the name `LayerNorm.weight` that the
    upstream example matches misses ViT's `layernorm_before`, every BatchNorm and every custom norm class.
    """
    no_decay = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()
        for param in module.parameters(recurse=False):
            if is_norm or param.ndim <= 1:
                no_decay.add(id(param))
    trainable = [param for param in model.parameters() if param.requires_grad]
    return [
        {
            "params": [p for p in trainable if id(p) not in no_decay],
            "weight_decay": weight_decay,
        },
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]
