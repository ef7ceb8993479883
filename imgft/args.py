"""Step 1: the run's arguments, as three dataclasses parsed from an optional YAML file plus the command line.

Flag names and meanings follow transformers' `run_image_classification_no_trainer.py`, so an existing
command runs unchanged. Defaults are the digits demo's values: `python train_loop.py` with no flags is the demo.
Parsed arguments are never changed afterwards; numbers derived from them get their own names.
Also here: what each program that reads these arguments lists in its --help (`Command`), the absolute
paths saved beside a run's config so that it reruns from any directory (`absolute_paths`), and the flags
reference, docs/flags.md (`flags_markdown`).
"""

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml
from transformers import HfArgumentParser

from imgft.errors import UserError

# The demo's small ResNet (1.2 M parameters), built from this config when no checkpoint is given.
DEMO_CONFIG_OVERRIDES = "embedding_size=32,hidden_sizes=[32,64,128,256],depths=[1,1,1,1],layer_type=basic"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SECRET_KEYS = ("hub_token",)
# Fields that always name a local path, and those that name either a Hub id or a local path.
PATH_FIELDS = ("output_dir", "train_dir", "validation_dir", "cache_dir", "resume_from_checkpoint")
HUB_OR_PATH_FIELDS = ("dataset_name", "model_name_or_path", "image_processor_name")
RESUME_LATEST = "latest"
# A saved run config's map from each relative path, as typed, to the absolute path it meant (outputs.py writes it).
ABSOLUTE_PATHS_KEY = "absolute_paths"
# What PyYAML (YAML 1.1) reads as true and false when unquoted.
YAML_BOOLEAN_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


@dataclass(frozen=True)
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset on the Hub (e.g. beans) or a local dataset folder, read with load_dataset."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "An imagefolder of training images, one subfolder per class. With no dataset given, "
            "the digits demo is written under $IMGFT_HOME (default ~/.cache/imgft) and used."
        },
    )
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder of validation images."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Which split of --dataset_name to evaluate on (e.g. test). Default: validation, valid or val, "
            "else test, else a seeded part of train (--train_val_split)."
        },
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train held out (seeded) when the dataset has no validation split."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only this many training examples (a seeded random subset), for debugging."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep only this many validation examples (a seeded random subset; of a stream, its first "
            "ones), for debugging."
        },
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the images. Default: the dataset's Image column."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the labels. Default: the ClassLabel column, else 'label'."},
    )
    random_flip: bool = field(
        default=False,
        metadata={"help": "Flip training images left-right at random (off: digits must not be flipped)."},
    )
    crop_scale_min: float = field(
        default=0.6,
        metadata={"help": "Smallest area fraction RandomResizedCrop keeps of a training image (torchvision: 0.08)."},
    )
    auto_augment: Literal["randaugment", "trivialaugment", "autoaugment", "augmix"] | None = field(
        default=None,
        metadata={
            "help": "An automatic augmentation policy for each training crop, seeded per image: "
            "torchvision v2 RandAugment, TrivialAugmentWide, AutoAugment (ImageNet policy) or AugMix. "
            "Default: none."
        },
    )
    randaugment_num_ops: int = field(
        default=2,
        metadata={"help": "With --auto_augment randaugment: operations per image (torchvision num_ops)."},
    )
    randaugment_magnitude: int = field(
        default=9,
        metadata={"help": "With --auto_augment randaugment: their strength, 0-30 (torchvision magnitude)."},
    )
    random_erasing: float = field(
        default=0.0,
        metadata={
            "help": "Probability of erasing a random rectangle of each training crop (torchvision "
            "RandomErasing), after --auto_augment, filled with the processor's mean colour: zero after "
            "normalisation, as torchvision's default."
        },
    )
    tta: Literal["flip", "zoom", "flip_zoom"] | None = field(
        default=None,
        metadata={
            "help": "Test-time augmentation for `python -m imgft evaluate` and `predict`, logits averaged "
            "over views: flip adds the mirrored evaluation crop; zoom the image's central 7/8 (of width and "
            "height) through the same resize and crop; flip_zoom both and the mirrored zoom (4 views). "
            "Training ignores it."
        },
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes per device. Default: none when the model trains on the CPU (the "
            "cores are busy with it), else min(8, CPU cores per process - 1)."
        },
    )
    resize_once: bool = field(
        default=True,
        metadata={
            "help": "Decode each training image once and store it shrunk (cached by datasets), instead of "
            "decoding the full-size file every epoch. Evaluation images are only checked, then read at full "
            "size as the model's processor reads them. --resize_once false gives the upstream pipeline exactly."
        },
    )
    stored_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Shortest edge, in pixels, --resize_once stores training images at (uncompressed, 3 bytes a "
            "pixel). Default: what the transforms need."
        },
    )
    strict_data: bool = field(
        default=False,
        metadata={"help": "Refuse the data if any image is unreadable, listing them all (default: skip and warn)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read --dataset_name (a Hub dataset, or a folder of parquet or webdataset .tar "
            "shards) as a stream, never written to disk. Needs --max_train_steps; an epoch is one pass "
            "over the stream."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "With --streaming: examples held in the shuffle buffer each DataLoader worker draws "
            "from. 0: no buffer, and a resume is exact; the shards are then read in their stored order in "
            "the first pass, and in an order drawn from the pass's number (not --seed) in each later one."
        },
    )
    label_names: str | None = field(
        default=None,
        metadata={
            "help": "With --streaming: the class names, comma-separated (label i is the i-th), when the "
            "label column is not a ClassLabel. Text labels are matched by name."
        },
    )


