"""What checksums cost a checkpoint of a ViT-B/16-sized model (86 M parameters, built from a config: no download):
model.safetensors of 344 MB and optimizer.bin of 687 MB (AdamW's two moments).

    python -m benchmarks.checkpoint_verify [--folder DIR] [--repeats 3]     # from the repository root

One optimizer step; `accelerator.save_state` timed alone, then the checkpoint as imgft saves it (the same inside
`checkpoint.staged_checkpoint`, which checksums and fsyncs every file and folder); then, alternately,
`checkpoint.verify_checkpoint` (sizes, then every file's sha256) and `accelerator.load_state`, each `--repeats`
times. The files are read back from the page cache, as they are right after a save or on a second read: a cold
read from disk costs both the same extra time, that of reading the bytes once. Prints one JSON object (seconds,
medians).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator
from transformers import ViTConfig, ViTForImageClassification

from imgft import checkpoint

VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT_B16, image_size=32, patch_size=16, num_labels=10))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, adamw = accelerator.prepare(model, adamw)
    pixels = torch.randn(2, 3, 32, 32, device=accelerator.device)
    accelerator.backward(model(pixel_values=pixels, labels=torch.tensor([0, 1], device=accelerator.device)).loss)
    adamw.step()

    with tempfile.TemporaryDirectory(dir=options.folder) as output_dir:
        plain_seconds = timed(lambda: accelerator.save_state(os.path.join(output_dir, "plain")))
        identity = {"config": {}}

        def save():
            with checkpoint.staged_checkpoint(accelerator, output_dir, "step_1", 1, identity, "metrics") as folder:
                accelerator.save_state(folder)

        save_seconds = timed(save)
        path = os.path.join(output_dir, "step_1")
        sizes = {name: record["bytes"] for name, record in checkpoint.read_state(path)["files"].items()}
        verify, load = [], []
        for _ in range(options.repeats):
            verify.append(timed(lambda: checkpoint.verify_checkpoint(path)))
            load.append(timed(lambda: accelerator.load_state(path)))
        assert checkpoint.verify_checkpoint(path) == (None, True)
    print(
        json.dumps(
            {
                "device": str(accelerator.device),
                "cpu_count": os.cpu_count(),
                "megabytes": {name: round(size / 1e6, 1) for name, size in sizes.items() if size > 1e6},
                "save_state_seconds": round(plain_seconds, 2),
                "imgft_checkpoint_seconds": round(save_seconds, 2),
                "verify_seconds": round(statistics.median(verify), 2),
                "load_state_seconds": round(statistics.median(load), 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
