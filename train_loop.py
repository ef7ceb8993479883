"""Fine-tune a 🤗 Transformers image classifier with a training loop in plain PyTorch + 🤗 Accelerate.

    python train_loop.py                                  # the digits demo: CPU or one GPU, no download
    python train_loop.py configs/vit-beans.yaml --learning_rate 3e-5
    accelerate launch --config_file accelerate_config.yaml train_loop.py configs/imagefolder.yaml

Read it top to bottom. It follows the five steps of the transformers image-classification example:
    1. arguments      three dataclasses from a YAML file and the command line     imgft/args.py
    2. dataset        Hub name or imagefolder, a validation split, label names     imgft/data.py
    3. model          AutoConfig + AutoModelForImageClassification + processor     imgft/model.py
    4. transforms     applied lazily with set_transform; DataLoaders, collate_fn   imgft/transforms.py
    5. optimizer      AdamW, a learning-rate schedule, and accelerator.prepare     imgft/optimizer.py
then the training loop, written out here, and the save. Each Accelerate call that replaces hand-written
PyTorch is here, with a comment on what it replaces; what sits behind a step (reading folders, decoding
images, the log lines, drawing the report) lives in imgft/.
"""

import math
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from imgft import args as imgft_args
from imgft import (
    augment,
    best,
    checkpoint,
    data,
    freezing,
    layer_decay,
    losses,
    metrics,
    nonfinite,
    optimizer,
    outputs,
    run_lock,
    runtime,
    stream,
    transforms,
)
from imgft.errors import UserError, run_as_script
from imgft.model import check_model_source, load_model
from imgft.peft_model import save_adapter_and_merge
from imgft.recipes import ema, mixing, sampling
from imgft.report import reports
from imgft.train_log import log_evaluation, log_train_loss, read_losses
from imgft.train_state import TrainState

logger = get_logger("imgft")


