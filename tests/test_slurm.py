"""examples/slurm/train.sbatch, run by bash against a fake `scontrol`, `scancel`, `srun` and `accelerate` that
record what they are given: the accelerate arguments each node computes; the time-limit warning, which has
every node checkpoint and then requeues the job; a preemption's SIGTERM, which is waited for."""

import os
import re
import signal
import subprocess
import time

import pytest
from conftest import REPO

SCRIPT = REPO / "examples" / "slurm" / "train.sbatch"

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then
    echo "$*" >> "$FAKE_LOG/scontrol.txt"
    printf 'gpu-a01\\ngpu-a02\\n'
else  # requeue: record how many nodes had stopped by then
    echo "$* after $(ls "$FAKE_LOG" | grep -c stopped) stopped" >> "$FAKE_LOG/scontrol.txt"
fi
"""
# Like `scancel --signal=TERM job`: SIGTERM to every process of the job's steps (here through the fake srun).
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scancel.txt"
kill -TERM "$(cat "$FAKE_LOG/srun.pid")"
"""
# Like srun: the command once per node, with that node's SLURM_NODEID, and a SIGTERM passed on to every task.
FAKE_SRUN = """#!/bin/bash
echo "$*" > "$FAKE_LOG/srun.txt"
echo $$ > "$FAKE_LOG/srun.pid"
while [[ "$1" == -* ]]; do shift; done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
code=0
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
    wait "$pid" 2>/dev/null; status=$?
    [ "$status" -gt "$code" ] && code=$status
done
exit "$code"
"""
# A node's `accelerate`: records its arguments and environment, then trains until SIGTERM, when it "saves a
# checkpoint" and exits as imgft does (143); or ends at once with $FAKE_EXIT.
FAKE_ACCELERATE = """#!/bin/bash
out="$FAKE_LOG/node$SLURM_NODEID"
trap 'sleep 0.2; touch "$out.stopped"; exit 143' TERM
printf '%s\\n' "$@" > "$out.args"
env > "$out.env"
if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi
touch "$out.training"
while true; do sleep 0.02; done
"""


@pytest.fixture
def fake_cluster(tmp_path):
    """(environment for the script, folder where the fakes record)"""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    fakes = {"scontrol": FAKE_SCONTROL, "scancel": FAKE_SCANCEL, "srun": FAKE_SRUN}
    for name, text in {**fakes, "accelerate": FAKE_ACCELERATE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_GPUS_ON_NODE": "4",
    }
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    return env, log


def submit(env, *args):
    """The batch script as SLURM runs it on the first node, from the submit folder."""
    command = ["bash", str(SCRIPT), "configs/vit-beans.yaml", "--output_dir", "/shared/runs/beans", *args]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen(command, cwd=REPO, env=env, **output)


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_each_node_launches_accelerate_with_its_rank_and_the_first_node_as_main(fake_cluster):
    env, log = fake_cluster
    job = submit({**env, "FAKE_EXIT": "0"}, "--learning_rate", "3e-5")
    assert job.wait(timeout=30) == 0, job.stdout.read()
    assert (log / "srun.txt").read_text().startswith("--kill-on-bad-exit=1 bash -c ")
    for rank in (0, 1):
        args = (log / f"node{rank}.args").read_text().splitlines()
        assert args == [
            "launch",
            "--config_file",
            "configs/accelerate/multi_node.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "8",  # 2 nodes x 4 GPUs
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "gpu-a01",
            "--main_process_port",
            "29500",
            "train_loop.py",
            "configs/vit-beans.yaml",
            "--output_dir",
            "/shared/runs/beans",
            "--learning_rate",
            "3e-5",
            "--resume_from_checkpoint",
            "latest",
        ]
        assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110" in (log / f"node{rank}.env").read_text().splitlines()
    assert (log / "scontrol.txt").read_text() == "show hostnames gpu-a[01-02]\n"  # finished: no requeue


def test_a_failed_run_is_not_requeued(fake_cluster):
    env, log = fake_cluster
    job = submit({**env, "FAKE_EXIT": "2"})
    assert job.wait(timeout=30) == 2
    assert "requeue" not in (log / "scontrol.txt").read_text()


def test_the_time_limit_warning_checkpoints_every_node_then_requeues_the_job(fake_cluster):
    env, log = fake_cluster
    job = submit(env)
    wait_for(lambda: (log / "node0.training").exists() and (log / "node1.training").exists())
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    assert job.wait(timeout=30) == 0
    assert (log / "scancel.txt").read_text() == "--signal=TERM 4242\n"  # the run's processes, not the script
    assert (log / "node0.stopped").exists() and (log / "node1.stopped").exists()
    # Requeued only once both nodes had saved and stopped.
    assert (log / "scontrol.txt").read_text().splitlines()[-1] == "requeue 4242 after 2 stopped"
    assert "requeued" in job.stdout.read()


def test_a_preemption_is_waited_for_and_signals_no_process_twice(fake_cluster):
    env, log = fake_cluster
    job = submit(env)
    wait_for(lambda: (log / "node0.training").exists() and (log / "node1.training").exists())
    # A preemption: SIGTERM to the script and to every process of the run, from SLURM.
    job.send_signal(signal.SIGTERM)
    os.kill(int((log / "srun.pid").read_text()), signal.SIGTERM)
    assert job.wait(timeout=30) == 143
    assert (log / "node0.stopped").exists() and (log / "node1.stopped").exists()
    assert not (log / "scancel.txt").exists()  # no second SIGTERM
    assert "requeue" not in (log / "scontrol.txt").read_text()  # SLURM requeues a preempted job itself


def test_the_launcher_waits_for_the_checkpoint_within_the_signal_lead_time():
    text = SCRIPT.read_text()
    header = text.split("\nset -euo pipefail")[0]
    # sbatch reads #SBATCH lines only before the first command.
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    assert "#SBATCH --requeue" in header
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", header).group(1))
    shutdown = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert 30 < shutdown < lead  # more than torch's default, and done before SLURM's SIGKILL
