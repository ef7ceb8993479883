"""Step 4: what turns a stored image into a batch: the size images are stored at, the seeded training
augmentation and the evaluation transform (what the image processor gives, see preprocessing.py), both applied
lazily with set_transform (or, on a stream, as it is read), the DataLoader options with collate_fn, and
`normalizer`, which makes the model's float input on the device."""

import logging
import math
import random
from functools import lru_cache, partial

import datasets
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from imgft import images, preprocessing
from imgft.runtime import log_once


def stored_image_size(image_processor, image_size, data_args):
    """The shortest edge --resize_once stores training images at (None when it is off): --stored_image_size,
    else enough for the model's input size with the usual 0.875 centre-crop margin."""
    if not data_args.resize_once:
        return None
    if data_args.stored_image_size:
        return data_args.stored_image_size
    processor = preprocessing.with_image_size(image_processor, image_size) if image_size else image_processor
    return math.ceil(max(preprocessing.input_size(processor, preprocessing.plan_for(processor))) / 0.875)


def build_transforms(image_processor, image_size, random_flip, crop_scale_min):
    """(train, evaluation): the transforms that give images at the model's input size.

    Train: RGB PIL image, `rng` -> H x W x 3 uint8 array, a random resized crop (+ optional flip) with the
    processor's filter, its randomness drawn from the `rng` it is given.
    Evaluation, on a whole batch: RGB PIL images -> one H x W x 3 array each, what the image processor gives
    (`preprocessing`): uint8 from the fast path, for `normalizer` to make floats on the device, or, for a
    processor imgft does not reproduce, the processor's own float output, from one call per batch where that
    gives each image its own output (said once in the log).
    `image_size` makes the input square (see `preprocessing.with_image_size`).
    """
    processor = preprocessing.with_image_size(image_processor, image_size) if image_size else image_processor
    plan = preprocessing.plan_for(processor)
    size = preprocessing.input_size(processor, plan)
    train = partial(
        random_resized_crop,
        size=list(size),
        scale=(crop_scale_min, 1.0),
        flip=random_flip,
        interpolation=preprocessing.interpolation(processor),
        flip_channels=plan.flip_channels,
    )
    if plan.kind != "processor":
        geometry = partial(preprocessing.geometry, processor=processor, plan=plan)
        return train, partial(each_image, image_transform=geometry)
    name = type(processor).__name__
    if preprocessing.batch_gives_each_its_own(processor):
        log_once(logging.INFO, f"Evaluation and prediction run {name} itself, once per batch: {plan.reason}")
        return train, partial(preprocessing.run_processor, processor=processor)
    log_once(
        logging.INFO,
        f"Evaluation and prediction run {name} itself, image by image, as its output for a batch is not each "
        f"image's own: {plan.reason}",
    )
    return train, partial(preprocessing.run_processor_on_each, processor=processor)


def each_image(images, image_transform):
    """`image_transform` on each of `images` in turn, as a list; `images` may be an iterator, read lazily."""
    return [image_transform(image) for image in images]


def crop_box(width, height, scale, ratio, rng):
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params, drawing
    from `rng` (a seeded random.Random) instead of torch's global generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    # Fallback, as torchvision's: the centre crop with the ratio closest to the image's.
    if width / height < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif width / height > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(
    image,
    rng=random,
    size=(224, 224),
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip=False,
    interpolation=F.InterpolationMode.BILINEAR,
    flip_channels=False,
):
    """A random crop resized to `size` (and a coin-flip mirror with `flip`), as an H x W x 3 uint8 array, in BGR
    order with `flip_channels` (for models that read BGR, as their processor feeds them).

    Torchvision's functional ops on the PIL image, with the parameters drawn here: the transform objects
    (v2.RandomResizedCrop, PILToTensor, Normalize) cost 3-4x more per small image, measured, and draw
    from torch's global generator where we need our own seeded `rng`.
    """
    top, left, height, width = crop_box(image.width, image.height, scale, ratio, rng)
    image = F.resized_crop(image, top, left, height, width, size, interpolation=interpolation, antialias=True)
    if flip and rng.random() < 0.5:
        image = F.horizontal_flip(image)
    pixels = np.asarray(image)
    return np.ascontiguousarray(pixels[..., ::-1]) if flip_channels else pixels


