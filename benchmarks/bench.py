"""`python -m imgft bench`: imgft's data path against the upstream example's, each run as a whole process.

Two pairs, on data the benchmark makes itself:
- camera: 320 train + 80 validation noisy 2000x1500 JPEGs in 4 classes, a small ResNet at 64 px, 10 epochs;
- digits: the demo's 32 px PNGs, 3 epochs.
Upstream (`benchmarks/upstream.py`) and imgft alternate, cold (empty datasets cache) then warm (the cache
the cold run left). Timings are ratios against upstream measured in the same run, never absolute claims.
`--pairs compile` times imgft on the digits with and without --torch_compile instead, the ratio again
measured in the same run. `--pairs recipes` trains on 10 and on 30 digits per class, validated on all the
other digits, with the default flags and with configs/recipes/small-data.yaml (and that recipe with one part
undone or one recipe added), alternating, over `--seeds`: top-1 and wall time, the gain measured in one run.
`--pairs memory` measures something else: the peak training memory and step time of a ViT-B/16 with full
fine-tuning, LoRA and gradient checkpointing, against full fine-tuning (`benchmarks/memory.py`).
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil  # an accelerate dependency
from PIL import Image

from benchmarks import memory as memory_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PAIRS = ("camera", "digits")
PAIRS = (*DATA_PAIRS, "memory")
COMPILE = "compile"  # not a pair against upstream: imgft with --torch_compile against imgft without
RECIPES = "recipes"  # not a pair against upstream: imgft's defaults against the small-data recipe
SMALL_DATA_CONFIG = "configs/recipes/small-data.yaml"
# What runs in the recipes pair: a config file (or None) and flags after it. The rows after the first two
# undo one part of the recipe, or add one it leaves out, to show what each part adds or costs.
RECIPE_VARIANTS = {
    "default": (None, ()),
    "small-data": (SMALL_DATA_CONFIG, ()),
    "small-data, batch 32": (SMALL_DATA_CONFIG, ("--per_device_train_batch_size", "32")),
    "small-data, crop 0.6": (SMALL_DATA_CONFIG, ("--crop_scale_min", "0.6")),
    "small-data + label smoothing 0.1": (SMALL_DATA_CONFIG, ("--label_smoothing_factor", "0.1")),
    "small-data + Mixup 0.8/CutMix 1.0": (
        SMALL_DATA_CONFIG,
        ("--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"),
    ),
    "small-data + RandAugment": (SMALL_DATA_CONFIG, ("--auto_augment", "randaugment")),
    "small-data + EMA 0.99": (SMALL_DATA_CONFIG, ("--ema_decay", "0.99")),
}
# What each run reports, from its all_results.json (eval_ema_accuracy and saved_weights with --ema_decay).
RECIPE_RESULTS = ("eval_accuracy", "eval_samples", "train_samples", "train_steps")
RECIPE_RESULTS += ("eval_ema_accuracy", "saved_weights")
RECIPE_IMAGES_PER_CLASS = (10, 30)
RECIPE_SEEDS = (0, 1, 2)


def write_camera_folder(root, train_per_class, validation_per_class, classes=4, size=(2000, 1500), seed=0):
    """Photo-like JPEGs: a smooth colour field per class plus sensor noise, so files weigh what photos do.

    Written by a pool of processes (each file seeded by its own index), so the same data on any core count.
    """
    jobs = []
    for split, count in (("train", train_per_class), ("validation", validation_per_class)):
        for label in range(classes):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                jobs.append((os.path.join(folder, f"{index:04d}.jpg"), label, size, (seed, len(jobs))))
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_camera_jpeg, *zip(*jobs, strict=True), chunksize=8))
    return root


def _write_camera_jpeg(path, label, size, seed):
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height:4, 0:width:4]
    phase = rng.uniform(0, 2 * np.pi, 3)
    field = np.stack([127 + 100 * np.sin(xs / (90 + 40 * label) + ys / 150 + phase[c]) for c in range(3)], axis=-1)
    small = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(small).resize(size, Image.BILINEAR)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def run_process(command, env, log_path, poll_seconds=0.5):
    """(wall seconds, peak memory in MiB of the process and its children, sampled every `poll_seconds`).

    Memory is the proportional set size (PSS): DataLoader and preprocessing workers share most of their
    pages with the process that forked them, and adding up resident sizes would count those once per
    worker. Reading PSS walks the page tables (25 ms a process here), hence the slow sampling.
    """
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):  # a child may end between listing and reading it
            peak = max(peak, sum(_memory(p) for p in [watched, *watched.children(recursive=True)]))
        time.sleep(poll_seconds)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        with open(log_path) as log:
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return seconds, peak / 2**20


def _memory(process):
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):  # no PSS here (not Linux, or not ours to read)
        return process.memory_info().rss


def read_epochs(metrics_file):
    with open(metrics_file) as file:
        records = [json.loads(line) for line in file]
    return [r for r in records if "train_images_per_second" in r]


# On a GPU, imgft also runs with what makes convolutions fast there; its loader is imgft's, so no loader-only rate.
GPU_VARIANT = "imgft-bf16-channels_last"
GPU_VARIANT_FLAGS = ("--mixed_precision", "bf16", "--channels_last")


def pipelines():
    """upstream and imgft, and on a GPU that can do bf16, imgft with bf16 and channels_last too."""
    import torch

    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return ("upstream", "imgft", GPU_VARIANT) if gpu else ("upstream", "imgft")


def pipeline_command(pipeline, data_dir, out_dir, image_size, epochs, batch_size):
    data = ["--train_dir", f"{data_dir}/train", "--validation_dir", f"{data_dir}/validation"]
    common = ["--image_size", str(image_size), "--num_train_epochs", str(epochs)]
    common += ["--per_device_train_batch_size", str(batch_size)]
    if pipeline == "upstream":
        upstream = [sys.executable, "-m", "benchmarks.upstream", *data, *common]
        return [*upstream, "--metrics_file", metrics_file(pipeline, out_dir)]
    variant = GPU_VARIANT_FLAGS if pipeline == GPU_VARIANT else ()
    return [sys.executable, "train_loop.py", *data, *common, "--output_dir", out_dir, "--random_flip", *variant]


def metrics_file(pipeline, out_dir):
    return f"{out_dir}/m.jsonl" if pipeline == "upstream" else f"{out_dir}/metrics.jsonl"


def run_pair(name, data_dir, work, image_size, epochs, batch_size, repeats, pipelines=("upstream", "imgft")):
    """Alternate the pipelines, cold then warm, `repeats` times; return the per-pipeline results."""
    runs = {pipeline: {"cold": [], "warm": []} for pipeline in pipelines}
    for repeat in range(repeats):
        for pipeline in pipelines:
            cache = tempfile.mkdtemp(prefix=f"{name}-{pipeline}-cache-", dir=work)
            for temperature in ("cold", "warm"):
                out_dir = tempfile.mkdtemp(prefix=f"{name}-{pipeline}-{temperature}-", dir=work)
                env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
                command = pipeline_command(pipeline, data_dir, out_dir, image_size, epochs, batch_size)
                seconds, peak = run_process(command, env, f"{out_dir}.log")
                epochs_seen = read_epochs(metrics_file(pipeline, out_dir))
                runs[pipeline][temperature].append(
                    {
                        "seconds": seconds,
                        "peak_memory_mib": peak,
                        "images_per_second_by_epoch": [r["train_images_per_second"] for r in epochs_seen],
                        "data_wait_fraction_by_epoch": [r["data_wait_fraction"] for r in epochs_seen],
                        "eval_accuracy": epochs_seen[-1]["eval_accuracy"],
                    }
                )
                print(f"  {name} {pipeline:24} {temperature} #{repeat + 1}: {seconds:6.1f} s", flush=True)
                shutil.rmtree(out_dir)
            shutil.rmtree(cache)
    return runs


def model_only_step(image_size, batch_size, num_labels, mixed_precision="no", channels_last=False):
    """imgft's training step alone (normalise the uint8 batch, forward, backward, clip the gradient norm to 1.0
    as imgft does by default, fused AdamW) on a batch already on the device: a function making one step."""
    import torch

    from benchmarks.upstream import demo_resnet
    from imgft.transforms import normalize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = demo_resnet(num_labels).to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    pixel_values = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_labels, (batch_size,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=mixed_precision == "bf16")

    def train_step():
        with autocast:
            loss = model(pixel_values=normalize(pixel_values, [0.5] * 3, [0.5] * 3, memory_format), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return train_step


def model_only_rate(image_size, batch_size, num_labels, mixed_precision="no", channels_last=False, steps=15, windows=3):
    """Images/s of `model_only_step`: the data path's ceiling. The median of `windows` timings of `steps`
    steps each, after 3 warm-up steps."""
    import torch

    train_step = model_only_step(image_size, batch_size, num_labels, mixed_precision, channels_last)

    def train_steps(count):
        for _ in range(count):
            train_step()
        if torch.cuda.is_available():  # the step's device: wait for the queued kernels before reading the clock
            torch.cuda.synchronize()

    train_steps(3)  # warm-up: allocations, kernel selection
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        train_steps(steps)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def loader_only_rate(pipeline, data_dir, image_size, batch_size, cache_dir):
    """Images/s of one epoch of the training DataLoader with no model (after a warm-up epoch fills caches)."""
    if pipeline == "upstream":
        from benchmarks.upstream import build_dataloaders

        loader = build_dataloaders(f"{data_dir}/train", f"{data_dir}/validation", image_size, batch_size, cache_dir)[0]
    else:
        loader = imgft_train_loader(data_dir, image_size, batch_size, cache_dir)
    for _ in loader:  # warm-up: imgft's resize-once pass and both pipelines' Arrow caches
        pass
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch["labels"])
    return images / (time.perf_counter() - start)


def imgft_train_loader(data_dir, image_size, batch_size, cache_dir):
    """The training DataLoader train_loop.py builds with its defaults (steps 2 and 4), without the model."""
    from torch.utils.data import DataLoader
    from transformers import ViTImageProcessor

    from imgft import data, transforms
    from imgft.args import DataArguments

    data_args = DataArguments(train_dir=f"{data_dir}/train", validation_dir=f"{data_dir}/validation", random_flip=True)
    dataset, image_column, label_column, names = data.load_labeled_dataset(data_args, cache_dir, 42)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    stored_size = transforms.stored_image_size(processor, image_size, data_args)
    dataset, _ = data.decode_once_dropping_unreadable(
        dataset, image_column, label_column, names, data_args, stored_size
    )
    train_transform, _ = transforms.build_transforms(processor, image_size, True, data_args.crop_scale_min)
    train = transforms.with_image_transform(
        dataset["train"], train_transform, image_column, label_column, seed=42, epoch=transforms.shared_epoch()
    )
    return DataLoader(train, batch_size, shuffle=True, collate_fn=transforms.collate_fn)  # no workers, as on a CPU run


def summarize(runs):
    def median(temperature, key):
        return statistics.median(run[key] for run in runs[temperature])

    def after_first_epoch(temperature, key):  # the median over epochs 2.. (epoch 1, if it is the only one)
        per_run = [run[key] for run in runs[temperature]]
        return statistics.median([value for epochs in per_run for value in (epochs[1:] or epochs)])

    return {
        temperature: {
            "seconds": median(temperature, "seconds"),
            "peak_memory_mib": median(temperature, "peak_memory_mib"),
            "images_per_second_after_first_epoch": after_first_epoch(temperature, "images_per_second_by_epoch"),
            "data_wait_fraction_after_first_epoch": after_first_epoch(temperature, "data_wait_fraction_by_epoch"),
            "eval_accuracy": median(temperature, "eval_accuracy"),
        }
        for temperature in ("cold", "warm")
    }


def measure_pair(name, data_dir, work, image_size, epochs, num_labels, repeats, batch_size=32):
    """Whole-process runs of every pipeline, and the model-only and loader-only rates beside them."""
    runs = run_pair(name, data_dir, work, image_size, epochs, batch_size, repeats, pipelines())
    summary = {pipeline: summarize(pipeline_runs) for pipeline, pipeline_runs in runs.items()}
    model_only = {"imgft": model_only_rate(image_size, batch_size, num_labels)}
    if GPU_VARIANT in runs:
        model_only[GPU_VARIANT] = model_only_rate(image_size, batch_size, num_labels, "bf16", channels_last=True)
    cache = tempfile.mkdtemp(prefix="loader-cache-", dir=work)
    ours = [pipeline for pipeline in runs if pipeline != "upstream"]

    def speedup(pipeline, temperature):
        return summary["upstream"][temperature]["seconds"] / summary[pipeline][temperature]["seconds"]

    def share_of_model_only(pipeline):
        return summary[pipeline]["warm"]["images_per_second_after_first_epoch"] / model_only[pipeline]

    return {
        "runs": runs,
        "summary": summary,
        "speedup_cold": speedup("imgft", "cold"),
        "speedup_warm": speedup("imgft", "warm"),
        "speedups": {pipeline: {t: speedup(pipeline, t) for t in ("cold", "warm")} for pipeline in ours},
        "model_only_images_per_second": model_only["imgft"],
        "model_only_images_per_second_by_pipeline": model_only,
        "imgft_end_to_end_vs_model_only": share_of_model_only("imgft"),
        "end_to_end_vs_model_only": {pipeline: share_of_model_only(pipeline) for pipeline in ours},
        "loader_only_images_per_second": {
            pipeline: loader_only_rate(pipeline, data_dir, image_size, batch_size, cache)
            for pipeline in ("upstream", "imgft")
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m imgft bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller data, fewer epochs, one repeat: < 3 min.")
    parser.add_argument("--repeats", type=int, default=None, help="Runs per pipeline and cache state (default 3).")
    parser.add_argument("--output", default="bench_results.json", help="Where the JSON results go.")
    parser.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument(
        "--pairs",
        nargs="+",
        choices=(*PAIRS, COMPILE, RECIPES),
        default=DATA_PAIRS,
        help="What to run (default: camera and digits); memory: LoRA and gradient checkpointing against full "
        "fine-tuning; compile: imgft with and without --torch_compile; recipes: the defaults against "
        f"{SMALL_DATA_CONFIG} on 10 and 30 digits per class.",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=RECIPE_SEEDS,
        help="recipes: the seeds, each drawing its own training images and passed as --seed (default 0 1 2; "
        "--quick: the first, and no ablation rows). Medians are over them.",
    )
    parser.add_argument("--skip_memory", action="store_true", help="Leave out the 1x/4x peak-memory runs.")
    args = parser.parse_args(argv)
    # Said now rather than when the first results are written, minutes of measuring later.
    output_folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(output_folder):
        parser.error(f"--output {args.output}: give a file in an existing folder")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    repeats = args.repeats or (1 if args.quick else 3)
    per_class, val_per_class, camera_epochs, digits_epochs = (16, 4, 3, 2) if args.quick else (80, 20, 10, 3)
    data_pairs = [name for name in args.pairs if name in DATA_PAIRS]
    needs_digits = bool(data_pairs) or COMPILE in args.pairs
    work = args.workdir or tempfile.mkdtemp(prefix="imgft-bench-")
    os.makedirs(work, exist_ok=True)
    camera = os.path.join(work, f"camera_{per_class}")
    digits = os.path.join(work, "digits")
    if needs_digits:
        print(f"Generating data in {work} ...", flush=True)
        if "camera" in args.pairs and not os.path.isdir(camera):
            write_camera_folder(camera, per_class, val_per_class)
        from imgft.commands.demo_data import write_digits_imagefolder

        if not os.path.isdir(digits):
            write_digits_imagefolder(digits)

    results = {"machine": _machine(), "quick": args.quick, "repeats": repeats, "pairs": {}}
    for name, data_dir, image_size, epochs, num_labels in (
        ("camera", camera, 64, camera_epochs, 4),
        ("digits", digits, 32, digits_epochs, 10),
    ):
        if name not in args.pairs:
            continue
        print(f"{name}: {epochs} epochs at {image_size} px", flush=True)
        results["pairs"][name] = measure_pair(name, data_dir, work, image_size, epochs, num_labels, repeats)
        _write(args.output, results)  # what is measured so far survives an interrupted benchmark
    if COMPILE in args.pairs:
        print(f"compile: digits, {digits_epochs} epochs, with and without --torch_compile", flush=True)
        results[COMPILE] = measure_compile(digits, work, digits_epochs, repeats)
        _write(args.output, results)
    if RECIPES in args.pairs:
        seeds = args.seeds[:1] if args.quick else args.seeds
        # --quick: the pair alone, without the rows that take one part of the recipe out or add one.
        pair = {name: RECIPE_VARIANTS[name] for name in ("default", "small-data")}
        variants = pair if args.quick else RECIPE_VARIANTS
        print(f"recipes: the digits, defaults against {SMALL_DATA_CONFIG}, seeds {seeds}", flush=True)
        results[RECIPES] = measure_recipes(work, seeds=seeds, variants=variants)
        _write(args.output, results)
    if not args.skip_memory and data_pairs:
        results["memory"] = memory_growth(digits, work)
        _write(args.output, results)
    if "memory" in args.pairs:
        print("memory: training a ViT-B/16 (built from a config) four ways, each in a fresh process", flush=True)
        results["training_memory"] = memory_bench.measure(steps=2 if args.quick else 3, repeats=repeats)
        _write(args.output, results)
    print(format_table(results))
    print(f"Wrote {args.output}")
    return results


def measure_compile(data_dir, work, epochs, repeats, batch_size=32):
    """imgft on `data_dir` without and with --torch_compile, alternating, on a warm datasets cache. Each
    compiled run starts with an empty inductor cache, as a first run does: its seconds include compiling;
    the images/s after the first epoch are the compiled code's own speed."""
    cache = tempfile.mkdtemp(prefix="compile-datasets-cache-", dir=work)
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    warm_up = tempfile.mkdtemp(prefix="compile-warm-up-", dir=work)  # fills the datasets cache, untimed
    run_process(
        [*pipeline_command("imgft", data_dir, warm_up, 32, 1, batch_size), "--max_train_steps", "1"],
        env,
        f"{warm_up}.log",
    )
    runs = {"eager": [], "compiled": []}
    for repeat in range(repeats):
        for variant, flags in (("eager", []), ("compiled", ["--torch_compile"])):
            out_dir = tempfile.mkdtemp(prefix=f"compile-{variant}-", dir=work)
            inductor_cache = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(out_dir, "inductor-cache")}
            command = [*pipeline_command("imgft", data_dir, out_dir, 32, epochs, batch_size), *flags]
            seconds, peak = run_process(command, {**env, **inductor_cache}, f"{out_dir}.log")
            epochs_seen = read_epochs(metrics_file("imgft", out_dir))
            runs[variant].append(
                {
                    "seconds": seconds,
                    "peak_memory_mib": peak,
                    "images_per_second_by_epoch": [r["train_images_per_second"] for r in epochs_seen],
                    "eval_accuracy": epochs_seen[-1]["eval_accuracy"],
                }
            )
            print(f"  compile {variant:8} #{repeat + 1}: {seconds:6.1f} s", flush=True)
            shutil.rmtree(out_dir)
    summary = {variant: _compile_summary(variant_runs) for variant, variant_runs in runs.items()}
    eager, compiled = summary["eager"], summary["compiled"]
    rate = "images_per_second_after_first_epoch"
    return {
        "runs": runs,
        "summary": summary,
        "compiled_vs_eager_seconds": compiled["seconds"] / eager["seconds"],
        "compiled_vs_eager_rate_after_first_epoch": compiled[rate] / eager[rate],
    }