def main(argv=None):
    # ---------------------------------------------------------------- 1. Arguments
    data_args, model_args, train_args = imgft_args.parse_args(argv)
    config = imgft_args.to_dict(data_args, model_args, train_args)
    output_dir = train_args.output_dir
    outputs.check_output_dir_can_be_a_folder(output_dir)
    outputs.check_push_possible(train_args)
    check_model_source(model_args)

    # The Accelerator replaces the hand-written parts of distributed training: device placement, DDP
    # wrapping, sharded DataLoaders, autocast + GradScaler, and no all-reduce on accumulation steps.
    # `accelerate launch` sets the process count; the same script runs as plain `python` on one device.
    # The seedable sampler draws the order from (seed, epoch): the same on every process, and on a resume.
    # non_blocking: a batch copies to the GPU (from pinned memory) while the GPU still runs the last step.
    loader_config = DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=train_args.seed, non_blocking=True
    )
    try:
        accelerator = Accelerator(
            cpu=runtime.distributed_without_gpu(),  # several processes and no GPU: one gloo DDP group
            mixed_precision=train_args.mixed_precision,
            gradient_accumulation_steps=train_args.gradient_accumulation_steps,
            log_with=train_args.report_to if train_args.with_tracking else None,
            project_dir=output_dir,
            dataloader_config=loader_config,
            kwargs_handlers=freezing.ddp_kwargs_handlers(train_args),  # a frozen backbone gets no gradients
            dynamo_backend="inductor" if train_args.torch_compile else None,  # prepare() compiles the model
        )
    except ValueError as err:  # e.g. bf16 on a GPU that cannot do it
        raise UserError(f"--mixed_precision {train_args.mixed_precision}: {err}") from None
    runtime.setup_logging()
    run_lock.take_output_dir_lock_on_main_process(accelerator, output_dir)  # one live run per folder
    outputs.check_every_process_sees_output_dir(accelerator, output_dir)  # one folder, on shared storage
    # The checkpoint to resume from: 'latest' is the newest whose files match their checksums.
    resume_path = checkpoint.resolve_resume(accelerator, train_args.resume_from_checkpoint, output_dir)
    resuming = train_args.resume_from_checkpoint is not None
    if outputs.check_output_dir(output_dir, resuming, train_args.overwrite_output_dir, config):
        logger.info(f"{output_dir} already holds this finished run: nothing to do")
        return 0
    # set_seed replaces seeding random, NumPy and torch one by one: the same new head (or model from
    # scratch) on every process and in every rerun. Splits and augmentation take the seed explicitly.
    set_seed(train_args.seed)

    # ---------------------------------------------------------------- 2. Dataset and labels
    # A Hub name or imagefolders (class folders become labels), a seeded split without a validation set,
    # and the class names that become id2label. main_process_first replaces barriers by hand: process 0
    # fills the datasets cache, the others then read it (imgft's wrapper: if process 0 refuses, all stop).
    with runtime.main_process_first(accelerator):
        dataset, image_column, label_column, label_names = data.load_labeled_dataset(
            data_args, model_args.cache_dir, train_args.seed
        )

    # ---------------------------------------------------------------- 3. Model and image processor
    with runtime.main_process_first(accelerator):
        model, image_processor = load_model(model_args, label_names)  # process 0 downloads, the others read

    # ---------------------------------------------------------------- 4. Transforms and DataLoaders
    # One decode of every image: unreadable files are set aside (each named), and with --resize_once the
    # rest are stored shrunk to what the transforms need, in a cached file later epochs and runs reuse.
    stored_size = transforms.stored_image_size(image_processor, model_args.image_size, data_args)
    with runtime.main_process_first(accelerator):
        dataset, unreadable_images = data.decode_once_dropping_unreadable(
            dataset, image_column, label_column, label_names, data_args, stored_size
        )
    # Sizes come from the image processor. The transforms give uint8 images (a quarter of float32's bytes
    # to move) unless the processor must run itself; `normalize` makes the model's float input on the device.
    train_transform, eval_transform = transforms.build_transforms(
        image_processor, model_args.image_size, data_args.random_flip, data_args.crop_scale_min
    )
    train_transform = augment.with_auto_augment_and_erasing(train_transform, data_args, image_processor)
    normalize = transforms.normalizer(image_processor, train_args.channels_last)
    train_rows = data.subsample(dataset["train"], data_args.max_train_samples, train_args.seed)
    train_samples = data.num_rows(train_rows)  # None for a stream: its length is unknown until it is read
    data.warn_classes_without_training_images(train_rows, label_column, label_names)
    eval_rows = data.subsample(dataset["validation"], data_args.max_eval_samples, train_args.seed)
    # set_transform, lazily: images are decoded and augmented per batch, in the DataLoader's workers.
    # Augmentation is seeded per image by (seed, epoch, row), the workers reading the epoch from
    # shared memory, so it is the same for any number of workers and after a resume.
    augmentation_epoch = transforms.shared_epoch()
    train_dataset = transforms.with_image_transform(
        train_rows, train_transform, image_column, label_column, train_args.seed, augmentation_epoch
    )
    eval_dataset = transforms.with_eval_transform(eval_rows, eval_transform, image_column, label_column)
    workers = runtime.dataloader_workers(data_args.num_workers, accelerator.device, accelerator.num_processes)
    # collate_fn stacks pixel_values into B x 3 x H x W and labels into B; pinned memory on a GPU.
    loader_options = transforms.loader_options(workers, accelerator.device, train_args.seed)
    batch_size = train_args.per_device_train_batch_size
    if data_args.streaming:  # this process's share of the stream, resumable mid-pass: imgft/stream.py
        train_labels = None  # unknown until read (--balanced_sampling and --class_weighted_loss need them)
        train_dataloader = stream.StreamLoader(train_dataset, batch_size, loader_options, accelerator)
    else:
        train_labels = data.labels_of(train_rows, label_column)
        sampler = sampling.balanced_sampler(train_labels, train_args)  # --balanced_sampling; None: a shuffle
        train_dataloader = DataLoader(
            train_dataset, batch_size, shuffle=sampler is None, sampler=sampler, **loader_options
        )
    eval_dataloader = DataLoader(eval_dataset, train_args.per_device_eval_batch_size, **loader_options)

    # ---------------------------------------------------------------- 5. Optimizer, schedule, prepare
    if train_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # No weight decay on biases and norms; --layer_decay and --head_learning_rate give groups their own lr.
    param_groups = layer_decay.param_groups(model, train_args)
    adamw = optimizer.adamw(param_groups, train_args.learning_rate, accelerator.mixed_precision)
    ema_model = ema.averaged_copy(model, train_args.ema_decay)  # --ema_decay's copy of the model, or None
    # prepare() moves the model to the device and wraps it in DDP, wraps the optimizer for mixed precision
    # and accumulation, and shards each DataLoader: len(train_dataloader) is then this process's share.
    # (A StreamLoader is no DataLoader: prepare passes it through, split and placed on the device already.)
    model, adamw, train_dataloader, eval_dataloader = accelerator.prepare(
        model, adamw, train_dataloader, eval_dataloader
    )
    # The EMA copy is for evaluation only (device and autocast, no DDP); save_state saves it as model_1.
    ema_model = None if ema_model is None else accelerator.prepare_model(ema_model, evaluation_mode=True)
    loss_options = losses.loss_options(train_args, train_labels, len(label_names), accelerator.device)
    mix_options = mixing.mix_options(train_args, len(label_names), accelerator.process_index)  # Mixup, CutMix
    # A stream has no length (None): its epoch ends when it runs out, and --max_train_steps is required.
    batches_per_epoch = None if data_args.streaming else len(train_dataloader)
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * math.ceil(
        batches_per_epoch / train_args.gradient_accumulation_steps
    )
    # The schedule counts optimizer steps, so warmup and total mean the same on any number of processes.
    # Not prepared (Accelerate's wrapper steps it once per process at each call): the loop steps it by hand.
    lr_scheduler = get_scheduler(
        train_args.lr_scheduler_type, adamw, train_args.num_warmup_steps, max_train_steps
    )

    # The loop's counters. register_for_checkpointing replaces saving more state_dicts by hand: save_state
    # and load_state carry them and the schedule, beside the model, optimizer, GradScaler, sampler and RNGs.
    state = TrainState(device=accelerator.device, batches_per_epoch=batches_per_epoch)
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if data_args.streaming:  # every process's position in the stream
        accelerator.register_for_checkpointing(train_dataloader)
    # A resume must continue the same run: the same arguments, data and launch. Anything else is refused.
    run_identity = checkpoint.run_identity(
        config, label_names, train_samples, accelerator, max_train_steps, image_processor
    )
    if resume_path:
        for change in checkpoint.check_resumable(resume_path, run_identity):
            logger.warning(f"Changed since the checkpoint, which does not change training: {change}")
        # load_state replaces loading each state_dict by hand, and restores every process's random state
        # (`restoring` checks that it did: Accelerate only logs a failure to).
        with checkpoint.restoring(accelerator, resume_path):
            accelerator.load_state(resume_path)
        logger.info(f"Resuming from {resume_path} at step {state.completed_steps}")
    if accelerator.is_main_process:  # replaces `rank == 0`: one process writes the shared files
        outputs.start_run_files(output_dir, train_args, resume_path, config)
    if train_args.with_tracking:
        # init_trackers starts TensorBoard/W&B/... on the main process only; imgft/train_log.py logs to them.
        accelerator.init_trackers(outputs.TRACKER_DIR, outputs.tracker_config(config))
        outputs.replay_metrics_to_trackers(accelerator, output_dir)  # a resumed run's history, as logged
    runtime.log_run_summary(train_rows, eval_rows, label_names, accelerator, train_args, max_train_steps)

    # ---------------------------------------------------------------- The training loop
    # is_local_main_process replaces `LOCAL_RANK == 0`: one progress bar per machine.
    progress = tqdm(
        total=max_train_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process
    )
    # SIGTERM/SIGINT finish the step, checkpoint and stop; several processes share the signal over gloo.
    signal_received = runtime.install_signal_handlers_and_start_signal_group(
        accelerator, state, max_train_steps
    )
    checkpoint_every = imgft_args.checkpoint_interval(train_args)  # None, a number of steps, or "epoch"
    stop = None  # a runtime.Stop, once a signal, a NaN loss or early stopping ends the run before its end
    evaluation = None  # the latest metrics.Evaluation: results, and the details the report draws
    run_clock = runtime.SpeedClock(state.samples_seen)
    while state.completed_steps < max_train_steps and stop is None:
        model.train()
        # unwrap_model replaces model.module: the plain model, whatever DDP or torch.compile wrapped it in.
        freezing.apply_unfreeze_schedule(accelerator.unwrap_model(model), state.epoch, train_args)
        train_dataloader.set_epoch(state.epoch)  # as DistributedSampler.set_epoch: order by (seed, epoch)
        augmentation_epoch.fill_(state.epoch)
        # skip_first_batches replaces "iterate and discard" after a resume mid-epoch: the sampler jumps
        # ahead without loading a single image. It builds a new DataLoader (new workers, slow to start),
        # so only then. A stream's loader needs none: load_state restored its position.
        batches = train_dataloader
        if state.batch_in_epoch > 0 and not data_args.streaming:
            batches = accelerator.skip_first_batches(train_dataloader, state.batch_in_epoch)
        state.start_epoch_clock()
        for batch in runtime.timed(batches, state.epoch_clock):  # timed(): counts the time spent waiting
            batch = mixing.mix_batch(batch, mix_options, state.epoch, state.batch_in_epoch)  # Mixup/CutMix
            # accumulate() replaces model.no_sync() and counting batches: DDP all-reduces gradients only on
            # an accumulation window's last batch; before it, optimizer.step() and zero_grad() do nothing.
            with accelerator.accumulate(model):
                logits = model(pixel_values=normalize(batch["pixel_values"])).logits
                loss = losses.training_loss(logits, batch["labels"], loss_options)  # cross-entropy + recipes
                # backward() replaces loss.backward(): it scales the loss for fp16 and divides it by the
                # accumulation steps, so it must not be divided here again.
                accelerator.backward(loss)
                state.add_batch_loss(loss, len(batch["labels"]))
                if accelerator.sync_gradients:  # the window's last batch: an optimizer step follows
                    nonfinite.skip_update_if_loss_was_nonfinite(accelerator, adamw, state)
                    if train_args.max_grad_norm > 0:  # replaces scaler.unscale_() + clip_grad_norm_()
                        accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                adamw.step()
                adamw.zero_grad()
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step happened
            if not accelerator.optimizer_step_was_skipped:  # GradScaler skips a step after an fp16 overflow
                lr_scheduler.step()
            state.completed_steps += 1
            ema.update_ema(ema_model, model, state.completed_steps, train_args.ema_decay)
            progress.update(1)

            signum = signal_received()
            checkpoint_now = signum or checkpoint.step_due(checkpoint_every, state.completed_steps)
            if state.completed_steps % train_args.logging_steps == 0:
                stop = log_train_loss(accelerator, state, train_args, lr_scheduler, progress)
            elif checkpoint_now:
                stop = read_losses(accelerator, state, train_args)  # a checkpoint holds the whole loss window
            if stop is None and train_args.eval_steps and state.completed_steps % train_args.eval_steps == 0:
                evaluation = evaluate_and_record(
                    model,
                    ema_model,
                    eval_dataloader,
                    normalize,
                    accelerator,
                    state,
                    train_args,
                    image_processor,
                )
                stop = best.stop_if_no_better(state.best, train_args)
            if stop is None and checkpoint_now:
                step_name = f"step_{state.completed_steps}"
                save_checkpoint(accelerator, step_name, state, run_identity, resume_path, train_args)
            if signum and stop is None:
                stop = runtime.stop_for_signal(signum)
            if state.completed_steps >= max_train_steps or stop is not None:
                break

        if stop is None and state.epoch_done():  # the end of an epoch, even one that ends the run
            state.end_epoch()
            stop = log_train_loss(accelerator, state, train_args, lr_scheduler, progress)
            if stop is None and not train_args.eval_steps:
                evaluation = evaluate_and_record(
                    model,
                    ema_model,
                    eval_dataloader,
                    normalize,
                    accelerator,
                    state,
                    train_args,
                    image_processor,
                )
                stop = best.stop_if_no_better(state.best, train_args)
            if stop is None and checkpoint_every == "epoch":
                save_checkpoint(
                    accelerator, f"epoch_{state.epoch}", state, run_identity, resume_path, train_args
                )
    progress.close()

    # ---------------------------------------------------------------- Why the loop ended
    if stop is None:  # the last steps' losses, when the run ends between two log steps
        stop = log_train_loss(accelerator, state, train_args, lr_scheduler, progress)
    if stop is not None and stop.reason == "nonfinite_loss":  # nothing trained after the NaN is saved
        raise UserError(stop.message)
    if stop is not None and stop.reason == "signal":  # its checkpoint is saved; the rerun resumes from it
        logger.info(stop.message)
        accelerator.end_training()
        return stop.exit_code
    if stop is not None:  # early stopping: evaluate and save as at the end
        logger.info(stop.message)
    train_runtime = run_clock.seconds()
    train_speed = run_clock.speed(state.samples_seen, accelerator.num_processes)
    if state.evaluated_at != state.completed_steps:  # --eval_steps off the last step, or a run cut mid-epoch
        evaluation = evaluate_and_record(
            model, ema_model, eval_dataloader, normalize, accelerator, state, train_args, image_processor
        )
    if train_args.load_best_model_at_end and state.best["step"] not in (None, state.completed_steps):
        best_dir = os.path.join(output_dir, outputs.BEST_DIR)
        outputs.load_weights(accelerator.unwrap_model(model, keep_torch_compile=False), best_dir)
        evaluation = None
    if evaluation is None:  # the best model was loaded, or we resumed after the last evaluation
        evaluation = evaluate_all(model, ema_model, eval_dataloader, normalize, accelerator)
    saved_weights = ema.choose_weights(evaluation.results, train_args)  # with --ema_decay: "ema" or "raw"
    eval_details = evaluation.details
    if saved_weights == "ema":  # the EMA weights are saved, and the report describes them
        model = ema_model
        eval_details = evaluation.ema_details

    # ---------------------------------------------------------------- Save a model anyone can load
    accelerator.wait_for_everyone()  # replaces a torch.distributed.barrier(): all processes done training
    with outputs.saving_final_files(output_dir):  # a full disk: one line, and the checkpoints stay intact
        # unwrap_model strips the DDP and torch.compile wrappers, so the weights load without imgft.
        # With --use_peft the adapter goes to output_dir/adapter and is merged into the weights saved here.
        plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        whole_weights = outputs.gathered_weights(accelerator, model)  # get_state_dict, where FSDP shards them
        save_adapter_and_merge(plain_model, output_dir, accelerator).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, state_dict=whole_weights
        )
        if accelerator.is_main_process:
            image_processor.save_pretrained(output_dir)  # pipeline() reads sizes and normalisation from it
            results = outputs.final_results(
                evaluation.results,
                state,
                train_samples,
                unreadable_images,
                train_runtime,
                train_speed,
                stopped_early=stop is not None,
                saved_weights=saved_weights,
            )
            reports.write_training_report(
                output_dir, config, results, eval_details, eval_rows, image_column, accelerator.num_processes
            )
            # Written last: all_results.json marks the run as finished, so a kill before it is resumable.
            outputs.write_json(os.path.join(output_dir, outputs.RESULTS_FILE), results)
    logger.info(f"Saved the model and {outputs.RESULTS_FILE} to {output_dir}")
    if train_args.push_to_hub and accelerator.is_main_process:
        logger.info(f"Pushed to https://huggingface.co/{outputs.push_to_hub(train_args)}")
    accelerator.end_training()  # ends the trackers and leaves the process group
    return 0


