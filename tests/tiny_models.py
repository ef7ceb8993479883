"""Tiny random-weight checkpoints of every architecture in transformers' image-classification mapping, each saved
with its own image processor class (defaults, sizes shrunk about 7x), for the breadth tests."""

import math

import torch
from transformers import AutoConfig
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

ARCHITECTURES = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
# The smallest settings each config takes (1-2 layers, 8-16 channels); image sizes follow the processor.
VIT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 99}
STAGES = {"hidden_sizes": [8, 16], "depths": [1, 1]}
SEGFORMER = {**STAGES, "num_encoder_blocks": 2, "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2]}
SEGFORMER |= {"num_attention_heads": [1, 2], "sr_ratios": [2, 1]}
CVT_TWO_STAGES = {
    "embed_dim": [8, 16],
    "num_heads": [1, 2],
    "depth": [1, 2],  # CvT indexes stage i's drop-path rates by i: each stage needs more layers than its index
    "patch_sizes": [7, 3],
    "patch_stride": [4, 2],
    "patch_padding": [2, 1],
    "stride_kv": [2, 2],
    "cls_token": [False, True],
    "mlp_ratio": [2.0, 2.0],
    "attention_drop_rate": [0.0, 0.0],
    "drop_rate": [0.0, 0.0],
    "drop_path_rate": [0.0, 0.0],
    "qkv_bias": [True, True],
    "qkv_projection_method": ["dw_bn", "dw_bn"],
    "kernel_qkv": [3, 3],
    "padding_kv": [1, 1],
    "stride_q": [1, 1],
    "padding_q": [1, 1],
}
TINY_CONFIGS = {
    "beit": {**VIT, "use_auxiliary_head": False},
    "bit": {"embedding_size": 8, **STAGES, "num_groups": 2},
    "clip": {"vision_config": VIT, "text_config": TEXT},
    "convnext": {**STAGES, "num_stages": 2},
    "convnextv2": {**STAGES, "num_stages": 2},
    "cvt": CVT_TWO_STAGES,
    "data2vec-vision": {**VIT, "use_auxiliary_head": False},
    "deit": VIT,
    "dinat": {"embed_dim": 8, "depths": [1], "num_heads": [1], "kernel_size": 3, "dilations": [[1]]},
    "dinov2": {**VIT, "mlp_ratio": 2},
    "dinov2_with_registers": {**VIT, "mlp_ratio": 2, "num_register_tokens": 1},
    "donut-swin": {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4},
    "efficientnet": {
        "width_coefficient": 0.1,
        "depth_coefficient": 0.1,
        "hidden_dim": 128,  # its top convolution's 1280 channels x width_coefficient
        "kernel_sizes": [3, 3],
        "in_channels": [32, 16],
        "out_channels": [16, 24],
        "num_block_repeats": [1, 1],
        "strides": [1, 2],
        "expand_ratios": [1, 2],
        "depthwise_padding": [],
    },
    "focalnet": {"embed_dim": 8, **STAGES, "focal_levels": [1, 1], "focal_windows": [3, 3]},
    "hgnet_v2": {
        "stem_channels": [3, 8, 8],
        "stage_in_channels": [8, 16],
        "stage_mid_channels": [8, 8],
        "stage_out_channels": [16, 16],
        "stage_num_blocks": [1, 1],
        "stage_downsample": [False, True],
        "stage_light_block": [False, True],
        "stage_kernel_size": [3, 3],
        "stage_numb_of_layers": [1, 1],
        "depths": [1, 1],
        "hidden_sizes": [16, 16],
        "embedding_size": 8,
    },
    "hiera": {
        "embed_dim": 8,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "patch_size": [4, 4],
        "patch_stride": [2, 2],
        "patch_padding": [1, 1],
        "masked_unit_size": [2, 2],
        "num_query_pool": 1,
        "query_stride": [2, 2],
        "mlp_ratio": 2.0,
    },
    "ijepa": VIT,
    "imagegpt": {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64},
    "levit": {
        "hidden_sizes": [16, 32],
        "num_attention_heads": [1, 2],
        "depths": [1, 1],
        "key_dim": [8, 8],
        "mlp_ratio": [2, 2],
        "attention_ratio": [2, 2],
        "down_ops": [["Subsample", 8, 1, 2, 2, 2]],
    },
    "metaclip_2": {"vision_config": VIT, "text_config": TEXT},
    "mobilenet_v1": {"depth_multiplier": 0.25, "min_depth": 4},
    "mobilenet_v2": {"depth_multiplier": 0.25, "min_depth": 4},
    "mobilevit": {"hidden_sizes": [8, 8, 8], "neck_hidden_sizes": [8, 8, 8, 8, 8, 8, 16], "num_attention_heads": 1},
    "mobilevitv2": {"width_multiplier": 0.25, "base_attn_unit_dims": [8, 8, 8], "n_attn_blocks": [1, 1, 1]},
    "perceiver": {
        "num_latents": 8,
        "d_latents": 16,
        "d_model": 16,
        "num_self_attends_per_block": 1,
        "num_self_attention_heads": 1,
        "num_cross_attention_heads": 1,
    },
    "poolformer": {**STAGES, "num_encoder_blocks": 2, "patch_sizes": [7, 3], "strides": [4, 2], "padding": [2, 1]},
    "pp_lcnet": {},
    "pvt": {**SEGFORMER, "sequence_reduction_ratios": [2, 1], "patch_sizes": [4, 2], "strides": [4, 2]},
    "pvt_v2": SEGFORMER,
    "regnet": {"embedding_size": 8, **STAGES, "groups_width": 8},
    "resnet": {"embedding_size": 8, **STAGES, "layer_type": "basic"},
    "segformer": {**SEGFORMER, "decoder_hidden_size": 16},
    "shieldgemma2": {},
    "siglip": {"vision_config": VIT, "text_config": TEXT},
    "siglip2": {"vision_config": {**VIT, "num_patches": 16}, "text_config": TEXT},
    "swiftformer": {"depths": [1, 1], "embed_dims": [8, 16], "mlp_ratio": 2},
    "swin": {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4},
    "swinv2": {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4},
    "textnet": {
        "stem_out_channels": 8,
        "hidden_sizes": [8, 8, 16],
        "depths": [1, 1],
        "conv_layer_kernel_sizes": [[[3, 3]], [[3, 3]]],
        "conv_layer_strides": [[1], [2]],
    },
    "timm_wrapper": {"architecture": "resnet18", "model_args": {"channels": [8, 16, 16, 16]}},
    "vit": VIT,
    "vit_msn": VIT,
}
# Processor settings where shrinking the defaults is not enough: Donut's 2560 x 1920 pages, TextNet's uncropped
# 640 px shortest edge, and timm's data config, which lives in config.json.
PROCESSOR_SETTINGS = {
    "donut-swin": {"size": {"height": 32, "width": 32}},
    "textnet": {"do_center_crop": True, "crop_size": {"height": 32, "width": 32}},
}
TIMM_DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


def processor_class(model_type):
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if model_type == "dinov2_with_registers":
        names = IMAGE_PROCESSOR_MAPPING_NAMES["dinov2"]
    if model_type == "hgnet_v2":
        names = IMAGE_PROCESSOR_MAPPING_NAMES["resnet"]
    import transformers

    return getattr(transformers, names["torchvision"])


def small_processor(model_type):
    """The architecture's own processor class with its default steps, its sizes divided by 7 (224 -> 32)."""
    cls = processor_class(model_type)
    defaults = cls()
    settings = {}
    for name in ("size", "crop_size"):
        value = getattr(defaults, name, None)
        if value:
            settings[name] = {key: math.ceil(value[key] / 7) for key in SIZE_KEYS if value.get(key)}
    return cls(**{**settings, **PROCESSOR_SETTINGS.get(model_type, {})})


def input_size(processor):
    """(height, width) the processor itself gives, from a plain image."""
    from PIL import Image

    return tuple(processor(images=[Image.new("RGB", (50, 40))], return_tensors="pt")["pixel_values"].shape[-2:])


def tiny_config(model_type, label_names, image_size=None):
    settings = dict(TINY_CONFIGS[model_type])
    if model_type == "timm_wrapper":
        settings["pretrained_cfg"] = TIMM_DATA_CONFIG
    config = AutoConfig.for_model(model_type, **settings)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    if getattr(config, "num_labels", None) != len(label_names):
        config.num_labels = len(label_names)
    for part in (config, getattr(config, "vision_config", None)):
        current = getattr(part, "image_size", None) if part is not None else None
        if image_size and current is not None:
            part.image_size = list(image_size) if isinstance(current, (list, tuple)) else image_size[0]
    return config


def save_tiny_checkpoint(path, model_type, label_names, weights=True):
    """A random-weight classifier of `model_type` with a head for `label_names`, saved with its processor; with
    `weights` False, the config, the default processor and an empty weights file: enough for refusals that come
    before loading, and for one that comes when the model is built (a library it needs is missing)."""
    from safetensors.torch import save_file

    from imgft.model import classification_class

    if not weights:
        config = tiny_config(model_type, label_names)
        config.architectures = [classification_class(config).__name__]
        config.save_pretrained(path)
        processor_class(model_type)().save_pretrained(path)
        save_file({}, f"{path}/model.safetensors", metadata={"format": "pt"})
        return path
    processor = None if model_type == "timm_wrapper" else small_processor(model_type)
    size = tuple(TIMM_DATA_CONFIG["input_size"][1:]) if processor is None else input_size(processor)
    config = tiny_config(model_type, label_names, size)
    config.architectures = [classification_class(config).__name__]
    torch.manual_seed(0)
    classification_class(config)(config).save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path
