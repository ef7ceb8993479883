"""imgft.batches: the images one optimizer step really sums, checked against Accelerate's own accumulation."""

import pytest
import torch
from conftest import reset_accelerate
from torch.utils.data import DataLoader

from imgft.batches import effective_batch


def images_per_optimizer_step(num_images, per_device, accumulation):
    """Counted by running Accelerate's accumulation over one epoch: the images summed before each optimizer step."""
    from accelerate import Accelerator

    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        model = torch.nn.Linear(1, 1)
        loader = accelerator.prepare(DataLoader(torch.zeros(num_images, 1), batch_size=per_device))
        counts, window = [], 0
        for batch in loader:
            with accelerator.accumulate(model):
                window += len(batch)
            if accelerator.sync_gradients:
                counts.append(window)
                window = 0
        return counts
    finally:
        reset_accelerate()


@pytest.mark.parametrize("num_images", [64, 60])
def test_accumulation_beyond_an_epoch_is_counted_and_warned_about(num_images):
    # 64 (or 60) images in batches of 16: 4 batches an epoch, so accumulating 10 steps once an epoch over all.
    assert images_per_optimizer_step(num_images, 16, 10) == [num_images]
    images, warning = effective_batch(4, per_device=16, processes=1, accumulation=10, num_images=num_images)
    assert images == 64  # in full batches
    assert "--gradient_accumulation_steps 10 is more than the 4 batches of an epoch" in warning
    assert f"{num_images} images, not 160" in warning  # the epoch's last batch holds 12 of the 60


def test_data_smaller_than_a_batch_is_counted_and_warned_about():
    assert images_per_optimizer_step(3, 32, 1) == [3]
    images, warning = effective_batch(1, per_device=32, processes=1, accumulation=1, num_images=3)
    assert images == 32
    assert warning.startswith("--per_device_train_batch_size 32 is more than the 3 training images: ")
    assert warning.endswith("each optimizer step sums 3 images, not 32")


@pytest.mark.parametrize(("accumulation", "expected"), [(2, 32), (4, 64)])
def test_accumulation_within_an_epoch_gives_the_nominal_batch(accumulation, expected):
    assert images_per_optimizer_step(64, 16, accumulation) == [expected] * (4 // accumulation)
    assert effective_batch(4, 16, 1, accumulation, num_images=64) == (expected, None)


def test_processes_multiply_the_images_of_a_step():
    # 2 processes of 3 batches of 8: a step that accumulates 5 sums all 6 batches, 48 images (with repeats
    # where the 41 images do not fill the last batches: Accelerate fills each process's batches up).
    images, warning = effective_batch(3, per_device=8, processes=2, accumulation=5, num_images=41)
    assert images == 48
    assert "48 images, not 80" in warning
    # 3 images, 2 processes: each fills its batch of 8 up with repeats.
    assert effective_batch(1, per_device=8, processes=2, accumulation=1, num_images=3) == (16, None)
