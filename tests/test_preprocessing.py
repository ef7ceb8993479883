"""imgft.preprocessing: imgft's evaluation input equals the image processor's own, for every image processor class
transformers ships, on a camera-sized JPEG, a small PNG and an odd aspect ratio; or imgft refuses, in one line, a
processor that gives no single fixed-size 3-channel image; and --image_size scales a processor's geometry.

Tolerance: FIDELITY_TOLERANCE (1e-4 in normalised units); measured at most 4.8e-7, float rounding of the same uint8
pixels, where one uint8 step is 1 / (255 * std), about 0.017."""

import io
import logging

import datasets
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny_models import TIMM_DATA_CONFIG
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

from imgft import images, tta
from imgft.errors import UserError
from imgft.preprocessing import (
    FIDELITY_TOLERANCE,
    batch_gives_each_its_own,
    input_size,
    plan_for,
    run_processor,
    with_image_size,
)
from imgft.transforms import build_transforms, collate_fn, normalizer, stack_images, with_eval_transform

PROCESSOR_CLASSES = sorted({name for backends in IMAGE_PROCESSOR_MAPPING_NAMES.values() for name in backends.values()})
# The processors of transformers' image classifiers: each must get the fast uint8 path, not the processor itself.
CLASSIFIER_PROCESSORS = (
    "BeitImageProcessor", "BitImageProcessor", "CLIPImageProcessor", "ConvNextImageProcessor", "DeiTImageProcessor",
    "EfficientNetImageProcessor", "LevitImageProcessor", "MobileNetV1ImageProcessor", "MobileNetV2ImageProcessor",
    "MobileViTImageProcessor", "PerceiverImageProcessor", "PoolFormerImageProcessor", "PvtImageProcessor",
    "SegformerImageProcessor", "SiglipImageProcessor", "ViTImageProcessor",
)  # fmt: skip


def make_processor(name):
    cls = getattr(transformers, name)
    if name == "TimmWrapperImageProcessor":
        return cls(pretrained_cfg=TIMM_DATA_CONFIG)
    return cls()