def _compile_summary(runs):
    by_epoch = [run["images_per_second_by_epoch"] for run in runs]
    after_first_epoch = [rate for rates in by_epoch for rate in (rates[1:] or rates)]
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "images_per_second_after_first_epoch": statistics.median(after_first_epoch),
        "eval_accuracy": statistics.median(run["eval_accuracy"] for run in runs),
    }


def write_digits_subsample(root, images_per_class, seed):
    """The demo's 1,797 digits, as its images: `images_per_class` of each digit in root/train (drawn with
    `seed`), all the others in root/validation. Returns root."""
    from sklearn.datasets import load_digits

    from imgft.commands.demo_data import digit_image

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        splits = {"train": indices[:images_per_class], "validation": indices[images_per_class:]}
        for split, split_indices in splits.items():
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder)
            for index in split_indices:
                digit_image(digits.images[index]).save(os.path.join(folder, f"{index:04d}.png"))
    return root


def measure_recipes(
    work, images_per_class=RECIPE_IMAGES_PER_CLASS, seeds=RECIPE_SEEDS, variants=RECIPE_VARIANTS, flags=()
):
    """Each variant of `variants` trained on `images_per_class` digits of each class and validated on all the
    others, for every seed (the training images' draw and --seed alike), the variants alternating; whole
    processes, each with an empty datasets cache. `flags` go to every run. Medians over the seeds, and the
    recipe against the defaults: top-1 points gained, and the ratio of wall times."""
    results = {}
    for per_class in images_per_class:
        runs = {variant: [] for variant in variants}
        for seed in seeds:
            data_dir = os.path.join(work, f"digits-{per_class}-seed{seed}")
            write_digits_subsample(data_dir, per_class, seed)
            data = ["--train_dir", f"{data_dir}/train", "--validation_dir", f"{data_dir}/validation"]
            for variant, (config, variant_flags) in variants.items():
                folder_name = re.sub(r"[^\w.-]+", "_", variant)  # "Mixup 0.8/CutMix 1.0": no slash
                out_dir = tempfile.mkdtemp(prefix=f"recipes-{per_class}-{folder_name}-", dir=work)
                cache = os.path.join(out_dir, "cache")
                env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
                command = [sys.executable, "train_loop.py", *([config] if config else []), *data]
                command += [*variant_flags, "--seed", str(seed), "--output_dir", f"{out_dir}/run", *flags]
                seconds = run_process(command, env, f"{out_dir}.log")[0]
                with open(f"{out_dir}/run/all_results.json") as file:
                    finished = json.load(file)
                run = {"seed": seed, "seconds": seconds}
                run |= {key: finished[key] for key in RECIPE_RESULTS if key in finished}
                runs[variant].append(run)
                top1 = run["eval_accuracy"]
                print(f"  {per_class}/class {variant:34} seed {seed}: {top1:.2%} {seconds:.1f} s", flush=True)
                shutil.rmtree(out_dir)
            shutil.rmtree(data_dir)
        results[str(per_class)] = _recipes_summary(runs)
    return results


