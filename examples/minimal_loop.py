"""The smallest loop that trains as train_loop.py trains: the same five steps, then a plain 🤗 Accelerate loop.

    python examples/minimal_loop.py --output_dir DIR      # the digits demo, as `python train_loop.py`

It follows the five steps of the transformers image-classification example:
    1. arguments      three dataclasses from a YAML file and the command line     imgft/args.py
    2. dataset        Hub name or imagefolder, a validation split, label names     imgft/data.py
    3. model          AutoConfig + AutoModelForImageClassification + processor     imgft/model.py
    4. transforms     applied lazily with set_transform; DataLoaders, collate_fn   imgft/transforms.py
    5. optimizer      AdamW, a learning-rate schedule, and accelerator.prepare     imgft/optimizer.py
then the training loop and the save, written out here. Read it first, then `diff examples/minimal_loop.py
train_loop.py`: what the diff adds are the real loop's features (output-folder guards, checkpoints and
resume, logs and the report, NaN losses, the best model and early stopping, the recipes). At the default
flags none of them changes a number: tests/test_minimal_loop.py finds the saved weights bitwise identical.
It reads train_loop.py's flags, and refuses in one line those that turn on what only train_loop.py does.
"""

# ruff: noqa: E402 (imgft is imported from the repository, one folder up, whichever folder this runs from)
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imgft import args as imgft_args
from imgft import data, runtime, transforms
from imgft.errors import UserError, run_as_script
from imgft.model import load_model
from imgft.optimizer import adamw, optimizer_param_groups

# Flags that turn on what only train_loop.py does: any of them away from its default is refused.
TRAIN_LOOP_ONLY = (
    *("streaming", "auto_augment", "random_erasing", "use_peft", "channels_last", "torch_compile"),
    *("layer_decay", "head_learning_rate", "freeze_backbone", "unfreeze_after_epochs", "on_nonfinite_loss"),
    *("label_smoothing_factor", "mixup_alpha", "cutmix_alpha", "ema_decay", "balanced_sampling"),
    *("class_weighted_loss", "eval_steps", "load_best_model_at_end", "early_stopping_patience"),
    *("checkpointing_steps", "resume_from_checkpoint", "with_tracking", "push_to_hub"),
)


