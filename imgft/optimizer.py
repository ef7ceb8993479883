"""The optimizer: AdamW, fused into one kernel wherever a skipped step stays visible to the loop, and its two
weight-decay groups (none on biases and norms; imgft/layer_decay.py splits them by learning rate)."""

import torch

NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
)


def adamw(param_groups, learning_rate, mixed_precision):
    """AdamW over `param_groups`; fused, except with fp16.

    Fused, the whole update is one kernel, and it can skip a step on the device (imgft/nonfinite.py).
    With fp16, GradScaler hands a fused optimizer its overflow flag and always calls its `step`, so
    Accelerate's `optimizer_step_was_skipped` never turns true and the schedule would advance on steps
    that made no update. Unfused, GradScaler skips the call itself, and the loop sees it.
    """
    return torch.optim.AdamW(param_groups, lr=learning_rate, fused=mixed_precision != "fp16")


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