@dataclass(frozen=True)
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune: a Hub id (google/vit-base-patch16-224-in21k) or a local folder. "
            "Unset: train --model_type from scratch."
        },
    )
    model_type: str = field(
        default="resnet",
        metadata={"help": "Architecture to build when training from scratch."},
    )
    config_overrides: str | None = field(
        default=DEMO_CONFIG_OVERRIDES,
        metadata={
            "help": "Config changes as key=value pairs separated by commas; values may be lists. "
            "The default builds the demo's small ResNet and applies only from scratch; "
            "set it to change a pretrained config too (e.g. hidden_dropout_prob=0.1)."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Load the image processor from here instead of --model_name_or_path."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Square input size in pixels. Default: the image processor's; 32 from scratch."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a checkpoint's classifier head whose size differs from the labels."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run model code from the Hub repository. Only for repositories you trust."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "Branch, tag or commit of the Hub checkpoint."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where downloaded models and datasets are kept."},
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth: the rate at which the deepest residual block is skipped in training, "
            "set on the config's drop_path_rate (or its own name for it). Default: the config's own value. "
            "An architecture without one is refused."
        },
    )
    use_peft: Literal["lora", "loha", "ia3"] | None = field(
        default=None,
        metadata={
            "help": "Train an adapter (🤗 PEFT) beside the frozen weights, and the classifier head, "
            "instead of all weights: lora, loha or ia3. output_dir gets the model with the adapter "
            "merged in, output_dir/adapter the adapter alone."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "Rank of the LoRA/LoHa update (--use_peft)."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA/LoHa scaling: the update is multiplied by lora_alpha / lora_r."}
    )
    lora_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the LoRA update's input (LoHa: rank dropout)."}
    )
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Names of the layers the adapter goes into, separated by commas (e.g. q_proj,v_proj), or "
            "all-linear. Default by architecture: attention's query and value projections (ViT, DeiT, BEiT, "
            "DINOv2, Swin...), pwconv1,pwconv2 (ConvNeXt), convolution (ResNet)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Keep only each layer's input and recompute its activations in the backward pass: "
            "much less memory for a slower step. For models that support it (ViT, Swin, DINOv2...; "
            "not ResNet or ConvNeXt)."
        },
    )


