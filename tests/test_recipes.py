"""The fine-tuning recipes (issue 14, training side), each shown to change what it should and nothing else:
label smoothing and class weights (imgft/losses.py), Mixup and CutMix (imgft/recipes/mixing.py), model EMA
(imgft/recipes/ema.py), class-balanced sampling (imgft/recipes/sampling.py), and --torch_compile."""

import functools
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import data_flags, vit_flags, write_color_imagefolder
from safetensors.torch import load_file

from imgft import losses, transforms
from imgft.args import TrainArguments
from imgft.recipes import ema, mixing, sampling


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--label_smoothing_factor", "1", "must lie in [0, 1)"),
        ("--ema_decay", "-0.1", "must lie in [0, 1)"),
        ("--mixup_prob", "1.5", "must lie in [0, 1]"),
        ("--mixup_switch_prob", "nan", "must lie in [0, 1]"),
        ("--cutmix_alpha", "-1", "must be a non-negative number"),
    ],
)
def test_recipe_values_out_of_range_are_refused_in_one_line(flag, value, message):
    from imgft.args import parse_args
    from imgft.errors import UserError

    with pytest.raises(UserError, match=re.escape(f"{flag} {message}")):
        parse_args([flag, value])


# ------------------------------------------------------------------------------------------ losses


def test_plain_loss_is_the_models_own_loss_bit_for_bit(tiny_vit):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    pixel_values, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    outputs = model(pixel_values=pixel_values, labels=labels)
    assert torch.equal(losses.training_loss(outputs.logits, labels, losses.LossOptions()), outputs.loss)


def test_label_smoothing_loss_by_hand():
    # One image, logits (log 1, log 2, log 5): probabilities 1/8, 2/8, 5/8; true class 2; eps 0.3 gives the
    # targets 0.1, 0.1, 0.8.
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]])
    by_hand = -(0.1 * math.log(1 / 8) + 0.1 * math.log(2 / 8) + 0.8 * math.log(5 / 8))
    smoothed = losses.training_loss(logits, torch.tensor([2]), losses.LossOptions(label_smoothing=0.3))
    assert smoothed.item() == pytest.approx(by_hand, rel=1e-6)
    assert losses.training_loss(logits, torch.tensor([2]), losses.LossOptions()).item() == pytest.approx(
        -math.log(5 / 8), rel=1e-6
    )


def test_class_weights_by_hand_and_the_weighted_loss_is_a_mean_over_images():
    # 6, 3 and 1 images of classes 0-2, none of class 3: n / (k * n_c) = 10 / 18, 10 / 9, 10 / 3, and 0.
    weights = losses.class_weights([0] * 6 + [1] * 3 + [2], num_classes=4)
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    # Two images with equal logits over 4 classes (loss log 4 each), of classes 0 and 2: the mean of
    # 10/18 log 4 and 10/3 log 4 (PyTorch's own weighted mean would divide by 10/18 + 10/3 instead).
    options = losses.LossOptions(class_weights=weights)
    loss = losses.training_loss(torch.zeros(2, 4), torch.tensor([0, 2]), options)
    assert loss.item() == pytest.approx((10 / 18 + 10 / 3) / 2 * math.log(4), rel=1e-6)
    # Soft targets are weighted alike: half class 0, half class 2 weighs the average of the two.
    soft = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    soft_loss = losses.training_loss(torch.zeros(1, 4), soft, options)
    assert soft_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_options_follow_the_flags():
    labels = [0] * 6 + [1] * 3 + [2]
    options = losses.loss_options(
        TrainArguments(label_smoothing_factor=0.3, class_weighted_loss=True), labels, 4, "cpu"
    )
    assert options.label_smoothing == 0.3
    assert options.class_weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    assert losses.loss_options(TrainArguments(), labels, 4, "cpu") == losses.LossOptions()


# ------------------------------------------------------------------------------------------ Mixup, CutMix


def mix_options(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0):
    train_args = TrainArguments(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mixup_prob=prob)
    return mixing.mix_options(train_args, num_classes=4, process_index=0)


def four_plain_images():
    """Four 8x8 uint8 images, each of one grey level (10, 20, 30, 40), of classes 0-3."""
    levels = torch.tensor([10, 20, 30, 40], dtype=torch.uint8)
    return {"pixel_values": levels.view(4, 1, 1, 1).expand(4, 3, 8, 8).clone(), "labels": torch.arange(4)}


