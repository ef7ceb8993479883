"""Where each parameter of a transformers image classifier sits: in the backbone or the classifier head, and
at which layer of the backbone, numbered from the input as BEiT and timm number them for layer-wise decay.

The backbone is the base model transformers names by `base_model_prefix` (ViT's `vit`, Swin's `swin`); the
head is everything outside it. The backbone's blocks are the children of its repeated containers (an
nn.ModuleList or nn.Sequential of one module class) whose count is what the config says: sum(depths) for
staged models (Swin, ConvNeXt, ResNet), else num_hidden_layers (ViT, DeiT, BEiT). Parameters outside any
block take the number of the block registered before them (Swin's patch merging, ConvNeXt's downsampling);
those registered before the first block are layer 0 (embeddings), those after the last one are the top.
Registration order stands for depth: where a model registers every stage's patch embedding apart from and
before the blocks (PVT, PoolFormer), those count as embeddings.
"""

import re

from torch import nn

from imgft.errors import UserError
from imgft.peft_model import is_adapter_model


def backbone(model):
    """The model's base model, whose parameters are all but the head's (and, in a model with an adapter,
    the adapter's inside it)."""
    if is_adapter_model(model):  # the transformers model inside the peft model names its base model
        model = model.get_base_model()
    base = model.base_model
    if base is model:
        raise UserError(f"{type(model).__name__} has no base model apart from its classifier head")
    return base


def head_parameter_names(model):
    """The names of the parameters outside the backbone: the classifier head (and any norm beside it)."""
    in_backbone = {id(param) for param in backbone(model).parameters()}
    return {name for name, param in model.named_parameters() if id(param) not in in_backbone}


def numbered_blocks(model):
    """The backbone's blocks, in order (see the module docstring); a one-line UserError where none match."""
    config = model.config
    depths = getattr(config, "depths", getattr(config, "depth", None))  # CvT says depth
    expected_counts = []
    if isinstance(depths, (list, tuple)) and all(isinstance(depth, int) for depth in depths):
        expected_counts.append(sum(depths))
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        expected_counts.append(config.num_hidden_layers)
    # The containers at the same place in every stage (`encoder.layers.*.blocks`) count together.
    containers = {}
    for name, module in backbone(model).named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len({type(child) for child in module}) == 1:
            containers.setdefault(re.sub(r"\b\d+\b", "*", name), []).extend(module)
    for count in expected_counts:
        # The outermost match: stages of one block each match as well as their blocks, and hold them whole.
        for blocks in containers.values():
            if len(blocks) == count:
                return blocks
    raise UserError(
        f"--layer_decay: cannot number the layers of {type(model).__name__}: no repeated blocks match "
        f"its config's depths or num_hidden_layers ({expected_counts or 'neither is set'}); "
        "leave --layer_decay unset"
    )


def layer_ids(model):
    """{parameter name: layer id}: 0 for the embeddings, i for the i-th block, number of blocks + 1 for what
    comes after the last block (the final norm) and for the head."""
    blocks = numbered_blocks(model)
    top = len(blocks) + 1
    block_of = {}
    for number, block in enumerate(blocks, start=1):
        block_of.update(dict.fromkeys(map(id, block.parameters()), number))
    backbone_params = list(backbone(model).parameters())
    last_block_param = max(index for index, param in enumerate(backbone_params) if id(param) in block_of)
    ids = {}
    current = 0  # the embeddings' layer, until the first block
    for index, param in enumerate(backbone_params):
        current = block_of.get(id(param), top if index > last_block_param else current)
        ids[id(param)] = current
    return {name: ids.get(id(param), top) for name, param in model.named_parameters()}