def camera_jpeg(width=4032, height=3024):
    """A 12-megapixel phone-camera-sized JPEG, decoded as imgft decodes files: smooth gradients under sensor noise."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 41, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] += np.linspace(0, 214, width, dtype=np.uint8)[None, :]
    pixels[..., 1] += np.linspace(0, 214, height, dtype=np.uint8)[:, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    image, reason = images.decode_file(data=buffer.getvalue(), rgb=True)
    assert image is not None, reason
    return image


def png(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return images.decode_file(data=buffer.getvalue(), rgb=True)[0]


@pytest.fixture(scope="module")
def photos():
    """(camera-sized JPEG, small PNG, a 300 x 61 strip)."""
    return camera_jpeg(), png(37, 53, 1), png(300, 61, 2)


def theirs(processor, image):
    return processor(images=[image], return_tensors="pt")["pixel_values"]


def ours(processor, image):
    return imgft_eval(processor)(image)


def imgft_eval(processor):
    """image -> imgft's 1 x 3 x H x W evaluation input, as training's evaluation and predict make it."""
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    normalize = normalizer(processor)
    return lambda image: normalize(stack_images(evaluation([image])))


def gives_one_fixed_size_image(processor, samples):
    """Whether the processor itself gives exactly one 3 x H x W image per plain RGB image, of one size for all."""
    try:
        outputs = [theirs(processor, image) for image in samples]
    except Exception:  # it cannot process a plain image at all
        return False
    shapes = {tuple(output.shape) if isinstance(output, torch.Tensor) else None for output in outputs}
    return len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 4 and next(iter(shapes))[:2] == (1, 3)


@pytest.mark.parametrize("name", PROCESSOR_CLASSES)
def test_eval_input_is_the_processors_own_or_refused(name, photos):
    processor = make_processor(name)
    small = photos[1:]
    try:
        plan = plan_for(processor)
        input_size(processor, plan)
    except UserError as refused:
        assert "\n" not in str(refused) and name in str(refused)
        assert not gives_one_fixed_size_image(processor, small), f"{name} gives fixed-size images, yet: {refused}"
        return
    # Run as it is, the processor is compared on one small image only: more would test it against itself.
    evaluate = imgft_eval(processor)
    for image in photos if plan.kind != "processor" else small[:1]:
        expected, got = theirs(processor, image), evaluate(image)
        assert got.shape == expected.shape
        assert (got - expected.float()).abs().max().item() <= FIDELITY_TOLERANCE


@pytest.mark.parametrize("name", CLASSIFIER_PROCESSORS)
def test_classifier_processors_get_the_fast_path(name):
    plan = plan_for(make_processor(name))
    assert plan.kind == "methods", plan.reason


def test_timm_processor_gets_the_fast_path_from_its_data_config():
    processor = make_processor("TimmWrapperImageProcessor")
    plan = plan_for(processor)
    assert plan.kind == "timm"
    assert input_size(processor, plan) == (32, 32)
    mean, std = TIMM_DATA_CONFIG["mean"], TIMM_DATA_CONFIG["std"]
    assert plan.shift == pytest.approx([255 * m for m in mean])
    assert plan.scale == pytest.approx([255 * s for s in std])


def test_deit_resizes_to_256_and_crops_the_centre_224():
    # Issue 13: the size logic ignored DeiT's crop_size and fed 256 px into a 224 model.
    processor = transformers.DeiTImageProcessor()
    plan = plan_for(processor)
    assert input_size(processor, plan) == (224, 224)
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[16:240, 32:480] = 255  # squashed to 256 x 256, this is the centre 224 x 224: the dark frame is cut off
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    out = evaluation([Image.fromarray(pixels)])[0]
    assert out.shape == (224, 224, 3)
    assert out[3:-3, 3:-3].min() == 255 and out.mean() > 245


def test_poolformer_crop_pct_and_efficientnet_include_top_are_reproduced():
    # Issue 13's largest differences: PoolFormer's crop_pct ignored when crop_size is set (1.37), EfficientNet's
    # second division by the std (1.01).
    image = png(97, 61, 3)
    for processor in (transformers.PoolFormerImageProcessor(), transformers.EfficientNetImageProcessor()):
        assert plan_for(processor).kind == "methods"
        difference = (ours(processor, image) - theirs(processor, image)).abs().max().item()
        assert difference <= FIDELITY_TOLERANCE


def test_a_subclass_that_changes_normalisation_is_run_as_it_is():
    class Inverted(transformers.ViTImageProcessor):
        def rescale_and_normalize(self, images, *args, **kwargs):
            return -super().rescale_and_normalize(images, *args, **kwargs)

    processor = Inverted(size={"height": 16, "width": 16})
    plan = plan_for(processor)
    assert plan.kind == "processor" and "rescale_and_normalize" in plan.reason
    image = png(40, 30, 4)
    assert torch.allclose(ours(processor, image), theirs(processor, image))


def test_a_fast_path_that_differs_on_the_probes_is_dropped():
    class Mirrored(transformers.ViTImageProcessor):
        # A step the fast path does not call: only the probe comparison can see it.
        def _prepare_images_structure(self, images, *args, **kwargs):
            prepared = super()._prepare_images_structure(images, *args, **kwargs)
            return [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in prepared]

    processor = Mirrored(size={"height": 16, "width": 16})
    plan = plan_for(processor)
    assert plan.kind == "processor" and "fast path differs from it by" in plan.reason
    image = png(40, 30, 5)
    assert torch.allclose(ours(processor, image), theirs(processor, image))


@pytest.mark.parametrize(
    ("processor", "resized"),
    [
        (transformers.DeiTImageProcessor(), {"size": (37, 37), "crop_size": (32, 32)}),
        (transformers.ConvNextImageProcessor(size={"shortest_edge": 224}), {"size": 32}),
        (transformers.PerceiverImageProcessor(), {"size": (32, 32), "crop_size": (37, 37)}),
        (transformers.ViTImageProcessor(), {"size": (32, 32)}),
        (transformers.ViTImageProcessor(size={"height": 24, "width": 48}), {"size": (32, 32)}),
    ],
    ids=["deit", "convnext", "perceiver", "vit", "vit-oblong"],
)
def test_image_size_scales_the_processors_geometry(processor, resized):
    smaller = with_image_size(processor, 32)
    assert input_size(smaller, plan_for(smaller)) == (32, 32)
    for attribute, expected in resized.items():
        value = getattr(smaller, attribute)
        got = value.shortest_edge if isinstance(expected, int) else (value.height, value.width)
        assert got == expected
    assert input_size(processor, plan_for(processor)) != (32, 32)  # the original is left as it was


class BatchRecorder(transformers.ViTImageProcessor):
    """A processor imgft runs as it is (it negates the normalised pixels, which the fast path cannot know),
    and that records how many images each call gives it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batch_sizes = []

    def rescale_and_normalize(self, images, *args, **kwargs):
        return -super().rescale_and_normalize(images, *args, **kwargs)

    def __call__(self, images, *args, **kwargs):
        self.batch_sizes.append(len(images))
        return super().__call__(images, *args, **kwargs)


