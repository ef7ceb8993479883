"""Fine-tune a 🤗 Transformers image classifier with a training loop written out in PyTorch + 🤗 Accelerate.

    python train_loop.py                                  # the digits demo: CPU or one GPU, no download
    python train_loop.py configs/vit-beans.yaml --learning_rate 3e-5
    accelerate launch --config_file accelerate_config.yaml train_loop.py configs/imagefolder.yaml

Outline, in the order the code runs:
    1. arguments      three dataclasses from a YAML file and the command line (imgft/args.py)
    2. dataset        Hub name or imagefolder, a seeded validation split, label2id/id2label (imgft/data.py)
    3. model          AutoConfig + AutoModelForImageClassification + AutoImageProcessor (imgft/model.py)
    4. transforms     torchvision, applied lazily with set_transform; DataLoaders with collate_fn
    5. training       AdamW + schedule, accumulate/backward/step, evaluate each epoch, checkpoints, save
"""

import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from imgft import args as imgft_args
from imgft import checkpoint, data, metrics, outputs
from imgft.demo_data import ensure_digits_imagefolder
from imgft.errors import UserError, exit_on_user_error
from imgft.model import load_model, optimizer_param_groups

logger = get_logger("imgft")


def main(argv=None):
    # ---------------------------------------------------------------- 1. Arguments
    data_args, model_args, train_args = imgft_args.parse_args(sys.argv[1:] if argv is None else argv)
    output_dir = train_args.output_dir
    resume_path = checkpoint.resolve_resume(train_args.resume_from_checkpoint, output_dir)
    outputs.check_output_dir(output_dir, resume_path is not None, train_args.overwrite_output_dir)
    outputs.check_push_possible(train_args)

    # The Accelerator replaces the hand-written parts of distributed training: it picks the device,
    # wraps the model in DDP, shards DataLoaders across processes, runs autocast + GradScaler for
    # mixed precision and skips gradient all-reduce on accumulation steps. `accelerate launch` sets
    # the process count; the same script runs as plain `python` on one device.
    try:
        accelerator = Accelerator(
            mixed_precision=train_args.mixed_precision,
            gradient_accumulation_steps=train_args.gradient_accumulation_steps,
            log_with=train_args.report_to if train_args.with_tracking else None,
            project_dir=output_dir,
            # A sampler seeded by (seed, epoch): the same order on every process, every rerun and after a resume.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_args.seed),
        )
    except ValueError as err:  # e.g. fp16 on a machine without a GPU
        raise UserError(f"--mixed_precision {train_args.mixed_precision}: {err}") from None
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    for noisy in ("httpx", "datasets", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Same seed on every process: identical initial weights (DDP also broadcasts them) and augmentations per seed.
    set_seed(train_args.seed)

    # ---------------------------------------------------------------- 2. Dataset and labels
    # main_process_first: process 0 downloads and builds the Arrow cache; the others wait, then read it.
    with accelerator.main_process_first():
        demo_dir = imgft_args.default_demo_dir()
        if not data_args.dataset_name and not data_args.train_dir:
            logger.info(f"No dataset given: using the digits demo in {demo_dir}")
            ensure_digits_imagefolder(demo_dir)
        dataset = data.load_raw_datasets(data_args, model_args.cache_dir, train_args.seed, demo_dir)
        image_column, label_column = data.find_columns(
            dataset, data_args.image_column_name, data_args.label_column_name
        )
        dataset, label_names = data.encode_labels(dataset, label_column)

    # ---------------------------------------------------------------- 3. Model and image processor
    with accelerator.main_process_first():
        model, image_processor, from_scratch = load_model(model_args, label_names)
    if from_scratch:
        logger.info(
            f"Training a {model_args.model_type} model from scratch (random weights, no download). To fine-tune "
            "a pretrained one instead, pass e.g. --model_name_or_path google/vit-base-patch16-224-in21k "
            "--ignore_mismatched_sizes"
        )

    # ---------------------------------------------------------------- 4. Transforms and DataLoaders
    train_transform, eval_transform = data.build_transforms(
        image_processor,
        model_args.image_size,
        data_args.random_flip,
        data_args.crop_scale_min,
    )
    train_dataset = data.with_image_transform(
        data.subsample(dataset["train"], data_args.max_train_samples, train_args.seed),
        train_transform,
        image_column,
        label_column,
    )
    eval_dataset = data.with_image_transform(
        data.subsample(dataset["validation"], data_args.max_eval_samples, train_args.seed),
        eval_transform,
        image_column,
        label_column,
    )
    loader_options = {
        "collate_fn": data.collate_fn,
        "num_workers": data_args.num_workers,
        "pin_memory": accelerator.device.type == "cuda",  # page-locked batches copy to the GPU faster
        "persistent_workers": data_args.num_workers > 0,  # keep workers alive across epochs
    }
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=True,
        batch_size=train_args.per_device_train_batch_size,
        **loader_options,
    )
    eval_dataloader = DataLoader(eval_dataset, batch_size=train_args.per_device_eval_batch_size, **loader_options)

    # ---------------------------------------------------------------- 5. Optimizer, schedule, prepare
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, train_args.weight_decay),
        lr=train_args.learning_rate,
    )
    # prepare() moves the model to the device and wraps it in DDP, wraps the optimizer for mixed precision
    # and accumulation, and shards each DataLoader so every process sees a different slice of every batch.
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    # After prepare(), len(train_dataloader) is this process's number of batches per epoch.
    updates_per_epoch = math.ceil(len(train_dataloader) / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    total_batch_size = (
        train_args.per_device_train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    )
    # The schedule counts optimizer steps, so warmup and total are in the same units on any process count.
    # It is stepped by hand below rather than prepared, since a prepared scheduler steps once per process.
    lr_scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=train_args.num_warmup_steps,
        num_training_steps=max_train_steps,
    )
    # save_state/load_state then include the scheduler with the model, optimizer, scaler and RNG states.
    accelerator.register_for_checkpointing(lr_scheduler)

    # What must not change between a checkpoint and its resume, or the resumed run would differ.
    run_identity = {
        "label_names": label_names,
        "train_samples": len(train_dataset),
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "seed": train_args.seed,
    }
    completed_steps, start_epoch, resume_batches = 0, 0, 0
    train_loss_sum, train_loss_count = 0.0, 0
    metrics_log = os.path.join(output_dir, outputs.METRICS_LOG)
    if resume_path:
        state = checkpoint.load_checkpoint(accelerator, resume_path, run_identity)
        completed_steps, start_epoch, resume_batches = (
            state["completed_steps"],
            state["epoch"],
            state["batch_in_epoch"],
        )
        train_loss_sum, train_loss_count = (
            state["train_loss_sum"],
            state["train_loss_count"],
        )
        if accelerator.is_main_process:
            outputs.truncate_lines(metrics_log, state["metrics_log_lines"])
        logger.info(f"Resuming from {resume_path} at step {completed_steps} (epoch {start_epoch})")
    if completed_steps >= max_train_steps and os.path.exists(os.path.join(output_dir, outputs.RESULTS_FILE)):
        logger.info(f"{output_dir} already holds the finished run ({completed_steps} steps): nothing to do")
        return

    if accelerator.is_main_process:
        if train_args.overwrite_output_dir and resume_path is None:
            outputs.clear_previous_run(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        imgft_args.save_config(
            os.path.join(output_dir, outputs.CONFIG_FILE),
            data_args,
            model_args,
            train_args,
        )
    if train_args.with_tracking:
        # Trackers take flat scalars; None becomes a string so TensorBoard's hparams accept it.
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in imgft_args.to_dict(data_args, model_args, train_args).items()
        }
        accelerator.init_trackers(outputs.TRACKER_DIR, config=tracker_config)

    logger.info(
        f"{len(train_dataset)} training / {len(eval_dataset)} validation examples, {len(label_names)} classes; "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}; "
        f"batch {total_batch_size} (= {train_args.per_device_train_batch_size} per device x "
        f"{accelerator.num_processes} x {train_args.gradient_accumulation_steps} accumulation); "
        f"{max_train_steps} optimizer steps over {num_epochs} epoch(s)"
    )
    checkpoint_every = imgft_args.checkpointing_every(train_args)

    # ---------------------------------------------------------------- The training loop
    progress = tqdm(
        total=max_train_steps,
        initial=completed_steps,
        disable=not accelerator.is_local_main_process,
    )
    # Losses pile up on the device and are read once per log step: a .item() per step would stall the GPU.
    window_loss = torch.zeros((), device=accelerator.device)
    window_batches = samples_seen = 0
    start_time = time.perf_counter()
    eval_results = {}

    def log_train_loss(epoch_position):
        # Also called at each checkpoint and epoch end, so a checkpoint never holds a half-summed window.
        nonlocal window_batches, train_loss_sum, train_loss_count
        if window_batches == 0:
            return
        mean_loss = accelerator.reduce(window_loss, "mean").item() / window_batches
        train_loss_sum, train_loss_count = (
            train_loss_sum + mean_loss * window_batches,
            train_loss_count + window_batches,
        )
        window_loss.zero_()
        window_batches = 0
        record = {
            "step": completed_steps,
            "epoch": round(epoch_position, 4),
            "loss": mean_loss,
            "learning_rate": lr_scheduler.get_last_lr()[0],
        }
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        if accelerator.is_main_process:
            outputs.append_jsonl(metrics_log, record)
        accelerator.log(
            {"train/loss": mean_loss, "train/learning_rate": record["learning_rate"]},
            step=completed_steps,
        )

    def save_checkpoint(name, epoch, batch_in_epoch):
        state = {
            "completed_steps": completed_steps,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "train_loss_sum": train_loss_sum,
            "train_loss_count": train_loss_count,
            "metrics_log_lines": outputs.count_lines(metrics_log),
            "run_identity": run_identity,
        }
        path = checkpoint.save_checkpoint(accelerator, output_dir, name, state)
        if accelerator.is_main_process:
            checkpoint.rotate_checkpoints(
                output_dir,
                train_args.checkpoints_total_limit,
                keep=[resume_path or path],
            )
        logger.info(f"Saved checkpoint {path}")

    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)  # reshuffle, in an order fixed by (seed, epoch)
        skip = resume_batches if epoch == start_epoch else 0
        # skip_first_batches replaces "iterate and discard": the sampler jumps ahead without loading images.
        epoch_batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_in_epoch, batch in enumerate(epoch_batches, start=skip + 1):
            # accumulate() skips DDP's gradient all-reduce until the last batch of each accumulation window,
            # and turns optimizer.step()/zero_grad() into no-ops before it.
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # backward() replaces loss.backward(): it scales the loss for fp16 and divides it by the
                # accumulation steps, so the loss must not be divided again here.
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_args.max_grad_norm > 0:
                    # Unscales fp16 gradients first, then clips the all-reduced gradient.
                    accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += loss.detach()
            window_batches += 1
            samples_seen += batch["labels"].shape[0]
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step happened

            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
                lr_scheduler.step()
            completed_steps += 1
            progress.update(1)
            checkpoint_now = checkpoint_every and completed_steps % checkpoint_every == 0
            if completed_steps % train_args.logging_steps == 0 or checkpoint_now:
                log_train_loss(epoch + batch_in_epoch / len(train_dataloader))
            if checkpoint_now:
                save_checkpoint(f"step_{completed_steps}", epoch, batch_in_epoch)
            if completed_steps >= max_train_steps:
                break

        log_train_loss(epoch + 1)
        eval_results = metrics.evaluate(model, eval_dataloader, accelerator, len(label_names))
        logger.info(f"epoch {epoch + 1}/{num_epochs}, step {completed_steps}: {metrics.format_results(eval_results)}")
        if accelerator.is_main_process:
            outputs.append_jsonl(
                metrics_log,
                {"step": completed_steps, "epoch": epoch + 1, **eval_results},
            )
        accelerator.log(
            {k.replace("eval_", "eval/"): v for k, v in eval_results.items()},
            step=completed_steps,
        )
        if train_args.checkpointing_steps == "epoch":
            save_checkpoint(f"epoch_{epoch + 1}", epoch + 1, 0)
        if completed_steps >= max_train_steps:
            break
    progress.close()
    train_runtime = time.perf_counter() - start_time

    # ---------------------------------------------------------------- Save a model anyone can load
    samples_seen = int(accelerator.reduce(torch.tensor(samples_seen, device=accelerator.device), "sum").item())
    accelerator.wait_for_everyone()
    # unwrap_model removes the DDP (and compile) wrappers, so the saved weights load without imgft.
    accelerator.unwrap_model(model).save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)
        results = {
            **eval_results,
            "epoch": completed_steps / updates_per_epoch,
            "train_loss": train_loss_sum / max(train_loss_count, 1),
            "train_runtime": train_runtime,
            "train_samples": len(train_dataset),
            "train_samples_per_second": samples_seen / train_runtime,
            "train_steps": completed_steps,
        }
        outputs.write_json(os.path.join(output_dir, outputs.RESULTS_FILE), results)
        logger.info(
            f"Saved the model and {outputs.RESULTS_FILE} to {output_dir}: eval_accuracy {results.get('eval_accuracy')}"
        )
        if train_args.push_to_hub:
            logger.info(f"Pushed to https://huggingface.co/{outputs.push_to_hub(train_args)}")
    accelerator.end_training()


if __name__ == "__main__":
    exit_on_user_error(main)