def test_mixup_mixes_images_and_labels_by_the_same_share():
    batch = four_plain_images()
    mixed = mixing.mix_batch(batch, mix_options(mixup_alpha=0.4), epoch=0, batch_in_epoch=3)
    labels = mixed["labels"]
    assert labels.shape == (4, 4) and torch.allclose(labels.sum(dim=1), torch.ones(4))
    share = labels[0, 0].item()
    assert 0 < share < 1
    levels = [10.0, 20.0, 30.0, 40.0]
    for i in range(4):  # image i is mixed with image 3 - i
        partner = 3 - i
        assert labels[i, i].item() == pytest.approx(share)
        assert labels[i, partner].item() == pytest.approx(1 - share)
        expected = round(share * levels[i] + (1 - share) * levels[partner])  # uint8 in, uint8 out
        assert torch.equal(mixed["pixel_values"][i], torch.full((3, 8, 8), expected, dtype=torch.uint8))
    # The same batch position mixes alike (a resume), another one differently.
    again = mixing.mix_batch(four_plain_images(), mix_options(mixup_alpha=0.4), epoch=0, batch_in_epoch=3)
    assert torch.equal(again["labels"], labels) and torch.equal(again["pixel_values"], mixed["pixel_values"])
    other = mixing.mix_batch(four_plain_images(), mix_options(mixup_alpha=0.4), epoch=0, batch_in_epoch=4)
    assert other["labels"][0, 0].item() != share
    assert torch.equal(batch["pixel_values"], four_plain_images()["pixel_values"])  # the input is left alone


def test_cutmix_pastes_a_box_whose_area_is_the_label_share():
    mixed = mixing.mix_batch(four_plain_images(), mix_options(cutmix_alpha=1.0), epoch=1, batch_in_epoch=0)
    labels, images = mixed["labels"], mixed["pixel_values"]
    share = labels[0, 0].item()
    assert 0 < share < 1 and torch.allclose(labels.sum(dim=1), torch.ones(4))
    for i, level in enumerate([10.0, 20.0, 30.0, 40.0]):
        pasted = (images[i] != level).float().mean().item()  # the share of pixels that came from image 3 - i
        assert pasted == pytest.approx(1 - share) and labels[i, 3 - i].item() == pytest.approx(1 - share)
        assert set(images[i].unique().tolist()) == {level, [40.0, 30.0, 20.0, 10.0][i]}


@pytest.mark.parametrize("flags", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}], ids=["mixup", "cutmix"])
def test_a_mixed_batch_reaches_the_model_normalised_as_a_plain_one_does(flags):
    normalize = functools.partial(transforms.normalize, shift=[127.5] * 3, scale=[127.5] * 3)
    batch = four_plain_images()
    mixed = mixing.mix_batch(batch, mix_options(**flags), epoch=0, batch_in_epoch=3)
    plain = normalize(batch["pixel_values"])
    model_input = normalize(mixed["pixel_values"])
    assert model_input.dtype == torch.float32 and -1 <= model_input.min() < model_input.max() <= 1
    if "mixup_alpha" in flags:  # Mixup: the blend of the normalised images, to within rounding to a level
        share = mixed["labels"][0, 0].item()
        expected = share * plain + (1 - share) * plain.flip(0)
        assert torch.allclose(model_input, expected, atol=0.5 / 127.5 + 1e-6)
    else:  # CutMix: each pixel is the normalised pixel of the image or of its partner
        assert torch.all((model_input == plain) | (model_input == plain.flip(0)))
    processed = {**batch, "pixel_values": plain}  # a processor's own float output is mixed as it is
    blended = mixing.mix_batch(processed, mix_options(**flags), epoch=0, batch_in_epoch=3)["pixel_values"]
    assert blended.dtype == torch.float32
    assert torch.allclose(normalize(blended), model_input, atol=0.5 / 127.5 + 1e-6)


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_mixup_switch_prob_is_the_share_of_mixed_batches_in_cutmix(switch_prob):
    train_args = TrainArguments(mixup_alpha=0.4, cutmix_alpha=1.0, mixup_switch_prob=switch_prob)
    options = mixing.mix_options(train_args, num_classes=4, process_index=0)
    for batch_in_epoch in range(10):
        mixed = mixing.mix_batch(four_plain_images(), options, epoch=0, batch_in_epoch=batch_in_epoch)
        # CutMix pastes image 3's level 40 into image 0's 10; Mixup blends them into a level between.
        levels = set(mixed["pixel_values"][0].unique().tolist())
        assert (levels == {10, 40}) == (switch_prob == 1.0), levels


def test_no_mixing_leaves_the_batch_as_it_is():
    batch = four_plain_images()
    assert mix_options() is None
    assert mixing.mix_batch(batch, None, epoch=0, batch_in_epoch=0) is batch
    assert mixing.mix_batch(batch, mix_options(mixup_alpha=1.0, prob=0.0), epoch=0, batch_in_epoch=0) is batch


# ------------------------------------------------------------------------------------------ EMA