def normalizer(image_processor, channels_last=False):
    """The function that turns a batch (on the device) into the model's float input, in channels_last memory format
    when asked: uint8 pixels through the processor's rescale and normalisation, folded into (x - shift) / scale
    (`preprocessing.plan_for`); float batches, which the processor itself made, as they are."""
    plan = preprocessing.plan_for(image_processor)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return partial(normalize, shift=plan.shift, scale=plan.scale, memory_format=memory_format)


def normalize(pixel_values, shift, scale, memory_format=torch.contiguous_format):
    # uint8 crossed the DataLoader and the host-to-device copy: a quarter of float32's bytes.
    if pixel_values.dtype != torch.uint8:
        return pixel_values.to(torch.float32, memory_format=memory_format)
    shift, scale = _channel_statistics(tuple(shift), tuple(scale), pixel_values.device)
    return pixel_values.to(torch.float32, memory_format=memory_format).sub_(shift).div_(scale)


@lru_cache
def _channel_statistics(shift, scale, device):
    # Made once per device: building them each step would copy from host memory to the GPU, and such a
    # copy waits for all queued GPU work, so the CPU could no longer run ahead of the GPU.
    shape = (1, -1, 1, 1)
    return torch.tensor(shift, device=device).view(shape), torch.tensor(scale, device=device).view(shape)


ROW_COLUMN = "__imgft_row__"


def shared_epoch():
    """An epoch counter in shared memory: DataLoader workers, even persistent ones, read the current value."""
    return torch.zeros((), dtype=torch.int64).share_memory_()


def sample_seed(seed, epoch, row):
    """A sample's augmentation seed: the same for (seed, epoch, row) whichever worker or iterator draws it."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + row) & 0x7FFF_FFFF_FFFF_FFFF


def apply_transform(batch, image_transform, image_column, label_column, seed, epoch):
    """Applied lazily by `set_transform` to each fetched batch of rows, so images are decoded on demand; each
    image transformed with its own generator, seeded by (seed, epoch, row)."""
    rgb_images = [images.to_rgb(image) for image in batch[image_column]]
    epoch_now = int(epoch)
    pixel_values = [
        image_transform(image, random.Random(sample_seed(seed, epoch_now, row)))
        for image, row in zip(rgb_images, batch[ROW_COLUMN], strict=True)
    ]
    return {"pixel_values": pixel_values, "labels": batch[label_column]}


def with_image_transform(split_dataset, image_transform, image_column, label_column, seed, epoch):
    """The dataset with training's `image_transform` applied on access; only the image and label columns are
    read.

    Each image's random augmentation is drawn from a generator seeded by (seed, epoch, row), `epoch` being the
    shared counter (`shared_epoch`): the same on any number of workers and after a resume. A stream
    (IterableDataset) gets `with_stream_transform` instead.
    """
    if isinstance(split_dataset, datasets.IterableDataset):
        return with_stream_transform(split_dataset, image_transform, image_column, label_column, seed, epoch)
    split_dataset = split_dataset.add_column(ROW_COLUMN, list(range(len(split_dataset))))
    # partial of a module-level function, not a closure, so DataLoader workers can pickle it under spawn too.
    transform = partial(
        apply_transform,
        image_transform=image_transform,
        image_column=image_column,
        label_column=label_column,
        seed=seed,
        epoch=epoch,
    )
    return split_dataset.with_transform(transform, columns=[image_column, label_column, ROW_COLUMN])


def apply_eval_transform(batch, eval_transform, image_column, label_column):
    """Applied lazily by `set_transform` to each fetched batch of rows: the evaluation transform on all."""
    rgb_images = [images.to_rgb(image) for image in batch[image_column]]
    return {"pixel_values": eval_transform(rgb_images), "labels": batch[label_column]}


def with_eval_transform(split_dataset, eval_transform, image_column, label_column):
    """The dataset with the evaluation transform applied on access, to each fetched batch as a whole (a
    processor run as it is runs once per batch); only the image and label columns are read. A streamed
    split gets `with_stream_transform`, image by image."""
    if isinstance(split_dataset, datasets.IterableDataset):
        one_image = partial(_on_one_image, batch_transform=eval_transform)
        return with_stream_transform(split_dataset, one_image, image_column, label_column)
    transform = partial(
        apply_eval_transform,
        eval_transform=eval_transform,
        image_column=image_column,
        label_column=label_column,
    )
    return split_dataset.with_transform(transform, columns=[image_column, label_column])


def _on_one_image(image, batch_transform):
    """`batch_transform` (images in, one array each out) on one image."""
    return batch_transform([image])[0]


STREAM_MAP_BATCH = 16  # examples a stream's map decodes at a time; a resume decodes at most these again


def with_stream_transform(stream, image_transform, image_column, label_column, seed=None, epoch=None):
    """A stream with `image_transform` applied as it is read (in the DataLoader worker that reads it), and its
    unreadable images dropped, each named once per process (`transform_streamed_batch`).

    A stream has no rows to seed augmentation by: an example's position is its index in what one worker of
    one process reads in this pass (`IterableDataset.map(with_indices=True)`, whose index a resume restores),
    made unique across workers and processes. So augmentation is a function of (seed, epoch, position), the
    same after a resume with the same processes and workers.
    """
    from accelerate import PartialState  # the launch's process index and count, also without an Accelerator

    launch = PartialState()
    return stream.map(
        transform_streamed_batch,
        with_indices=True,
        batched=True,
        batch_size=STREAM_MAP_BATCH,
        remove_columns=list(stream.features),
        fn_kwargs={
            "transform": image_transform,
            "image_column": image_column,
            "label_column": label_column,
            "seed": seed,
            "epoch": epoch,
            "process": (launch.process_index, launch.num_processes),
        },
    )


_unreadable_named = set()  # the unreadable images this process has already named


def transform_streamed_batch(batch, indices, transform, image_column, label_column, seed, epoch, process):
    """{"pixel_values", "labels"} for the readable examples of a batch read from a stream. `process` is the
    (index, count) of the launch's processes."""
    worker = torch.utils.data.get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
    process_index, processes = process
    epoch_now = None if epoch is None else int(epoch)
    pixel_values = []
    labels = []
    examples = zip(batch[image_column], batch[label_column], indices, strict=True)
    for row, (value, label, index) in enumerate(examples):
        image, reason = images.decode_value(value)
        if image is None:
            reader = (process_index, worker_id)
            where = streamed_example_name(batch, image_column, row, index, reader, epoch_now)
            if where not in _unreadable_named:
                _unreadable_named.add(where)
                logging.getLogger("imgft").warning(f"Skipping unreadable image {where}: {reason}")
            continue
        if seed is None:
            pixel_values.append(transform(image))
        else:
            position = (index * workers + worker_id) * processes + process_index
            pixel_values.append(transform(image, random.Random(sample_seed(seed, epoch_now, position))))
        labels.append(label)
    return {"pixel_values": pixel_values, "labels": labels}


