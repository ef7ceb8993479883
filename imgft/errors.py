"""One exception for mistakes the user can fix, and the wrapper that turns it into a clean exit (and a fast
one: the process group left, the last garbage collection skipped); a failed write's reason in plain words,
and a failed save that every process of a run learns of together."""

import contextlib
import errno
import gc
import json
import os
import shutil
import signal
import sys
import time

from safetensors import SafetensorError

from imgft import launcher


class UserError(Exception):
    """Bad input that the user can fix: printed as one message, never as a traceback."""


# What a failed write raises: the OS itself, torch.save ("PytorchStreamWriter failed writing file ...") and
# safetensors ("Error while serializing: IoError(...)") each in their own way.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
DISK_NEARLY_FULL = 16 * 2**20  # a failed write leaves less than one more chunk of the file free


def write_failure_reason(err, folder):
    """Why a write into `folder` failed, in a few words: torch and safetensors hide a full disk in their
    own messages, so a failure with the disk (nearly) full says so plainly."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    try:
        nearly_full = shutil.disk_usage(folder).free < DISK_NEARLY_FULL
    except OSError:
        nearly_full = False
    if nearly_full and "No space left on device" not in reason:
        reason = f"No space left on device ({reason})"
    return reason


@contextlib.contextmanager
def failing_together(describe):
    """Around one step of a save that every process takes (each writing its share, or none): a failed write
    (WRITE_ERRORS) on any process becomes a UserError on every process, once all have ended the step. The
    process that failed says `describe(err)`; the others say `process N failed: ` and the same words.

    Every process reports to the others whether its writes failed, so none goes on alone to wait for one that
    has stopped: that one used to end in gloo's "Connection closed by peer", which a nearly full disk then
    had reported as a full disk of its own. With one process, only its own failure counts.
    """
    failure = None
    try:
        yield
    except WRITE_ERRORS as err:
        failure = describe(err)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    failures = gather_object([failure]) if PartialState().num_processes > 1 else [failure]
    if failure is not None:
        raise UserError(failure)
    for process_index, message in enumerate(failures):
        if message is not None:
            raise UserError(f"process {process_index} failed: {message}")


def exit_on_user_error(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: ...` on stderr and exit code 2. So does a full disk
    wherever it strikes: the run stops, and what it saved before stays whole (checkpoints are atomic).

    The line starts a line of its own (an open progress bar is closed first), and once it is out, SIGTERM and
    SIGINT act as they do without imgft's handlers: under a launcher, the SIGTERM it sends the other processes
    once one has stopped ends them, rather than announcing a checkpoint that will not come.
    """
    try:
        return main(argv)
    except UserError as err:
        say_error_and_stop_handling_signals(str(err))
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = os.path.dirname(os.path.abspath(err.filename)) if err.filename else "the output folder"
        say_error_and_stop_handling_signals(
            f"cannot write in {folder}: {err.strerror}. Free some space, then rerun the same command "
            "with --resume_from_checkpoint latest"
        )
        sys.exit(2)


def say_error_and_stop_handling_signals(message):
    from tqdm import tqdm

    for progress_bar in list(tqdm._instances):  # every bar still drawn, this process's only
        progress_bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)
    # torch's launcher prints this file's message in its summary of the failed processes, where it would
    # otherwise give only a link to its docs about tracebacks.
    launcher_error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if launcher_error_file:
        with contextlib.suppress(OSError), open(launcher_error_file, "w", encoding="utf-8") as file:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, file)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_as_script(main):
    """`exit_on_user_error(main)` for a script's `__main__`, then a faster exit (`skip_final_collection`)
    with main's return value as the exit code. Under torch's launcher, this process first ties its life to
    the launcher's (`launcher.tie_to_launcher`). However main ends, this process leaves its process group
    first (`leave_process_group`)."""
    launcher.tie_to_launcher()
    try:
        exit_code = exit_on_user_error(main)
    finally:
        leave_process_group()
    skip_final_collection()
    sys.exit(exit_code or 0)


def leave_process_group():
    """Destroy the torch.distributed process group if one is still open, as `accelerator.end_training()`
    does at a normal end. A process that exits early with its group open (every process refused the same
    way, say) can abort in the interpreter's teardown with "terminate called without an active exception":
    the group's threads are destroyed while still running, and the launcher then reports a crash rather
    than the exit code 2 the processes chose."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def skip_final_collection():
    """gc.freeze(): move every live object out of the garbage collector's reach, so that the collection
    the interpreter runs at exit skips the millions of objects torch, transformers and datasets create,
    about 1.5 s of every run (measured on 2 cores). atexit handlers and file closing still run.

    Single-process runs only: under `accelerate launch` the collection also tears down what holds the
    process group's threads, and without it one of two processes once aborted at exit ("terminate
    called without an active exception").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        gc.freeze()
