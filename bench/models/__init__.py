"""Small CIFAR-10 CNNs, one file per family, each registered by name (``registry``):

- ``seed``: ``seed_bn`` and ``seed_gn``, which reproduce the seed models layer for layer;
- ``resnet``: the residual family and its named shapes;
- ``convnext``: the ConvNeXt-style family (depthwise conv, inverted bottleneck), where LayerNorm is native;
- ``layers``: what families share (packed-bytes Dropout, the norm factory, width scaling);
- ``budget``: meta-device parameter counts, the 50k budget check, the layer summary.

A new family is a new file that decorates its builder with ``@register_model`` and is imported here.
"""

from __future__ import annotations

# Importing a family registers its models, in the order --preset lists them: seed first.
from .seed import PRESETS, SeedNet, SeedTopology
from .resnet import BasicBlock, ResNet
from .convnext import ConvNeXt, ConvNeXtBlock
from .budget import build_checked, check_budget, count_params, count_params_fast, make_summary, max_width
from .layers import NUM_CLASSES, Dropout, make_norm, random_bytes_like, scale_width
from .registry import ModelEntry, create_model, list_models, preset_help, register_model

ALL_PRESETS = tuple(list_models())

__all__ = [
    "ALL_PRESETS", "NUM_CLASSES", "PRESETS", "BasicBlock", "ConvNeXt", "ConvNeXtBlock", "Dropout", "ModelEntry", "ResNet",
    "SeedNet", "SeedTopology",
    "build_checked", "check_budget", "count_params", "count_params_fast", "create_model", "list_models", "make_norm",
    "make_summary", "max_width", "preset_help", "random_bytes_like", "register_model", "scale_width",
]
