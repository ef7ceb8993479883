"""`python -m imgft COMMAND`: the tools around train_loop.py.

demo-data DIR                 write the digits demo as an imagefolder
evaluate [CONFIG] [flags]     evaluate a saved model on the validation split (same data flags as training)
"""

import json
import sys

from imgft.errors import UserError, exit_on_user_error

COMMANDS = ("demo-data", "evaluate", "check-data", "flags")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            sys.exit(2)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "demo-data":
        exit_on_user_error(demo_data, rest)
    elif command == "evaluate":
        exit_on_user_error(evaluate, rest)
    elif command == "check-data":
        exit_on_user_error(check_data, rest)
    elif command == "flags":
        from imgft.args import flags_markdown

        print(flags_markdown(), end="")


def demo_data(argv):
    from imgft.demo_data import write_digits_imagefolder

    if len(argv) != 1 or argv[0].startswith("-"):
        raise UserError("usage: python -m imgft demo-data DIR")
    try:
        path = write_digits_imagefolder(argv[0])
    except FileExistsError:
        raise UserError(f"{argv[0]} already exists; choose a new folder") from None
    print(f"Wrote the digits demo (train/ and validation/, 10 classes) to {path}")


def evaluate(argv):
    """Evaluate `--model_name_or_path` on the validation split; print one JSON object on the last line."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from imgft import data, metrics, runtime
    from imgft.args import parse_args
    from imgft.model import load_saved_classifier

    data_args, model_args, train_args = parse_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("evaluate needs --model_name_or_path (a trained model folder or a Hub id)")
    accelerator = Accelerator(cpu=runtime.distributed_without_gpu(), mixed_precision=train_args.mixed_precision)
    runtime.setup_logging()
    with accelerator.main_process_first():
        dataset, image_column, label_column, label_names, _ = data.load_labeled_dataset(
            data_args, model_args.cache_dir, train_args.seed
        )
        model, image_processor = load_saved_classifier(model_args)
        # Score against the model's own class ids, matched to the data's classes by name.
        validation = data.relabel(dataset["validation"], label_column, label_names, model.config.label2id)
    _, eval_transform = data.build_transforms(image_processor, model_args.image_size, False, 1.0)
    validation = data.with_image_transform(
        data.subsample(validation, data_args.max_eval_samples, train_args.seed),
        eval_transform,
        image_column,
        label_column,
    )
    dataloader = DataLoader(
        validation,
        batch_size=train_args.per_device_eval_batch_size,
        collate_fn=data.collate_fn,
        num_workers=data_args.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    num_labels = model.config.num_labels
    model, dataloader = accelerator.prepare(model, dataloader)
    results = metrics.evaluate(model, dataloader, accelerator, num_labels)
    if accelerator.is_main_process:
        print(json.dumps(results))


def check_data(argv):
    """Report on the data as training would see it; a UserError (exit 2) where training would refuse it."""
    from accelerate import PartialState

    from imgft import runtime
    from imgft.args import parse_args
    from imgft.data_report import data_report

    data_args, model_args, train_args = parse_args(argv)
    PartialState()  # accelerate's logging, used by the data functions, needs it
    runtime.setup_logging()
    lines, refusal = data_report(data_args, model_args.cache_dir, train_args.seed)
    print("\n".join(lines))
    if refusal:
        raise UserError(f"training would refuse this data: {refusal}")
    print("Training would accept this data.")
