"""`python -m imgft COMMAND`: the tools around train_loop.py.

Each command's --help says more.

demo-data DIR                 write the digits demo as an imagefolder
evaluate [CONFIG] [flags]     evaluate a saved model on --validation_dir alone, --eval_split of --dataset_name,
                              or the split training evaluates on; with --output_dir, also write
                              eval_results.json and pictures of the errors
predict --model_name_or_path MODEL PATH...
                              label image files, folders or globs; one JSON line per image (--help for more)
check-data [CONFIG] [flags]   report on the data as training would see it; exit 2 where training would refuse it
lr-find [CONFIG] [flags]      sweep the learning rate over a few training steps; write
                              output_dir/lr_find.png and print a suggested --learning_rate
bench [--quick] [--output F]  time imgft's data path against the upstream example's, whole processes;
                              --pairs recipes: top-1 of the small-data recipe against the defaults
flags                         print the flags table
"""

import sys

from imgft.errors import exit_on_user_error

FLAGS_USAGE = (
    "usage: python -m imgft flags [--help]\n\n"
    "Print every flag, its default and its help as a Markdown table (docs/flags.md holds the same)."
)
COMMANDS = ("demo-data", "evaluate", "predict", "check-data", "lr-find", "bench", "flags")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            sys.exit(2)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in ("evaluate", "check-data") and any(token in ("-h", "--help") for token in rest):
        # Their arguments are training's, parsed by imgft.args: the help lists the ones they read.
        from imgft import args

        print(args.help_text(args.EVALUATE_COMMAND if command == "evaluate" else args.CHECK_DATA_COMMAND), end="")
    elif command == "demo-data":
        from imgft.commands.demo_data import main as demo_data

        exit_on_user_error(demo_data, rest)
    elif command == "evaluate":
        from imgft.commands.evaluate import main as evaluate

        exit_on_user_error(evaluate, rest)
    elif command == "predict":
        from imgft.commands.predict import main as predict

        exit_on_user_error(predict, rest)
    elif command == "check-data":
        from imgft.commands.check_data import main as check_data

        exit_on_user_error(check_data, rest)
    elif command == "lr-find":
        from imgft.commands.lr_find import main as lr_find

        exit_on_user_error(lr_find, rest)
    elif command == "bench":
        from benchmarks.bench import main as bench_main

        bench_main(rest)
    elif command == "flags":
        exit_on_user_error(print_flags_table, rest)


def print_flags_table(argv):
    """`flags`: the table of every flag, as docs/flags.md shows it; it takes no arguments but --help."""
    from imgft.args import flags_markdown
    from imgft.errors import UserError

    if argv and argv[0] in ("-h", "--help"):
        print(FLAGS_USAGE)
    elif argv:
        raise UserError(f"flags takes no arguments (got {' '.join(argv)})")
    else:
        print(flags_markdown(), end="")
