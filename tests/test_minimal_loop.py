"""examples/minimal_loop.py, the loop a learner reads first, trains as train_loop.py does: at the default flags
the two save bitwise the same weights, so every line train_loop.py adds is inert there."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, data_flags, reset_accelerate, run_command, vit_flags

MINIMAL_LOOP = REPO / "examples" / "minimal_loop.py"


def load_minimal_loop():
    spec = importlib.util.spec_from_file_location("minimal_loop", MINIMAL_LOOP)
    minimal_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minimal_loop)
    return minimal_loop


def differing_tensors(first_dir, second_dir):
    """Names of the tensors that differ in dtype, shape or any bit between two saved models' weights."""
    from safetensors.torch import load_file

    first, second = (load_file(folder / "model.safetensors") for folder in (first_dir, second_dir))
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
    started = time.perf_counter()
    minimal = run_command([sys.executable, MINIMAL_LOOP, "--output_dir", minimal_dir])
    minimal_seconds = time.perf_counter() - started
    assert minimal.returncode == 0, minimal.stderr[-3000:]
    started = time.perf_counter()
    full = run_command([sys.executable, "train_loop.py", "--output_dir", full_dir])
    print(f"wall time: minimal_loop.py {minimal_seconds:.1f} s, train_loop.py {time.perf_counter() - started:.1f} s")
    assert full.returncode == 0, full.stderr[-3000:]
    assert differing_tensors(minimal_dir, full_dir) == []

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(minimal_dir))
    validation = Path(os.environ["IMGFT_HOME"]) / "digits" / "validation"
    images = sorted(validation.glob("*/*.png"))
    answers = classifier([str(image) for image in images], top_k=1, batch_size=64)
    right = sum(answer[0]["label"] == image.parent.name for answer, image in zip(answers, images, strict=True))
    assert len(images) == 359 and right / len(images) >= 0.97  # the demo's accuracy, through pipeline()


@pytest.mark.slow
def test_minimal_loop_draws_the_random_numbers_train_loop_draws(train, tmp_path, colors_data, tiny_vit):
    """The demo's ResNet draws no random number after its initialisation: an extra draw from torch's global
    generator in either loop would go unseen there (measured: a DataLoader without its own generator, which
    draws one per pass, left the demo's weights bitwise unchanged). A ViT with dropout draws masks at every
    step, so here such a draw changes the weights (measured: all 40 tensors)."""
    dropout = ["--config_overrides", "hidden_dropout_prob=0.1,attention_probs_dropout_prob=0.1"]
    flags = [*data_flags(colors_data), *vit_flags(tiny_vit), *dropout, "--num_train_epochs", "3"]
    flags = [str(flag) for flag in [*flags, "--per_device_train_batch_size", "8"]]
    train([*flags, "--output_dir", tmp_path / "train_loop"])
    reset_accelerate()
    try:
        load_minimal_loop().main([*flags, "--output_dir", str(tmp_path / "minimal")])
    finally:
        reset_accelerate()
    assert differing_tensors(tmp_path / "minimal", tmp_path / "train_loop") == []


def test_a_flag_for_what_only_train_loop_does_is_refused_naming_it(tmp_path):
    from imgft.errors import UserError

    minimal_loop = load_minimal_loop()
    reset_accelerate()
    with pytest.raises(UserError, match="^--ema_decay is not in the minimal loop: run train_loop.py for it$"):
        minimal_loop.main(["--output_dir", str(tmp_path / "out"), "--ema_decay", "0.999"])
    assert not (tmp_path / "out").exists()
