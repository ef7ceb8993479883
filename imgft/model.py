"""Step 3: the config, model and image processor, each checked before any work, the model resized for
--image_size, and a kept head's rows put in the data's class order; and a saved classifier loaded back for
evaluate and predict."""

import ast
import copy
import inspect
import logging
import math
import os

import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTImageProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

from imgft import peft_model, preprocessing
from imgft.args import DEMO_CONFIG_OVERRIDES
from imgft.checkpoint import CHECKPOINT_NAME
from imgft.drop_path import set_drop_path_rate
from imgft.errors import UserError
from imgft.layers import head_parameter_names
from imgft.outputs import BEST_DIR
from imgft.runtime import hub_offline, log_once

OFFLINE_REASON = "HF_HUB_OFFLINE is set, so Hub ids cannot be downloaded (and this one is not in the local cache)"

SCRATCH_IMAGE_SIZE = 32
FROM_SCRATCH_NOTE = (
    "Training a {model_type} model from scratch (random weights, no download). To fine-tune a pretrained one "
    "instead, pass e.g. --model_name_or_path google/vit-base-patch16-224-in21k --ignore_mismatched_sizes"
)
# Inputs some image classifiers need beside pixel_values, which the training loop does not give.
INPUTS_NOT_GIVEN = {
    "input_ids": "a text prompt (input_ids)",
    "spatial_shapes": "its processor's patch sequences with their spatial_shapes and pixel_attention_mask",
}
# What a model's forward raises on inputs it cannot take (shapes, sizes, missing inputs).
FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, IndexError)


def parse_config_overrides(text):
    """`a=1,b=[1,2],c=basic` -> {"a": 1, "b": [1, 2], "c": "basic"}; commas inside brackets do not split."""
    if not text:
        return {}
    pairs = []
    depth = 0
    start = 0
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
    """Fail fast, before any data is loaded, on a checkpoint that cannot be had: a missing local folder, a
    local folder that holds no model, or a Hub id while offline that is not in the local cache."""
    check_model_folder(model_args.model_name_or_path)
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


def check_model_folder(name):
    """Refuse a local folder without config.json, saying what it is and where the model is: a run's output_dir
    (whose model is saved only at its end), one of its checkpoints, or an adapter alone; transformers would
    raise a ValueError about a missing model_type."""
    if name is None or not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return
    run_dir = os.path.dirname(os.path.normpath(name)) or "."
    if CHECKPOINT_NAME.match(os.path.basename(os.path.abspath(name))):
        best_dir = os.path.join(run_dir, BEST_DIR)
        where = (
            f"the run's model is {run_dir}{f' (its best evaluation: {best_dir})' if _is_model(best_dir) else ''}"
            if _is_model(run_dir)
            else f"the run saves its model in {run_dir} when it ends"
        )
        raise UserError(
            f"cannot load model '{name}': it is a checkpoint to resume the run from (--resume_from_checkpoint), "
            f"not a saved model; {where}"
        )
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        where = (
            f"{run_dir} holds the model with it merged in"
            if _is_model(run_dir)
            else "load it onto its base model with peft"
        )
        raise UserError(f"cannot load model '{name}': it holds an adapter alone (adapter_config.json); {where}")
    checkpoints = sorted(entry for entry in os.listdir(name) if CHECKPOINT_NAME.match(entry))
    if checkpoints:
        listed = ", ".join(checkpoints)
        raise UserError(
            f"cannot load model '{name}': it holds no config.json, only checkpoints ({listed}) of a run not "
            "finished yet; the model is saved at its end (a stopped run goes on with "
            "--resume_from_checkpoint latest)"
        )
    raise UserError(f"cannot load model '{name}': the folder holds no config.json, so no saved model")


def _is_model(folder):
    return os.path.isfile(os.path.join(folder, "config.json"))


def load_model(model_args, label_names):
    """Return (model, image_processor) ready to train: `load_classifier`'s, with gradient checkpointing
    turned on and the model wrapped in an adapter where --gradient_checkpointing and --use_peft ask."""
    model, image_processor = load_classifier(model_args, label_names)
    return peft_model.prepare_for_training(model, model_args), image_processor


