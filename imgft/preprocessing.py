"""The model's own preprocessing, reproduced: how imgft's fast uint8 path gives what the image processor gives, or
that the processor must run itself (once per batch where that gives each image its own output); the input size
that results; and a copy of a processor resized by --image_size.

The fast path calls the processor's own `process_image`, `resize` and `center_crop` (uint8 in, uint8 out, on the
processor's backend: torchvision tensors or PIL) in the order its family's `_preprocess` calls them, or timm's own
eval transforms up to ToTensor, and folds rescale and normalize into one per-channel map, (pixel - shift) / scale,
done later on the device. A family is known by the `_preprocess` function it runs; a processor whose value
methods (rescale, normalize, ...) differ from its family's is run as it is. Every plan is also checked against the
processor itself on probe images before it is used.
"""

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from imgft.errors import UserError

# Largest difference allowed between imgft's input and the processor's, in normalised units: float rounding of the
# same uint8 pixels (measured at most 4.8e-7 over every processor class), where one uint8 step is about 0.017.
FIDELITY_TOLERANCE = 1e-4
# Landscape, portrait and smaller-than-the-crop (which the processor pads): noise, so any filter difference shows.
PROBE_SIZES = ((131, 89), (57, 160), (9, 7))
# Methods whose results the affine map stands for: a subclass that changes one of them is run as it is.
VALUE_METHODS = (
    "__call__",
    "preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "process_image",
    "rescale_and_normalize",
    "rescale",
    "normalize",
)
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


class Plan(NamedTuple):
    """How to make the model's input from an RGB image. `kind`: "methods" (the processor's resize and crop), "timm"
    (timm's eval transforms) or "processor" (the processor itself, for evaluation; `reason` says why)."""

    kind: str
    resize_kwargs: dict
    crop_first: bool
    crop: bool
    flip_channels: bool
    shift: tuple
    scale: tuple
    reason: str = ""


def plan_for(image_processor):
    """The Plan for `image_processor`, its fast path checked against the processor on probe images."""
    steps = _timm_steps(image_processor) if _is_timm(image_processor) else _family_steps(image_processor)
    if isinstance(steps, str):
        return _processor_plan(image_processor, steps)
    plan = Plan(*steps)
    difference = _largest_difference(image_processor, plan)
    if difference > FIDELITY_TOLERANCE:
        return _processor_plan(image_processor, f"imgft's fast path differs from it by {difference:.3g}")
    return plan


def _owner(cls, name):
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def _family_steps(processor):
    """(kind, resize kwargs, crop first, centre crop, flip channels, shift, scale) when `processor`'s `_preprocess` is
    one imgft reproduces with the processor's own resize and crop; else the reason it is not, as a string."""
    import transformers
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    cls = type(processor)
    if not issubclass(cls, (TorchvisionBackend, PilBackend)):
        return f"{cls.__name__} is neither a torchvision- nor a PIL-backend processor"
    family = _owner(cls, "_preprocess")
    changed = [name for name in VALUE_METHODS if getattr(cls, name, None) is not getattr(family, name, None)]
    if changed:
        return f"{cls.__name__} changes {', '.join(changed)} of its family {family.__name__}"

    def pair(name):  # a family's torchvision and PIL classes
        return getattr(transformers, name), getattr(transformers, f"{name}Pil")

    crop = bool(getattr(processor, "do_center_crop", False))
    pads = family in (TorchvisionBackend, PilBackend) + pair("PoolFormerImageProcessor")
    if pads and getattr(processor, "do_pad", False):
        return f"{cls.__name__} pads its images (do_pad)"
    if family in (TorchvisionBackend, PilBackend) + pair("BeitImageProcessor") + pair("MobileNetV2ImageProcessor"):
        return ("methods", {}, False, crop, False, *_rescale_normalize(processor))
    if family in pair("ConvNextImageProcessor") + pair("PoolFormerImageProcessor"):
        return ("methods", {"crop_pct": processor.crop_pct}, False, crop, False, *_rescale_normalize(processor))
    if family in pair("TextNetImageProcessor"):
        resize_kwargs = {"size_divisor": processor.size_divisor}
        return ("methods", resize_kwargs, False, crop, False, *_rescale_normalize(processor))
    if family in pair("SegformerImageProcessor"):
        return ("methods", {}, False, False, False, *_rescale_normalize(processor))  # Segformer never crops
    if family in pair("PerceiverImageProcessor"):
        return ("methods", {}, crop, False, False, *_rescale_normalize(processor))  # it crops first, then resizes
    if family in pair("EfficientNetImageProcessor"):
        return ("methods", {}, False, crop, False, *_efficientnet_affine(processor))
    if family in pair("MobileViTImageProcessor"):
        # MobileViT only rescales (never normalises) and feeds BGR.
        affine = _affine(processor.rescale_factor if processor.do_rescale else None, 0.0, [], 3)
        return ("methods", {}, False, crop, bool(processor.do_flip_channel_order), *affine)
    return f"imgft does not reproduce the {family.__name__} family's steps"