@dataclass(frozen=True)
class TrainArguments:
    output_dir: str = field(
        default="output",
        metadata={"help": "Where the model, results and checkpoints go."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds an earlier run."},
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate, after warmup."})
    weight_decay: float = field(
        default=0.05,
        metadata={"help": "AdamW weight decay (never on biases and norms)."},
    )
    num_train_epochs: int = field(default=5, metadata={"help": "Passes over the training data."})
    max_train_steps: int | None = field(
        default=None,
        metadata={"help": "Total optimizer steps; overrides --num_train_epochs."},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Batches whose gradients are summed before each optimizer step."},
    )
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
    ] = field(default="linear", metadata={"help": "Learning-rate schedule after warmup."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warmup."})
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay (BEiT, timm), e.g. 0.75: layer i of L gets "
            "learning_rate * layer_decay ** (L + 1 - i); embeddings are layer 0, the final norm and head "
            "L + 1. For encoders whose blocks match the config's depths or num_hidden_layers (ViT, DeiT, "
            "BEiT, Swin, ConvNeXt, ResNet, ...); any other is refused."
        },
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the classifier head. Default: --learning_rate."},
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": "Train only the classifier head (a linear probe); BatchNorm statistics still adapt. "
            "See --unfreeze_after_epochs."
        },
    )
    unfreeze_after_epochs: int | None = field(
        default=None,
        metadata={
            "help": "Train only the head for this many epochs, then the whole model (fastai's fine_tune), "
            "under one learning-rate schedule. Implies --freeze_backbone until then."
        },
    )
    on_nonfinite_loss: Literal["stop", "skip"] = field(
        default="stop",
        metadata={
            "help": "A NaN/inf loss never updates the weights (its step is skipped on the device). stop: end the run "
            "at the next log step or checkpoint, naming the step(s) and the last checkpoint; skip: log and go on."
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clip the gradient norm to this; 0 turns it off."},
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={"help": "Overrides the accelerate config. Default: the accelerate config, else no."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Weights and batches in channels_last memory: faster convolutions on GPUs with bf16/fp16."},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seeds weights, data order, augmentation and the split."},
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (and at the end) instead of every epoch."}
    )
    metric_for_best_model: str = field(
        default="accuracy", metadata={"help": "Evaluation metric that decides the best model, e.g. accuracy, loss."}
    )
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a larger --metric_for_best_model is better. Default: all but loss."}
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "Save the best evaluation's weights as the final model (kept in output_dir/best_model)."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations in a row without a better metric."}
    )
    logging_steps: int = field(
        default=10,
        metadata={"help": "Log the training loss every this many optimizer steps."},
    )
    checkpointing_steps: str | None = field(
        default=None,
        metadata={"help": "Save a checkpoint every N optimizer steps, or 'epoch' after each epoch."},
    )
    checkpoints_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many checkpoints, deleting the oldest."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to continue from, or 'latest' for the newest in output_dir."},
    )
    with_tracking: bool = field(default=False, metadata={"help": "Log metrics to the trackers in --report_to."})
    report_to: str = field(
        default="all",
        metadata={"help": "Trackers: tensorboard, wandb, comet_ml, ... or 'all' installed ones."},
    )
    label_smoothing_factor: float = field(
        default=0.0,
        metadata={"help": "Label smoothing eps: targets are (1 - eps) one-hot + eps / classes (0: off)."},
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={"help": "Mixup: blend each batch with its reverse by a Beta(alpha, alpha) share (0: off)."},
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={"help": "CutMix: paste a box of the reversed batch, of Beta(alpha, alpha) area (0: off)."},
    )
    mixup_prob: float = field(
        default=1.0,
        metadata={"help": "Share of training batches mixed, with --mixup_alpha or --cutmix_alpha."},
    )
    mixup_switch_prob: float = field(
        default=0.5,
        metadata={"help": "With --mixup_alpha and --cutmix_alpha: the share of mixed batches in CutMix."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay, e.g. 0.999 (0: off), "
            "warmed up as min(decay, 1 - step^(-2/3)). Evaluated beside the weights (eval_ema_*), and "
            "saved instead of them when it scores better on --metric_for_best_model."
        },
    )
    balanced_sampling: bool = field(
        default=False,
        metadata={"help": "Draw training images with replacement, all classes equally often (imbalance)."},
    )
    class_weighted_loss: bool = field(
        default=False,
        metadata={
            "help": "Weigh each class's loss by its rarity in train: images / (classes x the class's "
            "images), so all classes weigh the same in total (imbalanced data)."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (inductor). Default: the accelerate config."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository. Default: output_dir's name."})
    hub_token: str | None = field(
        default=None,
        metadata={"help": "Hub token. Default: the HF_TOKEN environment or a saved login."},
    )