# ------------------------------------------------------- The loop's parts: evaluation, logs, checkpoints


@torch.no_grad()
def evaluate(model, eval_dataloader, normalize, accelerator):
    """A metrics.Evaluation of the whole validation set: results (top-1/top-5 accuracy, macro precision,
    recall, F1 and loss), and details (per class, the confusion matrix, the most confident mistakes).
    Every process must call it, and all get the same answer."""
    id2label = accelerator.unwrap_model(model).config.id2label
    label_names = [id2label[i] for i in range(len(id2label))]
    was_training = model.training
    model.eval()
    tally = metrics.start_tally(label_names, accelerator.device)
    for batch in eval_dataloader:
        logits = model(pixel_values=normalize(batch["pixel_values"])).logits
        # gather_for_metrics replaces a hand-written all_gather: it also drops the samples that pad the
        # last batch so that every process gets one, which would otherwise be counted twice.
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        metrics.add_batch(tally, logits, labels)
    model.train(was_training)
    return metrics.finish_tally(tally, label_names)


def evaluate_all(model, ema_model, eval_dataloader, normalize, accelerator):
    """`evaluate` the model, and with --ema_decay the EMA weights too: their results join as eval_ema_*."""
    evaluation = evaluate(model, eval_dataloader, normalize, accelerator)
    if ema_model is None:
        return evaluation
    ema.broadcast_ema_buffers(ema_model)  # process 0's BatchNorm statistics, which the checkpoints hold
    ema_evaluation = evaluate(ema_model, eval_dataloader, normalize, accelerator)
    results = {**evaluation.results, **ema.ema_results(ema_evaluation.results)}
    return metrics.Evaluation(results, evaluation.details, ema_details=ema_evaluation.details)