def test_ema_follows_the_warmed_up_decay_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    average = ema.averaged_copy(model, decay=0.45)
    assert not any(p.requires_grad for p in average.parameters()) and not average.training
    weight = model[0].weight
    # Updates 1, 2, 3 decay by min(0.45, 1 - k^(-2/3)): 0, 0.37004, 0.45.
    with torch.no_grad():
        for step, value in enumerate([1.0, 2.0, 4.0], start=1):
            weight.fill_(value)
            model[1].num_batches_tracked.fill_(step * 10)
            ema.update_ema(average, model, step, decay=0.45)
    after_two = 0.37004 * 1.0 + 0.62996 * 2.0  # 1.62996
    assert average[0].weight.item() == pytest.approx(0.45 * after_two + 0.55 * 4.0, rel=1e-4)  # 2.93348
    assert weight.item() == 4.0  # the model's own weights are left alone
    assert average[1].num_batches_tracked.item() == 30  # integer buffers are copied, not averaged
    ema.update_ema(None, model, 4, decay=0.45)  # EMA off: nothing to do


def test_ema_weights_are_saved_only_when_they_score_better():
    args = TrainArguments(metric_for_best_model="accuracy")
    assert ema.choose_weights({"eval_accuracy": 0.8, "eval_ema_accuracy": 0.9}, args) == "ema"
    assert ema.choose_weights({"eval_accuracy": 0.8, "eval_ema_accuracy": 0.8}, args) == "raw"
    loss_args = TrainArguments(metric_for_best_model="loss")
    assert ema.choose_weights({"eval_loss": 0.5, "eval_ema_loss": 0.4}, loss_args) == "ema"
    assert ema.choose_weights({"eval_accuracy": 0.8}, args) is None  # no EMA


# ------------------------------------------------------------------------------------------ balanced sampling

TEN_TO_ONE = [0] * 100 + [1] * 10  # a 10:1 imbalanced training set


def test_balanced_sampling_draws_a_10_to_1_set_about_evenly():
    sampler = sampling.balanced_sampler(TEN_TO_ONE, TrainArguments(balanced_sampling=True, seed=42))
    # Each image of the big class is drawn with probability 1/200, each of the small one 1/20: 1/2 a class.
    assert sampler.probabilities[0] == pytest.approx(1 / 200)
    assert sampler.probabilities[-1] == pytest.approx(1 / 20)
    counts = np.zeros(2, dtype=int)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == 110
        counts += np.bincount(np.array(TEN_TO_ONE)[drawn], minlength=2)
    # 1100 draws, 550 expected of each class (standard deviation 16.6); a shuffle would give 100 and 1000.
    assert abs(counts[1] - 550) < 50, counts
    assert sampling.balanced_sampler(TEN_TO_ONE, TrainArguments()) is None  # off: the DataLoader shuffles


@pytest.fixture
def fresh_accelerate():
    from conftest import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


def test_the_balanced_order_depends_only_on_seed_and_epoch_through_accelerate(fresh_accelerate):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    def order(seed, epoch):
        sampler = sampling.balanced_sampler(TEN_TO_ONE, TrainArguments(balanced_sampling=True, seed=seed))
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(42, 3) == order(42, 3) and order(42, 3) != order(42, 4) and order(42, 3) != order(7, 3)
    sampler = sampling.balanced_sampler(TEN_TO_ONE, TrainArguments(balanced_sampling=True, seed=42))
    loader = DataLoader(range(110), batch_size=10, sampler=sampler)
    # As train_loop.py prepares it: Accelerate's seedable sampler replaces only RandomSamplers.
    options = {"use_seedable_sampler": True, "data_seed": 42, "put_on_device": False}
    prepared = prepare_data_loader(loader, **options)
    prepared.set_epoch(3)
    assert [i for batch in prepared for i in batch.tolist()] == order(42, 3)
    # A resume skipping the epoch's first 4 batches continues the same order (the loop sets the epoch first).
    prepared.set_epoch(3)
    assert [i for batch in skip_first_batches(prepared, 4) for i in batch.tolist()] == order(42, 3)[40:]
    # Two DDP processes take alternate batches of that same order (the 11th batch: the second pads it).
    shards = [prepare_data_loader(loader, num_processes=2, process_index=rank, **options) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(3)
    batches = [[batch.tolist() for batch in shard] for shard in shards]
    interleaved = [i for pair in zip(*batches, strict=True) for batch in pair for i in batch]
    assert interleaved[:110] == order(42, 3)


@pytest.mark.parametrize(("small_class", "hint"), [(3, True), (6, False)])  # 12:3 is 4x, 12:6 is 2x
def test_check_data_points_to_the_imbalance_recipes(tmp_path, small_class, hint):
    from imgft.args import DataArguments
    from imgft.commands import check_data

    write_color_imagefolder(tmp_path / "train", ["red"], 12, seed=1)
    write_color_imagefolder(tmp_path / "train", ["green"], small_class, seed=2)
    write_color_imagefolder(tmp_path / "validation", ["red", "green"], 2, seed=3)
    data_args = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
    lines, refusal = check_data.data_report(data_args, None, 42)
    assert refusal is None
    assert f"Imbalance (train): largest class 12, smallest {small_class} ({12 / small_class:.1f}x)" in lines
    hints = [line for line in lines if "--balanced_sampling" in line and "--class_weighted_loss" in line]
    assert len(hints) == int(hint), lines


# ------------------------------------------------------------------------------------------ whole runs

# The 5-class tiny ViT on the colours: 60 images, 10 a batch, 6 steps an epoch, 2 epochs; a checkpoint at the
# end. A high constant learning rate: the weights still jump about at the end, where an average helps.
RUN = ["--num_train_epochs", "2", "--per_device_train_batch_size", "10", "--learning_rate", "6e-2"]
RUN += ["--lr_scheduler_type", "constant", "--logging_steps", "1", "--checkpointing_steps", "12"]
TIMING_KEYS = ("train_images_per_second", "data_wait_fraction")


def run_flags(colors_data, tiny_vit, out):
    return [*data_flags(colors_data), *vit_flags(tiny_vit), *RUN, "--output_dir", out]


def records(out, leave_out=()):
    """metrics.jsonl without timings and the `leave_out` keys."""
    lines = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS + leave_out} for record in lines]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, colors_data, tiny_vit):
    from conftest import reset_accelerate

    import train_loop

    out = tmp_path_factory.mktemp("plain") / "out"
    reset_accelerate()
    try:
        train_loop.main([str(a) for a in run_flags(colors_data, tiny_vit, out)])
    finally:
        reset_accelerate()
    return out


