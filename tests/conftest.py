"""Shared fixtures. Everything runs offline on CPU, on data and models the tests make themselves."""

import os
import tempfile

# Before any Hugging Face import: no network waits, and no cache or token from the machine leaks in.
_SANDBOX = tempfile.mkdtemp(prefix="imgft-tests-")
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": os.path.join(_SANDBOX, "hf_home"),
        "HF_DATASETS_CACHE": os.path.join(_SANDBOX, "datasets_cache"),
        "IMGFT_HOME": os.path.join(_SANDBOX, "imgft_home"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
)
os.environ.pop("HF_TOKEN", None)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Five colours a model tells apart within a few steps.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 30, 180),
    "cyan": (30, 210, 210),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "grey": (128, 128, 128),
}


def write_color_imagefolder(root, class_names, per_class, size=16, seed=0):
    """root/<class>/<n>.png: noisy squares of one colour per class. Returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for index, name in enumerate(class_names):
        base = np.array(list(COLORS.values())[index % len(COLORS)], dtype=np.int16)
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            noise = rng.integers(-25, 26, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n:03d}.png")
    return root


@pytest.fixture(scope="session")
def colors_data(tmp_path_factory):
    """A 5-class imagefolder: train (12 per class) and validation (5 per class)."""
    root = tmp_path_factory.mktemp("colors")
    names = list(COLORS)[:5]
    write_color_imagefolder(root / "train", names, 12, seed=1)
    write_color_imagefolder(root / "validation", names, 5, seed=2)
    return root


@pytest.fixture(scope="session")
def colors10_data(tmp_path_factory):
    """A 10-class imagefolder, for replacing a 5-class head."""
    root = tmp_path_factory.mktemp("colors10")
    names = list(COLORS)
    write_color_imagefolder(root / "train", names, 8, seed=3)
    write_color_imagefolder(root / "validation", names, 3, seed=4)
    return root


def save_tiny_vit(path, label_names, image_size=16):
    """A randomly initialised 2-layer ViT saved like a Hub checkpoint, with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    import torch

    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A saved 5-class tiny ViT: the 'pretrained checkpoint' the tests fine-tune."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"), [f"old{i}" for i in range(5)])


def data_flags(root):
    """train_loop flags for an imagefolder with train/ and validation/ under `root`."""
    return ["--train_dir", root / "train", "--validation_dir", root / "validation"]


def vit_flags(model_dir):
    """train_loop flags that fine-tune a saved checkpoint, replacing its head."""
    return ["--model_name_or_path", model_dir, "--ignore_mismatched_sizes"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


@pytest.fixture
def train():
    """Run train_loop.main(argv) in this process (much faster than a subprocess); returns None."""
    import train_loop

    def run(argv):
        reset_accelerate()
        try:
            return train_loop.main([str(a) for a in argv])
        finally:
            reset_accelerate()

    return run


def run_command(args, timeout=600, env=None):
    """Run a command from the repository root in a fresh process; returns CompletedProcess with text output."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def launch_two_processes(args, timeout=600):
    """`accelerate launch` with 2 real DDP processes on CPU (gloo)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    launcher += [str(_free_port())]
    return run_command(launcher + list(args), timeout=timeout)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