def evaluate_and_record(
    model, ema_model, eval_dataloader, normalize, accelerator, state, train_args, image_processor
):
    """Evaluate; log one line with the training speed since the epoch began; keep the best model, with the
    image processor beside it."""
    speed = state.epoch_clock.speed(state.samples_seen, accelerator.num_processes)  # before evaluating
    evaluation = evaluate_all(model, ema_model, eval_dataloader, normalize, accelerator)
    state.evaluated_at = state.completed_steps
    log_evaluation(accelerator, state, evaluation.results, speed, train_args.output_dir)
    state.best, improved = best.update(
        state.best, evaluation.results, state.completed_steps, state.epoch_position(), train_args
    )
    if improved and train_args.load_best_model_at_end:
        outputs.save_best_model(accelerator, model, image_processor, train_args.output_dir)
    return evaluation


def save_checkpoint(accelerator, name, state, run_identity, resume_path, train_args):
    """Save all a resume needs to output_dir/name, then delete the oldest beyond --checkpoints_total_limit."""
    output_dir = train_args.output_dir
    metrics_log = os.path.join(output_dir, outputs.METRICS_LOG)
    # save_state replaces saving each state_dict by hand: model, optimizer, GradScaler, sampler, the random
    # states of every process, and the registered schedule and TrainState. staged_checkpoint renames the
    # folder into place only once it is complete, so 'latest' never picks a half-written one.
    with checkpoint.staged_checkpoint(
        accelerator, output_dir, name, state.completed_steps, run_identity, metrics_log
    ) as staging_folder:
        accelerator.save_state(staging_folder)
    limit = train_args.checkpoints_total_limit
    path = os.path.join(output_dir, name)
    # Kept: the one just saved, the newest intact checkpoint even beside a damaged one of a later step.
    checkpoint.delete_oldest_checkpoints(accelerator, output_dir, limit, keep=[path, resume_path])
    logger.info(f"Saved checkpoint {path}")


if __name__ == "__main__":
    run_as_script(main)
