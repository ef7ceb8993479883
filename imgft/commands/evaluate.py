"""`python -m imgft evaluate`: a saved model's metrics on a validation split, and the report of its errors."""

import dataclasses
import json
import os
import sys

from imgft.errors import UserError


def main(argv):
    """Evaluate `--model_name_or_path` on a split; print one JSON object on the last line.

    The split: --validation_dir alone (no --train_dir needed), --eval_split of --dataset_name, else the one
    training evaluates on. Its classes are matched by name to the model's (id2label).
    With --output_dir on the command line, also write the report there: eval_results.json (per-class metrics,
    confusion matrix, most confident mistakes), confusion_matrix.png and mistakes.png.
    """
    import datasets
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    import train_loop
    from imgft import data, runtime, transforms, tta
    from imgft.model import load_saved_classifier

    data_args, model_args, train_args = parse_evaluation_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("evaluate needs --model_name_or_path (a trained model folder or a Hub id)")
    report_dir = _report_dir(argv, train_args)
    accelerator = Accelerator(cpu=runtime.distributed_without_gpu(), mixed_precision=train_args.mixed_precision)
    runtime.setup_logging()
    with runtime.main_process_first(accelerator):
        model, image_processor = load_saved_classifier(model_args)
        model_label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        # Labelled with the model's own class ids, matched to the data's classes by name.
        validation, image_column, label_column = data.load_evaluation_split(
            data_args, model_args.cache_dir, train_args.seed, model.config.label2id
        )
        # The check training's evaluation split gets (unreadable files left out; the rest read from their files
        # as they are, never stored shrunk), so the numbers match the training run's own evaluation, and predict's.
        kept, _ = data.decode_once_dropping_unreadable(
            datasets.DatasetDict(validation=validation), image_column, label_column, model_label_names, data_args
        )
    validation = data.subsample(kept["validation"], data_args.max_eval_samples, train_args.seed)
    _, eval_transform = transforms.build_transforms(image_processor, model_args.image_size, False, 1.0)
    collate_fn = transforms.collate_fn
    if data_args.tta:  # each image becomes its V views, B x V x 3 x H x W a batch
        eval_transform = tta.views_transform(eval_transform, data_args.tta)
        collate_fn = tta.collate_views
    dataloader = DataLoader(
        transforms.with_eval_transform(validation, eval_transform, image_column, label_column),
        batch_size=train_args.per_device_eval_batch_size,
        collate_fn=collate_fn,
        num_workers=runtime.dataloader_workers(data_args.num_workers, accelerator.device, accelerator.num_processes),
        pin_memory=accelerator.device.type == "cuda",
    )
    model, dataloader = accelerator.prepare(model, dataloader)
    normalize = transforms.normalizer(image_processor)
    if data_args.tta:  # logits averaged over each image's views; training's evaluation has no --tta
        model = tta.ViewAveraged(model)
    # The loop training evaluates with, so both give the same numbers for the same model and data.
    evaluation = train_loop.evaluate(model, dataloader, normalize, accelerator)
    if report_dir is not None and accelerator.is_main_process:
        _write_report(report_dir, evaluation.results, evaluation.details, validation, image_column)
    if accelerator.is_main_process:
        print(json.dumps(evaluation.results))
    accelerator.end_training()  # leaves the process group, on every process


def parse_evaluation_args(argv):
    """`parse_args`, less training's rule that --validation_dir needs --train_dir: evaluate takes its classes
    from the model, so a folder of test images is enough."""
    from imgft.args import parse_args

    validation_dir, others = _take_flag(argv, "validation_dir")
    data_args, model_args, train_args = parse_args(others)
    if validation_dir is None:
        return data_args, model_args, train_args
    if data_args.dataset_name:
        raise UserError("give either --dataset_name or --train_dir/--validation_dir, not both")
    return dataclasses.replace(data_args, validation_dir=validation_dir), model_args, train_args


def _take_flag(argv, name):
    """(the last value given to --name on the command line or None, argv without it)."""
    value, others, tokens = None, [], iter(argv)
    for token in tokens:
        if not _is_flag(token, name):
            others.append(token)
        elif "=" in token:
            value = token.split("=", 1)[1]
        else:
            value = next(tokens, None)
            if value is None:  # no value: left for parse_args to refuse
                others.append(token)
    return value, others


def _is_flag(token, name):
    return token.startswith("--") and token[2:].split("=", 1)[0].replace("-", "_") == name


def _report_dir(argv, train_args):
    """Where the report goes: an --output_dir given on the command line, else nowhere (None).

    A config file's output_dir does not count: a training run's imgft_config.yaml names the folder that run
    wrote to. A folder holding a finished run (all_results.json) is refused unless --overwrite_output_dir is
    on the command line too, since the report would replace the run's own, which its results and card describe.
    """
    from imgft.outputs import RESULTS_FILE, check_output_dir_can_be_a_folder

    if not any(_is_flag(token, "output_dir") for token in argv):
        return None
    check_output_dir_can_be_a_folder(train_args.output_dir)
    told = train_args.overwrite_output_dir and any(_is_flag(token, "overwrite_output_dir") for token in argv)
    if os.path.exists(os.path.join(train_args.output_dir, RESULTS_FILE)) and not told:
        raise UserError(
            f"--output_dir {train_args.output_dir} holds a finished training run ({RESULTS_FILE}), whose report "
            "this evaluation would replace: choose another folder, or pass --overwrite_output_dir"
        )
    return train_args.output_dir


def _write_report(report_dir, results, details, validation, image_column):
    from imgft.report import reports

    written = reports.write_evaluation_report(report_dir, results, details, validation, image_column)
    print(f"Wrote {', '.join(written)}", file=sys.stderr)
