"""output_dir/README.md: a Hub model card, its metadata built with huggingface_hub rather than written by hand, and
its usage snippet carrying imgft's image conversion (images.to_rgb), since pipeline()'s own differs."""

import inspect
import json
import os
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from imgft import images
from imgft.outputs import ADAPTER_DIR, CARD_FILE

TAGS = ["image-classification", "imgft"]
ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "ia3": "IA3"}  # --use_peft's choices, as papers write them
# `owner/name` or `name`: what the Hub accepts as a repository id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# (key in results, label in the card, metric type and arguments for model-index; None: table only)
RESULT_ROWS = (
    ("eval_accuracy", "accuracy", ("accuracy", None)),
    ("eval_top5_accuracy", "top-5 accuracy", ("accuracy", {"top_k": 5})),
    ("eval_macro_precision", "macro precision", ("precision", {"average": "macro"})),
    ("eval_macro_recall", "macro recall", ("recall", {"average": "macro"})),
    ("eval_macro_f1", "macro F1", ("f1", {"average": "macro"})),
    ("eval_loss", "validation loss", None),
    ("eval_samples", "validation images", None),
    ("train_loss", "training loss (mean)", None),
    ("train_steps", "optimizer steps", None),
    ("epoch", "epochs", None),
)
MACRO_KEYS = ("eval_macro_precision", "eval_macro_recall", "eval_macro_f1")
HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_train_steps",
    "lr_scheduler_type",
    "num_warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "mixed_precision",
    "seed",
    "image_size",
    "random_flip",
    "crop_scale_min",
)
# The recipes a run may use, each listed under the hyperparameters only when on (not None, False or 0), with
# the settings that go with it (`_recipes`).
RECIPES = (
    "label_smoothing_factor",
    "class_weighted_loss",
    "balanced_sampling",
    "mixup_alpha",
    "cutmix_alpha",
    "auto_augment",
    "random_erasing",
    "drop_path_rate",
    "layer_decay",
    "head_learning_rate",
    "freeze_backbone",
    "unfreeze_after_epochs",
    "use_peft",
    "ema_decay",
    "load_best_model_at_end",
    "early_stopping_patience",
)


def write_model_card(output_dir, config, results, label_names, per_class=None, num_processes=None, license=None):
    """Write `output_dir/README.md` and return its path.

    config: the run's arguments as one flat dict, as `imgft.args.to_dict` gives and imgft_config.yaml holds.
        `model_name_or_path` becomes `base_model` when it is a Hub id (a local folder is only mentioned),
        `dataset_name` becomes `datasets` when it is a Hub id (else the card says which local data it was:
        a dataset folder, image folders or the demo), `eval_split` names the split of the results,
        `hub_model_id` (else output_dir's name) names the model, and the training keys fill the
        hyperparameters table.
    results: the numbers of all_results.json (eval_accuracy, eval_macro_f1, ..., train_loss); the eval_*
        metrics also go into the model-index metadata.
    label_names: the class names in id order.
    per_class: optional {class name: {"precision", "recall", "f1", "support"}}, as in
        `metrics.detailed_evaluation`'s details["per_class"], for a per-class table.
    num_processes: optional, to state the effective batch size.
    The usage snippet loads `usage_reference`: the Hub repository, else the output folder's absolute path.
    license: optional Hub license id, e.g. "apache-2.0".
    """
    model_name = config.get("hub_model_id") or os.path.basename(os.path.abspath(output_dir))
    base_model = _hub_id(config.get("model_name_or_path"))
    dataset = _hub_id(config.get("dataset_name"))
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=TAGS + [config["use_peft"]] if config.get("use_peft") else list(TAGS),
        metrics=sorted({row[2][0] for row in RESULT_ROWS if row[2] and row[0] in results}) or None,
        eval_results=_eval_results(results, config, dataset) or None,
    )
    sections = [
        f"# {model_name}",
        _origin(config, base_model, dataset, len(label_names)),
        "## Results on the validation set",
        _table(
            ["metric", "value"], [(label, _number(results[key])) for key, label, _ in RESULT_ROWS if key in results]
        ),
    ]
    if per_class:
        sections += ["## Per-class metrics", _per_class_table(per_class)]
        if any(key in results for key in MACRO_KEYS):
            sections += [_macro_note(per_class)]
    else:
        sections += ["## Classes", ", ".join(f"`{name}`" for name in label_names)]
    if config.get("use_peft"):
        sections += ["## Adapter", _adapter(config["use_peft"], output_dir)]
    sections += [
        "## Training hyperparameters",
        _table(["hyperparameter", "value"], _hyperparameters(config, num_processes) + _recipes(config, results)),
        "## Usage",
        _usage(usage_reference(config, output_dir)),
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = os.path.join(output_dir, CARD_FILE)
    card.save(path)
    return path


def _hub_id(name):
    """`name` when it can only mean a Hub repository, else None (unset, or a folder on this machine)."""
    if not name or os.path.exists(name) or not HUB_ID.match(name):
        return None
    return name


def _eval_results(results, config, dataset):
    dataset_type, dataset_name = _local_data_names(config) if dataset is None else (dataset, dataset)
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=config.get("dataset_config_name") if dataset else None,
            dataset_split=config.get("eval_split") or "validation",
            metric_type=metric[0],
            metric_name=label,
            metric_args=metric[1],
            metric_value=results[key],
        )
        for key, label, metric in RESULT_ROWS
        if metric and isinstance(results.get(key), (int, float))
    ]


