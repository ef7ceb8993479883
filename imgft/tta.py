"""Test-time augmentation (--tta) for `python -m imgft evaluate` and `predict`: the views each image is
seen in, built around the evaluation transform, and the model's logits averaged over them. Training's own
evaluation never uses it; `evaluate --tta` runs `train_loop.evaluate` on a `ViewAveraged` model.

The views, each of the evaluation crop's size:
    centre         the evaluation transform's output, as without --tta
    flip           its mirror image (left-right)
    zoom           the image's central ZOOM of width and height, through the same transform: zoomed in
    zoom_flip      the mirror image of zoom
"""

from functools import partial
from itertools import chain
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

ZOOM = 0.875  # the usual centre-crop margin, taken once more
VIEWS = {
    "flip": ("centre", "flip"),
    "zoom": ("centre", "zoom"),
    "flip_zoom": ("centre", "flip", "zoom", "zoom_flip"),
}


def views_transform(eval_transform, tta):
    """The transform --tta `tta` evaluates with: a batch of PIL images -> a V x H x W x 3 array each."""
    return partial(image_views, eval_transform=eval_transform, views=VIEWS[tta])


def image_views(images, eval_transform, views):
    """Each image's `views` (names above), as one V x H x W x 3 array per image. The evaluation transform runs
    once for the batch (a processor run as it is: one call), on each image followed, with a zoom view, by its
    zoomed centre; an iterator feeds it, so that a transform that goes image by image never holds the
    batch."""
    per_image = 2 if "zoom" in views else 1
    outputs = eval_transform(chain.from_iterable(_view_inputs(image, per_image) for image in images))
    starts = range(0, len(outputs), per_image)
    return [_stacked_views(outputs[start : start + per_image], views) for start in starts]


def _view_inputs(image, per_image):
    if per_image == 1:
        return (image,)
    return image, F.center_crop(image, [round(image.height * ZOOM), round(image.width * ZOOM)])


def _stacked_views(outputs, views):
    """One image's V x H x W x 3 `views`, from its transformed centre and, with a zoom view, zoomed one."""
    arrays = {"centre": outputs[0], "flip": outputs[0][:, ::-1]}
    if len(outputs) == 2:
        arrays.update(zoom=outputs[1], zoom_flip=outputs[1][:, ::-1])
    return np.stack([arrays[name] for name in views])


def stack_views(arrays):
    """V x H x W x 3 arrays (what `image_views` gives) -> one B x V x 3 x H x W tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 1, 4, 2, 3)


def collate_views(examples):
    """`transforms.collate_fn` for `image_views`' outputs: B x V x 3 x H x W uint8 pixel values, B labels."""
    return {
        "pixel_values": stack_views([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


def tta_logits(model, pixel_values, normalize):
    """B x classes float32 logits: the mean over views of the model's logits for each B x V x 3 x H x W uint8
    batch's view. One forward pass per view, so memory stays that of a batch without --tta."""
    dtype = next(model.parameters()).dtype  # float32 under mixed precision, which autocasts the forward
    view_logits = [
        model(pixel_values=normalize(pixel_values[:, view]).to(dtype)).logits.float()
        for view in range(pixel_values.shape[1])
    ]
    return torch.stack(view_logits).mean(dim=0)


class ViewAveraged(torch.nn.Module):
    """`model` seen through its views: forward takes B x V x 3 x H x W pixel values (`collate_views`) and gives
    `tta_logits`, so `train_loop.evaluate` scores each image's averaged logits with its own loop and metrics.
    Its pixel values are normalised already, so `tta_logits` gets an identity `normalize`."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, pixel_values):
        return SimpleNamespace(logits=tta_logits(self.model, pixel_values, normalize=_as_it_is))


def _as_it_is(pixel_values):
    return pixel_values
