"""The residual family: preset ``resnet`` and its named shapes (``config.RESNET_SHAPES``).

A post-activation CIFAR ResNet (He et al. 2016): a 3x3 stem conv-norm-ReLU, three stages of basic
blocks (conv-norm-ReLU-conv-norm, plus the shortcut, then ReLU), stride 2 at the start of stages 2
and 3 (``stride2``, ``stride3``: 1 keeps the resolution, same parameters, 4x the multiply-adds) with a
1x1 conv-norm projection shortcut wherever channels or resolution change, global average pooling,
dropout and a linear classifier. Its shape comes from the flat ``ModelConfig`` fields
``stem``, ``width1..3``, ``blocks`` (or per stage ``blocks1..3``), ``stride2..3`` and ``dropout_at``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DROPOUT_AT, RESNET_SHAPE, RESNET_SHAPES, ModelConfig
from ..errors import BudgetError
from .layers import NUM_CLASSES, Dropout, make_norm, staged_shape
from .registry import register_model


def conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, norm: str, groups: int) -> list[nn.Module]:
    # The side passed to make_norm only matters for lnchw, which residual models refuse.
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False), make_norm(norm, out_ch, 0, groups)]


class BasicBlock(nn.Module):
    """Post-activation basic block: ReLU(norm(conv(ReLU(norm(conv(x))))) + shortcut(x)).
    ``dropout`` > 0 puts dropout between the two convs, as in Wide ResNets."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, groups: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            *conv_norm(in_ch, out_ch, 3, stride, norm, groups), nn.ReLU(), *([Dropout(dropout)] if dropout else []),
            *conv_norm(out_ch, out_ch, 3, 1, norm, groups),
        )
        projected = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Sequential(*conv_norm(in_ch, out_ch, 1, stride, norm, groups)) if projected else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int, norm: str, groups: int, dropout: float) -> nn.Sequential:
    """``blocks`` basic blocks; the first one changes width and resolution."""
    return nn.Sequential(*(
        BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, norm, groups, dropout) for i in range(blocks)
    ))


class ResNet(nn.Module):
    def __init__(self, stem: int, widths: tuple[int, ...], blocks: tuple[int, ...], norm: str, groups: int = 4,
                 dropout: float = 0.0, dropout_at: str = "head", strides: tuple[int, ...] = (1, 2, 2)):
        super().__init__()
        block_dropout = dropout if dropout_at == "blocks" else 0.0
        self.stem = nn.Sequential(*conv_norm(3, stem, 3, 1, norm, groups), nn.ReLU())
        self.stages = nn.Sequential(*(
            make_stage(in_ch, out_ch, n_blocks, stride, norm, groups, block_dropout)
            for in_ch, out_ch, n_blocks, stride in zip((stem, *widths), widths, blocks, strides)
        ))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = Dropout(dropout if dropout_at == "head" else 0.0)
        self.classifier = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.stages(self.stem(x))).flatten(1)))


@register_model(help="shape from width1..3, blocks1..3")
def resnet(cfg: ModelConfig) -> ResNet:
    """The residual model from the flat config fields; ``width`` scales the stem and every stage."""
    stem, widths, blocks = staged_shape(cfg, "residual models")
    if cfg.dropout_at not in DROPOUT_AT:
        raise BudgetError(f"dropout_at {cfg.dropout_at!r} is not one of {', '.join(DROPOUT_AT)}")
    strides = (1, cfg.stride2, cfg.stride3)
    return ResNet(stem, widths, blocks, cfg.norm, cfg.groups, cfg.dropout, cfg.dropout_at, strides)


# The named shapes are listed here so --preset shows them; create_model has turned them into
# preset "resnet" plus their fields (config.expand_preset) before any builder runs.
for _name, _shape in RESNET_SHAPES.items():
    register_model(resnet, name=_name, help=", ".join(f"{k}={v}" for k, v in _shape.items() if RESNET_SHAPE[k] != v))
