"""The step-skipping contracts the loop relies on, pinned so that a torch or Accelerate release that changes
them fails here: fused AdamW honours `found_inf`, and with fp16 a skipped step is visible to the loop."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from conftest import reset_accelerate

from imgft import nonfinite, optimizer
from imgft.train_state import TrainState


class OneProcess:
    num_processes = 1


def one_step(adamw, nonfinite_losses):
    """Give the weight a gradient, count `nonfinite_losses` NaN losses, and take an optimizer step."""
    weight = adamw.param_groups[0]["params"][0]
    weight.grad = torch.ones_like(weight)
    state = TrainState()
    state.nonfinite_losses += nonfinite_losses
    nonfinite.skip_update_if_loss_was_nonfinite(OneProcess(), adamw, state)
    adamw.step()
    return state


def test_fused_adamw_skips_the_whole_update_after_a_nonfinite_loss():
    weight = torch.nn.Parameter(torch.ones(4))
    adamw = optimizer.adamw([{"params": [weight], "weight_decay": 0.1}], 0.1, "no")
    assert adamw.defaults["fused"]
    state = one_step(adamw, nonfinite_losses=1)
    assert torch.equal(weight.detach(), torch.ones(4))  # no update, not even weight decay
    assert not adamw.state[weight] or adamw.state[weight]["step"].item() == 0  # no moment, no step counted
    assert state.skipped_on_device.item() == 1 and state.nonfinite_losses.item() == 0
    state = one_step(adamw, nonfinite_losses=0)
    assert not torch.equal(weight.detach(), torch.ones(4))
    assert adamw.state[weight]["step"].item() == 1
    assert state.skipped_on_device.item() == 0


def test_skipped_steps_are_read_as_a_stop_or_a_warning(tmp_path, caplog):
    state = TrainState()
    state.completed_steps = 4
    state.skipped_on_device += 3
    stop = nonfinite.check_skipped_steps(state, "stop", str(tmp_path))
    assert stop.reason == "nonfinite_loss" and stop.exit_code == 2
    assert "in 3 of steps 1-4" in stop.message and "there is no checkpoint yet" in stop.message
    state.completed_steps = 6
    state.skipped_on_device += 1
    assert nonfinite.check_skipped_steps(state, "skip", str(tmp_path)) is None
    assert "Skipped 1 of steps 5-6" in caplog.text
    assert state.skipped_steps == 4 and state.steps_checked == 6


@pytest.mark.parametrize("mixed_precision", ["fp16", "no"])
def test_an_fp16_overflow_is_a_step_accelerate_sees_as_skipped(mixed_precision):
    # With fp16, GradScaler passes a fused optimizer its overflow flag and calls its step() anyway, so
    # Accelerate's optimizer_step_was_skipped stayed False and the schedule advanced on skipped steps.
    reset_accelerate()
    try:
        Accelerator(cpu=True)
        weight = torch.nn.Parameter(torch.ones(4))
        adamw = optimizer.adamw([{"params": [weight], "weight_decay": 0.0}], 0.1, mixed_precision)
        assert adamw.defaults["fused"] == (mixed_precision != "fp16")
        scaler = torch.amp.GradScaler("cpu")
        wrapped = AcceleratedOptimizer(adamw, scaler=scaler)
        scaler.scale((weight * float("inf")).sum()).backward()  # an overflow: every gradient is inf
        wrapped.step()
        assert torch.equal(weight.detach(), torch.ones(4))
        # Only the unfused optimizer that imgft builds for fp16 lets Accelerate see the skip.
        assert wrapped.step_was_skipped == (mixed_precision == "fp16")
    finally:
        reset_accelerate()
