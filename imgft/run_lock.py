"""One output_dir, one live run: the lock a run takes before it reads or writes anything in its output_dir.

A second run started on a folder that a live run uses (a double submit, a scheduler's requeue while the
first job still runs) is refused at once, naming the owner's pid, host and start time. The live run's files
are never touched: the refusal comes before `outputs.check_output_dir` and `outputs.start_run_files`.

The lock file sits beside the folder, `runs/.exp.imgft.lock` for `runs/exp`, not inside it, because:
  - taking the lock then creates nothing in output_dir: a run refused later (bad data, say) leaves no
    folder behind, and a blind relaunch of a finished run changes nothing in it, as before;
  - nothing else in a run opens that file. Inside output_dir, anything that reads every file there
    (push_to_hub's upload_folder) would open and close it, which drops a POSIX lock (below), and would
    publish the owner's host name;
  - --overwrite_output_dir's clearing and a user's `rm -rf output_dir` cannot remove it under a live run.
The path is resolved first (realpath), so a symlinked output_dir and its target share one lock file.
The parent folder must be writable; where it is not, the run goes on unguarded, with a warning.

The lock is a POSIX record lock (`fcntl.lockf`), which the OS releases when the owning process ends,
however it ends: a SIGKILLed run may leave the file, but nothing that blocks the next run. Not `flock`:
a flock belongs to the open file, which forked children share, so DataLoader workers (forked, never
exec'd) would go on holding it after their parent is killed, until they notice and exit. A POSIX lock
belongs to the process alone. Its pitfall is the reverse one: closing *any* descriptor of the file in the
owning process drops the lock, so the file is opened once and kept open (_HELD_UNTIL_EXIT).

Held until the process exits, not until main() returns: a test that calls train_loop.main() in-process
keeps the folders it trained in locked (against other processes; it may train there again). At a normal
exit (sys.exit included) the owner deletes its lock file, so only a killed run leaves one; a run that
finds a file replaced or deleted under it while it waited starts again on the new one.

On NFS: a POSIX lock reaches the server (NLM for NFSv3, the protocol itself for v4) and so works across
nodes where the server's lock service works. A client mounted with `nolock` or `local_lock=...` only locks
within one node, so two runs on two nodes are not kept apart there; and a node that crashes (rather than a
process that dies) keeps its lock until the server's lease or lock recovery frees it, tens of seconds on
NFSv4. Where the file system refuses locks altogether (ENOLCK), the run goes on with a warning, unguarded.
"""

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from imgft.errors import UserError

# This process's lock files, (path, descriptor). Closing a descriptor, or letting it be garbage-collected,
# would release the lock (and any other lock this process holds on the same file), so they stay open until
# the process exits: a module-level list rather than a value the caller must remember to keep alive.
_HELD_UNTIL_EXIT = []


def lock_file_path(output_dir):
    """`parent/.name.imgft.lock` beside `output_dir`, after resolving symlinks."""
    folder = os.path.realpath(output_dir)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.imgft.lock")


def take_output_dir_lock_on_main_process(accelerator, output_dir):
    """The main process locks `output_dir` until it exits; if a live run holds it, every process stops
    with exit code 2.

    One process, the usual case: the refusal is a UserError. Several: the main process decides and broadcasts
    the outcome, so that the others stop by themselves rather than wait in the next collective for a main
    process that has gone. The main process prints the `error: ...` line before the broadcast, because the
    launcher ends the remaining processes as soon as one exits: a message left to the end could be cut off.
    """
    refusal = None
    if accelerator.is_main_process:
        try:
            take_output_dir_lock(output_dir)
        except UserError as err:
            refusal = str(err)
    if accelerator.num_processes == 1:
        if refusal is not None:
            raise UserError(refusal)
        return
    from accelerate.utils import broadcast_object_list

    if refusal is not None:
        # The line imgft.errors.exit_on_user_error would print.
        print(f"error: {refusal}", file=sys.stderr, flush=True)
    if broadcast_object_list([refusal])[0] is not None:
        raise SystemExit(2)


def take_output_dir_lock(output_dir):
    """Lock `output_dir` for the rest of this process's life and write who holds it, or raise UserError
    naming the live process that holds it. A refused call changes nothing on disk."""
    path = lock_file_path(output_dir)
    if any(_same_file(fd, path) for _, fd in _HELD_UNTIL_EXIT):
        return  # train_loop.main() run again in the same process
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # No O_TRUNC: the file may be a live run's, whose details the next refusal must still read.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            _warn_unguarded(path, err)
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_owner(fd)
            os.close(fd)  # this process holds no lock on this file, so closing it releases nothing
            if err.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
                advice = "wait for it or choose another --output_dir"
                raise UserError(f"{output_dir} is in use by a live run ({owner}); {advice}") from None
            _warn_unguarded(path, err)
            return
        if _same_file(fd, path):
            break
        os.close(fd)  # its owner deleted it at exit after we opened it: lock the file now at `path` instead
    if not _HELD_UNTIL_EXIT:
        atexit.register(_delete_lock_files, os.getpid())
    _HELD_UNTIL_EXIT.append((path, fd))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)


def _same_file(fd, path):
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _delete_lock_files(owner_pid):
    """At exit, while still locked: delete this process's lock files, so that only a killed run leaves one."""
    if os.getpid() != owner_pid:  # a forked child exiting through sys.exit: the files are its parent's
        return
    for path, fd in _HELD_UNTIL_EXIT:
        if _same_file(fd, path):
            with contextlib.suppress(OSError):  # at exit, a file we cannot delete is only left behind
                os.unlink(path)


def _read_owner(fd):
    """'pid 1234 on host h, started ...' from the lock file, or a note if the owner has not written it yet."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):  # locked a moment ago, details not written yet
        return "its pid is not written yet"


def _warn_unguarded(path, err):
    message = f"Cannot lock {path} ({err.strerror}): nothing stops a second run there"
    logging.getLogger("imgft").warning(message)
