"""Training a big model on small hardware: gradient checkpointing, and adapters through 🤗 PEFT (LoRA, LoHa,
IA3) that train a few new weights beside the frozen ones; and what the final save, and the best model's, make
of an adapter: the adapter itself in <folder>/adapter, and the model with it merged in, plain transformers
weights, in the folder.

peft is imported only when an adapter is asked for: predicting and evaluating never need it.
"""

import copy
import itertools
import logging
import os
import sys
import warnings

import torch

from imgft.errors import UserError
from imgft.outputs import ADAPTER_DIR
from imgft.runtime import log_once

# The layers an adapter goes into when --lora_target_modules is not given: the first group whose names all
# occur among the model's layers. Attention's query and value projections, as peft's image-classification
# guide adapts, where a model has attention; its pointwise or plain convolutions where it has none.
DEFAULT_TARGET_MODULES = (
    ("q_proj", "v_proj"),  # ViT, DeiT, BEiT, DINOv2, Swin, CLIP, SigLIP (as transformers 5 names them)
    ("query", "value"),  # Swinv2, MobileViT, PVTv2, Data2Vec-Vision (and ViT & co before transformers 5)
    ("qkv",),  # Hiera, whose attention projects query, key and value in one layer
    ("pwconv1", "pwconv2"),  # ConvNeXt and ConvNeXt V2: the pointwise layers of each block
    ("convolution",),  # ResNet, RegNet: every convolution
)
ALL_LINEAR = "all-linear"  # every linear layer outside the head, as peft names that choice
ADAPTED_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def prepare_for_training(model, model_args):
    """`model` as --gradient_checkpointing and --use_peft ask: checkpointing turned on, and wrapped in an
    adapter (a peft model whose classifier head stays fully trainable). Unchanged without them."""
    if model_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if model_args.use_peft is None:
        return model
    from peft import get_peft_model

    adapter_config = build_adapter_config(model, model_args)
    with warnings.catch_warnings():
        # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5.2x deprecates: not ours to fix.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        adapted = get_peft_model(model, adapter_config)
    trainable, total = adapted.get_nb_trainable_parameters()
    log_once(
        logging.INFO,
        f"{model_args.use_peft} adapter on {', '.join(sorted(adapter_config.target_modules))}, head "
        f"{', '.join(adapter_config.modules_to_save)} fully trained: {trainable:,} of {total:,} parameters "
        f"trainable ({100 * trainable / total:.2f}%)",
    )
    return adapted


def enable_gradient_checkpointing(model):
    """Keep only each layer's input in the forward pass and recompute the rest in the backward pass.

    Non-reentrant checkpointing: the reentrant kind gives no gradient to a block whose inputs do not require
    one, which is every block of a frozen model with adapters inside.
    """
    if not model.supports_gradient_checkpointing:
        name = type(model).__name__
        raise UserError(f"--gradient_checkpointing: {name} does not support gradient checkpointing")
    # transformers 5.2x renamed it activation checkpointing; the old name still works there, with a warning.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    log_once(logging.INFO, "Gradient checkpointing: layer activations are recomputed in the backward pass")


def build_adapter_config(model, model_args):
    """The peft config that --use_peft and the --lora_* flags describe, for `model`."""
    from peft import IA3Config, LoHaConfig, LoraConfig

    targets = target_modules(model, model_args.lora_target_modules)
    head = head_modules(model)
    if model_args.use_peft == "lora":
        return LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets,
            modules_to_save=head,
        )
    if model_args.use_peft == "loha":
        return LoHaConfig(
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            rank_dropout=model_args.lora_dropout,
            target_modules=targets,
            modules_to_save=head,
        )
    # IA3 scales each target layer's output by a learned vector; no rank, scaling or dropout.
    return IA3Config(target_modules=targets, feedforward_modules=[], modules_to_save=head)


def target_modules(model, requested):
    """The layer names an adapter goes into: `requested` (comma-separated names, or all-linear) checked
    against `model`, else the first group of DEFAULT_TARGET_MODULES that `model` has."""
    head = tuple(head_modules(model))
    full_names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTED_TYPES) and not name.startswith(head)
    ]
    layers = {name.rsplit(".", 1)[-1]: model.get_submodule(name) for name in full_names}  # by their last part
    if requested == ALL_LINEAR:  # resolved here: peft's own all-linear would take the head in too
        return sorted(name for name, layer in layers.items() if isinstance(layer, torch.nn.Linear))
    if requested:
        wanted = [name.strip() for name in requested.split(",") if name.strip()]
        # peft matches a name against the end of each layer's full name: `q_proj` or `attention.q_proj`
        missing = [name for name in wanted if not any(f".{full}".endswith(f".{name}") for full in full_names)]
        if missing:
            raise UserError(
                f"--lora_target_modules: {type(model).__name__} has no layer named {', '.join(missing)}; "
                f"its linear and convolution layers are named {', '.join(sorted(layers))}"
            )
        return wanted
    for group in DEFAULT_TARGET_MODULES:
        if set(group) <= layers.keys():
            return list(group)
    raise UserError(
        f"--use_peft: no default layers to adapt in {type(model).__name__}; pass --lora_target_modules with "
        f"some of {', '.join(sorted(layers))}"
    )


def head_modules(model):
    """The names of the model's top-level modules that hold its output layer (a linear layer with one output
    per class) outside the backbone: the classifier head, which adapters leave fully trainable."""
    backbone = getattr(model, model.base_model_prefix, None)
    heads = [
        name
        for name, child in model.named_children()
        if child is not backbone
        and any(
            isinstance(layer, torch.nn.Linear) and layer.out_features == model.config.num_labels
            for layer in child.modules()
        )
    ]
    if not heads:
        raise UserError(
            f"--use_peft: cannot find the classifier head of {type(model).__name__} (a linear layer with "
            f"{model.config.num_labels} outputs outside its backbone)"
        )
    return heads


def is_adapter_model(model):
    """Whether `model` is wrapped in an adapter (a peft model)."""
    peft = sys.modules.get("peft")  # never imported: no model anywhere has an adapter
    return peft is not None and isinstance(model, peft.PeftModel)


def save_adapter_and_merge(model, output_dir, accelerator):
    """The model to save as the run's result. An adapter model first saves its adapter to output_dir/adapter
    (`PeftModel.from_pretrained(base_model, that_folder)` loads it), then has the adapter merged into its
    weights, in place, and comes back as the plain transformers model, which loads with no peft at all.
    Any other model comes back as it is. Every process must call it."""
    if not is_adapter_model(model):
        return model
    model.save_pretrained(
        os.path.join(output_dir, ADAPTER_DIR),
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    return model.merge_and_unload()


def save_adapter_and_merged_copy(model, folder, accelerator):
    """Save an adapter model as the final save does (`save_adapter_and_merge`), the adapter to folder/adapter and
    the model with it merged in to folder, but leave `model` as it is, its training to go on: the merge is done
    in a copy on the CPU, every weight copied there before the module is, so that the device never holds a
    second model. Every process must call it; the main process copies and writes."""
    model.save_pretrained(
        os.path.join(folder, ADAPTER_DIR),
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    if not accelerator.is_main_process:
        return
    on_cpu = {}  # deepcopy's memo: the copy's tensors, found by the original's id
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        copied = tensor.detach().to("cpu", copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
        on_cpu[id(tensor)] = copied
    copy.deepcopy(model, on_cpu).merge_and_unload().save_pretrained(folder)


def load_adapter_weights(model, folder):
    """Copy the adapter weights that an adapter model's save_pretrained left in `folder` into `model`."""
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"))
