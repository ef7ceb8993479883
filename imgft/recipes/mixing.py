"""Mixup and CutMix (--mixup_alpha, --cutmix_alpha): a training batch mixed with itself in reverse order,
images and labels by the same share, before the forward pass.

The formulas are timm's `Mixup` in batch mode (one share per batch, CutMix's share corrected to the box's
real area). timm and torchvision draw from their global generators; here every batch draws from its own,
seeded by (seed, epoch, batch, process), so a resumed run mixes exactly as an uninterrupted one, and each
DDP process mixes its own batch reproducibly. The labels become probabilities (B x C) that
`losses.training_loss` takes as soft targets; evaluation never mixes.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixOptions:
    mixup_alpha: float
    cutmix_alpha: float
    prob: float  # share of batches mixed
    switch_prob: float  # with both on, share of mixed batches that use CutMix
    num_classes: int
    seed: int
    process_index: int


def mix_options(train_args, num_classes, process_index):
    """The MixOptions the arguments ask for, or None when Mixup and CutMix are both off."""
    if not (train_args.mixup_alpha or train_args.cutmix_alpha):
        return None
    return MixOptions(
        mixup_alpha=train_args.mixup_alpha,
        cutmix_alpha=train_args.cutmix_alpha,
        prob=train_args.mixup_prob,
        switch_prob=train_args.mixup_switch_prob,
        num_classes=num_classes,
        seed=train_args.seed,
        process_index=process_index,
    )


def mix_batch(batch, options, epoch, batch_in_epoch):
    """The batch with its images and labels mixed, or unchanged (with `options` None, or when this batch
    draws no mixing). Mixed: B x C labels, and pixel_values of the batch's own dtype, so that `normalize`
    treats them as it treats an unmixed batch: uint8 stays uint8 (Mixup rounded to the nearest level, as
    timm's FastCollateMixup does), and a processor's float output is mixed as it is."""
    if options is None:
        return batch
    rng = np.random.default_rng([options.seed, epoch, batch_in_epoch, options.process_index])
    share, use_cutmix = draw_share(rng, options)
    if share == 1.0:
        return batch
    pixels = batch["pixel_values"]
    partners = pixels.flip(0)  # image i is mixed with image B-1-i
    if use_cutmix:
        images = pixels.clone()
        top, bottom, left, right = cutmix_box(rng, images.shape[-2], images.shape[-1], share)
        images[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        share = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
    else:
        # Back to uint8: `normalize` passes a float batch through untouched, as a processor's own output that
        # is normalised already, so a 0-255 float batch would reach the model unnormalised.
        blended = pixels.to(torch.float32).mul_(share).add_(partners.to(torch.float32), alpha=1.0 - share)
        images = blended.round_().to(torch.uint8) if pixels.dtype == torch.uint8 else blended.to(pixels.dtype)
    one_hot = F.one_hot(batch["labels"], options.num_classes).float()
    labels = one_hot.mul(share).add_(one_hot.flip(0), alpha=1.0 - share)
    return {**batch, "pixel_values": images, "labels": labels}


def draw_share(rng, options):
    """(share of each image kept, whether CutMix): timm's `Mixup._params_per_batch`, drawn from `rng`."""
    if rng.random() >= options.prob:
        return 1.0, False
    if options.mixup_alpha and options.cutmix_alpha:
        use_cutmix = bool(rng.random() < options.switch_prob)
    else:
        use_cutmix = bool(options.cutmix_alpha)
    alpha = options.cutmix_alpha if use_cutmix else options.mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix


def cutmix_box(rng, height, width, share):
    """(top, bottom, left, right) of a box of about (1 - share) of the image, centred at random and clipped
    to the image: timm's `rand_bbox`."""
    ratio = np.sqrt(1.0 - share)
    cut_height, cut_width = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([centre_y - cut_height // 2, centre_y + cut_height // 2], 0, height)
    left, right = np.clip([centre_x - cut_width // 2, centre_x + cut_width // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)