ARG_CLASSES = (DataArguments, ModelArguments, TrainArguments)


@dataclass(frozen=True)
class Command:
    """How a program that reads these arguments presents them in --help."""

    prog: str
    description: str
    # The flags --help lists (None: all), those the program reads. It accepts the others too, so that a
    # training config file or command line serves it unchanged.
    shown_flags: tuple[str, ...] | None = None


CONFIG_NOTE = (
    "A YAML or JSON file of 'flag_name: value' pairs may come first (one in configs/, or a run's "
    "output_dir/imgft_config.yaml); flags after it override its values."
)
TRAIN_COMMAND = Command("train_loop.py", "Fine-tune a 🤗 Transformers image classifier. " + CONFIG_NOTE)
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "eval_split")
DATA_FLAGS += ("train_val_split", "image_column_name", "label_column_name", "num_workers", "strict_data")
EVALUATE_COMMAND = Command(
    "python -m imgft evaluate",
    "Evaluate a saved model on the validation split, read as training reads it; with --output_dir, also write "
    f"eval_results.json and pictures of the errors there. {CONFIG_NOTE} Training flags not listed are ignored.",
    DATA_FLAGS
    + ("resize_once", "stored_image_size", "max_eval_samples", "tta")
    + ("model_name_or_path", "image_processor_name", "image_size", "cache_dir", "model_revision", "trust_remote_code")
    + ("per_device_eval_batch_size", "mixed_precision", "seed", "output_dir", "overwrite_output_dir"),
)
CHECK_DATA_COMMAND = Command(
    "python -m imgft check-data",
    "Report on the data as training would see it: images per class, image sizes, unreadable files, duplicates "
    f"across the splits; exit 2 where training would refuse it. {CONFIG_NOTE} Training flags not listed are ignored.",
    DATA_FLAGS + ("cache_dir", "seed"),
)


def make_parser(command=TRAIN_COMMAND):
    # exit_on_error=False: a bad value raises ArgumentError, which we turn into one clear line.
    parser = HfArgumentParser(
        ARG_CLASSES,
        prog=command.prog,
        usage=f"{command.prog} [CONFIG.yaml] [--flag value ...]",
        description=command.description,
        allow_abbrev=False,
        exit_on_error=False,
    )
    if command.shown_flags is not None:
        for action in parser._actions:  # argparse has no public way to hide a flag once added
            if action.dest not in command.shown_flags and action.dest != "help":
                action.help = argparse.SUPPRESS
    return parser


def help_text(command):
    return make_parser(command).format_help()


def field_defaults():
    """{flag name: default} for every argument (the hub token left out, as in `to_dict`)."""
    return to_dict(*(cls() for cls in ARG_CLASSES))


def field_names():
    return [f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls)]


