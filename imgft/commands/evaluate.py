"""`python -m imgft evaluate`: a saved model's metrics on a validation split, and the report of its errors."""

import json
import sys

import yaml

from imgft.errors import UserError

SOURCE_ROW = "imgft_source_row"  # each validation row's place in the original split, to name the mistakes' files


def main(argv):
    """Evaluate `--model_name_or_path` on the validation split; print one JSON object on the last line.

    With an --output_dir named (on the command line or in the config file), also write the report there:
    eval_results.json (per-class metrics, confusion matrix, most confident mistakes), confusion_matrix.png
    and mistakes.png.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    import train_loop
    from imgft import data, runtime, transforms
    from imgft.args import parse_args
    from imgft.model import load_saved_classifier

    data_args, model_args, train_args = parse_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("evaluate needs --model_name_or_path (a trained model folder or a Hub id)")
    report_dir = train_args.output_dir if _names_output_dir(argv) else None
    accelerator = Accelerator(cpu=runtime.distributed_without_gpu(), mixed_precision=train_args.mixed_precision)
    runtime.setup_logging()
    with accelerator.main_process_first():
        dataset, image_column, label_column, label_names = data.load_labeled_dataset(
            data_args, model_args.cache_dir, train_args.seed
        )
        model, image_processor = load_saved_classifier(model_args)
        original_validation = dataset["validation"]
        if report_dir:
            # Each row remembers where it came from, so the report can name the files of the mistakes.
            dataset["validation"] = original_validation.add_column(SOURCE_ROW, list(range(len(original_validation))))
        # The same single decode as training (unreadable files left out, images stored shrunk), so the
        # numbers match those of the training run's own evaluation.
        stored_size = transforms.stored_image_size(image_processor, model_args.image_size, data_args)
        dataset, _ = data.decode_once_dropping_unreadable(
            dataset, image_column, label_column, label_names, data_args, stored_size
        )
        # Score against the model's own class ids, matched to the data's classes by name.
        validation = data.relabel(dataset["validation"], label_column, label_names, model.config.label2id)
    validation = data.subsample(validation, data_args.max_eval_samples, train_args.seed)
    _, eval_transform = transforms.build_transforms(image_processor, model_args.image_size, False, 1.0)
    dataloader = DataLoader(
        transforms.with_image_transform(validation, eval_transform, image_column, label_column),
        batch_size=train_args.per_device_eval_batch_size,
        collate_fn=transforms.collate_fn,
        num_workers=runtime.dataloader_workers(data_args.num_workers, accelerator.device, accelerator.num_processes),
        pin_memory=accelerator.device.type == "cuda",
    )
    model, dataloader = accelerator.prepare(model, dataloader)
    normalize = transforms.normalizer(image_processor)
    # The loop training evaluates with, so both give the same numbers for the same model and data.
    results, details = train_loop.evaluate(model, dataloader, normalize, accelerator)
    if report_dir is not None and accelerator.is_main_process:
        _write_report(report_dir, results, details, validation, original_validation, image_column)
    if accelerator.is_main_process:
        print(json.dumps(results))
    accelerator.end_training()  # leaves the process group, on every process


def _names_output_dir(argv):
    """Whether --output_dir is given; its default is training's folder, which evaluate leaves alone unless told."""
    from imgft.args import CONFIG_SUFFIXES

    for token in argv:
        if token.startswith("--") and token[2:].split("=", 1)[0].replace("-", "_") == "output_dir":
            return True
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        with open(argv[0], encoding="utf-8") as file:  # parse_args has read and checked it already
            return "output_dir" in (yaml.safe_load(file) or {})
    return False


def _write_report(report_dir, results, details, validation, original_validation, image_column):
    import datasets

    from imgft.report import reports

    mistakes = details["mistakes"]
    if mistakes and SOURCE_ROW in validation.column_names:
        source_rows = validation.select([m["index"] for m in mistakes])[SOURCE_ROW]
        files = original_validation.cast_column(image_column, datasets.Image(decode=False)).select(source_rows)
        for mistake, file in zip(mistakes, files[image_column], strict=True):
            if file.get("path"):
                mistake["path"] = file["path"]
    written = reports.write_evaluation_report(report_dir, results, details, validation, image_column)
    print(f"Wrote {', '.join(written)}", file=sys.stderr)
