"""Process-level defaults: DataLoader workers and the throughput numbers logged with each evaluation."""

import torch

from imgft import runtime


def test_default_workers_spare_the_cpu_when_it_trains_and_feed_a_gpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.dataloader_workers(None, cpu, 1) == 0
    assert runtime.dataloader_workers(3, cpu, 1) == 3  # an explicit value always wins
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert runtime.dataloader_workers(None, gpu, 2) == 7  # 16 cores / 2 processes, one left for the process
    assert runtime.dataloader_workers(None, gpu, 1) == 8  # capped
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert runtime.dataloader_workers(None, gpu, 2) == 0


def test_timed_counts_only_the_wait_for_batches():
    import time

    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    clock = runtime.SpeedClock(samples_at_start=100)
    seen = []
    for item in runtime.timed(slow_batches(), clock):
        time.sleep(0.05)  # "training" time, not counted
        seen.append(item)
    speed = clock.speed(samples_now=148, num_processes=2)  # 48 images on each of 2 processes
    total = clock.seconds()
    assert seen == [0, 1, 2]
    assert 0.14 <= clock.data_wait < total - 0.12
    assert 96 / total <= speed["train_images_per_second"] <= 96 / (total - 0.05)
    assert 0.3 < speed["data_wait_fraction"] < 0.6