def _unknown_key_message(key, source, prefix=""):
    key = str(key)  # YAML keys can be numbers, or booleans such as `on:`
    close = difflib.get_close_matches(key, field_names(), n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else "; see --help for the list"
    return f"unknown {source} '{prefix}{key}'{hint}"


def _config_to_tokens(path):
    """Turn a YAML/JSON config into command-line tokens, so argparse checks its types exactly like flags."""
    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file) or {}
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold 'flag_name: value' pairs")
    recorded_paths = values.get(ABSOLUTE_PATHS_KEY) or {}
    if not isinstance(recorded_paths, dict):
        raise UserError(f"'{ABSOLUTE_PATHS_KEY}' in {path} must map each path as typed to its absolute path")
    tokens = []
    for key, value in values.items():
        if key == ABSOLUTE_PATHS_KEY:
            continue
        if key not in field_names():
            raise UserError(_unknown_key_message(key, f"key in {path}:"))
        if value is None:
            continue  # `key: null` keeps the default
        value = _as_flag_value(key, value, recorded_paths, path)
        # PyYAML reads 5e-5 as a string and 5.0e-5 as a float; argparse's float() takes both.
        # --key=value, so that a value such as -1e-3 is not mistaken for a flag.
        if isinstance(value, list):
            tokens += [f"--{key}", *(str(v) for v in value)]
        else:
            tokens.append(f"--{key}={value}")
    return tokens


def _as_flag_value(key, value, recorded_paths, path):
    """A config file's value as it would be typed after --key: what YAML's reading or the file's layout changed."""
    if isinstance(value, bool) and _literal_choices(key):
        return _choice_meant(key, value, path)
    if key == "config_overrides" and isinstance(value, (dict, list)):
        return config_overrides_text(value)
    if _is_path_value(key, value) and isinstance(recorded_paths.get(value), str):
        # A relative path means the folder it meant when the file was written. Kept as typed where that is the
        # same folder from here, so that rerunning from there gives the same config (a resume compares it).
        absolute = recorded_paths[value]
        return value if os.path.abspath(value) == absolute else absolute
    return value


def _is_path_value(key, value):
    if key == "resume_from_checkpoint" and value == RESUME_LATEST:
        return False
    return key in PATH_FIELDS + HUB_OR_PATH_FIELDS and isinstance(value, str)


def _literal_choices(name):
    """The choices of a `Literal[...]` field (also of `Literal[...] | None`); () for other fields."""
    annotation = next(f.type for cls in ARG_CLASSES for f in dataclasses.fields(cls) if f.name == name)
    for option in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(option) is Literal:
            return typing.get_args(option)
    return ()


def _choice_meant(key, value, path):
    """The choice that an unquoted `no`, `off`, `yes`... stood for: YAML 1.1 reads those words as booleans."""
    choices = _literal_choices(key)
    words = YAML_BOOLEAN_WORDS[value]
    meant = [choice for choice in choices if choice.lower() in words]
    if len(meant) == 1:
        return meant[0]
    raise UserError(
        f"{key} in {path}: YAML reads an unquoted {'/'.join(words)} as {str(value).lower()}, which names no single "
        f'choice of --{key} ({", ".join(choices)}); quote the value, e.g. {key}: "{choices[0]}"'
    )


def config_overrides_text(overrides):
    """config_overrides written in a config file as a mapping, or a list of `key=value` strings and mappings,
    as the flag's text `key=value,key=[1,2]`, which `model.parse_config_overrides` reads back identically."""
    items = overrides if isinstance(overrides, list) else [overrides]
    pairs = []
    for item in items:
        if isinstance(item, dict):
            pairs += [_override_pair(key, value) for key, value in item.items()]
        elif isinstance(item, str):
            pairs.append(item)
        else:
            raise UserError(f"config_overrides: {item!r} is neither a key=value string nor a mapping")
    return ",".join(pairs)


def _override_pair(key, value):
    """`key=value` that parse_config_overrides reads back as {key: value}: spelled plainly (true, null, basic,
    [16,32]) where that reads back, else as a Python literal ('1' for the string "1")."""
    from imgft.model import parse_config_overrides  # imgft.model imports this module

    for text in (_plain_text(value), repr(value)):
        pair = f"{key}={text}"
        try:
            if parse_config_overrides(pair) == {str(key): value}:
                return pair
        except UserError:
            pass  # e.g. a string holding a comma splits into a piece that is not key=value
    raise UserError(f"config_overrides: {key}: {value!r} cannot be written as key=value text (a comma in a string?)")