def odd_sized_pngs(count):
    return [png(20 + 7 * i, 45 - 3 * i, i) for i in range(count)]


def test_a_processor_run_as_it_is_runs_once_per_batch_and_gives_each_image_its_own(caplog):
    processor = BatchRecorder(size={"height": 16, "width": 16})
    caplog.set_level(logging.INFO, logger="imgft")
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    pictures = odd_sized_pngs(10)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": pictures, "label": list(range(10))}, features=features)
    evaluated = with_eval_transform(dataset, evaluation, "image", "label")
    loader = DataLoader(evaluated, batch_size=4, collate_fn=collate_fn)
    processor.batch_sizes.clear()
    batches = list(loader)
    assert processor.batch_sizes == [4, 4, 2]
    alone = torch.cat([theirs(processor, image) for image in pictures])
    got = normalizer(processor)(torch.cat([batch["pixel_values"] for batch in batches]))
    assert got.shape == alone.shape == (10, 3, 16, 16)
    assert (got - alone).abs().max().item() <= FIDELITY_TOLERANCE
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == list(range(10))
    assert "run BatchRecorder itself, once per batch" in caplog.text

    # --tta: the centre and the zoomed view of every image of the batch, in one call.
    processor.batch_sizes.clear()
    views = tta.stack_views(tta.views_transform(evaluation, "flip_zoom")(pictures[:4]))
    assert processor.batch_sizes == [8]
    zoomed = [F.center_crop(pic, [round(pic.height * 0.875), round(pic.width * 0.875)]) for pic in pictures]
    zoomed_alone = torch.cat([theirs(processor, image) for image in zoomed[:4]])
    for view, expected in enumerate((alone[:4], alone[:4].flip(-1), zoomed_alone, zoomed_alone.flip(-1))):
        assert (views[:, view] - expected).abs().max().item() <= FIDELITY_TOLERANCE


def test_a_processor_whose_batches_differ_from_its_images_alone_runs_image_by_image(caplog):
    if not hasattr(transformers, "PPOCRV5ServerRecImageProcessor"):
        pytest.skip("this transformers has no PPOCRV5ServerRecImageProcessor")
    # It resizes a batch to its widest image's aspect ratio: one call would change the other images' inputs.
    processor = transformers.PPOCRV5ServerRecImageProcessor()
    pictures = [png(131, 89, 0), png(57, 160, 1), png(300, 61, 2)]
    alone = torch.cat([theirs(processor, image) for image in pictures])
    together = processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert together.shape == alone.shape and (together - alone).abs().max().item() > 0.5
    caplog.set_level(logging.INFO, logger="imgft")
    _, evaluation = build_transforms(processor, None, random_flip=False, crop_scale_min=1.0)
    got = normalizer(processor)(stack_images(evaluation(pictures)))
    assert (got - alone).abs().max().item() <= FIDELITY_TOLERANCE
    assert not batch_gives_each_its_own(processor)
    assert "run PPOCRV5ServerRecImageProcessor itself, image by image" in caplog.text


def test_a_processor_that_gives_more_images_than_it_was_given_is_refused():
    class Tiler(transformers.ViTImageProcessor):
        def __call__(self, images, *args, **kwargs):
            return {"pixel_values": torch.zeros(2 * len(images), 3, 16, 16)}  # two tiles per image

    with pytest.raises(UserError, match=r"Tiler gives pixel_values of shape \(6, 3, 16, 16\) for 3 images"):
        run_processor(odd_sized_pngs(3), Tiler())
