"""--auto_augment, --random_erasing: seeded by (seed, epoch, row) only, changing images, exact on a resume."""

import random

import datasets
import numpy as np
import pytest
import torch
from conftest import data_flags
from PIL import Image
from test_resume import RUN, assert_same_run, kill_when, metrics_steps, start
from transformers import ViTImageProcessor

from imgft import augment, transforms
from imgft.args import DataArguments
from imgft.checkpoint import list_checkpoints

POLICIES = ["randaugment", "trivialaugment", "autoaugment", "augmix"]
MEAN, STD = [0.2, 0.4, 0.6], [0.5, 0.5, 0.5]


def picture(index, size=40):
    """A gradient with a bright square and some noise: structure every policy's operations change."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 200, size, dtype=np.float64)
    columns, rows = np.meshgrid(ramp, ramp)
    pixels = np.stack([columns, rows, np.full((size, size), 90.0)], axis=-1)
    top, left = rng.integers(0, size // 2, 2)
    pixels[top : top + size // 3, left : left + size // 3] = 240
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def train_transform(auto_augment=None, random_erasing=0.0, random_flip=True, **randaugment):
    processor = ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=MEAN, image_std=STD)
    crop, _ = transforms.build_transforms(processor, None, random_flip=random_flip, crop_scale_min=0.5)
    data_args = DataArguments(auto_augment=auto_augment, random_erasing=random_erasing, **randaugment)
    return augment.with_auto_augment_and_erasing(crop, data_args, processor)


def seeded(seed, epoch, row):
    return random.Random(transforms.sample_seed(seed, epoch, row))


@pytest.mark.parametrize("policy", POLICIES)
def test_an_images_augmentation_depends_only_on_seed_epoch_and_row(policy):
    transform = train_transform(policy, random_erasing=0.5)
    images = [picture(i) for i in range(6)]
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = [transform(image, seeded(42, 1, row)) for row, image in enumerate(images)]
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's own generator is left as it was
    torch.manual_seed(7)  # whatever torch's generator holds
    again = [transform(image, seeded(42, 1, row)) for row, image in reversed(list(enumerate(images)))]
    for out, repeat in zip(first, reversed(again), strict=True):
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
        assert np.array_equal(out, repeat)
    next_epoch = [transform(image, seeded(42, 2, row)) for row, image in enumerate(images)]
    assert sum(not np.array_equal(a, b) for a, b in zip(first, next_epoch, strict=True)) >= 5


def test_the_dataloader_gives_the_same_augmented_batches_with_0_and_2_workers():
    transform = train_transform("randaugment", random_erasing=0.5)
    dataset = datasets.Dataset.from_dict(
        {"image": [picture(i) for i in range(8)], "label": list(range(8))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    epoch = transforms.shared_epoch()
    epoch.fill_(3)
    augmented = transforms.with_image_transform(dataset, transform, "image", "label", seed=42, epoch=epoch)
    loaded = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            augmented, batch_size=3, num_workers=workers, collate_fn=transforms.collate_fn
        )
        loaded[workers] = torch.cat([batch["pixel_values"] for batch in loader])
    assert torch.equal(loaded[0], loaded[2])
    by_hand = [transform(picture(row), seeded(42, 3, row)) for row in range(8)]
    assert torch.equal(loaded[0], transforms.stack_images(by_hand))


@pytest.mark.parametrize(("policy", "least_changed"), [(p, 16) for p in POLICIES])
def test_a_policy_changes_most_images(policy, least_changed):
    plain, augmented = train_transform(), train_transform(policy)
    changed = 0
    for row in range(20):
        image = picture(row)
        # The same generator draws the same crop and flip first, so only the policy can differ.
        changed += not np.array_equal(plain(image, seeded(0, 0, row)), augmented(image, seeded(0, 0, row)))
    assert changed >= least_changed


def test_randaugment_changes_images_more_with_more_operations_and_a_higher_magnitude():
    plain = train_transform()

    def mean_change(**randaugment):
        augmented = train_transform("randaugment", **randaugment)
        changes = []
        for row in range(20):
            after = augmented(picture(row), seeded(0, 0, row)).astype(int)
            changes.append(np.abs(after - plain(picture(row), seeded(0, 0, row))).mean())
        return np.mean(changes)

    # Measured: 2 against 47 levels of 255, and 15 against 43.
    assert 5 * mean_change(randaugment_magnitude=0) < mean_change(randaugment_magnitude=30)
    assert 2 * mean_change(randaugment_num_ops=1) < mean_change(randaugment_num_ops=4)


def test_random_erasing_fills_a_rectangle_with_the_colour_normalisation_makes_zero():
    transform = train_transform(random_erasing=0.5, random_flip=False)
    fill = np.array([round(255 * mean) for mean in MEAN], dtype=np.uint8)
    erased = 0
    for row in range(40):
        out = transform(picture(row), seeded(0, 0, row))
        filled = (out == fill).all(axis=-1)
        if filled.sum() >= 6:
            erased += 1
            rows, columns = np.nonzero(filled)
            box = filled[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
            assert box.all()  # one solid rectangle
    assert 12 <= erased <= 28  # p = 0.5 of 40
    normalize = transforms.normalizer(ViTImageProcessor(image_mean=MEAN, image_std=STD))
    zero = normalize(transforms.stack_images([np.broadcast_to(fill, (1, 1, 3))]))
    assert zero.abs().max() < 1 / 255 / 0.5  # zero, up to rounding the mean to whole uint8 levels


def test_with_both_off_the_training_transform_is_unchanged():
    processor = ViTImageProcessor(size={"height": 24, "width": 24})
    crop, _ = transforms.build_transforms(processor, None, random_flip=True, crop_scale_min=0.5)
    assert augment.with_auto_augment_and_erasing(crop, DataArguments(), processor) is crop


# test_resume's run on 5 colours x 12 images: 8 batches of 8, so 4 optimizer steps an epoch (accumulating 2),
# 2 epochs, a checkpoint every 3 steps.
POLICY_RUN = ["--auto_augment", "trivialaugment", "--random_erasing", "0.5", "--random_flip"]
POLICY_RUN += ["--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--checkpointing_steps", "3"]


def test_sigkill_then_resume_with_a_policy_and_erasing_is_bitwise_identical(colors_data, tmp_path, train):
    run = [*RUN, *POLICY_RUN, *map(str, data_flags(colors_data))]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    # The reference and the resumed run run in this process, sparing two start-ups: the same code.
    assert train([*run, "--num_workers", "0", "--output_dir", reference]) == 0
    # Killed once step 4, the first epoch's last, is logged: the resume from step_3 crosses into the second
    # epoch, with 2 workers where the reference had none, so each image's draws must come from its own seed.
    process = start(out, [*POLICY_RUN, *map(str, data_flags(colors_data)), "--num_workers", "2"], "1")
    assert kill_when(process, lambda: max(metrics_steps(out), default=0) >= 4)
    assert list_checkpoints(out)
    assert train([*run, "--num_workers", "2", "--output_dir", out]) == 0
    assert_same_run(reference, out)
