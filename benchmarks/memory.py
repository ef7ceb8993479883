"""`python -m imgft bench --pairs memory`: the peak memory and step time of training a ViT-B/16-sized model
(built from a config: no download) with full fine-tuning, LoRA, gradient checkpointing, and LoRA + gradient
checkpointing, each variant in a fresh process, alternating.

Each process builds the model as imgft does (`imgft.peft_model.prepare_for_training`), then runs imgft's step
(forward, backward, gradient clipping to 1.0, AdamW over `optimizer_param_groups`) on one random batch.
Memory, on a CPU: the process's peak resident set (`getrusage(RUSAGE_SELF).ru_maxrss`), which includes the
interpreter, the libraries and the model's weights, and beside it that peak less what the process held
before its first step (the training's own memory: gradients, optimizer state, activations). On a GPU:
`torch.cuda.max_memory_allocated`, with bf16 autocast, and the same peak less what was allocated before the
first step.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "full": {},
    "lora": {"use_peft": "lora"},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "lora+gradient_checkpointing": {"use_peft": "lora", "gradient_checkpointing": True},
}
MODELS = {
    # ViT-B/16 at 224 px (google/vit-base-patch16-224's shape): 86 M parameters.
    "vit-b16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    # A tiny one, for testing the harness.
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
IMAGE_SIZE = {"vit-b16": 224, "tiny": 32}
NUM_LABELS = 10


def build_model(model_name, variant):
    """The model of `model_name`, randomly initialised (seeded), prepared for `variant` as imgft prepares it."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from imgft.args import ModelArguments
    from imgft.peft_model import prepare_for_training

    torch.manual_seed(0)
    config = ViTConfig(**MODELS[model_name], patch_size=16, image_size=IMAGE_SIZE[model_name], num_labels=NUM_LABELS)
    return prepare_for_training(ViTForImageClassification(config), ModelArguments(**VARIANTS[variant]))


def current_memory_mib(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as file:  # resident pages, now
        return int(file.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mib(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def measure_variant(model_name, variant, batch_size, steps):
    """In this process: build, then time `steps` training steps after one warm-up step; return the numbers."""
    import torch

    from imgft.optimizer import adamw, optimizer_param_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, variant).to(device)
    model.train()
    mixed_precision = "bf16" if device.type == "cuda" else "no"
    optimizer = adamw(optimizer_param_groups(model, 0.05), 1e-4, mixed_precision)
    size = IMAGE_SIZE[model_name]
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = current_memory_mib(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=mixed_precision == "bf16")
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast:
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(device)
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": seconds[1:],  # the first step allocates and warms up
        "peak_memory_mib": peak,
        "memory_before_training_mib": before,
        "training_memory_mib": peak - before,
    }


def run_variant(model_name, variant, batch_size, steps):
    """`measure_variant` in a fresh process, so that each peak is that variant's alone."""
    command = [sys.executable, "-m", "benchmarks.memory", "--model", model_name, "--variant", variant]
    command += ["--batch_size", str(batch_size), "--steps", str(steps)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def measure(model_name="vit-b16", batch_size=8, steps=3, repeats=1, variants=tuple(VARIANTS)):
    """Every variant `repeats` times, alternating; medians, and ratios against full fine-tuning."""
    runs = {variant: [] for variant in variants}
    for repeat in range(repeats):
        for variant in variants:
            runs[variant].append(run_variant(model_name, variant, batch_size, steps))
            step = statistics.median(runs[variant][-1]["step_seconds"])
            peak = runs[variant][-1]["peak_memory_mib"]
            print(f"  memory {variant:28} #{repeat + 1}: peak {peak:7.0f} MiB, step {step:6.2f} s", flush=True)
    summary = {
        variant: {
            "trainable_parameters": variant_runs[0]["trainable_parameters"],
            "total_parameters": variant_runs[0]["total_parameters"],
            "peak_memory_mib": statistics.median(run["peak_memory_mib"] for run in variant_runs),
            "training_memory_mib": statistics.median(run["training_memory_mib"] for run in variant_runs),
            "step_seconds": statistics.median(s for run in variant_runs for s in run["step_seconds"]),
        }
        for variant, variant_runs in runs.items()
    }
    full = summary.get("full")
    if full:
        for numbers in summary.values():
            for key in ("peak_memory_mib", "training_memory_mib", "step_seconds"):
                numbers[f"{key}_vs_full"] = numbers[key] / full[key]
    return {
        "model": model_name,
        "config": MODELS[model_name],
        "image_size": IMAGE_SIZE[model_name],
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "device": runs[variants[0]][0]["device"],
        "runs": runs,
        "summary": summary,
    }


def format_table(results):
    lines = [
        f"Training {results['model']} ({results['image_size']} px, batch {results['batch_size']}) on "
        f"{results['device']}, median of {results['repeats']} run(s) x {results['steps']} steps:",
        "",
        "| variant | trainable parameters | peak memory MiB | vs full | training memory MiB | vs full "
        "| step s | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, numbers in results["summary"].items():
        share = numbers["trainable_parameters"] / numbers["total_parameters"]
        lines.append(
            f"| {variant} | {numbers['trainable_parameters']:,} ({share:.2%}) | {numbers['peak_memory_mib']:.0f} "
            f"| {numbers.get('peak_memory_mib_vs_full', 1):.0%} | {numbers['training_memory_mib']:.0f} "
            f"| {numbers.get('training_memory_mib_vs_full', 1):.0%} | {numbers['step_seconds']:.2f} "
            f"| {numbers.get('step_seconds_vs_full', 1):.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="One variant, in this process; prints its numbers as JSON.")
    parser.add_argument("--model", choices=MODELS, default="vit-b16")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure_variant(args.model, args.variant, args.batch_size, args.steps)))


if __name__ == "__main__":
    main()
