"""The code stays as readable as the guide asks: ruff-clean, and train_loop.py a reference a learner can read
top to bottom, with the Accelerate calls in it as code, no closures and no private attributes."""

import ast
import re
import subprocess
import sys

from conftest import REPO

LOOP_SOURCE = (REPO / "train_loop.py").read_text(encoding="utf-8")
LOOP_TREE = ast.parse(LOOP_SOURCE)


def test_ruff_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout
    loop = [sys.executable, "-m", "ruff", "format", "--check", "--line-length", "110", "train_loop.py"]
    loop_fmt = subprocess.run(loop, cwd=REPO, capture_output=True, text=True)
    assert loop_fmt.returncode == 0, loop_fmt.stdout


def test_no_line_is_crammed():
    for number, line in enumerate(LOOP_SOURCE.splitlines(), start=1):
        assert len(line) <= 110, f"train_loop.py:{number} is {len(line)} columns"
    for path in [REPO / "train_loop.py", *sorted((REPO / "imgft").rglob("*.py"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            assert "fmt: skip" not in line and "fmt: off" not in line, f"{path.name}:{number}"


def called_names(tree):
    """Every `x.name(...)` and `name(...)` called in `tree`, as the name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            names.add(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None))
    return names


def test_the_accelerate_calls_a_learner_comes_to_see_are_code_in_the_loop_file():
    calls = called_names(LOOP_TREE)
    for name in (
        "Accelerator",
        "prepare",
        "accumulate",
        "backward",
        "clip_grad_norm_",
        "step",
        "zero_grad",
        "save_state",
        "load_state",
        "register_for_checkpointing",
        "skip_first_batches",
        "gather_for_metrics",
        "init_trackers",
        "wait_for_everyone",
        "unwrap_model",
        "end_training",
        "set_epoch",
    ):
        assert name in calls, f"train_loop.py never calls {name}()"
    attributes = {node.attr for node in ast.walk(LOOP_TREE) if isinstance(node, ast.Attribute)}
    assert {"sync_gradients", "optimizer_step_was_skipped"} <= attributes


def test_the_loop_file_has_no_closures_nonlocal_exit_or_private_writes():
    for function in (node for node in ast.walk(LOOP_TREE) if isinstance(node, ast.FunctionDef)):
        nested = [node.name for node in ast.walk(function) if isinstance(node, ast.FunctionDef | ast.Lambda)]
        assert nested in ([function.name], []), f"{function.name} defines {nested[1:]}"
    assert not any(isinstance(node, ast.Nonlocal | ast.Global) for node in ast.walk(LOOP_TREE))
    assert "sys.exit" not in LOOP_SOURCE and "os._exit" not in LOOP_SOURCE
    for node in ast.walk(LOOP_TREE):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                text = ast.unparse(target)
                assert not re.search(r"\._\w", text), f"writes a private attribute: {text}"
                assert "optimizer.optimizer" not in text and "found_inf" not in text, text
            # A tuple built only to be unpacked: `a, b = (x, y)`.
            assert not (isinstance(node.value, ast.Tuple) and isinstance(targets[0], ast.Tuple)), ast.unparse(node)


def test_the_loop_file_reads_as_the_five_steps_then_the_loop_then_the_save():
    headings = re.findall(r"^    # -+ (.+)$", LOOP_SOURCE, flags=re.MULTILINE)
    assert [heading.split(".")[0] for heading in headings[:5]] == ["1", "2", "3", "4", "5"], headings
    assert headings[5:] == ["The training loop", "Why the loop ended", "Save a model anyone can load"], headings
    lines = len(LOOP_SOURCE.splitlines())
    assert lines <= 450, f"{lines} lines: move what is not the loop into imgft/"
