"""One exception for mistakes the user can fix, and the wrapper that turns it into a clean exit."""

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
