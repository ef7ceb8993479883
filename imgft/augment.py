"""Automatic augmentation of training images: torchvision's policies (--auto_augment) and random erasing
(--random_erasing), applied to the uint8 training crop with each image's draws seeded from the
(seed, epoch, row) generator the training transform is given, so a resume stays exact on any worker count."""

import contextlib
from functools import partial

import torch
from PIL import Image
from torchvision.transforms import v2


def with_auto_augment_and_erasing(train_transform, data_args, image_processor):
    """`train_transform` followed by --auto_augment's policy, then --random_erasing; the same function when
    both are off, so the default training images stay exactly what they were."""
    if not data_args.auto_augment and not data_args.random_erasing:
        return train_transform
    steps = []
    if data_args.auto_augment:
        num_ops, magnitude = data_args.randaugment_num_ops, data_args.randaugment_magnitude
        steps.append(policy(data_args.auto_augment, num_ops, magnitude))
    steps.append(v2.PILToTensor())  # the policies run faster on PIL images; RandomErasing needs a tensor
    if data_args.random_erasing:
        steps.append(v2.RandomErasing(p=data_args.random_erasing, value=erasing_fill(image_processor)))
    return partial(crop_then_augment, crop=train_transform, augmentation=v2.Compose(steps))


def policy(name, num_ops, magnitude):
    """torchvision's v2 policy called `name` (an --auto_augment choice), with its default settings but for
    RandAugment's num_ops and magnitude."""
    if name == "randaugment":
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    others = {"trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment, "augmix": v2.AugMix}
    return others[name]()  # AutoAugment: its ImageNet policy


def erasing_fill(image_processor):
    """The uint8 colour that `transforms.normalize` maps to 0: torchvision erases with 0 after Normalize,
    and imgft normalises later, on the device, so the erased pixels get the processor's mean colour."""
    if not getattr(image_processor, "do_normalize", True):
        return [0, 0, 0]
    return [round(255 * mean) for mean in image_processor.image_mean]


def crop_then_augment(image, rng, crop, augmentation):
    """`crop(image, rng)`, then `augmentation` (PIL image -> 3 x H x W uint8 tensor) on the crop: an
    H x W x 3 uint8 array, as `crop` gives.

    torchvision's policies draw from torch's global generator: they run on a fork of it seeded from `rng`,
    so an image's augmentation depends only on its (seed, epoch, row), in whichever process it is made,
    and the global generator (dropout, the main process's draws) is left as it was.
    """
    cropped = Image.fromarray(crop(image, rng))
    with torch.random.fork_rng(devices=[]), one_thread():  # the CPU generator only: no CUDA in workers
        torch.default_generator.manual_seed(rng.getrandbits(63))
        augmented = augmentation(cropped)
    return augmented.permute(1, 2, 0).numpy()


@contextlib.contextmanager
def one_thread():
    """Torch's ops on one small image, run on one thread: sharing them out across the main process's
    threads made AugMix 30x slower on a busy 2-core machine, measured (DataLoader workers have one anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
