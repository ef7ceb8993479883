"""What one optimizer step sees: the images it sums, from batch size, process count and accumulation."""


def effective_batch(batches_per_epoch, per_device, processes, accumulation):
    """(images per optimizer step over all processes, warning text or None).

    Accelerate ends an accumulation window at the end of each epoch, so with more accumulation steps than
    batches in an epoch (per process) every step sums one epoch's batches, not `accumulation` of them.
    Counted in full batches: an epoch's last batch may be smaller.
    """
    nominal = per_device * processes * accumulation
    if accumulation <= batches_per_epoch:
        return nominal, None
    images = per_device * processes * batches_per_epoch
    warning = (
        f"--gradient_accumulation_steps {accumulation} is more than the {batches_per_epoch} batches of an epoch "
        f"(per process): each optimizer step sums {batches_per_epoch} batches, {images} images, not {nominal}; "
        f"lower --gradient_accumulation_steps to {batches_per_epoch} or less"
    )
    return images, warning
