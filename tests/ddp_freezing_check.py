"""Run by tests/test_finetune_recipes.py under `accelerate launch --num_processes 2`: a tiny ViT wrapped in
DDP the way train_loop.py wraps it, frozen in epoch 0 and unfrozen in epoch 1, each process on its own
batches. Prints, from the main process, one JSON line per epoch: the parameters changed since the start,
and whether the weights are the same on both processes."""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imgft import freezing, layer_decay, optimizer  # noqa: E402
from imgft.args import TrainArguments  # noqa: E402

train_args = dataclasses.replace(TrainArguments(), unfreeze_after_epochs=1, learning_rate=0.01)
accelerator = Accelerator(cpu=True, kwargs_handlers=freezing.ddp_kwargs_handlers(train_args))
torch.manual_seed(0)
config = ViTConfig(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=16,
    patch_size=8,
)
model = ViTForImageClassification(config)
adamw = optimizer.adamw(layer_decay.param_groups(model, train_args), train_args.learning_rate, "no")
model, adamw = accelerator.prepare(model, adamw)
unwrapped = accelerator.unwrap_model(model)
start = {name: param.detach().clone() for name, param in unwrapped.named_parameters()}
batches = torch.Generator().manual_seed(accelerator.process_index)  # different batches on each process
for epoch in range(2):
    freezing.apply_unfreeze_schedule(unwrapped, epoch, train_args)
    for _ in range(2):
        pixel_values = torch.randn(4, 3, 16, 16, generator=batches)
        loss = model(pixel_values=pixel_values, labels=torch.randint(0, 2, (4,), generator=batches)).loss
        accelerator.backward(loss)
        adamw.step()
        adamw.zero_grad()
    changed = [name for name, param in unwrapped.named_parameters() if not torch.equal(param, start[name])]
    flat = torch.cat([param.detach().flatten() for param in unwrapped.parameters()])
    weights = accelerator.gather(flat[None])  # one row per process
    record = {"epoch": epoch, "changed": changed, "same_on_both": torch.equal(weights[0], weights[1])}
    if accelerator.is_main_process:
        print(json.dumps(record))
accelerator.end_training()