def _channels(value, count=3):
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * count


def _affine(rescale_factor, offset, divisions, channels):
    """(shift, scale) with (pixel - shift) / scale equal to: pixel * rescale_factor - offset (when rescaling), then
    (x - mean) / std for each (mean, std) of `divisions` in turn."""
    multiply, add = [1.0] * channels, [0.0] * channels
    if rescale_factor is not None:
        multiply, add = [rescale_factor] * channels, [-offset] * channels
    for mean, std in divisions:
        mean, std = _channels(mean, channels), _channels(std, channels)
        multiply = [m / s for m, s in zip(multiply, std, strict=True)]
        add = [(a - mu) / s for a, mu, s in zip(add, mean, std, strict=True)]
    return tuple(-a / m for a, m in zip(add, multiply, strict=True)), tuple(1 / m for m in multiply)


def _rescale_normalize(processor):
    rescale = processor.rescale_factor if processor.do_rescale else None
    divisions = [(processor.image_mean, processor.image_std)] if processor.do_normalize else []
    return _affine(rescale, 0.0, divisions, 3)


def _efficientnet_affine(processor):
    # EfficientNet rescales with an optional -1 offset, normalises, and with include_top divides by the std again.
    rescale = processor.rescale_factor if processor.do_rescale else None
    offset = 1.0 if processor.rescale_offset else 0.0
    divisions = [(processor.image_mean, processor.image_std)] if processor.do_normalize else []
    if processor.include_top:
        divisions.append((0.0, processor.image_std))
    return _affine(rescale, offset, divisions, 3)


def _is_timm(processor):
    # By name: transformers.TimmWrapperImageProcessor cannot even be looked up where timm is not installed.
    return type(processor).__name__ == "TimmWrapperImageProcessor"