def test_the_learning_rate_given_stays_put_under_a_constant_schedule(plain_run):
    rates = [record["learning_rate"] for record in records(plain_run) if "loss" in record]
    assert len(rates) == 12 and set(rates) == {6e-2}  # RUN's --learning_rate, --lr_scheduler_type constant


def test_ema_is_evaluated_beside_and_saved_when_better(train, plain_run, colors_data, tiny_vit, tmp_path):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "ema"
    train(run_flags(colors_data, tiny_vit, out) + ["--ema_decay", "0.5"])
    ema_keys = tuple(key for key in records(out)[-1] if key.startswith("eval_ema_"))
    assert {"eval_ema_accuracy", "eval_ema_loss", "eval_ema_macro_f1"} <= set(ema_keys)
    # The raw weights train exactly as without EMA: every loss, learning rate and evaluation is the same.
    assert records(out, leave_out=ema_keys) == records(plain_run)
    raw = load_file(out / "step_12" / "model.safetensors")
    average = load_file(out / "step_12" / "model_1.safetensors")  # save_state keeps the EMA model
    assert raw.keys() == average.keys() and any(not torch.equal(raw[k], average[k]) for k in raw)
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_ema_accuracy"] > results["eval_accuracy"]  # the average scores better (0.8, 0.6)
    assert results["saved_weights"] == "ema"
    # The report describes the saved (EMA) weights: its confusion matrix counts their accuracy, not the raw.
    matrix = json.loads((out / "eval_results.json").read_text())["confusion_matrix"]["matrix"]
    right = sum(row[i] for i, row in enumerate(matrix))
    assert right / sum(map(sum, matrix)) == pytest.approx(results["eval_ema_accuracy"])
    saved = AutoModelForImageClassification.from_pretrained(out).state_dict()
    assert saved.keys() == average.keys() and all(torch.equal(saved[k], average[k]) for k in average)
    assert "saved_weights" not in json.loads((plain_run / "all_results.json").read_text())


def test_torch_compile_trains_the_same_and_saves_a_model_transformers_loads(
    train, plain_run, colors_data, tiny_vit, tmp_path, monkeypatch
):
    from transformers import AutoModelForImageClassification

    # Inductor's code generation takes minutes on 2 CPU cores (the benchmark measures it): here the model is
    # compiled by the same calls with dynamo's eager backend, which captures the graphs and runs them as such.
    backends, compile_with_inductor = [], torch.compile

    def compile_eagerly(model, **options):
        backends.append(options["backend"])
        return compile_with_inductor(model, **{**options, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    out = tmp_path / "compiled"
    train(run_flags(colors_data, tiny_vit, out) + ["--torch_compile"])
    assert backends == ["inductor"]
    saved = load_file(out / "model.safetensors")
    assert not any("_orig_mod" in key for key in saved)
    reference = load_file(plain_run / "model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label[0] == "blue"
