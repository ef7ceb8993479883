"""One exception for mistakes the user can fix, and the wrapper that turns it into a clean exit."""

import gc
import sys


class UserError(Exception):
    """Bad input that the user can fix: printed as one message, never as a traceback."""


def exit_on_user_error(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_as_script(main):
    """`exit_on_user_error(main)` for a script's `__main__`, then a faster exit.

    gc.freeze() moves every live object out of the garbage collector's reach, so the collection the
    interpreter runs at exit skips the millions of objects torch, transformers and datasets create:
    about 1.5 s of every run (measured on 2 cores). atexit handlers and file closing still run.
    """
    exit_on_user_error(main)
    gc.freeze()
