"""What one optimizer step sees: the images it sums, from batch size, process count and accumulation."""


def effective_batch(batches_per_epoch, per_device, processes, accumulation, num_images):
    """(images per optimizer step over all processes, in full batches; warning text or None).

    Accelerate ends an accumulation window at the end of each epoch, so with more accumulation steps than
    batches in an epoch (per process) every step sums one epoch's batches, not `accumulation` of them.
    Counted in full batches: an epoch's last batch may be smaller. Where each step sums a whole epoch (more
    accumulation steps than batches) or the data is smaller than a batch, the warning gives the real count:
    on one process the epoch's `num_images`; several processes fill their last batches up with repeats.
    """
    nominal = per_device * processes * accumulation
    images = per_device * processes * min(accumulation, batches_per_epoch)
    real = min(images, num_images) if processes == 1 else images
    if accumulation > batches_per_epoch:
        return images, (
            f"--gradient_accumulation_steps {accumulation} is more than the {batches_per_epoch} batches of "
            f"an epoch (per process): each optimizer step sums {batches_per_epoch} batches, {_images(real)}, "
            f"not {nominal}; lower --gradient_accumulation_steps to {batches_per_epoch} or less"
        )
    if real < per_device:  # one process, one short batch an epoch
        return images, (
            f"--per_device_train_batch_size {per_device} is more than the {_images(num_images, 'training ')}: "
            f"each optimizer step sums {_images(real)}, not {nominal}"
        )
    return images, None


def _images(count, kind=""):
    return f"{count} {kind}image" if count == 1 else f"{count} {kind}images"