def _recipes_summary(runs):
    def medians(variant_runs):
        # With --ema_decay the raw weights train as without it: the EMA weights' top-1 is what it adds.
        keys = [key for key in ("eval_accuracy", "seconds", "eval_ema_accuracy") if key in variant_runs[0]]
        return {key: statistics.median(run[key] for run in variant_runs) for key in keys}

    summary = {variant: medians(variant_runs) for variant, variant_runs in runs.items()}
    default, recipe = summary["default"], summary["small-data"]
    return {
        "runs": runs,
        "summary": summary,
        "recipe_minus_default_points": 100 * (recipe["eval_accuracy"] - default["eval_accuracy"]),
        "recipe_vs_default_seconds": recipe["seconds"] / default["seconds"],
    }


def _write(path, results):
    with open(path, "w") as file:
        json.dump(results, file, indent=2)


def memory_growth(digits, work):
    """imgft's peak memory for one epoch on the digits, and on four times as many images."""
    bigger = os.path.join(work, "digits_x4")
    if not os.path.isdir(bigger):
        for copy in range(4):
            for split in ("train", "validation"):
                for label in os.listdir(os.path.join(digits, split)):
                    target = os.path.join(bigger, split, label)
                    os.makedirs(target, exist_ok=True)
                    for name in os.listdir(os.path.join(digits, split, label)):
                        shutil.copyfile(
                            os.path.join(digits, split, label, name), os.path.join(target, f"{copy}_{name}")
                        )
    peaks = {}
    for label, data_dir in (("1x", digits), ("4x", bigger)):
        out_dir = tempfile.mkdtemp(prefix=f"memory-{label}-", dir=work)
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(out_dir, "cache"), "HF_HUB_OFFLINE": "1"}
        command = pipeline_command("imgft", data_dir, out_dir, 32, 1, 32)
        peaks[label] = run_process(command, env, f"{out_dir}.log")[1]
        shutil.rmtree(out_dir)
    return {"peak_memory_mib": peaks, "ratio_4x_to_1x": peaks["4x"] / peaks["1x"]}


