"""One folder, one run: real processes hold output_dir, a second run on it is refused, and a killed one
blocks nothing."""

import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, launch_two_processes, reset_accelerate, run_command

from imgft import outputs
from imgft.checkpoint import STATE_FILE
from imgft.errors import UserError, exit_on_user_error
from imgft.run_lock import lock_file_path, take_output_dir_lock

# The digits demo, small enough to start quickly and long enough (350 steps) to still be running when killed.
ARGS = ["--max_train_samples", "200", "--num_train_epochs", "50", "--checkpointing_steps", "5"]
ARGS += ["--logging_steps", "1"]
RUN = ["train_loop.py", *ARGS]
# The second runs: the same, but 1 step, so that one let through by mistake fails the test in seconds.
SECOND = [*RUN, "--max_train_steps", "1"]
REFUSAL = "is in use by a live run (pid {pid} on host {host}, started "


def start(out, *extra, log_name):
    with open(out.parent / f"{log_name}.txt", "w") as log:  # the child keeps its own handle
        command = [sys.executable, *RUN, "--output_dir", out, *extra]
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)


def wait_for(condition, process, log, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def lock_owner_pid(out):
    try:
        return json.loads(Path(lock_file_path(out)).read_text())["pid"]
    except (FileNotFoundError, ValueError):
        return None


def metrics_steps(out):
    path = out / outputs.METRICS_LOG
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def child_pids(pid):
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def snapshot(folder):
    """Every file's bytes, inode and mtime and every folder's mtime, and the same of the folder's lock file:
    any create, delete or write changes it."""
    found = {str(folder): os.stat(folder).st_mtime_ns, "lock file": file_state(lock_file_path(folder))}
    for root, folders, files in os.walk(folder):
        found.update({path: os.stat(path).st_mtime_ns for path in (os.path.join(root, n) for n in folders)})
        found.update({os.path.join(root, name): file_state(os.path.join(root, name)) for name in files})
    return found


def file_state(path):
    stat = os.stat(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), stat.st_ino, stat.st_mtime_ns


def hold_lock(out, *, fork_child=False, write_owner=True):
    """A real process that locks `out` as a run does (or, write_owner=False, locks without naming itself yet).

    fork_child: it also forks a child that outlives it, as DataLoader workers do.
    Returns (process, child pid).
    """
    code = f"""
import fcntl, os, sys, time
sys.path.insert(0, {str(REPO)!r})
from imgft.run_lock import lock_file_path, take_output_dir_lock
out = {str(out)!r}
if {write_owner}:
    take_output_dir_lock(out)
else:
    fcntl.lockf(os.open(lock_file_path(out), os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)
child = os.fork() if {fork_child} else 1
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(process.stdout.readline())  # printed once the lock is held
    return process, child


def test_a_held_folder_is_refused_naming_its_owner_and_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder, _ = hold_lock(out)
    try:
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        before = snapshot(out)
        with pytest.raises(UserError) as refused:
            take_output_dir_lock(out)
        message = str(refused.value)
        assert message.startswith(f"{out} " + REFUSAL.format(pid=holder.pid, host=socket.gethostname()))
        assert message.endswith("); wait for it or choose another --output_dir")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_an_owner_that_has_not_named_itself_yet_is_still_refused(tmp_path):
    out = tmp_path / "out"
    holder, _ = hold_lock(out, write_owner=False)
    try:
        with pytest.raises(UserError, match=r"in use by a live run \(its pid is not written yet\)"):
            take_output_dir_lock(out)
    finally:
        holder.kill()
        holder.wait()


def test_a_symlink_to_a_held_folder_is_refused_too(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    holder, _ = hold_lock(tmp_path / "real")
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid} "):
            take_output_dir_lock(tmp_path / "link")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_its_process_even_when_a_forked_child_lives_on(tmp_path):
    # A DataLoader worker is such a child. With flock it would keep the lock until it noticed and exited.
    out = tmp_path / "out"
    holder, child = hold_lock(out, fork_child=True)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child still lives
        take_output_dir_lock(out)  # not refused
        assert lock_owner_pid(out) == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_same_process_may_lock_its_folder_again(tmp_path):
    # train_loop.main() run twice in one process (the in-process tests; a resume after a stop) is one owner.
    take_output_dir_lock(tmp_path / "out")
    take_output_dir_lock(tmp_path / "out")
    assert lock_owner_pid(tmp_path / "out") == os.getpid()


def test_the_lock_creates_nothing_in_output_dir_and_goes_with_a_process_that_exits(tmp_path):
    # A run refused later (bad data) leaves no folder; one that ends, even on an error, leaves no lock file.
    out = tmp_path / "runs" / "out"
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from imgft.run_lock import take_output_dir_lock\n"
    code += f"take_output_dir_lock({str(out)!r}); print(open({lock_file_path(out)!r}).read()); sys.exit(2)"
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ended.returncode == 2 and f'"host": "{socket.gethostname()}"' in ended.stdout, ended.stderr
    assert os.listdir(tmp_path / "runs") == []


def run_in_this_process(argv):
    """train_loop.main as `python train_loop.py` runs it, here (a real run, without a process's start-up);
    returns the exit code."""
    import train_loop

    reset_accelerate()
    try:
        exit_on_user_error(train_loop.main, [str(a) for a in argv])
    except SystemExit as stopped:
        return stopped.code
    finally:
        reset_accelerate()
    return 0


def test_second_runs_on_a_live_runs_folder_are_refused_at_once_and_touch_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    # Over a finished run's folder whose earlier owner was killed, leaving its lock file: neither blocks it.
    out.mkdir()
    (out / outputs.RESULTS_FILE).write_text("{}")
    Path(lock_file_path(out)).write_text('{"pid": 1, "host": "gone", "started": "long ago"}\n')
    live_log, seconds, began = tmp_path / "live.txt", {}, time.monotonic()
    live = start(out, "--overwrite_output_dir", "--num_workers", "2", log_name="live")
    importlib.import_module("train_loop")  # meanwhile, this process's start-up for the runs in it below
    try:
        checkpointed = (out / "step_5" / STATE_FILE).exists
        wait_for(lambda: checkpointed() and len(metrics_steps(out)) >= 5, live, live_log)
        seconds["live run to its first checkpoint"] = time.monotonic() - began
        live.send_signal(signal.SIGSTOP)  # frozen, so that any change to its folder is a refused run's doing
        before = snapshot(out)
        assert lock_owner_pid(out) == live.pid and not (out / outputs.RESULTS_FILE).exists()

        # A double submit and a 2-process requeue as new processes (in the background), and a resume and an
        # overwrite in this process: each is refused before it reads or clears anything.
        def timed(name, run, *args):
            started = time.monotonic()
            result = run(*args)
            seconds[f"{name}: refused"] = time.monotonic() - started
            return result

        second = [*SECOND, "--output_dir", out]
        resume, overwrite = ["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(timed, "plain", run_command, [sys.executable, *second], 180)
            two = pool.submit(timed, "2 processes", launch_two_processes, [*second, *resume], 180)
            in_process = {
                name: timed(f"{name} (in this process)", run_in_this_process, [*second[1:], *flags])
                for name, flags in {"resume": resume, "overwrite": overwrite}.items()
            }
            plain, two = plain.result(), two.result()
        assert snapshot(out) == before

        expected = f"error: {out} " + REFUSAL.format(pid=live.pid, host=socket.gethostname())
        stderr = capsys.readouterr().err  # both runs in this process: one line each
        assert in_process == {"resume": 2, "overwrite": 2} and stderr.count(expected) == 2, stderr
        assert len(stderr.splitlines()) == 2, stderr
        assert plain.returncode == 2 and plain.stderr.startswith(expected), plain.stderr[-3000:]
        assert len(plain.stderr.splitlines()) == 1, plain.stderr[-3000:]
        # One error line (the main process's); torchrun then reports its workers' exit code, 2.
        errors = [line for line in two.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(expected), two.stderr[-3000:]
        assert two.returncode != 0 and "exitcode: 2" in two.stderr, two.stderr[-3000:]

        # The live run was never disturbed: it goes on.
        steps_before = max(metrics_steps(out))
        live.send_signal(signal.SIGCONT)
        wait_for(lambda: max(metrics_steps(out)) > steps_before, live, live_log)
        assert "Traceback" not in live_log.read_text()

        # Then it dies (SIGKILL), its DataLoader workers still alive for a moment: that blocks no one.
        # The next run takes the folder at once and finishes (1 step, over what was there).
        workers = child_pids(live.pid)
        live.send_signal(signal.SIGKILL)
        live.wait()
        assert any(pid_alive(pid) for pid in workers), "the kill should leave orphaned workers behind"
        started = time.monotonic()
        assert run_in_this_process([*second[1:], *overwrite]) == 0
        seconds["next run after the kill (in this process)"] = time.monotonic() - started
        assert json.loads((out / outputs.RESULTS_FILE).read_text())["train_steps"] == 1
        assert lock_owner_pid(out) == os.getpid()
    finally:
        live.kill()
        live.wait()
        for pid in workers if "workers" in locals() else ():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)  # they would exit within seconds anyway, their parent gone
    with capsys.disabled():
        print("".join(f"\n  {name}: {value:.1f} s" for name, value in seconds.items()))
