"""examples/minimal_loop.py, the loop a learner reads first, trains as train_loop.py does: at the default flags
the two save bitwise the same weights, so every line train_loop.py adds is inert there."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, reset_accelerate, run_command

MINIMAL_LOOP = REPO / "examples" / "minimal_loop.py"


def differing_tensors(first, second):
    """Names of the tensors that differ in dtype, shape or any bit between two model.safetensors files."""
    from safetensors.torch import load_file

    first, second = load_file(first), load_file(second)
    assert first.keys() == second.keys()
    return [
        name
        for name in first
        if (first[name].dtype, first[name].shape) != (second[name].dtype, second[name].shape)
        or first[name].numpy().tobytes() != second[name].numpy().tobytes()
    ]


@pytest.mark.slow
def test_minimal_loop_saves_bitwise_the_weights_train_loop_saves_on_the_demo(tmp_path):
    minimal_dir, full_dir = tmp_path / "minimal", tmp_path / "train_loop"
    minimal = run_command([sys.executable, MINIMAL_LOOP, "--output_dir", minimal_dir])
    assert minimal.returncode == 0, minimal.stderr[-3000:]
    full = run_command([sys.executable, "train_loop.py", "--output_dir", full_dir])
    assert full.returncode == 0, full.stderr[-3000:]
    assert differing_tensors(minimal_dir / "model.safetensors", full_dir / "model.safetensors") == []

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(minimal_dir))
    validation = Path(os.environ["IMGFT_HOME"]) / "digits" / "validation"
    images = sorted(validation.glob("*/*.png"))
    answers = classifier([str(image) for image in images], top_k=1)
    right = sum(answer[0]["label"] == image.parent.name for answer, image in zip(answers, images, strict=True))
    assert len(images) == 359 and right / len(images) >= 0.97  # the demo's accuracy, through pipeline()


def test_a_flag_for_what_only_train_loop_does_is_refused_naming_it(tmp_path):
    from imgft.errors import UserError

    spec = importlib.util.spec_from_file_location("minimal_loop", MINIMAL_LOOP)
    minimal_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minimal_loop)
    reset_accelerate()
    with pytest.raises(UserError, match="^--ema_decay is not in the minimal loop: run train_loop.py for it$"):
        minimal_loop.main(["--output_dir", str(tmp_path / "out"), "--ema_decay", "0.999"])
    assert not (tmp_path / "out").exists()
