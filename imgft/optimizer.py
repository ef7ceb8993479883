"""The optimizer: AdamW, fused into one kernel wherever a skipped step stays visible to the loop."""

import torch


def adamw(param_groups, learning_rate, mixed_precision):
    """AdamW over `param_groups`; fused, except with fp16.

    Fused, the whole update is one kernel, and it can skip a step on the device (imgft/nonfinite.py).
    With fp16, GradScaler hands a fused optimizer its overflow flag and always calls its `step`, so
    Accelerate's `optimizer_step_was_skipped` never turns true and the schedule would advance on steps
    that made no update. Unfused, GradScaler skips the call itself, and the loop sees it.
    """
    return torch.optim.AdamW(param_groups, lr=learning_rate, fused=mixed_precision != "fp16")