def main(argv=None):
    # ---------------------------------------------------------------- 1. Arguments
    data_args, model_args, train_args = imgft_args.parse_args(argv)
    config = imgft_args.to_dict(data_args, model_args, train_args)
    output_dir = train_args.output_dir
    defaults = imgft_args.field_defaults()
    for name in TRAIN_LOOP_ONLY:
        if config[name] != defaults[name]:
            raise UserError(f"--{name} is not in the minimal loop: run train_loop.py for it")

    # The Accelerator replaces the hand-written parts of distributed training: device placement, DDP
    # wrapping, sharded DataLoaders, autocast + GradScaler, and no all-reduce on accumulation steps.
    # The seedable sampler draws the order from (seed, epoch): the same on every process.
    # non_blocking: a batch copies to the GPU (from pinned memory) while the GPU still runs the last step.
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_args.seed, non_blocking=True)
    accelerator = Accelerator(
        cpu=runtime.distributed_without_gpu(),  # several processes and no GPU: one gloo DDP group
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        dataloader_config=loader_config,
    )
    runtime.setup_logging()
    # set_seed replaces seeding random, NumPy and torch one by one: the same new head (or model from
    # scratch) on every process and in every rerun. Splits and augmentation take the seed explicitly.
    set_seed(train_args.seed)

    # ---------------------------------------------------------------- 2. Dataset and labels
    # main_process_first: process 0 fills the datasets cache, the others then read it.
    with accelerator.main_process_first():
        dataset, image_column, label_column, label_names = data.load_labeled_dataset(
            data_args, model_args.cache_dir, train_args.seed
        )

    # ---------------------------------------------------------------- 3. Model and image processor
    with accelerator.main_process_first():
        model, image_processor = load_model(model_args, label_names)  # process 0 downloads, the others read

    # ---------------------------------------------------------------- 4. Transforms and DataLoaders
    # One decode of every image: unreadable files are set aside, and with --resize_once (the default) the
    # rest are stored shrunk to what the transforms need, in a cached file later epochs and runs reuse.
    stored_size = transforms.stored_image_size(image_processor, model_args.image_size, data_args)
    with accelerator.main_process_first():
        dataset, _ = data.decode_once_dropping_unreadable(
            dataset, image_column, label_column, label_names, data_args, stored_size
        )
    # Sizes come from the image processor. The transforms give uint8 images (a quarter of float32's bytes
    # to move); `normalize` makes the model's float input on the device.
    train_transform, eval_transform = transforms.build_transforms(
        image_processor, model_args.image_size, data_args.random_flip, data_args.crop_scale_min
    )
    normalize = transforms.normalizer(image_processor)
    train_rows = data.subsample(dataset["train"], data_args.max_train_samples, train_args.seed)
    eval_rows = data.subsample(dataset["validation"], data_args.max_eval_samples, train_args.seed)
    # set_transform, lazily: images are decoded and augmented per batch, in the DataLoader's workers.
    # Augmentation is seeded per image by (seed, epoch, row), the workers reading the epoch from
    # shared memory, so it is the same for any number of workers.
    augmentation_epoch = transforms.shared_epoch()
    train_dataset = transforms.with_image_transform(
        train_rows, train_transform, image_column, label_column, train_args.seed, augmentation_epoch
    )
    eval_dataset = transforms.with_eval_transform(eval_rows, eval_transform, image_column, label_column)
    workers = runtime.dataloader_workers(data_args.num_workers, accelerator.device, accelerator.num_processes)
    # collate_fn stacks pixel_values into B x 3 x H x W and labels into B; pinned memory on a GPU.
    loader_options = transforms.loader_options(workers, accelerator.device, train_args.seed)
    batch_size = train_args.per_device_train_batch_size
    train_dataloader = DataLoader(train_dataset, batch_size, shuffle=True, **loader_options)
    eval_dataloader = DataLoader(eval_dataset, train_args.per_device_eval_batch_size, **loader_options)

    # ---------------------------------------------------------------- 5. Optimizer, schedule, prepare
    # No weight decay on biases and norms. AdamW is fused into one kernel, except with fp16 (see its docstring).
    param_groups = optimizer_param_groups(model, train_args.weight_decay)
    optimizer = adamw(param_groups, train_args.learning_rate, accelerator.mixed_precision)
    # prepare() moves the model to the device and wraps it in DDP, and wraps its forward in autocast for
    # --mixed_precision; wraps the optimizer for mixed precision (GradScaler) and accumulation; and shards
    # each DataLoader: len(train_dataloader) is then this process's share.
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    batches_per_epoch = len(train_dataloader)
    steps_per_epoch = math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * steps_per_epoch
    # The schedule counts optimizer steps, so warmup and total mean the same on any number of processes.
    # Not prepared (Accelerate's wrapper steps it once per process at each call): the loop steps it by hand.
    lr_scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, train_args.num_warmup_steps, max_train_steps)

    # ---------------------------------------------------------------- The training loop
    completed_steps = 0
    for epoch in range(math.ceil(max_train_steps / steps_per_epoch)):
        model.train()
        train_dataloader.set_epoch(epoch)  # as DistributedSampler.set_epoch: order by (seed, epoch)
        augmentation_epoch.fill_(epoch)
        for batch in train_dataloader:
            # accumulate() replaces model.no_sync() and counting batches: DDP all-reduces gradients only on
            # an accumulation window's last batch; before it, optimizer.step() and zero_grad() do nothing.
            with accelerator.accumulate(model):
                logits = model(pixel_values=normalize(batch["pixel_values"])).logits
                loss = F.cross_entropy(logits, batch["labels"])
                # backward() replaces loss.backward(): it scales the loss for fp16 and divides it by the
                # accumulation steps, so it must not be divided here again.
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_args.max_grad_norm > 0:  # the window's last batch
                    # replaces scaler.unscale_() + clip_grad_norm_(), on the window's summed gradients
                    accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step happened
            if not accelerator.optimizer_step_was_skipped:  # GradScaler skips a step after an fp16 overflow
                lr_scheduler.step()
            completed_steps += 1
            if completed_steps % train_args.logging_steps == 0:
                # .item() waits for the device; this process's last batch (train_loop.py logs the mean)
                accelerator.print(f"step {completed_steps}/{max_train_steps}: loss {loss.item():.4f}")
            if completed_steps >= max_train_steps:
                break
        accuracy = evaluate(model, eval_dataloader, normalize, accelerator)
        accelerator.print(f"epoch {epoch + 1}: eval_accuracy {accuracy:.4f}")

    # ---------------------------------------------------------------- Save a model anyone can load
    accelerator.wait_for_everyone()  # replaces a torch.distributed.barrier(): all processes done training
    # unwrap_model strips the DDP and torch.compile wrappers, so the weights load without imgft. (FSDP and
    # DeepSpeed shard them: train_loop.py gathers them first, with accelerator.get_state_dict.)
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    plain_model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)  # pipeline() reads sizes and normalisation from it
    accelerator.print(f"Saved the model to {output_dir}")
    accelerator.end_training()  # leaves the process group
    return 0


@torch.no_grad()
def evaluate(model, eval_dataloader, normalize, accelerator):
    """Top-1 accuracy on the whole validation set. Every process must call it, and all get the same answer."""
    num_labels = accelerator.unwrap_model(model).config.num_labels
    model.eval()
    # sync_on_compute=False: every process is given every process's logits below, so torchmetrics' own
    # cross-process sync would count each image once per process.
    accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro", sync_on_compute=False)
    accuracy = accuracy.to(accelerator.device)
    for batch in eval_dataloader:
        logits = model(pixel_values=normalize(batch["pixel_values"])).logits
        # gather_for_metrics replaces a hand-written all_gather: it also drops the samples that pad the
        # last batch so that every process gets one, which would otherwise be counted twice.
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        accuracy.update(logits, labels)
    model.train()
    return accuracy.compute().item()


if __name__ == "__main__":
    run_as_script(main)