def _plain_text(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(repr(item) for item in value) + "]"
    return str(value)


def _check_flags(tokens):
    """Refuse unknown flags by name; return the tokens with `--flag -1e-3` joined as `--flag=-1e-3`."""
    # HfArgumentParser adds --no_X only for booleans that default to True.
    negatable = {f"no_{f.name}" for cls in ARG_CLASSES for f in dataclasses.fields(cls) if f.default is True}
    known = set(field_names()) | negatable | {"help"}
    joined = []
    for token in tokens:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name not in known:
                raise UserError(_unknown_key_message(name, "flag", prefix="--"))
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _is_negative_number(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _is_negative_number(token):
    try:
        return token.startswith("-") and float(token) < 0
    except ValueError:
        return False


def _parse(parser, tokens, source):
    try:
        namespace, extras = parser.parse_known_args(tokens)
    except argparse.ArgumentError as err:
        raise UserError(f"{err} ({source})") from None
    if extras:
        raise UserError(f"unexpected argument '{extras[0]}' {source}: flags are --name value, a config file goes first")
    return namespace


def parse_args(argv):
    """Parse `[CONFIG.yaml] [--flag value ...]` (default: the command line); flags override the file.
    Returns (data, model, train) args."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_tokens = []
    config_path = None
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_path = argv.pop(0)
        config_tokens = _config_to_tokens(config_path)
    argv = _check_flags(argv)
    parser = make_parser()
    if config_path:
        _parse(parser, config_tokens, f"in {config_path}")
    # argparse keeps the last value given, so command-line flags after the file's win.
    namespace = _parse(parser, config_tokens + argv, "on the command line")
    parsed = tuple(
        cls(**{f.name: _expand_home(f.name, getattr(namespace, f.name)) for f in dataclasses.fields(cls)})
        for cls in ARG_CLASSES
    )
    check_args(*parsed)
    return parsed


def _expand_home(name, value):
    # A shell expands `~` in `--output_dir ~/out` but not in `--output_dir=~/out` or a config file; a Hub id
    # never starts with `~`.
    if _is_path_value(name, value) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def check_args(data_args, model_args, train_args):
    """Refuse values that cannot work, before anything is loaded or written."""
    positive = {
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "per_device_eval_batch_size": train_args.per_device_eval_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "logging_steps": train_args.logging_steps,
    }
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    epochs = train_args.num_train_epochs
    if train_args.max_train_steps is None and epochs < 1:
        raise UserError(f"--num_train_epochs must be at least 1 (got {epochs}), or 0 with --max_train_steps")
    if epochs < 0:  # with --max_train_steps, which decides how long training lasts
        raise UserError(f"--num_train_epochs must be at least 0 (got {epochs})")
    for name, value in {
        "max_train_steps": train_args.max_train_steps,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "checkpoints_total_limit": train_args.checkpoints_total_limit,
        "image_size": model_args.image_size,
        "stored_image_size": data_args.stored_image_size,
        "eval_steps": train_args.eval_steps,
        "early_stopping_patience": train_args.early_stopping_patience,
        "unfreeze_after_epochs": train_args.unfreeze_after_epochs,
        "lora_r": model_args.lora_r,
    }.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    for name, value in {
        "learning_rate": train_args.learning_rate,
        "weight_decay": train_args.weight_decay,
        "num_warmup_steps": train_args.num_warmup_steps,
        "max_grad_norm": train_args.max_grad_norm,
        "num_workers": data_args.num_workers or 0,
        "mixup_alpha": train_args.mixup_alpha,
        "cutmix_alpha": train_args.cutmix_alpha,
    }.items():
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} must be a non-negative number (got {value})")
    if train_args.learning_rate == 0:
        raise UserError("--learning_rate must be greater than 0")
    if not 0 <= train_args.seed < 2**32:  # numpy's and torch's seeding (set_seed) take no other
        raise UserError(f"--seed must lie in [0, 2**32 - 1] (got {train_args.seed})")
    _check_recipes(model_args, train_args)
    _check_metric_for_best_model(train_args)
    if not 0 < data_args.train_val_split < 1:
        raise UserError(f"--train_val_split must lie strictly between 0 and 1 (got {data_args.train_val_split})")
    if model_args.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be greater than 0 (got {model_args.lora_alpha})")
    if not 0 <= model_args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must lie in [0, 1) (got {model_args.lora_dropout})")
    if not 0 < data_args.crop_scale_min <= 1:
        raise UserError(f"--crop_scale_min must lie in (0, 1] (got {data_args.crop_scale_min})")
    if not 0 <= data_args.random_erasing <= 1:
        raise UserError(f"--random_erasing must lie in [0, 1] (got {data_args.random_erasing})")
    if data_args.randaugment_num_ops < 1:
        raise UserError(f"--randaugment_num_ops must be at least 1 (got {data_args.randaugment_num_ops})")
    magnitude = data_args.randaugment_magnitude
    if not 0 <= magnitude <= 30:
        raise UserError(f"--randaugment_magnitude must lie in [0, 30] (got {magnitude})")
    steps = train_args.checkpointing_steps
    if steps is not None and steps != "epoch" and not (_is_whole_number(steps) and int(steps) > 0):
        raise UserError(f"--checkpointing_steps must be a positive whole number or 'epoch' (got '{steps}')")
    if data_args.dataset_name and (data_args.train_dir or data_args.validation_dir):
        raise UserError("give either --dataset_name or --train_dir/--validation_dir, not both")
    if data_args.validation_dir and not data_args.train_dir:
        raise UserError("--validation_dir needs --train_dir")
    check_streaming_args(data_args, train_args)


def check_streaming_args(data_args, train_args):
    """Refuse what a stream cannot do: it has no length, and it is not read before training starts."""
    if data_args.shuffle_buffer_size < 0:
        raise UserError(f"--shuffle_buffer_size must be at least 0 (got {data_args.shuffle_buffer_size})")
    if not data_args.streaming:
        if data_args.label_names:
            raise UserError("--label_names is read with --streaming only (other datasets name their classes)")
        return
    if train_args.max_train_steps is None:
        raise UserError("--streaming needs --max_train_steps: a stream has no length to count epochs in")
    if not data_args.dataset_name:
        raise UserError("--streaming reads --dataset_name: a Hub dataset, or a folder of parquet/.tar shards")
    if data_args.max_train_samples is not None:
        raise UserError("--max_train_samples cannot cut a stream: --max_train_steps sets how much is read")
    if data_args.strict_data:
        raise UserError("--strict_data checks every image before training, which a stream is not: drop it")
    for name in ("balanced_sampling", "class_weighted_loss"):
        if getattr(train_args, name):
            raise UserError(f"--{name} counts each class's training images, which a stream cannot: drop it")
    if train_args.checkpointing_steps == "epoch" and train_args.gradient_accumulation_steps > 1:
        raise UserError(
            "--streaming with --gradient_accumulation_steps: a pass over a stream can end inside an "
            "accumulation window, so checkpoint every N steps (--checkpointing_steps N), not every epoch"
        )
    names = data_args.label_names
    if names is not None and len(label_names_list(names)) < 2:
        raise UserError(f"--label_names needs at least two comma-separated names (got '{names}')")


def label_names_list(text):
    """--label_names as a list: comma-separated, spaces around each name dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_recipes(model_args, train_args):
    """The fine-tuning recipes' ranges: layer decay, the head's learning rate, unfreezing, stochastic depth,
    label smoothing, EMA and mixing.
    Written as `not inside` so that NaN, for which every comparison is false, is refused too."""
    layer_decay = train_args.layer_decay
    head_rate = train_args.head_learning_rate
    drop_rate = model_args.drop_path_rate
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise UserError(f"--layer_decay must lie in (0, 1] (got {layer_decay})")
    if head_rate is not None and not 0 < head_rate < math.inf:
        raise UserError(f"--head_learning_rate must be a positive number (got {head_rate})")
    if drop_rate is not None and not 0 <= drop_rate < 1:
        raise UserError(f"--drop_path_rate must lie in [0, 1) (got {drop_rate})")
    unfreeze = train_args.unfreeze_after_epochs
    epochs = train_args.num_train_epochs
    if model_args.use_peft and (train_args.freeze_backbone or unfreeze is not None):
        raise UserError(
            "--use_peft already freezes the backbone and trains an adapter in it; it cannot go with "
            "--freeze_backbone or --unfreeze_after_epochs"
        )
    sharded = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}") == "true"]
    if model_args.use_peft and sharded:  # merging the adapter needs the whole weights on one process
        raise UserError(f"--use_peft cannot go with {sharded[0]} yet: launch it with DDP (multi_gpu)")
    if unfreeze is not None and train_args.max_train_steps is None and unfreeze >= epochs:
        raise UserError(
            f"--unfreeze_after_epochs {unfreeze} would never unfreeze in {epochs} epochs: "
            "pass fewer, or --freeze_backbone to train only the head"
        )
    for name, value in {
        "label_smoothing_factor": train_args.label_smoothing_factor,
        "ema_decay": train_args.ema_decay,
    }.items():
        if not 0 <= value < 1:
            raise UserError(f"--{name} must lie in [0, 1), 0 for off (got {value})")
    for name in ("mixup_prob", "mixup_switch_prob"):
        value = getattr(train_args, name)
        if not 0 <= value <= 1:
            raise UserError(f"--{name} must lie in [0, 1] (got {value})")


def _check_metric_for_best_model(train_args):
    """A metric that evaluation reports, refused when misspelled before training, not at its first evaluation.
    (top5_accuracy, reported only above five classes, is checked against the data at that evaluation.)"""
    from imgft.metrics import SUMMARY_METRICS  # here: metrics imports torch, which parsing needs not

    names = [*SUMMARY_METRICS, "loss"]
    if train_args.ema_decay > 0:  # the EMA weights' results, eval_ema_*
        names += [f"ema_{name}" for name in names]
    given = train_args.metric_for_best_model
    if given.removeprefix("eval_") not in names:
        raise UserError(f"--metric_for_best_model {given} is not a metric imgft reports ({', '.join(names)})")


def to_dict(*args_objects):
    """All arguments as one flat dict, hub token left out, ready to save as a config that reruns the run."""
    merged = {}
    for obj in args_objects:
        merged.update(dataclasses.asdict(obj))
    return {key: value for key, value in merged.items() if key not in SECRET_KEYS}


def absolute_paths(config):
    """{path as typed: its absolute path} for the relative local paths in `config` (a `to_dict`), saved beside
    it so that the saved config reruns the same run from any directory (`parse_args` reads them back)."""
    recorded = {}
    for key, value in config.items():
        if not _is_path_value(key, value) or os.path.isabs(value):
            continue
        if key in HUB_OR_PATH_FIELDS and not os.path.exists(value):
            continue  # a Hub id
        recorded[value] = os.path.abspath(value)
    return recorded


def _is_whole_number(text):
    return text.isascii() and text.isdecimal()


def checkpoint_interval(train_args):
    """--checkpointing_steps, read once: None (no checkpoints), a number of optimizer steps, or "epoch"."""
    steps = train_args.checkpointing_steps
    if steps is None or steps == "epoch":
        return steps
    return int(steps)


FLAGS_DOC_HEADER = (
    "# Flags\n\n"
    "Every flag of `train_loop.py`, its default and its meaning; a config file's keys are the same names.\n\n"
    "This file is generated from the argument dataclasses: `python -m imgft flags > docs/flags.md` writes it,\n"
    "and `tests/test_docs.py` fails when it and the code differ.\n"
)


def flags_markdown():
    """docs/flags.md: a short header, then every flag's table, generated from the dataclasses so it cannot drift
    from the code."""
    lines = [FLAGS_DOC_HEADER]
    for title, cls in zip(("Data", "Model", "Training"), ARG_CLASSES, strict=True):
        lines += [f"**{title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for item in dataclasses.fields(cls):
            default = "" if item.default is None else f"`{item.default}`"
            help_text = item.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `--{item.name}` | {default} | {help_text} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