def _local_data_names(config):
    """(type, name) of data on this machine for model-index: a dataset folder read by load_dataset
    (--dataset_name), image folders (--train_dir), or the digits demo."""
    if config.get("dataset_name"):
        return "local", f"{os.path.basename(os.path.normpath(config['dataset_name']))} (local dataset folder)"
    if config.get("train_dir"):
        return "imagefolder", "local image folders"
    return "imagefolder", "imgft digits demo"


def _origin(config, base_model, dataset, num_classes):
    source = config.get("model_name_or_path")
    if base_model:
        model = f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
    elif source:
        model = f"fine-tuned from the local checkpoint `{source}`"
    else:
        model = f"a {config.get('model_type', 'model')} trained from scratch"
    if dataset:
        data = f"the [{dataset}](https://huggingface.co/datasets/{dataset}) dataset"
    elif config.get("dataset_name"):
        data = f"the local dataset folder `{config['dataset_name']}`"
    elif config.get("train_dir"):
        folders = [f"`{config[key]}` ({key[:-4]})" for key in ("train_dir", "validation_dir") if config.get(key)]
        data = f"the local image folder{'s' if len(folders) > 1 else ''} {' and '.join(folders)}"
    else:
        data = "imgft's digits demo"
    return f"This image classifier ({num_classes} classes) is {model}, trained on {data} with imgft's `train_loop.py`."


def _adapter(method, output_dir):
    """How a --use_peft run was trained, from the adapter config it saved in output_dir/adapter."""
    with open(os.path.join(output_dir, ADAPTER_DIR, "adapter_config.json"), encoding="utf-8") as file:
        adapter = json.load(file)
    name = ADAPTER_NAMES[method]
    settings = {
        "method": f"{name} (`--use_peft {method}`)",
        "adapted layers": ", ".join(f"`{target}`" for target in sorted(adapter["target_modules"])),
        "fully trained": ", ".join(f"`{module}`" for module in adapter["modules_to_save"]),
    }
    for key in ("r", "lora_alpha", "alpha", "lora_dropout", "rank_dropout"):
        if key in adapter:
            settings[key] = f"`{adapter[key]}`"
    text = (
        f"Only a {name} adapter ([🤗 PEFT](https://huggingface.co/docs/peft)) and the classifier head were "
        "trained; the rest of the weights stayed frozen. The weights here have the adapter merged in: they "
        "load with transformers alone. The adapter itself is in `adapter/`, and loads with "
        '`PeftModel.from_pretrained(base_model, "adapter")`.'
    )
    return text + "\n\n" + _table(["setting", "value"], list(settings.items()))


def _hyperparameters(config, num_processes):
    rows = [(key, f"`{config[key]}`") for key in HYPERPARAMETERS if config.get(key) is not None]
    if num_processes:
        per_device = config.get("per_device_train_batch_size", 1)
        total = per_device * num_processes * config.get("gradient_accumulation_steps", 1)
        rows += [("processes", f"`{num_processes}`"), ("total train batch size", f"`{total}`")]
    return rows