def load_classifier(model_args, label_names):
    """Return (model, image_processor), with the class names written into the config, each checked before any
    work: the architecture can be trained by imgft's loop, and one blank image made as training makes them runs
    through the model to one logit per class and a loss.

    A pretrained checkpoint keeps its backbone; with `ignore_mismatched_sizes` its head is replaced
    by a new one sized for `label_names`. `image_size` reaches the model: from scratch through the config, from a
    checkpoint by resampling its position tables (`at_input_size`).
    """
    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    overrides = parse_config_overrides(model_args.config_overrides)
    path = model_args.model_name_or_path
    if path is None:
        model, image_processor = _model_from_scratch(model_args, label_names, overrides, hub)
    else:
        model, image_processor = _model_from_checkpoint(model_args, label_names, overrides, hub)
    check_model_runs(model, image_processor, label_names)
    return model, image_processor


def _model_from_scratch(model_args, label_names, overrides, hub):
    try:
        config = AutoConfig.for_model(model_args.model_type)
    except ValueError:
        raise UserError(f"--model_type '{model_args.model_type}' is not a transformers model type") from None
    check_trainable(config)
    _apply_overrides(config, overrides)
    set_drop_path_rate(config, model_args.drop_path_rate)
    if model_args.image_processor_name:
        image_processor = _load_processor(model_args.image_processor_name, hub)
        if model_args.image_size:
            image_processor = preprocessing.with_image_size(image_processor, model_args.image_size)
    else:
        size = _scratch_image_size(model_args.image_size, overrides)
        # Only size and normalisation matter to our transforms; saved with the model so pipeline() works.
        image_processor = ViTImageProcessor(
            size={"height": size, "width": size},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    input_size = preprocessing.input_size(image_processor, preprocessing.plan_for(image_processor))
    override = overrides.get("image_size")
    if override is not None and _as_pair(override) != tuple(input_size):
        height, width = input_size
        raise UserError(f"--config_overrides image_size={override}: the image processor gives {height}x{width} px")
    set_input_size(config, input_size)
    set_labels(config, label_names)
    model_class = classification_class(config)
    # Not AutoModelForImageClassification.from_config, which fails on a new config whose type has several classes
    # (DeiT, LeViT, Perceiver: it looks for config.architectures, which is None).
    model = _built(lambda: model_class._from_config(config), config)
    log_once(logging.INFO, FROM_SCRATCH_NOTE.format(model_type=model_args.model_type))
    return model, image_processor


def _as_pair(size):
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _scratch_image_size(image_size, overrides):
    """--image_size, else an `image_size` set in --config_overrides, else 32: the one size of processor and config."""
    override = overrides.get("image_size")
    if isinstance(override, (list, tuple)) and len(set(override)) == 1:
        override = override[0]
    if override is not None and not isinstance(override, int):
        raise UserError(f"--config_overrides image_size={override}: give one number (the model's input is square)")
    if image_size and override and image_size != override:
        raise UserError(f"--image_size {image_size} and --config_overrides image_size={override} disagree")
    return image_size or override or SCRATCH_IMAGE_SIZE


def _model_from_checkpoint(model_args, label_names, overrides, hub):
    path = model_args.model_name_or_path
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, finetuning_task="image-classification", **hub)
    except OSError as err:
        raise _load_error("model", path, err) from None
    check_trainable(config)
    if model_args.config_overrides != DEMO_CONFIG_OVERRIDES:
        _apply_overrides(config, overrides)
    set_drop_path_rate(config, model_args.drop_path_rate)
    kept_head_names = check_head(config, label_names, path, model_args.ignore_mismatched_sizes)
    set_labels(config, label_names)
    image_processor = _load_processor(model_args.image_processor_name or path, hub)
    if model_args.image_size:
        image_processor = preprocessing.with_image_size(image_processor, model_args.image_size)
        if getattr(config, "pretrained_cfg", None):  # timm: the processor is saved in, and read from, config.json
            config.pretrained_cfg = {**config.pretrained_cfg, "input_size": [3, *[model_args.image_size] * 2]}
    try:
        model = _built(
            lambda: AutoModelForImageClassification.from_pretrained(
                path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
            ),
            config,
        )
    except (RuntimeError, ValueError) as err:  # a head check_head could not see: no `architectures` in the config
        if "size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err):
            raise UserError(
                f"'{path}' has a classifier head for a different number of classes than the {len(label_names)} "
                "in your data; pass --ignore_mismatched_sizes to replace the head"
            ) from None
        raise
    # The processor's size, from --image_size or --image_processor_name, may not be the checkpoint's.
    input_size = preprocessing.input_size(image_processor, preprocessing.plan_for(image_processor))
    model = at_input_size(model, input_size)
    if kept_head_names is not None and kept_head_names != list(label_names):  # the same classes, reordered
        put_head_in_data_order(model, kept_head_names, label_names, input_size, path)
    return model, image_processor


