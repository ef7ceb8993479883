"""Evaluation reports: metrics checked against a hand-made confusion matrix, the pictures, the model card,
and `python -m imgft evaluate --output_dir` on 1 and 2 processes."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import launch_two_processes, reset_accelerate
from huggingface_hub import ModelCard
from PIL import Image
from test_predict import save_opinionated_vit

from imgft import metrics
from imgft.report import model_card, plots

# 10 samples, 3 classes. Rows: true class, columns: predicted class.
CONFUSION = np.array(
    [
        [3, 1, 0],  # true 0: 3 right, one taken for class 1
        [1, 2, 1],
        [0, 0, 2],
    ]
)
LABEL_NAMES = ["cat", "dog", "fox"]


class LogitsAsInput(torch.nn.Module):
    """A stand-in model whose 'pixel_values' are already the logits, so the test fixes every prediction."""

    def __init__(self, label_names):
        super().__init__()
        self.config = SimpleNamespace(id2label=dict(enumerate(label_names)))

    def forward(self, pixel_values):
        return SimpleNamespace(logits=pixel_values)


FAKE_ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"), gather_for_metrics=lambda tensors: tensors, unwrap_model=lambda model: model
)
UNCHANGED = lambda pixel_values: pixel_values  # noqa: E731 (the batches hold logits, not images)


def detailed_evaluation(batches, label_names):
    """train_loop.evaluate, the loop training and `evaluate` share, over batches of ready-made logits."""
    import train_loop

    return train_loop.evaluate(LogitsAsInput(label_names), batches, UNCHANGED, FAKE_ACCELERATOR)


def batches_for(confusion, confidences, batch_size):
    """Logits and labels realising `confusion` exactly: sample i predicts its class with confidences[i]."""
    labels, predictions = [], []
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            labels += [true] * int(count)
            predictions += [predicted] * int(count)
    num_classes = len(confusion)
    logits = torch.zeros(len(labels), num_classes)
    for i, (predicted, confidence) in enumerate(zip(predictions, confidences, strict=True)):
        logits[i, predicted] = confidence
    labels = torch.tensor(labels)
    return (
        [
            {"pixel_values": logits[i : i + batch_size], "labels": labels[i : i + batch_size]}
            for i in range(0, len(labels), batch_size)
        ],
        logits,
        labels,
    )


def test_metrics_match_a_hand_computed_confusion_matrix():
    confidences = [2.0, 2.5, 3.0, 6.0, 4.0, 1.0, 1.5, 5.0, 2.0, 3.5]
    batches, logits, labels = batches_for(CONFUSION, confidences, batch_size=3)  # a short last batch
    evaluation = detailed_evaluation(batches, LABEL_NAMES)
    results = evaluation.results
    details = evaluation.details

    assert details["confusion_matrix"] == {"labels": LABEL_NAMES, "matrix": CONFUSION.tolist()}
    # By hand: precision = diagonal / column sums, recall = diagonal / row sums.
    precision = [3 / 4, 2 / 3, 2 / 3]
    recall = [3 / 4, 2 / 4, 2 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    for i, name in enumerate(LABEL_NAMES):
        assert details["per_class"][name]["precision"] == pytest.approx(precision[i])
        assert details["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert details["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert details["per_class"][name]["support"] == CONFUSION[i].sum()
    assert results["eval_accuracy"] == pytest.approx(7 / 10)
    assert results["eval_macro_precision"] == pytest.approx(sum(precision) / 3)
    assert results["eval_macro_recall"] == pytest.approx(sum(recall) / 3)
    assert results["eval_macro_f1"] == pytest.approx(sum(f1) / 3)
    assert results["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert results["eval_samples"] == 10
    assert "eval_top5_accuracy" not in results  # 3 classes

    # The three mistakes are samples 3 (cat->dog, logit 6), 4 (dog->cat, 4) and 7 (dog->fox, 5).
    def softmax_top(i):
        return logits[i].softmax(0).max().item()

    assert [(m["index"], m["true_label"], m["predicted_label"]) for m in details["mistakes"]] == [
        (3, "cat", "dog"),
        (7, "dog", "fox"),
        (4, "dog", "cat"),
    ]
    assert [m["score"] for m in details["mistakes"]] == pytest.approx([softmax_top(i) for i in (3, 7, 4)])
    tally = metrics.start_tally(LABEL_NAMES, "cpu")
    for batch in batches:
        metrics.add_batch(tally, batch["pixel_values"], batch["labels"])
    fewer = metrics.finish_tally(tally, LABEL_NAMES, num_mistakes=2).details
    assert [m["index"] for m in fewer["mistakes"]] == [3, 7]


def test_a_class_without_validation_images_is_not_evaluated_and_left_out_of_the_macro_averages():
    from sklearn.metrics import precision_recall_fscore_support

    confusion = np.zeros((7, 7), dtype=int)
    confusion[:3, :3] = CONFUSION  # classes 5 and 6 have no validation images
    confusion[3, 3] = 4
    confusion[3, 5] = 1  # ... but one image of class 3 is taken for class 5
    confusion[4, 0] = 1  # class 4 occurs once, is always missed and never predicted
    batches, logits, labels = batches_for(confusion, [1.0] * int(confusion.sum()), batch_size=4)
    names = [f"c{i}" for i in range(7)]
    evaluation = detailed_evaluation(batches, names)
    results = evaluation.results
    per_class = evaluation.details["per_class"]
    # By hand, over classes 0-4, those with images.
    precision = [3 / 5, 2 / 3, 2 / 3, 4 / 4, 0.0]
    recall = [3 / 4, 2 / 4, 2 / 2, 4 / 5, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    assert results["eval_macro_precision"] == pytest.approx(sum(precision) / 5)
    assert results["eval_macro_recall"] == pytest.approx(sum(recall) / 5)
    assert results["eval_macro_f1"] == pytest.approx(sum(f1) / 5)
    # The same as sklearn's classification_report over the classes with images.
    by_sklearn = precision_recall_fscore_support(
        labels, logits.argmax(1), labels=range(5), average="macro", zero_division=0
    )
    assert [results[f"eval_macro_{m}"] for m in ("precision", "recall", "f1")] == pytest.approx(by_sklearn[:3])
    assert per_class["c4"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    for name in ("c5", "c6"):
        assert per_class[name] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert "eval_top5_accuracy" in results and results["eval_top5_accuracy"] >= results["eval_accuracy"]


def test_eval_results_json_names_classes_and_keeps_matrix_rows_on_one_line(tmp_path):
    batches, _, _ = batches_for(CONFUSION, [1.0 + i for i in range(10)], batch_size=4)
    evaluation = detailed_evaluation(batches, LABEL_NAMES)
    results = evaluation.results
    details = evaluation.details
    results["eval_loss"] = math.nan  # a diverged run must still give valid JSON
    path = metrics.write_eval_results(tmp_path / "eval_results.json", results, details)
    text = path.read_text()
    saved = json.loads(text)
    assert saved["eval_loss"] is None and saved["eval_samples"] == 10
    assert saved["confusion_matrix"]["labels"] == LABEL_NAMES
    assert saved["confusion_matrix"]["matrix"] == CONFUSION.tolist()
    assert set(saved["per_class"]) == set(LABEL_NAMES)
    assert "[3, 1, 0]" in text  # one line per row


def image_stats(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
        return image.size, pixels.std()


def test_training_curves_picture(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [
        {"step": s, "epoch": s / 10, "loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 40)} for s in range(2, 41, 2)
    ]
    records += [{"step": s, "epoch": s / 10, "eval_accuracy": s / 50, "eval_loss": 1.0} for s in (10, 20, 30, 40)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, evals = plots.read_metrics_log(log)
    assert len(train) == 20 and len(evals) == 4
    figure = plots.training_curves_figure(train, evals)
    loss_axes, lr_axes, accuracy_axes = figure.axes
    assert list(loss_axes.lines[0].get_ydata()) == pytest.approx([2.0 / s for s in range(2, 41, 2)])
    assert list(accuracy_axes.lines[0].get_xdata()) == [10, 20, 30, 40]
    assert [t.get_text() for t in accuracy_axes.texts] == ["0.800"]  # the final accuracy, written out
    size, contrast = image_stats(plots.plot_training_curves(log, tmp_path / "curves.png"))
    assert 600 <= size[0] <= 1200 and 600 <= size[1] <= 1200 and contrast > 10


def test_confusion_matrix_picture_annotates_few_classes_and_stays_legible_with_a_hundred(tmp_path):
    few = plots.confusion_matrix_figure(CONFUSION, LABEL_NAMES)
    axes = few.axes[0]
    assert sorted(t.get_text() for t in axes.texts) == sorted(["3", "1", "1", "2", "1", "2"])
    assert [t.get_text() for t in axes.get_yticklabels()] == LABEL_NAMES
    assert axes.images[0].get_array()[1].tolist() == pytest.approx([0.25, 0.5, 0.25])  # row-normalised
    size, contrast = image_stats(plots.plot_confusion_matrix(CONFUSION, LABEL_NAMES, tmp_path / "few.png"))
    assert min(size) >= 400 and max(size) <= 1000 and contrast > 10

    n = 100
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 30, n)) + rng.integers(0, 2, (n, n))
    names = [f"n{i:08d}_a_rather_long_class_name" for i in range(n)]
    many = plots.confusion_matrix_figure(matrix, names)
    axes = many.axes[0]
    assert not axes.texts  # 10,000 numbers would be noise
    assert len(axes.get_yticklabels()) == n and axes.get_yticklabels()[0].get_fontsize() >= 6
    shown = [label.get_text() for label in axes.get_yticklabels()]
    assert all("…" in name and len(name) <= plots.MAX_LABEL_CHARS for name in shown)  # long names shortened
    assert len(set(shown)) == n and shown[7].startswith("n00000007")  # ... to names still told apart
    width, height = many.get_size_inches() * many.dpi
    # Each row gets at least twice the tick label's height in pixels, so labels never overlap.
    assert height / n >= 2 * axes.get_yticklabels()[0].get_fontsize() * many.dpi / 72 * 0.9
    size, _ = image_stats(plots.plot_confusion_matrix(matrix, names, tmp_path / "many.png"))
    assert min(size) >= 2000 and max(size) <= 4200


def test_mistakes_picture(tmp_path):
    tiles = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (900, 600), (30, 30, 200))]
    mistakes = [
        {"index": 4, "true_label": "red", "predicted_label": "blue", "score": 0.934, "path": "/data/val/red/0042.png"},
        {"index": 1, "true_label": "blue", "predicted_label": "green", "score": 0.51, "row": 17},
        {"index": 2, "true_label": "blue", "predicted_label": "red", "score": 0.5},  # a stream's: neither
    ]
    long_name = {**mistakes[0], "path": "/photos/IMG_20240612_153012_HDR_portrait_mode_0042.jpg"}
    figure = plots.mistakes_figure(tiles * 3 + tiles[:1], mistakes * 2 + [long_name])
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titles[:3] == [
        "true: red\npred: blue (0.93)\n0042.png",
        "true: blue\npred: green (0.51)\nrow 17",
        "true: blue\npred: red (0.50)",
    ]
    assert titles[6].endswith("\nIMG_202406…trait_mode_0042.jpg") and len(titles[6].split("\n")[2]) == 30
    assert len(titles) == 7 and len(figure.axes) == 8  # a 4 x 2 grid, one tile empty
    size, contrast = image_stats(
        plots.plot_mistakes(tiles * 3 + tiles[:1], mistakes * 2 + [long_name], tmp_path / "m.png")
    )
    assert 1000 <= size[0] <= 1600 and 500 <= size[1] <= 1000 and contrast > 10
    size, _ = image_stats(plots.plot_mistakes([], [], tmp_path / "none.png"))
    assert size[0] >= 300


RUN_CONFIG = {
    "model_name_or_path": "google/vit-base-patch16-224-in21k",
    "dataset_name": "beans",
    "dataset_config_name": None,
    "hub_model_id": None,
    "learning_rate": 3e-5,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 2,
    "num_train_epochs": 3,
    "max_train_steps": None,
    "seed": 42,
}
RUN_RESULTS = {
    "eval_accuracy": 0.9624,
    "eval_macro_precision": 0.96,
    "eval_macro_recall": 0.955,
    "eval_macro_f1": 0.957,
    "eval_loss": 0.12,
    "eval_samples": 133,
    "train_loss": 0.4,
    "epoch": 3.0,
}


def front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_model_card_metadata_and_body(tmp_path):
    per_class = {
        "angular_leaf_spot": {"precision": 0.95, "recall": 0.93, "f1": 0.94, "support": 43},
        "bean_rust": {"precision": 0.93, "recall": 0.95, "f1": 0.94, "support": 44},
        "healthy": {"precision": 1.0, "recall": 0.99, "f1": 0.995, "support": 46},
    }
    out = tmp_path / "beans-vit"
    out.mkdir()
    path = model_card.write_model_card(
        out, RUN_CONFIG, RUN_RESULTS, list(per_class), per_class, num_processes=2, license="apache-2.0"
    )
    meta, text = front_matter(out / "README.md")
    assert str(path) == str(out / "README.md")
    assert meta["base_model"] == "google/vit-base-patch16-224-in21k"
    assert meta["datasets"] == ["beans"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["image-classification", "imgft"]
    index = meta["model-index"][0]
    assert index["name"] == "beans-vit"
    result = index["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "beans", "type": "beans", "split": "validation"}
    values = {(m["type"], m.get("args", {}).get("average")): m["value"] for m in result["metrics"]}
    assert values == {("accuracy", None): 0.9624, ("precision", "macro"): 0.96, ("recall", "macro"): 0.955,
                      ("f1", "macro"): 0.957}  # fmt: skip

    card = ModelCard.load(out / "README.md")  # huggingface_hub reads back what it wrote
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "precision", "recall", "f1"}
    assert "| accuracy | 0.9624 |" in text and "| validation images | 133 |" in text
    assert "| healthy | 1 | 0.99 | 0.995 | 46 |" in text
    assert "| learning_rate | `3e-05` |" in text and "| total train batch size | `64` |" in text
    assert f'pipeline("image-classification", model="{out}")' in text


def test_model_card_of_a_local_run_has_no_hub_links(tmp_path, tiny_vit):
    config = {**RUN_CONFIG, "model_name_or_path": str(tiny_vit), "dataset_name": None, "hub_model_id": "me/colors"}
    model_card.write_model_card(tmp_path, config, {"eval_accuracy": 0.5}, ["red", "gr|een"])
    meta, text = front_matter(tmp_path / "README.md")
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert meta["model-index"][0]["name"] == "me/colors"
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "imagefolder"
    assert f"local checkpoint `{tiny_vit}`" in text and "`gr|een`" in text
    assert 'model="me/colors"' in text

    scratch = {**config, "model_name_or_path": None, "model_type": "resnet"}
    model_card.write_model_card(tmp_path, scratch, {}, ["a", "b"])
    meta, text = front_matter(tmp_path / "README.md")
    assert "model-index" not in meta and "base_model" not in meta
    assert "resnet trained from scratch" in text


def test_model_card_says_what_the_data_was(tmp_path):
    parquet_folder = tmp_path / "leaves_parquet"
    parquet_folder.mkdir()
    folder_run = {**RUN_CONFIG, "dataset_name": str(parquet_folder)}
    model_card.write_model_card(tmp_path, folder_run, {"eval_accuracy": 0.5}, ["a", "b"])
    meta, text = front_matter(tmp_path / "README.md")
    dataset = meta["model-index"][0]["results"][0]["dataset"]
    assert dataset["name"] == "leaves_parquet (local dataset folder)" and "imagefolder" not in str(dataset)
    assert f"trained on the local dataset folder `{parquet_folder}`" in text and "image folder" not in text

    imagefolders = {**RUN_CONFIG, "dataset_name": None, "train_dir": "my_data/train", "validation_dir": "my/val"}
    model_card.write_model_card(tmp_path, imagefolders, {"eval_accuracy": 0.5}, ["a", "b"])
    meta, text = front_matter(tmp_path / "README.md")
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "local image folders"
    assert "trained on the local image folders `my_data/train` (train) and `my/val` (validation)" in text


def hyperparameter_rows(text):
    table = text.split("## Training hyperparameters")[1].split("##")[0]
    return dict(line.strip("| ").split(" | ") for line in table.strip().splitlines()[2:])


def test_model_card_lists_every_recipe_the_run_used_and_none_it_did_not(tmp_path):
    from imgft.args import field_defaults

    defaults = {**field_defaults(), "output_dir": str(tmp_path)}
    model_card.write_model_card(tmp_path, defaults, {"eval_accuracy": 0.5}, ["a", "b"])
    plain = hyperparameter_rows((tmp_path / "README.md").read_text())
    assert set(plain) == {key for key in model_card.HYPERPARAMETERS if defaults[key] is not None}

    recipes = {
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "layer_decay": 0.75,
        "balanced_sampling": True,
        "ema_decay": 0.999,
        "label_smoothing_factor": 0.1,
        "class_weighted_loss": True,
        "unfreeze_after_epochs": 1,
        "auto_augment": "randaugment",
        "random_erasing": 0.25,
        "drop_path_rate": 0.1,
        "head_learning_rate": 0.01,
        "use_peft": "lora",
        "load_best_model_at_end": True,
        "early_stopping_patience": 3,
        "metric_for_best_model": "macro_f1",
    }
    (tmp_path / "adapter").mkdir()
    adapter = {"target_modules": ["query"], "modules_to_save": ["classifier"], "r": 16}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
    results = {"eval_accuracy": 0.5, "saved_weights": "ema", "best_model_step": 40}
    model_card.write_model_card(tmp_path, {**defaults, **recipes}, results, ["a", "b"])
    rows = hyperparameter_rows((tmp_path / "README.md").read_text())
    for key, value in recipes.items():
        assert rows[key] == f"`{value}`", key
    assert rows["mixup_prob"] == "`1.0`" and rows["mixup_switch_prob"] == "`0.5`"
    assert rows["randaugment_num_ops"] == "`2`" and rows["randaugment_magnitude"] == "`9`"
    assert rows["saved weights"] == "the EMA weights, the better on `macro_f1`"
    assert rows["best model"] == "step 40"
    assert "freeze_backbone" not in rows  # off: --unfreeze_after_epochs freezes by itself
    cutmix_only = {**defaults, "cutmix_alpha": 1.0, "ema_decay": 0.99}
    model_card.write_model_card(tmp_path, cutmix_only, {"saved_weights": "raw"}, ["a", "b"])
    rows = hyperparameter_rows((tmp_path / "README.md").read_text())
    assert "mixup_alpha" not in rows and "mixup_switch_prob" not in rows and rows["mixup_prob"] == "`1.0`"
    assert rows["saved weights"] == "the raw weights (not the EMA), the better on `accuracy`"


def test_model_card_usage_loads_the_model_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "beans").mkdir(parents=True)
    local = {**RUN_CONFIG, "output_dir": "runs/beans"}
    model_card.write_model_card("runs/beans", local, {}, ["a", "b"])
    text = (tmp_path / "runs" / "beans" / "README.md").read_text()
    assert f'pipeline("image-classification", model="{tmp_path / "runs" / "beans"}")' in text
    # Pushed: the repository the push creates, named after the folder; the push adds the account.
    model_card.write_model_card("runs/beans", {**local, "push_to_hub": True}, {}, ["a", "b"])
    assert 'model="beans"' in (tmp_path / "runs" / "beans" / "README.md").read_text()
    model_card.point_usage_at("runs/beans", "beans", "me/beans")
    assert 'model="me/beans"' in (tmp_path / "runs" / "beans" / "README.md").read_text()


def test_model_card_says_n_a_for_a_class_without_validation_images_and_what_macro_averages_cover(tmp_path):
    per_class = {
        "cat": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 2},
        "dog": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
        "fox": {"precision": None, "recall": None, "f1": None, "support": 0},
    }
    results = {"eval_accuracy": 0.75, "eval_macro_recall": 0.75}
    model_card.write_model_card(tmp_path, RUN_CONFIG, results, list(per_class), per_class)
    text = (tmp_path / "README.md").read_text()
    assert "| fox | n/a | n/a | n/a | 0 |" in text
    assert "Macro averages are unweighted means over the classes with validation images (2 of 3); a class" in text


@pytest.fixture(scope="module")
def confident_colors_model(tmp_path_factory):
    """An untrained 5-colour ViT whose answers vary from image to image, many of them wrong."""
    return save_opinionated_vit(tmp_path_factory.mktemp("opinionated_vit"))


def run_evaluate(argv, capsys):
    from imgft.commands import evaluate

    reset_accelerate()
    try:
        evaluate.main([str(a) for a in argv])
    finally:
        reset_accelerate()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_writes_the_report_and_matches_on_two_processes(
    colors_data, confident_colors_model, tmp_path, capsys, monkeypatch
):
    data = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    common = ["--model_name_or_path", confident_colors_model, *data, "--per_device_eval_batch_size", "4"]
    single = run_evaluate([*common, "--output_dir", tmp_path / "one"], capsys)
    report = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    matrix = np.array(report["confusion_matrix"]["matrix"])
    assert matrix.sum() == single["eval_samples"] == 25
    assert np.count_nonzero(matrix.sum(axis=0)) > 1  # the model answers more than one class
    assert single["eval_accuracy"] == pytest.approx(np.trace(matrix) / 25)
    assert 0 < len(report["mistakes"]) == min(25 - np.trace(matrix), metrics.NUM_MISTAKES)
    # The mistakes point at the right files: each path lies in its true class's folder.
    for mistake in report["mistakes"]:
        assert f"/validation/{mistake['true_label']}/" in mistake["path"]
    for name in ("confusion_matrix.png", "mistakes.png"):
        size, contrast = image_stats(tmp_path / "one" / name)
        assert min(size) >= 300 and contrast > 10

    # Without --output_dir, evaluate writes nothing (its default is training's output folder).
    monkeypatch.chdir(tmp_path)
    assert run_evaluate(common, capsys) == single
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]

    # 25 images over 2 processes in batches of 4: the last batches are padded with repeats, and
    # torchmetrics' own sync on top of the gather would double every count.
    double = launch_two_processes(["-m", "imgft", "evaluate", *common, "--output_dir", tmp_path / "two"])
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads(double.stdout.strip().splitlines()[-1])["eval_accuracy"] == single["eval_accuracy"]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["confusion_matrix"] == report["confusion_matrix"]
    assert two["per_class"] == report["per_class"]
    assert [m["path"] for m in two["mistakes"]] == [m["path"] for m in report["mistakes"]]


def test_evaluate_names_each_mistake_of_images_without_files_by_its_row_in_the_split(tmp_path, capsys):
    import datasets

    # Hub-style data: images held as bytes with no file name. Row i is labelled r<i>, so a mistake's true
    # label tells which row it really was.
    names = [f"r{i}" for i in range(12)]
    model = save_opinionated_vit(tmp_path / "model", names)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in names]
    images[0] = {"bytes": b"not an image", "path": None}  # dropped: every later row moves up one
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    (tmp_path / "hub").mkdir()
    validation = datasets.Dataset.from_dict({"image": images, "label": names}, features=features)
    validation.to_parquet(str(tmp_path / "hub" / "validation.parquet"))
    argv = ["--model_name_or_path", model, "--dataset_name", tmp_path / "hub", "--max_eval_samples", "8"]
    results = run_evaluate([*argv, "--output_dir", tmp_path / "report"], capsys)
    mistakes = json.loads((tmp_path / "report" / "eval_results.json").read_text())["mistakes"]
    assert results["eval_samples"] == 8 and len(mistakes) >= 4
    assert all("path" not in mistake for mistake in mistakes)
    assert [mistake["true_label"] for mistake in mistakes] == [f"r{mistake['row']}" for mistake in mistakes]
    assert any(mistake["row"] != mistake["index"] for mistake in mistakes)


def test_evaluate_report_from_a_config_file(colors_data, confident_colors_model, tmp_path, capsys):
    # A run's imgft_config.yaml names the output_dir training wrote to: evaluate leaves it alone.
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(confident_colors_model),
                "train_dir": str(colors_data / "train"),
                "validation_dir": str(colors_data / "validation"),
                "output_dir": str(tmp_path / "from_config"),
                "max_eval_samples": 7,
            }
        )
    )
    results = run_evaluate([config], capsys)
    assert results["eval_samples"] == 7
    assert not (tmp_path / "from_config").exists()
    # An --output_dir on the command line is where the report goes.
    assert run_evaluate([config, "--output_dir", tmp_path / "told"], capsys) == results
    report = json.loads((tmp_path / "told" / "eval_results.json").read_text())
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == 7
