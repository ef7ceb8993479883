"""The code stays as readable as the guide asks: ruff-clean, and train_loop.py short enough to read in one go."""

import subprocess
import sys

from conftest import REPO


def test_ruff_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def test_train_loop_keeps_the_loop_visible_and_short():
    source = (REPO / "train_loop.py").read_text()
    assert len(source.splitlines()) <= 300
    for visible in (
        "accelerator.accumulate(model)",
        "accelerator.backward(loss)",
        "optimizer.step()",
        "lr_scheduler.step()",
        "accelerator.prepare(",
        "for batch_in_epoch, batch in enumerate(",
    ):
        assert visible in source, visible