def _recipes(config, results):
    """(setting, value) rows of the RECIPES the run used, each followed by what goes with it: Mixup/CutMix's
    shares, RandAugment's strength, which weights an EMA run saved, the best model's step; then the metric
    that chose between weights."""
    rows = []
    for key in RECIPES:
        if config.get(key) not in (None, False, 0):
            rows.append((key, f"`{config[key]}`"))
            rows += _recipe_settings(key, config, results)
        if key == "cutmix_alpha" and (config.get("mixup_alpha") or config.get("cutmix_alpha")):
            rows.append(("mixup_prob", f"`{config.get('mixup_prob')}`"))
            if config.get("mixup_alpha") and config.get("cutmix_alpha"):
                rows.append(("mixup_switch_prob", f"`{config.get('mixup_switch_prob')}`"))
    if any(config.get(key) for key in ("ema_decay", "load_best_model_at_end", "early_stopping_patience")):
        rows.append(("metric_for_best_model", f"`{config.get('metric_for_best_model')}`"))
    return rows


def _recipe_settings(key, config, results):
    if key == "auto_augment" and config[key] == "randaugment":
        return [(name, f"`{config[name]}`") for name in ("randaugment_num_ops", "randaugment_magnitude")]
    if key == "ema_decay" and results.get("saved_weights"):
        saved = "the EMA weights" if results["saved_weights"] == "ema" else "the raw weights (not the EMA)"
        return [("saved weights", f"{saved}, the better on `{config.get('metric_for_best_model')}`")]
    if key == "load_best_model_at_end" and results.get("best_model_step") is not None:
        return [("best model", f"step {results['best_model_step']}")]
    return []


def _macro_note(per_class):
    evaluated = sum(1 for metrics in per_class.values() if metrics["support"])
    note = (
        f"Macro averages are unweighted means over the classes with validation images ({evaluated} of {len(per_class)})"
    )
    if evaluated < len(per_class):
        note += "; a class without any has no precision, recall or F1 (n/a)"
    return note + "."


def _per_class_table(per_class):
    rows = [
        (_cell(name), _number(m["precision"]), _number(m["recall"]), _number(m["f1"]), str(m["support"]))
        for name, m in per_class.items()
    ]
    return _table(["class", "precision", "recall", "F1", "images"], rows)


def usage_reference(config, output_dir):
    """What the usage snippet loads, from anywhere: --hub_model_id, else with --push_to_hub the repository it
    creates (named after output_dir; `point_usage_at` adds the account the Hub put it under), else the
    output folder's absolute path."""
    if config.get("hub_model_id"):
        return config["hub_model_id"]
    if config.get("push_to_hub"):
        return os.path.basename(os.path.abspath(output_dir))
    return os.path.abspath(output_dir)


def point_usage_at(output_dir, old_reference, repo_id):
    """Make the card in `output_dir` load `repo_id`, the repository a push created for `old_reference`
    (the Hub puts a bare name under the token's account)."""
    path = os.path.join(output_dir, CARD_FILE)
    if old_reference == repo_id or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as file:
        text = file.read()
    with open(path, "w", encoding="utf-8") as file:
        file.write(text.replace(f'model="{old_reference}"', f'model="{repo_id}"'))


def _usage(model_ref):
    """The pipeline() snippet, with a loader that gives pipeline() images as training saw them: `images.to_rgb`'s
    own source, so that the card and imgft cannot convert differently."""
    return (
        "This model was trained and evaluated on images converted to RGB by `to_rgb` below (its docstring gives the "
        "rule). `pipeline()` given a file converts it with PIL's `convert('RGB')` instead, which clips 16-bit images "
        "to near white and shows whatever a file stores under its transparent pixels: load images with "
        "`load_image` below for the answers the model was evaluated with. On plain RGB photos both agree.\n\n"
        "```python\n"
        "import numpy as np\n"
        "from PIL import Image, ImageOps\n"
        "from transformers import pipeline\n\n\n"
        f"{inspect.getsource(images.to_rgb)}\n\n"
        "def load_image(path):\n"
        '    """The image file at `path` as the model saw images: first frame, upright (EXIF), by `to_rgb`."""\n'
        "    with Image.open(path) as image:\n"
        "        return to_rgb(ImageOps.exif_transpose(image))\n\n\n"
        f'classifier = pipeline("image-classification", model="{model_ref}")\n'
        'classifier(load_image("image.jpg"))  # [{"label": ..., "score": ...}, ...]\n'
        "```"
    )


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value):
    if value is None:  # not defined, as a class's recall without validation images
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")  # 0.97, not 0.9700; 5 epochs, not 5.0000
    return _cell(value)
