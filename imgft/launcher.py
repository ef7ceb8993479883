"""A process that torch's launcher started (`accelerate launch` with several processes, torchrun): it dies with
its launcher, and it forms the process group with the others within a bounded time or stops saying why.

torch's launcher starts each process in a session of its own, so that killing the launcher's process group,
or the launcher alone, used to leave the processes training on without it: they held the output folder's lock
and their port, and a relaunch could hang for many minutes in `init_process_group`, inside `Accelerator(...)`.
On a SLURM cluster, ending a job kills every process in its cgroup, launched or not.
"""

import ctypes
import os
import signal
import sys
import threading
import time
from datetime import timedelta

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
GROUP_TIMEOUT_VARIABLE = "IMGFT_PROCESS_GROUP_TIMEOUT"
DEFAULT_GROUP_TIMEOUT = 300  # seconds from a process's start to its process group formed
STORE_PREFIX = "imgft/started"


def tie_to_launcher():
    """Under torch's launcher: die with it, and stop with one line if the process group has not formed in time.
    Anywhere else (plain `python`, accelerate's single-process launch, in-process tests): nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torch's launcher for each process it starts
        return
    die_with_launcher()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        stop_unless_group_forms(group_timeout())


def die_with_launcher():
    """Have the kernel SIGKILL this process when its parent, the launcher, dies (Linux only), as a SIGKILL of the
    launcher's own process group would have done: the run stops at once and resumes from its last checkpoint.
    A launcher that died before this was set (during the imports) has already handed this process to another
    parent, so this process ends now. The DataLoader workers it starts notice its end and stop too."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != launcher:
        os.kill(os.getpid(), signal.SIGKILL)


def group_timeout():
    """Seconds a process waits for its process group to form: IMGFT_PROCESS_GROUP_TIMEOUT, or 300."""
    value = os.environ.get(GROUP_TIMEOUT_VARIABLE, str(DEFAULT_GROUP_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        print(f"error: {GROUP_TIMEOUT_VARIABLE}={value}: give a number of seconds above 0", file=sys.stderr)
        sys.exit(2)
    return seconds


def stop_unless_group_forms(timeout):
    """Note this process's start in the launcher's store, then watch from a thread: if torch.distributed's
    default group has not formed `timeout` seconds later, print one line saying which processes never started
    (or that all did, so something else holds the group back) and exit with code 2. torch's own bound is 30
    minutes (10 with NCCL), and that bound also limits every later collective, so it cannot be lowered here."""
    import torch.distributed

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    store = _launcher_store(rank)

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if torch.distributed.is_initialized():
                return
            time.sleep(0.2)
        started = _started_ranks(store, world_size)
        if started is not None and len(started) < world_size:
            missing = ", ".join(str(r) for r in range(world_size) if r not in started)
            why = f"process(es) {missing} of {world_size} never started"
        elif started is not None:
            why = (
                f"all {world_size} processes started, but at least one never reached it: stuck, or taken by "
                "leftover processes of an earlier launch"
            )
        else:
            why = "the processes could not meet at the launcher's address"
        print(
            f"error: process {rank}: the {world_size} processes of this launch did not form their process group "
            f"at {address} within {timeout:g} s ({GROUP_TIMEOUT_VARIABLE}): {why}. Stop any process left from an "
            "earlier launch of this run (they hold its folder and port), then launch again",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    threading.Thread(target=watch, name="imgft-group-timeout", daemon=True).start()


def _store_key(rank):
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{STORE_PREFIX}/{os.environ['TORCHELASTIC_RUN_ID']}/{attempt}/{rank}"


def _launcher_store(rank):
    """A client of the store that the launcher holds, with this process's start noted in it; None where the
    launcher holds none (the processes' own rank 0 then opens it, later) or it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    from torch.distributed import TCPStore

    try:
        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
        store.set(_store_key(rank), str(os.getpid()))
    except RuntimeError:  # torch's DistStoreError and the like: the watch then says less
        return None
    return store


def _started_ranks(store, world_size):
    if store is None:
        return None
    try:
        return {rank for rank in range(world_size) if store.check([_store_key(rank)])}
    except RuntimeError:
        return None