def _built(make, config):
    """make(), a model-building call, with a missing dependency (natten, timm, ...) said in one line."""
    try:
        return make()
    except ImportError as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{config.model_type} cannot be built here: {reason}") from None


def classification_class(config):
    """The image-classification class for `config`: the one its `architectures` names, else the type's first."""
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise UserError(f"{config.model_type} has no image-classification model in transformers")
    classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]
    if not isinstance(classes, (list, tuple)):
        return classes
    named = [cls for cls in classes if cls.__name__ in (config.architectures or [])]
    return (named or list(classes))[0]


def check_trainable(config):
    """Refuse, before anything is built, an architecture that imgft's loop cannot fine-tune: the loop gives the model
    `pixel_values` and `labels` and reads `loss` and `logits`. Remote code (--trust_remote_code) is checked by
    `check_model_runs` only."""
    if "AutoModelForImageClassification" in (getattr(config, "auto_map", None) or {}):
        return
    model_class = classification_class(config)
    name = config.model_type
    parameters = inspect.signature(model_class.forward).parameters
    prefix = f"{name} ({model_class.__name__}) cannot be fine-tuned as an image classifier by imgft"
    if "pixel_values" not in parameters:
        first = next(name for name in parameters if name != "self")
        raise UserError(f"{prefix}: it reads {first}, not the pixel_values that imgft gives it")
    if "labels" not in parameters:
        raise UserError(f"{prefix}: its forward takes no labels, so it gives no loss to train on")
    for needed, what in INPUTS_NOT_GIVEN.items():
        if needed in parameters:
            raise UserError(f"{prefix}: it also needs {what}, which imgft does not give")


def check_head(config, label_names, path, ignore_mismatched_sizes):
    """Before any weights load: refuse a checkpoint head sized for another class count unless it is to be replaced,
    and warn when a head of the right size was trained for other class names (or names none), which it keeps by
    position. Returns the checkpoint's class names, in its head's order, where its head is kept and they are
    your classes in some order (for `put_head_in_data_order`); None otherwise.

    A config whose id2label is null names no classes; PVT's still counts them, in a num_labels of its own."""
    if not any("ForImageClassification" in name for name in (config.architectures or [])):
        return None  # a backbone checkpoint (ViTModel, ...): its head is new anyway
    count = config.num_labels
    if count != len(label_names):
        if not ignore_mismatched_sizes:
            raise UserError(
                f"'{path}' has a classifier head for {count} classes, not the {len(label_names)} "
                "in your data; pass --ignore_mismatched_sizes to replace the head"
            )
        return None
    if config.id2label is None:
        logging.getLogger("imgft").warning(
            f"'{path}' has a classifier head for {count} classes without names (its id2label is null); your "
            f"classes are {_listed(label_names)}: the head is kept and its classes are given your names in that order"
        )
        return None
    theirs = [config.id2label.get(i) for i in range(count)]  # None where an id has no name
    if set(theirs) == set(label_names):
        return theirs
    logging.getLogger("imgft").warning(
        f"'{path}' has a classifier head for {count} classes named {_listed(theirs)}; your classes are "
        f"{_listed(label_names)}: the head is kept and its classes are given your names in that order"
    )
    return None


def put_head_in_data_order(model, checkpoint_names, label_names, input_size, path):
    """Reorder the rows of the head's output layers (weights and biases) from the checkpoint's class order to your
    data's, so that each class keeps the row it was trained with, as `evaluate` matches classes by name.

    The output layers are those with one weight row per class, outside the backbone where the model has some
    there (else anywhere: timm's and Perceiver's heads sit inside theirs). A forward pass checks the result: the
    logits of a random batch must be the old ones with their columns reordered. Where they are not (a layer
    found that is no output layer), the head is put back, kept by position, and the log says so."""
    order = [checkpoint_names.index(name) for name in label_names]  # each of your classes' row in the checkpoint
    probe = torch.randn((2, 3, *input_size), generator=torch.Generator().manual_seed(0))  # leaves torch's RNG alone
    before = _probe_logits(model, probe)
    rows = [param for layer in _output_layers(model, len(order)) for param in _class_rows(layer, len(order))]
    originals = [param.detach().clone() for param in rows]
    with torch.no_grad():
        for param, original in zip(rows, originals, strict=True):
            param.copy_(original[order])
    after = _probe_logits(model, probe)
    if rows and before is not None and after is not None and torch.allclose(after, before[:, order], 1e-4, 1e-5):
        log_once(
            logging.INFO,
            f"'{path}' has a classifier head for your {len(order)} classes in another order, "
            f"{_listed(checkpoint_names)}: its rows are reordered to yours, {_listed(label_names)}, so that each "
            "class keeps its trained row",
        )
        return
    with torch.no_grad():
        for param, original in zip(rows, originals, strict=True):
            param.copy_(original)
    logging.getLogger("imgft").warning(
        f"'{path}' has a classifier head for your {len(order)} classes in another order, "
        f"{_listed(checkpoint_names)}, but its output rows cannot be found in {type(model).__name__}: the head is "
        f"kept and its classes are given your names in that order, {_listed(label_names)}"
    )


