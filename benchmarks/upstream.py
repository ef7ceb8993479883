"""The upstream data pipeline, restated for the benchmark: transformers' run_image_classification_no_trainer.py.

Same as upstream: the imagefolder loader over `train_dir/**`, torchvision (v1) PIL transforms applied per
sample through `with_transform`, so every epoch decodes every full-size file, and a DataLoader with no
workers. The model, optimizer and loop match imgft's so that only the data path differs.

    python -m benchmarks.upstream --train_dir D/train --validation_dir D/validation --image_size 64 \
        --num_train_epochs 10 --per_device_train_batch_size 32 --metrics_file out.jsonl
"""

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from datasets import load_dataset
from torch.utils.data import DataLoader
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import AutoConfig, AutoModelForImageClassification

from imgft.args import DEMO_CONFIG_OVERRIDES
from imgft.model import parse_config_overrides


def demo_resnet(num_labels):
    """The model of every benchmark run and of the model-only rate: imgft's demo ResNet, random weights."""
    config = AutoConfig.for_model("resnet", **parse_config_overrides(DEMO_CONFIG_OVERRIDES), num_labels=num_labels)
    return AutoModelForImageClassification.from_config(config)


def build_dataloaders(train_dir, validation_dir, image_size, batch_size, cache_dir=None):
    """The upstream example's datasets, transforms and DataLoaders: (train, eval, label names)."""
    dataset = load_dataset(
        "imagefolder",
        data_files={"train": os.path.join(train_dir, "**"), "validation": os.path.join(validation_dir, "**")},
        cache_dir=cache_dir,
    )
    labels = dataset["train"].features["label"].names
    normalize = Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    train_transforms = Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), ToTensor(), normalize])
    val_transforms = Compose([Resize(image_size), CenterCrop(image_size), ToTensor(), normalize])

    def preprocess_train(example_batch):
        example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def preprocess_val(example_batch):
        example_batch["pixel_values"] = [val_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    train_dataset = dataset["train"].with_transform(preprocess_train)
    eval_dataset = dataset["validation"].with_transform(preprocess_val)
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collate_fn, batch_size=batch_size)
    return train_dataloader, eval_dataloader, labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_dir", required=True)
    parser.add_argument("--validation_dir", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_train_epochs", type=int, default=10)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--metrics_file", required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    accelerator = Accelerator()

    train_dataloader, eval_dataloader, labels = build_dataloaders(
        args.train_dir, args.validation_dir, args.image_size, args.per_device_train_batch_size
    )

    model = demo_resnet(len(labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    with open(args.metrics_file, "w", encoding="utf-8") as log:
        for epoch in range(args.num_train_epochs):
            model.train()
            start, waited, images, fetch_start = time.perf_counter(), 0.0, 0, time.perf_counter()
            for batch in train_dataloader:
                waited += time.perf_counter() - fetch_start
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                images += len(batch["labels"])
                fetch_start = time.perf_counter()
            seconds = time.perf_counter() - start
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for batch in eval_dataloader:
                    predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
                    correct += (predictions == batch["labels"]).sum().item()
                    total += len(batch["labels"])
            record = {
                "epoch": epoch + 1,
                "eval_accuracy": correct / total,
                "train_images_per_second": images / seconds,
                "data_wait_fraction": waited / seconds,
            }
            log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
