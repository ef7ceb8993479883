"""GPU speed on a real-size model, for the big-models issue: run on a GPU machine by .ci/gpu-vit, not by the suite.

    python .ci/gpu-vit.py model-only BATCH [--compile]   # ViT-B/16 at 224 px, bf16: imgft's step on a ready batch
    python .ci/gpu-vit.py epochs OUTPUT_DIR              # images/s and data wait per epoch from a run's metrics.jsonl

The model-only step is the one train_loop.py takes, on a uint8 batch already on the GPU: normalise, forward
under bf16 autocast, backward, clip, fused AdamW. Timed after warm-up, median of three windows.
"""

import json
import statistics
import sys
import time

import torch

VIT_B = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def model_only(batch_size, compiled):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, num_labels=4, **VIT_B)).cuda()
    if compiled:
        model = torch.compile(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pixels = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 4, (batch_size,), device="cuda")
    mean = torch.tensor([0.5, 0.5, 0.5], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.5, 0.5, 0.5], device="cuda").view(1, 3, 1, 1) * 255

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=pixels.float().sub_(mean).div_(std), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adamw.step()
        adamw.zero_grad()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(15):
            step()
        torch.cuda.synchronize()
        rates.append(15 * batch_size / (time.perf_counter() - start))
    print(json.dumps({"model_only_images_per_second": statistics.median(rates), "compiled": compiled}))


def epochs(output_dir):
    with open(f"{output_dir}/metrics.jsonl") as file:
        records = [json.loads(line) for line in file if "train_images_per_second" in line]
    for record in records:
        print(
            f"epoch {record['epoch']}: {record['train_images_per_second']:.0f} images/s, "
            f"data wait {record['data_wait_fraction']:.3f}"
        )
    later = records[1:] or records
    print(
        json.dumps(
            {
                "images_per_second_after_epoch_1": statistics.median(r["train_images_per_second"] for r in later),
                "data_wait_after_epoch_1": statistics.median(r["data_wait_fraction"] for r in later),
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "model-only":
        model_only(int(sys.argv[2]), "--compile" in sys.argv)
    else:
        epochs(sys.argv[2])
