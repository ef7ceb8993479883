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
from imgft import best, checkpoint, data, metrics, outputs, runtime, transforms
from imgft.errors import UserError, run_as_script
from imgft.model import check_model_source, load_model, optimizer_param_groups
from imgft.report import reports

logger = get_logger("imgft")


def main(argv=None):
    # ---------------------------------------------------------------- 1. Arguments
    data_args, model_args, train_args = parsed = imgft_args.parse_args(sys.argv[1:] if argv is None else argv)
    config, output_dir = imgft_args.to_dict(*parsed), train_args.output_dir
    outputs.check_push_possible(train_args)
    check_model_source(model_args)

    # A sampler seeded by (seed, epoch): the same order on every process, every rerun and after a resume.
    # non_blocking: a batch copies to the GPU (from pinned memory) while the GPU still computes the last step.
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_args.seed, non_blocking=True)
    # The Accelerator replaces the hand-written parts of distributed training: device placement, DDP wrapping,
    # sharded DataLoaders, autocast + GradScaler, and no all-reduce on accumulation steps. `accelerate launch`
    # sets the process count; the same script runs as plain `python` on one device.
    try:
        accelerator = Accelerator(
            cpu=runtime.distributed_without_gpu(),
            mixed_precision=train_args.mixed_precision,
            gradient_accumulation_steps=train_args.gradient_accumulation_steps,
            log_with=train_args.report_to if train_args.with_tracking else None,
            project_dir=output_dir,
            dataloader_config=loader_config,
        )
    except ValueError as err:  # e.g. bf16 on a GPU that cannot do it
        raise UserError(f"--mixed_precision {train_args.mixed_precision}: {err}") from None
    runtime.setup_logging()
    resume_path = checkpoint.resolve_resume(train_args.resume_from_checkpoint, output_dir)
    resuming = train_args.resume_from_checkpoint is not None
    if outputs.check_output_dir(output_dir, resuming, train_args.overwrite_output_dir, config):
        logger.info(f"{output_dir} already holds this finished run: nothing to do")
        return
    checkpoint_every = imgft_args.checkpointing_every(train_args)
    # Same seed on every process: identical initial weights (DDP also broadcasts them) and augmentations per seed.
    set_seed(train_args.seed)

    # ---------------------------------------------------------------- 2. Dataset and labels
    # Hub name or imagefolders (folder names become labels), a seeded split if there is no validation set, and
    # a ClassLabel whose names become id2label. main_process_first: process 0 builds the cache, the others read it.
    with accelerator.main_process_first():
        dataset, image_column, label_column, label_names = data.load_labeled_dataset(
            data_args, model_args.cache_dir, train_args.seed
        )

    # ---------------------------------------------------------------- 3. Model and image processor
    with accelerator.main_process_first():
        model, image_processor = load_model(model_args, label_names)  # says so when training from scratch

    # ---------------------------------------------------------------- 4. Transforms and DataLoaders
    # One decode of every image: unreadable files are set aside (each named), and with --resize_once the
    # rest are stored shrunk to what the transforms need, in a cached file that later epochs and runs reuse.
    stored_size = transforms.stored_image_size(image_processor, model_args.image_size, data_args)
    with accelerator.main_process_first():
        dataset, unreadable_images = data.drop_unreadable(
            dataset, image_column, label_column, label_names, data_args, stored_size
        )
    # Sizes and normalisation come from the image processor; transforms run lazily, per batch (set_transform).
    # They give uint8 images (a quarter of float32's bytes to move); `normalize` makes floats on the device.
    train_transform, eval_transform = transforms.build_transforms(
        image_processor, model_args.image_size, data_args.random_flip, data_args.crop_scale_min
    )
    normalize = transforms.normalizer(image_processor, train_args.channels_last)
    train_dataset = data.subsample(dataset["train"], data_args.max_train_samples, train_args.seed)
    eval_rows = data.subsample(dataset["validation"], data_args.max_eval_samples, train_args.seed)
    # Augmentation is seeded per image by (seed, epoch, row), workers reading the epoch from shared memory.
    augmentation_epoch = transforms.shared_epoch()
    train_dataset = transforms.with_image_transform(
        train_dataset, train_transform, image_column, label_column, seed=train_args.seed, epoch=augmentation_epoch
    )
    eval_dataset = transforms.with_image_transform(eval_rows, eval_transform, image_column, label_column)
    workers = runtime.dataloader_workers(data_args.num_workers, accelerator.device, accelerator.num_processes)
    loader_options = {
        "collate_fn": transforms.collate_fn,  # stacks pixel_values into B x C x H x W (uint8) and labels into B
        "num_workers": workers,
        "pin_memory": accelerator.device.type == "cuda",  # a non_blocking copy from pageable memory waits for the GPU
        "persistent_workers": workers > 0,  # keep workers alive across epochs
    }
    train_dataloader = DataLoader(train_dataset, train_args.per_device_train_batch_size, shuffle=True, **loader_options)
    eval_dataloader = DataLoader(eval_dataset, train_args.per_device_eval_batch_size, **loader_options)

    # ---------------------------------------------------------------- 5. Optimizer, schedule, prepare
    model = model.to(memory_format=torch.channels_last) if train_args.channels_last else model
    # fused: the whole update in one kernel, which can also skip a step on the device (found_inf, in the loop).
    param_groups = optimizer_param_groups(model, train_args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=train_args.learning_rate, fused=True)
    # prepare() moves the model to the device and wraps it in DDP, wraps the optimizer for mixed precision
    # and accumulation, and shards each DataLoader: len(train_dataloader) is then this process's share.
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # The schedule counts optimizer steps, so warmup and total mean the same on any number of processes.
    # It is stepped by hand below rather than prepared: a prepared scheduler steps once per process.
    lr_scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, train_args.num_warmup_steps, max_train_steps)
    # save_state/load_state now cover the scheduler too, beside model, optimizer, scaler, sampler and RNGs.
    accelerator.register_for_checkpointing(lr_scheduler)

    # Counters a checkpoint restores; a resume must continue the same run (same arguments and data).
    run_identity = checkpoint.run_identity(
        config, label_names, len(train_dataset), accelerator.num_processes, accelerator.mixed_precision, max_train_steps
    )
    state = checkpoint.NEW_RUN_STATE
    metrics_log = os.path.join(output_dir, outputs.METRICS_LOG)
    if resume_path:
        state, harmless_changes = checkpoint.load_checkpoint(accelerator, resume_path, run_identity)
        for change in harmless_changes:
            logger.warning(f"Changed since the checkpoint, which does not change training: {change}")
        logger.info(f"Resuming from {resume_path} at step {state['completed_steps']}")
    completed_steps, train_loss_sum, train_loss_count, best_state = (
        state["completed_steps"], state["train_loss_sum"], state["train_loss_count"], state["best"]
    )  # fmt: skip
    if accelerator.is_main_process:
        outputs.start_run_files(output_dir, train_args, resume_path, state, config)
    if train_args.with_tracking:
        # init_trackers starts TensorBoard/W&B/... on the main process only; accelerator.log() is a no-op elsewhere.
        # purge_step makes TensorBoard drop what an interrupted run logged after the step we start from.
        tensorboard_options = {"tensorboard": {"purge_step": completed_steps + 1}}
        accelerator.init_trackers(outputs.TRACKER_DIR, outputs.tracker_config(config), tensorboard_options)
    logger.info(runtime.run_summary(train_dataset, eval_dataset, label_names, accelerator, train_args, max_train_steps))

    def log_train_loss(epoch_position):
        # Also called at checkpoints and epoch ends, so a checkpoint never holds a half-summed window. It reads the
        # count of steps skipped for a NaN/inf loss too: --on_nonfinite_loss stop ends the run here.
        nonlocal window_batches, train_loss_sum, train_loss_count, skipped_steps, steps_checked
        skipped_steps = runtime.read_skipped_steps(skipped_on_device, skipped_steps, steps_checked, completed_steps,
                                                   train_args.on_nonfinite_loss, output_dir)  # fmt: skip
        steps_checked = completed_steps
        if window_batches:
            mean_loss = accelerator.reduce(window_loss, "mean").item() / window_batches
            train_loss_sum += mean_loss * window_batches
            train_loss_count += window_batches
            window_loss.zero_()
            window_batches = 0
            record = {"step": completed_steps, "epoch": round(epoch_position, 4), "loss": mean_loss,
                      "learning_rate": lr_scheduler.get_last_lr()[0]}  # fmt: skip
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            outputs.log_metrics(accelerator, metrics_log, record)

    def save_checkpoint(name, epoch, batch_in_epoch):
        counters = {"completed_steps": completed_steps, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best":
                    best_state, "train_loss_sum": train_loss_sum, "train_loss_count": train_loss_count}  # fmt: skip
        path = checkpoint.save_checkpoint(accelerator, output_dir, name, counters, run_identity, metrics_log)
        checkpoint.rotate_checkpoints(accelerator, output_dir, train_args.checkpoints_total_limit, keep=[resume_path])
        logger.info(f"Saved checkpoint {path}")

    def evaluate_now(epoch_position):
        # Logs one line, keeps the best model and the details the report needs; True when early stopping says stop.
        nonlocal eval_results, details, evaluated_at, best_state
        epoch_images = (samples_seen - samples_before) * accelerator.num_processes
        speed = runtime.throughput(epoch_images, time.perf_counter() - epoch_start, data_wait)  # training time only
        eval_results, details = metrics.detailed_evaluation(model, eval_dataloader, normalize, accelerator, label_names)
        evaluated_at = completed_steps
        record = {"step": completed_steps, "epoch": round(epoch_position, 4), **eval_results, **speed}
        logger.info(f"{time.perf_counter() - start_time:.0f} s, {metrics.format_results(record)}")
        outputs.log_metrics(accelerator, metrics_log, record)
        best_state, improved = best.update(best_state, eval_results, completed_steps, epoch_position, train_args)
        if improved and train_args.load_best_model_at_end:
            accelerator.unwrap_model(model).save_pretrained(
                os.path.join(output_dir, outputs.BEST_DIR), is_main_process=accelerator.is_main_process
            )
        model.train()
        return best.should_stop_early(best_state, train_args, logger)

    # ---------------------------------------------------------------- The training loop
    stop_signal = runtime.preemption_check(accelerator)
    progress = tqdm(total=max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    # Losses pile up on the device and are read once per log step: an .item() per step would stall the GPU.
    window_loss = torch.zeros((), device=accelerator.device)
    nonfinite_losses = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    skipped_on_device = torch.zeros((), device=accelerator.device)
    window_batches, samples_seen, skipped_steps, steps_checked = 0, 0, 0, completed_steps
    eval_results, details, evaluated_at, stop_early = {}, {}, None, False
    start_time = time.perf_counter()
    for epoch in range(state["epoch"], num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)  # reshuffle, in an order fixed by (seed, epoch)
        augmentation_epoch.fill_(epoch)
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        # skip_first_batches replaces "iterate and discard": the sampler jumps ahead without loading images.
        epoch_batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        # timed() adds up the time spent waiting for each batch: a large share means a starved accelerator.
        data_wait, epoch_start, samples_before = {"seconds": 0.0}, time.perf_counter(), samples_seen
        for batch_in_epoch, batch in enumerate(runtime.timed(epoch_batches, data_wait), start=skip + 1):
            # accumulate() skips DDP's gradient all-reduce until the last batch of each accumulation window,
            # and turns optimizer.step() and zero_grad() into no-ops before it.
            with accelerator.accumulate(model):
                loss = model(pixel_values=normalize(batch["pixel_values"]), labels=batch["labels"]).loss
                # backward() replaces loss.backward(): it scales the loss for fp16 and divides it by the
                # accumulation steps, so the loss must not be divided again here.
                accelerator.backward(loss)
                nonfinite_losses += ~loss.detach().isfinite()
                if accelerator.sync_gradients:
                    # A NaN/inf loss on any process sets found_inf: fused AdamW then skips the update on the device
                    # (GradScaler's protocol). Counted there, read at log steps: a read per step stalls the GPU.
                    optimizer.optimizer.found_inf = runtime.any_nonfinite(accelerator, nonfinite_losses)
                    skipped_on_device += optimizer.optimizer.found_inf
                    if train_args.max_grad_norm > 0:  # unscales fp16 gradients, then clips the all-reduced ones
                        accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += loss.detach().nan_to_num(0.0, 0.0, 0.0)
            window_batches += 1
            samples_seen += len(batch["labels"])
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step happened
            if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow makes the scaler skip a step
                lr_scheduler.step()
            completed_steps += 1
            progress.update(1)
            signum = stop_signal()  # SIGTERM/SIGINT: checkpoint this step, then exit
            checkpoint_now = signum or (checkpoint_every and completed_steps % checkpoint_every == 0)
            if completed_steps % train_args.logging_steps == 0 or checkpoint_now:
                log_train_loss(epoch + batch_in_epoch / len(train_dataloader))
            if train_args.eval_steps and completed_steps % train_args.eval_steps == 0:
                stop_early = evaluate_now(epoch + batch_in_epoch / len(train_dataloader))
            if checkpoint_now:
                save_checkpoint(f"step_{completed_steps}", epoch, batch_in_epoch)
            if signum:
                logger.info("Stopped by a signal; to continue, rerun the command with --resume_from_checkpoint latest")
                accelerator.end_training()
                sys.exit(128 + signum)
            if completed_steps >= max_train_steps or stop_early:
                break

        log_train_loss(epoch + 1)
        if not train_args.eval_steps:
            stop_early = evaluate_now(epoch + 1)
        if train_args.checkpointing_steps == "epoch":
            save_checkpoint(f"epoch_{epoch + 1}", epoch + 1, 0)
        if completed_steps >= max_train_steps or stop_early:
            break
    progress.close()
    train_runtime = time.perf_counter() - start_time
    if evaluated_at != completed_steps:  # --eval_steps off the last step, or resumed after the last evaluation
        evaluate_now(completed_steps / updates_per_epoch)
    if train_args.load_best_model_at_end and best_state["step"] not in (None, completed_steps):
        outputs.load_weights(accelerator.unwrap_model(model), os.path.join(output_dir, outputs.BEST_DIR))
        eval_results, details = metrics.detailed_evaluation(model, eval_dataloader, normalize, accelerator, label_names)

    # ---------------------------------------------------------------- Save a model anyone can load
    # reduce() sums each process's count into the global one (a collective: every process calls it).
    samples_seen = accelerator.reduce(torch.tensor(samples_seen, device=accelerator.device), "sum").item()
    accelerator.wait_for_everyone()
    # unwrap_model strips the DDP (and torch.compile) wrappers, so the saved weights load without imgft.
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)  # pipeline() reads sizes and normalisation from it
        results = {**eval_results, "epoch": completed_steps / updates_per_epoch, "train_steps": completed_steps,
                   "train_loss": train_loss_sum / max(train_loss_count, 1), "train_runtime": train_runtime,
                   "train_samples": len(train_dataset), "train_samples_per_second": samples_seen / train_runtime,
                   "unreadable_images": unreadable_images, "skipped_nonfinite_steps": skipped_steps,
                   "stopped_early": stop_early, **best.summary(best_state)}  # fmt: skip
        outputs.write_json(os.path.join(output_dir, outputs.RESULTS_FILE), results)
        report = (config, results, details, eval_rows, image_column, metrics_log, accelerator.num_processes)
        reports.write_training_report(output_dir, *report)
        logger.info(f"Saved the model and {outputs.RESULTS_FILE} to {output_dir}")
        if train_args.push_to_hub:
            logger.info(f"Pushed to https://huggingface.co/{outputs.push_to_hub(train_args)}")
    accelerator.end_training()


if __name__ == "__main__":
    run_as_script(main)
