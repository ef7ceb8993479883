"""NaN/inf training losses: the update they would spoil is skipped on the device, and the skips are counted,
then read, reported and (with --on_nonfinite_loss stop) turned into the reason the loop stops.

Skipping without the CPU waiting for the GPU relies on one contract that torch keeps between its GradScaler
and its fused optimizers: a fused AdamW whose `found_inf` attribute holds a non-zero tensor leaves weights,
moments and step count untouched. `skip_update_if_loss_was_nonfinite` is the only code that writes it;
tests/test_nonfinite.py pins the behaviour, so a torch release that changes it fails loudly.
With fp16 the optimizer is not fused (see imgft/optimizer.py) and GradScaler skips such a step itself.
"""

import logging

from imgft.checkpoint import list_checkpoints
from imgft.runtime import Stop, log_once


def skip_update_if_loss_was_nonfinite(accelerator, optimizer, state):
    """At an optimizer step: if any process saw a NaN/inf loss since the last step, have fused AdamW skip this
    update, on the device. Counted in `state.skipped_on_device`; `check_skipped_steps` reads the count."""
    nonfinite = state.nonfinite_losses
    if accelerator.num_processes > 1:
        nonfinite = accelerator.reduce(nonfinite, "sum")
    found_inf = (nonfinite > 0).float()
    state.nonfinite_losses.zero_()
    state.skipped_on_device += found_inf
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
    # Under DeepSpeed this is its ZeRO optimizer, no torch one (no `defaults`): the skip is not done there.
    if getattr(torch_optimizer, "defaults", {}).get("fused"):
        torch_optimizer.found_inf = found_inf


def check_skipped_steps(state, on_nonfinite_loss, output_dir):
    """Read the count of skipped steps (one GPU read, done where the loss is read anyway). New skips since the
    last check are logged (--on_nonfinite_loss skip) or give the Stop that ends the run (stop)."""
    skipped = state.skipped_steps + int(state.skipped_on_device.item())
    state.skipped_on_device.zero_()
    first = state.steps_checked + 1
    last = state.completed_steps
    new_skips = skipped - state.skipped_steps
    state.skipped_steps = skipped
    state.steps_checked = last
    if not new_skips:
        return None
    steps = f"step {last}" if first == last else f"{new_skips} of steps {first}-{last}"
    if on_nonfinite_loss == "stop":
        where = ("at " if first == last else "in ") + steps
        return Stop("nonfinite_loss", nonfinite_message(where, output_dir), exit_code=2)
    log_once(logging.WARNING, f"Skipped {steps}: non-finite loss, no update made")
    return None


def nonfinite_message(where, output_dir):
    checkpoints = list_checkpoints(output_dir)
    last = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint yet"
    return (
        f"non-finite loss (NaN or inf) {where}: no update was made from it, and the run stopped; {last}. "
        "Lower --learning_rate or check the data, or pass --on_nonfinite_loss skip to go on without such steps"
    )