def _machine():
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_table(results):
    lines = []
    if results["pairs"]:
        lines += [
            "| pair | pipeline | cold s | warm s | images/s after epoch 1 | data wait after epoch 1 "
            "| loader-only images/s | peak memory MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for name, pair in results["pairs"].items():
        for pipeline, summary in pair["summary"].items():
            cold, warm = summary["cold"], summary["warm"]
            loader_only = pair["loader_only_images_per_second"].get(pipeline)
            lines.append(
                f"| {name} | {pipeline} | {cold['seconds']:.1f} | {warm['seconds']:.1f} | "
                f"{warm['images_per_second_after_first_epoch']:.0f} | "
                f"{warm['data_wait_fraction_after_first_epoch']:.0%} | "
                f"{'' if loader_only is None else f'{loader_only:.0f}'} | {warm['peak_memory_mib']:.0f} |"
            )
        for pipeline, speedup in pair["speedups"].items():
            model_only = pair["model_only_images_per_second_by_pipeline"][pipeline]
            lines.append(
                f"| {name} | **{pipeline} speed-up** | **{speedup['cold']:.1f}x** | **{speedup['warm']:.1f}x** | "
                f"model-only {model_only:.0f} images/s; {pipeline} reaches "
                f"{pair['end_to_end_vs_model_only'][pipeline]:.0%} of it | | | |"
            )
    compiled = results.get(COMPILE)
    if compiled:
        eager, fast = compiled["summary"]["eager"], compiled["summary"]["compiled"]
        rate = "images_per_second_after_first_epoch"
        lines.append(
            f"\n--torch_compile on the digits: {fast['seconds']:.1f} s against {eager['seconds']:.1f} s "
            f"without ({compiled['compiled_vs_eager_seconds']:.2f}x the time, compiling included); after the "
            f"first epoch {fast[rate]:.0f} against {eager[rate]:.0f} images/s "
            f"({compiled['compiled_vs_eager_rate_after_first_epoch']:.2f}x)."
        )
    if RECIPES in results:
        lines.append("\n" + format_recipes_table(results[RECIPES]))
    memory = results.get("memory")
    if memory:
        lines.append(
            f"\nPeak memory, imgft, 1 epoch: {memory['peak_memory_mib']['1x']:.0f} MiB on the digits, "
            f"{memory['peak_memory_mib']['4x']:.0f} MiB on 4x the images ({memory['ratio_4x_to_1x']:.2f}x)."
        )
    if results.get("training_memory"):
        lines += ["", memory_bench.format_table(results["training_memory"])]
    return "\n".join(lines)


def format_recipes_table(recipes):
    """The recipes pair as a Markdown table: each run's median top-1 and wall time, then the recipe's gain."""
    lines = [
        "| images per class | run | top-1, median | wall s, median | top-1 by seed |",
        "|---|---|---|---|---|",
    ]
    for per_class, measured in recipes.items():
        for variant, summary in measured["summary"].items():
            runs = measured["runs"][variant]
            by_seed = ", ".join(f"{run['eval_accuracy']:.1%}" for run in runs)
            top1 = f"{summary['eval_accuracy']:.1%}"
            if "eval_ema_accuracy" in summary:
                top1 += f" (EMA weights {summary['eval_ema_accuracy']:.1%})"
                by_seed += " (EMA " + ", ".join(f"{run['eval_ema_accuracy']:.1%}" for run in runs) + ")"
            lines.append(f"| {per_class} | {variant} | {top1} | {summary['seconds']:.1f} | {by_seed} |")
        gain = measured["recipe_minus_default_points"]
        time_ratio = measured["recipe_vs_default_seconds"]
        against = f"| {per_class} | **small-data against default** |"
        lines.append(f"{against} **{gain:+.1f} points** | **{time_ratio:.2f}x** | |")
    return "\n".join(lines)