def _timm_steps(processor):
    """timm's eval transforms: geometry on the PIL image, then ToTensor (/255) and Normalize."""
    steps = processor.val_transforms.transforms
    names = [type(step).__name__ for step in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        return f"its timm eval transforms ({', '.join(names)}) do not end in ToTensor, Normalize"
    normalize = steps[-1]
    affine = _affine(1 / 255, 0.0, [(normalize.mean.tolist(), normalize.std.tolist())], 3)
    return ("timm", {}, False, False, False, *affine)


def _processor_plan(processor, reason):
    """Evaluation runs the processor itself; training crops are normalised as its attributes say (0-1 without them)."""
    do_rescale = getattr(processor, "do_rescale", True)
    rescale = (getattr(processor, "rescale_factor", None) or 1 / 255) if do_rescale else None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    divisions = [(mean, std)] if getattr(processor, "do_normalize", False) and mean and std else []
    shift, scale = _affine(rescale, 0.0, divisions, 3)
    return Plan("processor", {}, False, False, False, shift, scale, reason)


def batch_gives_each_its_own(processor):
    """Whether the processor, called once on the probe images, gives each what it gives it alone, so that a
    processor run as it is can run once per batch. Not every processor does: PPOCRV5ServerRecImageProcessor,
    for one, resizes a batch to its widest image's aspect ratio, and a processor that pads a batch to its
    largest image would differ too: those run image by image."""
    probes = [_probe(size, seed) for seed, size in enumerate(PROBE_SIZES)]
    try:
        together = run_processor(probes, processor)
        alone = run_processor_on_each(probes, processor)
    except UserError:  # it fails together (so it runs image by image), or alone too (input_size says why)
        return False
    return all(
        ours.shape == theirs.shape and np.abs(ours - theirs).max() <= FIDELITY_TOLERANCE
        for ours, theirs in zip(together, alone, strict=True)
    )


def _probe(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def geometry(image, processor, plan):
    """An RGB PIL image at the model's input size, as an H x W x 3 uint8 array: the processor's own resize and crop,
    or timm's eval transforms before ToTensor."""
    if plan.kind == "timm":
        for step in processor.val_transforms.transforms[:-2]:
            image = step(image)
        return np.asarray(image)
    pixels = processor.process_image(image)  # 3 x H x W uint8: a torch tensor or a numpy array, as its backend works
    if plan.crop_first:
        pixels = processor.center_crop(pixels, size=processor.size, crop_size=processor.crop_size)
    if processor.do_resize:
        pixels = processor.resize(pixels, processor.size, processor.resample, **plan.resize_kwargs)
    if plan.crop:
        pixels = processor.center_crop(pixels, processor.crop_size)
    pixels = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else pixels.transpose(1, 2, 0)
    return np.ascontiguousarray(pixels[..., ::-1] if plan.flip_channels else pixels)


def run_processor(images, processor):
    """The processor itself, called once on `images` (RGB images): its 3 x H x W float pixel_values for each,
    as an H x W x 3 float32 array; UserError when it gives anything else for plain RGB images (tiles, patch
    sequences, video frames, an error)."""
    images = list(images)
    if not images:  # a batch whose files were all unreadable: processors refuse an empty list
        return []
    name = type(processor).__name__
    try:
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    except Exception as err:  # any processor's own code, on a plain RGB image: whatever it raises, it cannot serve
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name} cannot process a plain RGB image: {reason}") from None
    shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or shape[:2] != (len(images), 3):
        count = "one image" if len(images) == 1 else f"{len(images)} images"
        raise UserError(
            f"{name} gives pixel_values of shape {shape} for {count}, not one 3-channel image each: "
            "an image classifier fine-tuned by imgft needs one"
        )
    return list(pixel_values.float().permute(0, 2, 3, 1).numpy())


def run_processor_on_each(images, processor):
    """`run_processor` called once per image: for a processor whose output for a batch is not each image's."""
    return [run_processor([image], processor)[0] for image in images]


def model_input(array, plan):
    """One transform output as the model sees it, 3 x H x W float32: the affine map for uint8, as is for floats."""
    tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    if tensor.dtype != torch.uint8:
        return tensor.float()
    shift, scale = torch.tensor(plan.shift).view(3, 1, 1), torch.tensor(plan.scale).view(3, 1, 1)
    return tensor.float().sub_(shift).div_(scale)


def _largest_difference(processor, plan):
    """Largest absolute difference between the plan's input and the processor's own, over the probe images."""
    largest = 0.0
    for seed, size in enumerate(PROBE_SIZES):
        image = _probe(size, seed)
        theirs = torch.from_numpy(run_processor([image], processor)[0]).permute(2, 0, 1)
        try:
            ours = model_input(geometry(image, processor, plan), plan)
        except (ValueError, TypeError, RuntimeError):
            return math.inf  # its own resize or crop fails where its pipeline does not: it is run as it is
        if ours.shape != theirs.shape:
            return math.inf
        largest = max(largest, (ours - theirs).abs().max().item())
    return largest


def input_size(processor, plan):
    """(height, width) of the model's input; UserError when it depends on the image's shape."""
    shapes = set()
    for seed, size in enumerate(PROBE_SIZES[:2]):
        image = _probe(size, seed)
        if plan.kind == "processor":
            shapes.add(run_processor([image], processor)[0].shape[:2])
        else:
            shapes.add(geometry(image, processor, plan).shape[:2])
    if len(shapes) > 1:
        raise UserError(
            f"{type(processor).__name__} gives images whose size follows each image's shape "
            f"({' and '.join(f'{h}x{w}' for h, w in sorted(shapes))} px), which cannot be batched: give a processor "
            "that crops or resizes to a fixed size, or --image_size"
        )
    return shapes.pop()


def _scaled(size, factor):
    values = {key: getattr(size, key, None) if not isinstance(size, dict) else size.get(key) for key in SIZE_KEYS}
    return {key: max(1, round(value * factor)) for key, value in values.items() if value}


def with_image_size(image_processor, image_size):
    """A copy of `image_processor` that gives image_size x image_size images, its resize-to-crop ratio kept (a 256 ->
    224 processor becomes 37 -> 32 for 32); a non-square output becomes square (its crop, else its resize); UserError
    when the processor cannot be made to give that size this way."""
    plan = plan_for(image_processor)
    height, width = input_size(image_processor, plan)
    if (height, width) == (image_size, image_size):
        return image_processor
    name = type(image_processor).__name__
    refusal = f"--image_size {image_size}: imgft cannot make {name} ({height}x{width} px) give square images"
    if _is_timm(image_processor):
        resized = type(image_processor)(
            pretrained_cfg={**image_processor.data_config, "input_size": (3, image_size, image_size)}
        )
    elif not getattr(image_processor, "size", None):
        raise UserError(refusal)
    else:
        resized = copy.deepcopy(image_processor)
        factor = image_size / min(height, width)
        square = {"height": image_size, "width": image_size}
        for attribute in ("size", "crop_size"):
            value = getattr(resized, attribute, None)
            if value:
                setattr(resized, attribute, type(value)(**_scaled(value, factor)))
        if height != width and getattr(resized, "do_center_crop", False) and getattr(resized, "crop_size", None):
            resized.crop_size = type(resized.crop_size)(**square)
        elif height != width and getattr(resized.size, "height", None):
            resized.size = type(resized.size)(**square)
    if input_size(resized, plan_for(resized)) != (image_size, image_size):
        raise UserError(refusal)
    return resized


def interpolation(image_processor):
    """The processor's resampling filter as a torchvision InterpolationMode, for training's random crops."""
    from torchvision.transforms.v2 import InterpolationMode
    from transformers.image_utils import pil_torch_interpolation_mapping

    if _is_timm(image_processor):
        name = image_processor.data_config.get("interpolation", "bilinear")
        known = name in {mode.value for mode in InterpolationMode}
        return InterpolationMode(name) if known else InterpolationMode.BILINEAR  # timm's "random", too
    resample = getattr(image_processor, "resample", None)
    if isinstance(resample, InterpolationMode):
        return resample
    return pil_torch_interpolation_mapping.get(resample, InterpolationMode.BILINEAR)
