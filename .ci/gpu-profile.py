"""Where a GPU training step's time goes, for the data-path issue: run on a GPU machine, not by the suite.

    python .ci/gpu-profile.py syncs OUT_DIR              # every place the loop makes the CPU wait for the GPU
    python .ci/gpu-profile.py profile NAME DATA_DIR OUT_DIR [train_loop flags]
    python .ci/gpu-profile.py steps DATA_DIR [train_loop flags]   # per epoch: first-batch wait, median step
    python .ci/gpu-profile.py model OUT_DIR                      # the benchmark's model-only step, profiled

`syncs` trains the digits demo for a few steps with torch.cuda.set_sync_debug_mode("warn") and lists each
source line that synchronised. `profile` trains on an imagefolder (the benchmark's camera data) under
torch.profiler for steps 21-60 (epochs 3-6 at 10 steps an epoch), then writes the profiler's table, a
gzipped Chrome trace, and per step: wall time, time the GPU was busy, and the wait for the batch.
"""

import gzip
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.getcwd())
import train_loop  # noqa: E402
from imgft import runtime  # noqa: E402


def syncs(out_dir):
    argv = ["--output_dir", "/tmp/imgft-syncs-run", "--max_train_steps", "25", "--logging_steps", "10"]
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_loop.main(argv)
    torch.cuda.set_sync_debug_mode(0)
    counts = {}
    for warning in caught:
        if "synchroniz" in str(warning.message):
            where = f"{os.path.relpath(warning.filename)}:{warning.lineno}"
            counts[where] = counts.get(where, 0) + 1
    lines = [f"{count:6d}  {where}" for where, count in sorted(counts.items(), key=lambda item: -item[1])]
    report = "synchronising calls in 25 steps (count, place):\n" + "\n".join(lines)
    print(report)
    with open(os.path.join(out_dir, "syncs.txt"), "w") as file:
        file.write(report + "\n")


def profile(name, data_dir, out_dir, extra_flags):
    from torch.profiler import ProfilerActivity, schedule

    argv = camera_flags(data_dir, f"/tmp/imgft-profile-{name}") + extra_flags
    original_timed = runtime.timed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = torch.profiler.profile(activities=activities, schedule=schedule(wait=15, warmup=5, active=40, repeat=1))

    def profiled(batches, wait):
        for batch in original_timed(batches, wait):
            yield batch
            profiler.step()

    runtime.timed = profiled
    with profiler:
        train_loop.main(argv)
    write_report(profiler, out_dir, f"profile-{name}", keep_trace=True)


def write_report(profiler, out_dir, name, keep_trace):
    """NAME.txt (and printed): the profiler's table and per-step GPU busy time; NAME.json.gz: the Chrome trace."""
    trace_path = os.path.join(out_dir, f"{name}.json")
    profiler.export_chrome_trace(trace_path)
    with open(trace_path) as file:
        trace = json.load(file)
    if keep_trace:
        with open(trace_path, "rb") as file, gzip.open(trace_path + ".gz", "wb") as packed:
            packed.write(file.read())
    os.remove(trace_path)
    report = [profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), per_step_gpu_busy(trace)]
    print("\n".join(report))
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as file:
        file.write("\n".join(report) + "\n")


def camera_flags(data_dir, output_dir):
    argv = ["--train_dir", f"{data_dir}/train", "--validation_dir", f"{data_dir}/validation", "--image_size", "64"]
    return argv + [
        "--num_train_epochs",
        "8",
        "--per_device_train_batch_size",
        "32",
        "--random_flip",
        "--output_dir",
        output_dir,
    ]


def steps(data_dir, extra_flags):
    """Without a profiler: per epoch, the wait for its first batch and the median time between later batches."""
    epochs = []
    original_timed = runtime.timed

    def stamped(batches, wait):
        start, stamps = time.perf_counter(), []
        epochs.append((start, stamps))
        for batch in original_timed(batches, wait):
            stamps.append(time.perf_counter())
            yield batch

    runtime.timed = stamped
    train_loop.main(camera_flags(data_dir, f"/tmp/imgft-steps-{len(extra_flags)}") + extra_flags)
    for number, (start, stamps) in enumerate(epochs, start=1):
        gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
        print(
            f"epoch {number}: first batch after {(stamps[0] - start) * 1e3:.1f} ms, median step "
            f"{statistics.median(gaps) * 1e3:.2f} ms, min {min(gaps) * 1e3:.2f} ms ({' '.join(extra_flags)})"
        )


def model_only(out_dir):
    """The benchmark's model-only step (imgft's step on a batch already on the GPU): unprofiled, then profiled."""
    from torch.profiler import ProfilerActivity

    from benchmarks.bench import model_only_rate, model_only_step

    print(f"model-only, unprofiled: {32 / model_only_rate(64, 32, 4, steps=30) * 1e3:.2f} ms a step (median of 3)")
    step = model_only_step(64, 32, 4)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(40):
            with torch.profiler.record_function("ProfilerStep#model"):
                step()
        torch.cuda.synchronize()
    write_report(profiler, out_dir, "profile-model-only", keep_trace=False)


def per_step_gpu_busy(trace):
    events = trace["traceEvents"]
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("name", "").startswith("ProfilerStep#") and "dur" in e
    )
    gpu = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    merged = []
    for start, end in gpu:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    lines = ["step: CPU wall ms, GPU busy ms inside it, data-loader next() ms"]
    waits = {
        e["ts"]: e["dur"]
        for e in events
        if "DataLoader" in e.get("name", "") and "__next__" in e.get("name", "") and "dur" in e
    }
    total_wall = total_busy = 0.0
    for start, end, name in steps:
        busy = sum(max(0.0, min(end, b) - max(start, a)) for a, b in merged)
        wait = sum(duration for ts, duration in waits.items() if start <= ts < end)
        total_wall, total_busy = total_wall + end - start, total_busy + busy
        lines.append(f"{name}: {(end - start) / 1e3:7.2f} {busy / 1e3:7.2f} {wait / 1e3:7.2f}")
    if total_wall:
        lines.append(f"GPU busy {total_busy / total_wall:.0%} of {total_wall / 1e3:.1f} ms profiled")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "syncs":
        syncs(sys.argv[2])
    elif sys.argv[1] == "steps":
        steps(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "model":
        model_only(sys.argv[2])
    else:
        profile(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
