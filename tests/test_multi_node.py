"""Two machines, played on this one: two `accelerate launch` calls with the shipped multi_node.yaml, one
process each, joined over 127.0.0.1 (gloo). They must train exactly as two processes on one machine do,
stop together on a SIGTERM to either, resume exactly, and refuse output folders they do not share."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO, _free_port, launch_two_processes
from safetensors.torch import load_file

from imgft.checkpoint import list_checkpoints, read_state

# The digits demo, cut down: 256 images, 8 optimizer steps an epoch on 2 processes (8 per device x 2 batches
# accumulated), 2 epochs, with random crops.
RUN = ["--max_train_samples", "256", "--max_eval_samples", "64", "--num_train_epochs", "2"]
RUN += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--num_workers", "0"]
RUN += ["--logging_steps", "1", "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest"]
TIMING_KEYS = ("train_images_per_second", "data_wait_fraction")


def launch_node(rank, port, output_dir, log_path, cwd=REPO):
    """One machine of two: `accelerate launch` with the shipped multi-node config."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", REPO / "configs" / "accelerate" / "multi_node.yaml"]
    command += ["--mixed_precision", "no"]
    command += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    command += [REPO / "train_loop.py", *RUN, "--output_dir", output_dir]
    with open(log_path, "w") as log:  # the child keeps its own handle
        command = [str(part) for part in command]
        return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def launch_two_nodes(output_dir, logs, cwds=(REPO, REPO)):
    port = _free_port()
    return [launch_node(rank, port, output_dir, logs / f"node{rank}.txt", cwds[rank]) for rank in (0, 1)]


def wait_all(processes, timeout=300):
    return [process.wait(timeout=timeout) for process in processes]


def metrics(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def assert_same_run(reference, out):
    weights, other = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert weights.keys() == other.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, other[name]), name
    assert metrics(out) == metrics(reference)
    results, other_results = (json.loads((d / "all_results.json").read_text()) for d in (reference, out))
    for key in ("eval_accuracy", "eval_loss", "eval_samples", "train_loss", "train_steps", "epoch"):
        assert other_results[key] == results[key], key


def metrics_reach(out, step):
    path = out / "metrics.jsonl"
    return path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """The run on one machine with two processes, left alone."""
    out = tmp_path_factory.mktemp("one_machine") / "out"
    result = launch_two_processes(["train_loop.py", *RUN, "--output_dir", out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 16
    return out


def test_two_machines_stop_together_on_a_sigterm_to_one_and_resume_as_one_machine_runs(one_machine, tmp_path):
    # Bitwise the run of two processes on one machine, though cut by a SIGTERM and relaunched: so two
    # machines train as two processes on one do, stop at the same step, and resume exactly.
    out = tmp_path / "out"
    nodes = launch_two_nodes(out, tmp_path)
    deadline = time.monotonic() + 300
    while not metrics_reach(out, step=3) and time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), (tmp_path / "node0.txt").read_text()[-3000:]
        time.sleep(0.005)
    # As SLURM does: every process of the second machine gets the signal, its launcher and its worker (which
    # the launcher also passes it on to).
    second_machine = psutil.Process(nodes[1].pid)
    for process in [second_machine, *second_machine.children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    codes = wait_all(nodes, timeout=120)
    logs = [(tmp_path / f"node{rank}.txt").read_text() for rank in (0, 1)]
    assert all(code != 0 for code in codes), logs  # neither machine reports the run as done
    assert "SIGTERM: finishing this optimizer step" in logs[1]
    # The main process, on the machine the signal did not reach, says how to continue.
    assert "Stopped by SIGTERM" in logs[0] and "--resume_from_checkpoint latest" in logs[0]
    assert re.search(r"exitcode\s*:\s*143", logs[0])  # the worker on the machine no signal reached: 128 + 15
    saved = list_checkpoints(out)
    assert saved, logs
    step = read_state(saved[-1])["completed_steps"]
    assert 3 <= step < 16
    # One checkpoint of both processes at the same step: each saved its random state into it.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(saved[-1]))
    assert max(record["step"] for record in metrics(out)) == step  # nothing logged after the stop
    assert not (out / "all_results.json").exists()

    codes = wait_all(launch_two_nodes(out, tmp_path))
    assert codes == [0, 0], [(tmp_path / f"node{rank}.txt").read_text()[-3000:] for rank in (0, 1)]
    log = (tmp_path / "node0.txt").read_text()
    assert f"Resuming from {saved[-1]} at step {step}" in log and "2 process(es) on cpu" in log
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no staging folder, no check file
    assert_same_run(one_machine, out)


def test_machines_that_do_not_share_output_dir_are_refused_before_anything_is_written(tmp_path):
    # A relative --output_dir from two working directories: as two machines, each with its own local disk.
    first, second = tmp_path / "machine0", tmp_path / "machine1"
    first.mkdir()
    second.mkdir()
    codes = wait_all(launch_two_nodes("out", tmp_path, cwds=(first, second)))
    logs = [(tmp_path / f"node{rank}.txt").read_text() for rank in (0, 1)]
    assert codes == [1, 1], logs  # the launchers report their worker's exit code 2
    assert all(re.search(r"exitcode\s*:\s*2\b", log) for log in logs)
    for log in logs:  # both machines say why, naming the one that cannot see the folder
        [message] = [line for line in log.splitlines() if line.startswith("error: ")]
        assert message.startswith("error: --output_dir out is not one folder that every process sees: ")
        assert f"(rank 1, {second / 'out'}) cannot see what" in message
        assert f"(rank 0) wrote in {first / 'out'}" in message
    assert not (first / "out").exists() and not (second / "out").exists()  # nothing left behind
