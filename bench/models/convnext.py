"""The ConvNeXt-style family: preset ``convnext``, an architecture in which LayerNorm is native.

A small ConvNeXt (Liu et al. 2022) for 32x32 inputs: a stem (``stems``; by default a 3x3 conv-norm at
full resolution), three stages of inverted-bottleneck blocks (depthwise 7x7 conv, norm, 1x1 conv expanding 4x, GELU, 1x1 conv
projecting back, plus the identity), a norm and 2x2 stride-2 conv between stages (the ConvNeXt
downsampling layer), then global average pooling, a norm, dropout and a linear classifier. There is
one norm per block, as in ConvNeXt, and layer scale only if asked. Its shape comes from the flat ``ModelConfig``
fields ``stem``, ``width1..3``, ``blocks`` (or per stage ``blocks1..3``), ``width``, ``norm``,
``groups``, ``dropout``, ``kernel`` (the depthwise kernel), ``drop_path`` (stochastic depth), ``stem_kind``,
``stages`` (2 drops the 8x8 stage), ``expansion`` (hidden width over block width), ``gated`` and
``layer_scale``;
``dropout_at`` does not apply.

``gated`` replaces the GELU feed-forward by a gated one (ReGLU, Shazeer 2020): the first 1x1 conv makes
two maps and ReLU of one multiplies the other (ReLU rather than GEGLU's GELU: the whole model trains
1.38x faster on these CPUs, where bf16 GELU is costly; docs/convnext.md). With ``expansion = 1`` a block
costs about 3 C^2 parameters instead of 8 C^2, so the same budget buys wider stages at higher resolution:
the shape of the small depthwise networks that reach the best CIFAR-10 accuracy per parameter
(xvel/cifar10-tiniest: 48 and 80 channels at 32x32 and 16x16, 97,530 parameters, 94.4%).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .depthwise import DepthwiseConv2d
from .layers import NUM_CLASSES, Dropout, make_norm, staged_shape
from .registry import register_model
from .stems import make_stem


def norm_layer(norm: str, channels: int, groups: int) -> nn.Module:
    # The side passed to make_norm only matters for lnchw, which this family refuses.
    return make_norm(norm, channels, 0, groups)


def stochastic_depth(rate: float) -> nn.Module:
    from torchvision.ops import StochasticDepth  # only when used: importing torchvision costs every command ~1.6 s

    return StochasticDepth(rate, "row")


class GatedReLU(nn.Module):
    """ReLU(a) * b of the two halves (a, b) of the channels: ReGLU's gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return F.relu(a) * b


class LayerScale(nn.Module):
    """A learnt per-channel factor on a residual branch, starting at ``init`` (ConvNeXt, after CaiT):
    each block first adds a small share of its output to the stream, and grows it only as it learns to."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ConvNeXtBlock(nn.Module):
    """x + pw2(GELU(pw1(norm(dwconv(x))))): the inverted bottleneck of ConvNeXt (``gated``: ReGLU),
    its output scaled per channel by ``layer_scale`` when that is not 0."""

    def __init__(self, channels: int, norm: str, groups: int, kernel: int = 7, drop_path: float = 0.0,
                 expansion: int = 4, gated: bool = False, layer_scale: float = 0.0):
        super().__init__()
        hidden = expansion * channels
        after = norm_layer(norm, channels, groups)
        # Compiled, the fused weight gradient wins after BatchNorm (1.42x the whole bn step) and lnc, and
        # loses after GroupNorm (gn, ln: 0.9x), whose backward inductor lays out NCHW (docs/speed.md).
        fused = not isinstance(after, nn.GroupNorm)
        self.residual = nn.Sequential(
            # No bias: the norm right after it has its own shift.
            DepthwiseConv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False, fused_weight_grad=fused),
            after,
            # 1x1 convs rather than Linear on permuted tensors: the layout stays NCHW or channels-last.
            nn.Conv2d(channels, 2 * hidden if gated else hidden, 1),
            GatedReLU() if gated else nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
            *([LayerScale(channels, layer_scale)] if layer_scale else []),
        )
        # Stochastic depth: in training, skips the residual branch of a random share of the images.
        self.drop_path = stochastic_depth(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.residual(x))


def downsample(in_ch: int, out_ch: int, norm: str, groups: int) -> nn.Sequential:
    return nn.Sequential(norm_layer(norm, in_ch, groups), nn.Conv2d(in_ch, out_ch, 2, stride=2))


class ConvNeXt(nn.Module):
    def __init__(self, stem: int, widths: tuple[int, ...], blocks: tuple[int, ...], norm: str, groups: int = 4,
                 dropout: float = 0.0, kernel: int = 7, drop_path: float = 0.0, stem_kind: str = "conv",
                 expansion: int = 4, gated: bool = False, layer_scale: float = 0.0):
        super().__init__()
        # ConvNeXt's rule: the drop rate rises linearly from 0 at the first block to drop_path at the last.
        # (Plain floats, not torch.linspace: the budget check builds the model on the meta device.)
        n = sum(blocks)
        rates = iter(drop_path * i / max(n - 1, 1) for i in range(n))
        self.stem, stem = make_stem(stem_kind, stem, lambda channels: norm_layer(norm, channels, groups))
        stages = []
        for i, (in_ch, out_ch, n_blocks) in enumerate(zip((stem, *widths), widths, blocks)):
            # Stage 1 keeps the stem's resolution and needs a 1x1 projection only when the stem is narrower or wider.
            entry = downsample(in_ch, out_ch, norm, groups) if i else (
                nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity())
            stages.append(nn.Sequential(entry, *(ConvNeXtBlock(out_ch, norm, groups, kernel, next(rates), expansion, gated, layer_scale)
                                                 for _ in range(n_blocks))))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = norm_layer(norm, widths[-1], groups)  # ConvNeXt normalises the pooled features
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.head_norm(self.pool(self.stages(self.stem(x))))
        return self.classifier(self.dropout(pooled.flatten(1)))


@register_model(help="ConvNeXt blocks, shape from width1..3, blocks1..3")
def convnext(cfg: ModelConfig) -> ConvNeXt:
    """The ConvNeXt model from the flat config fields; ``width`` scales the stem and every stage."""
    stem, widths, blocks = staged_shape(cfg, "convnext")
    return ConvNeXt(stem, widths[:cfg.stages], blocks[:cfg.stages], cfg.norm, cfg.groups, cfg.dropout, cfg.kernel,
                    cfg.drop_path, cfg.stem_kind, cfg.expansion, cfg.gated, cfg.layer_scale)