def streamed_example_name(batch, image_column, row, index, reader, epoch):
    """What names a streamed example for a person: its file name, or webdataset key, and shard; else its
    place in the stream: the `index`-th example that `reader` (process, worker) read in pass `epoch`."""
    value = batch[image_column][row]
    path = value.get("path") if isinstance(value, dict) else None
    key = path or (batch["__key__"][row] if "__key__" in batch else None)
    shard = batch["__url__"][row] if "__url__" in batch else None
    if key:
        return f"{key} (in {shard})" if shard else key
    return f"#{index} read by worker {reader[1]} of process {reader[0]} in pass {epoch or 0}"


def loader_options(num_workers, device, seed):
    """The options every DataLoader of a run shares."""
    return {
        "collate_fn": collate_fn,
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",  # a non_blocking copy to the GPU needs pinned memory
        "persistent_workers": num_workers > 0,  # keep the workers alive from one epoch to the next
        # Each pass draws a seed for its workers: from a generator of its own, not from the global RNG that
        # dropout draws from, or a run resumed mid-epoch would draw once more than the run it continues.
        "generator": torch.Generator().manual_seed(seed),
    }


def collate_fn(examples):
    """Stack H x W x 3 images into a B x 3 x H x W batch (`stack_images`) and labels into B."""
    return {
        "pixel_values": stack_images([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


def stack_images(arrays):
    """H x W x 3 arrays (what the transforms give: uint8, or float from a processor run as is) -> one B x 3 x H x W
    tensor, channels-last in memory: the permute is a view, so the stack is the only copy."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