def _probe_logits(model, pixel_values):
    """The model's logits for `pixel_values`, or None where it cannot run on them (`check_model_runs` then says
    why)."""
    try:
        return _forward_blank(model, None, labels=False, pixel_values=pixel_values).logits
    except FORWARD_ERRORS:
        return None


def _output_layers(model, num_classes):
    """The modules whose own weight has one row (output) per class, outside the backbone where there are some."""
    layers = [(name, module) for name, module in model.named_modules() if _class_rows(module, num_classes)]
    try:
        head = head_parameter_names(model)
    except UserError:  # no base model apart from the head (CLIP, HGNet-V2): look everywhere
        head = set()
    in_head = [module for name, module in layers if f"{name}.weight" in head]
    return in_head or [module for _, module in layers]


def _class_rows(module, num_classes):
    """The module's own weight, and bias, where its weight is a matrix (or kernel) of `num_classes` rows; else []."""
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() < 2 or weight.shape[0] != num_classes:
        return []
    bias = module._parameters.get("bias")
    return [weight] + ([bias] if bias is not None and bias.shape == (num_classes,) else [])


def _listed(names, limit=10):
    shown = ", ".join(str(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def set_labels(config, label_names):
    """Write the class names, and the class count, into every field the architecture reads them from: most derive
    num_labels from id2label, but some (PVT) keep a num_labels field of their own, and timm's config saves the
    label_names and num_classes it was loaded with."""
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    if config.num_labels != len(label_names):
        config.num_labels = len(label_names)
    if hasattr(config, "label_names"):
        config.label_names = list(label_names)
    if hasattr(config, "num_classes"):
        config.num_classes = len(label_names)


def _configs(config):
    """The config and its vision sub-config (CLIP, SigLIP, ...), where the image size lives."""
    return [part for part in (config, getattr(config, "vision_config", None)) if part is not None]


def set_input_size(config, size):
    """Write the (height, width) input size into every `image_size` field of the config, as the int or the pair it
    holds."""
    height, width = size
    for part in _configs(config):
        current = getattr(part, "image_size", None)
        if isinstance(current, (list, tuple)):
            part.image_size = [height, width]
        elif current is not None:
            if height != width:
                raise UserError(f"{config.model_type} takes square images; its processor gives {height}x{width} px")
            part.image_size = height


def at_input_size(model, size):
    """`model` ready for (height, width) `size` inputs: as it is when its config says that size or it runs at it,
    else rebuilt for that size with its absolute position tables resampled bicubically to the new patch grid. Done
    once here, rather than by `interpolate_pos_encoding` at each forward, which the training loop would have to pass
    and pipeline() never does: the saved model takes the new size as it is. UserError when neither works."""
    config = model.config
    height, width = size
    sizes = [getattr(part, "image_size", None) for part in _configs(config)]
    if all(current in (None, height, [height, width], (height, width)) for current in sizes):
        return model
    try:
        _forward_blank(model, size, labels=False)
        return model  # size-agnostic (a CNN): its config's image_size is not used
    except FORWARD_ERRORS:
        pass  # fixed-size position tables: resample them below
    new_config = copy.deepcopy(config)
    set_input_size(new_config, size)
    resized = type(model)._from_config(new_config)
    old_state, new_state = model.state_dict(), resized.state_dict()
    for key, new in new_state.items():
        old = old_state[key]
        if old.shape == new.shape:
            new_state[key] = old
        elif not old.is_floating_point():
            continue  # an index buffer (relative positions), which the new model computed for its size
        else:
            table = _resampled(old, new.shape)
            if table is None:
                raise UserError(
                    f"--image_size {height}: {config.model_type}'s {key} {tuple(old.shape)} cannot be resampled to "
                    f"{tuple(new.shape)}; leave --image_size out to train at the checkpoint's size"
                )
            new_state[key] = table
    resized.load_state_dict(new_state)
    resized.train(model.training)
    return resized


def _resampled(table, shape):
    """A position table resampled to `shape`: along the one axis whose length differs, a few leading tokens (class,
    distillation, ...) kept, then a square grid resized bicubically; None when the lengths are not of that form."""
    differing = [axis for axis, (a, b) in enumerate(zip(table.shape, shape, strict=True)) if a != b]
    if len(table.shape) != len(shape) or len(differing) != 1:
        return None
    axis = differing[0]
    old_length = table.shape[axis]
    new_length = shape[axis]
    for extra in range(9):
        old_side = math.isqrt(old_length - extra)
        new_side = math.isqrt(max(new_length - extra, 0))
        if old_side > 0 and new_side > 0 and old_side**2 == old_length - extra and new_side**2 == new_length - extra:
            break
    else:
        return None
    tokens = table.movedim(axis, 0)
    rest = tokens.shape[1:]
    flat = tokens.reshape(old_length, -1).float()
    grid = flat[extra:].reshape(old_side, old_side, -1).permute(2, 0, 1).unsqueeze(0)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(new_side * new_side, -1)
    resampled = torch.cat([flat[:extra], grid]).reshape(new_length, *rest).to(table.dtype)
    return resampled.movedim(0, axis).contiguous()


def _forward_blank(model, size, labels=True, pixel_values=None):
    """One forward pass of a mid-grey batch of one (or `pixel_values`), in eval mode and without gradients."""
    parameter = next(model.parameters())
    if pixel_values is None:
        pixel_values = torch.zeros((1, 3, *size))
    inputs = {"pixel_values": pixel_values.to(parameter.device, parameter.dtype)}
    if labels:
        inputs["labels"] = torch.zeros(1, dtype=torch.long, device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        model.train(was_training)


def check_model_runs(model, image_processor, label_names):
    """Run one blank image, made as training and evaluation make them, through the model: it must run and give one
    logit per class, then with a label it must give a loss. Refuses in one line what would fail in the first step."""
    plan = preprocessing.plan_for(image_processor)
    size = preprocessing.input_size(image_processor, plan)
    blank = Image.new("RGB", (size[1], size[0]), (128, 128, 128))
    if plan.kind == "processor":
        array = preprocessing.run_processor([blank], image_processor)[0]
    else:
        array = preprocessing.geometry(blank, image_processor, plan)
    pixel_values = preprocessing.model_input(array, plan).unsqueeze(0)
    name = f"{model.config.model_type} ({type(model).__name__})"
    source = f"the {size[0]}x{size[1]} images from {type(image_processor).__name__}"
    logits = getattr(_checked_forward(model, pixel_values, False, f"{name} cannot run on {source}"), "logits", None)
    if logits is None:
        raise UserError(f"{name} cannot be fine-tuned as an image classifier by imgft: it gives no logits")
    if logits.shape[-1] != len(label_names):
        raise UserError(
            f"{name}'s classifier head gives {logits.shape[-1]} outputs for your {len(label_names)} classes"
        )
    if getattr(_checked_forward(model, pixel_values, True, f"{name} cannot compute a loss"), "loss", None) is None:
        raise UserError(f"{name} cannot be fine-tuned as an image classifier by imgft: it gives no loss for labels")


def _checked_forward(model, pixel_values, labels, failure):
    try:
        return _forward_blank(model, None, labels=labels, pixel_values=pixel_values)
    except FORWARD_ERRORS as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{failure}: {reason}") from None


def load_saved_classifier(model_args):
    """A trained image classifier and its processor, as saved by imgft or any transformers checkpoint; with
    --image_size (evaluate's), both at that size, as training makes a checkpoint (`at_input_size`)."""
    path = model_args.model_name_or_path
    check_model_folder(path)
    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    try:
        model = AutoModelForImageClassification.from_pretrained(path, **hub)
    except OSError as err:
        raise _load_error("model", path, err) from None
    if model.config.id2label is None:  # a PvtConfig saved by transformers 5.25 from one built that way
        raise UserError(
            f"cannot use model '{path}': its config.json names no classes (id2label is null), so its outputs have "
            "no names; fine-tune it on your classes first (training swaps its head with --ignore_mismatched_sizes)"
        )
    image_processor = _load_processor(model_args.image_processor_name or path, hub)
    if model_args.image_size:
        image_processor = preprocessing.with_image_size(image_processor, model_args.image_size)
        size = preprocessing.input_size(image_processor, preprocessing.plan_for(image_processor))
        model = at_input_size(model, size)
    return model, image_processor


def _load_processor(name, hub):
    try:
        return AutoImageProcessor.from_pretrained(name, **hub)
    except OSError as err:
        raise _load_error("the image processor of", name, err) from None
