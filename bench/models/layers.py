"""Layers every family shares: the packed-bytes Dropout, the norm factory and width scaling."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import NORMS, ModelConfig
from ..errors import BudgetError

NUM_CLASSES = 10


def random_bytes_like(x: torch.Tensor) -> torch.Tensor:
    """Uniform uint8 random bytes with ``x``'s shape and memory layout (NCHW or channels-last): eight
    per 64-bit draw. The full signed range is asked for because ``random_()`` alone leaves bit 63 at 0."""
    n = x.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    bytes_ = bits.view(torch.uint8)[:n]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        return bytes_.view(b, h, w, c).permute(0, 3, 1, 2)
    return bytes_.view(x.shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from packed random bytes.

    ``F.dropout`` draws one float per element; here one 64-bit draw yields eight 8-bit uniforms
    (profiled: mask generation was about half of a training step). p is rounded to a multiple of
    1/256 (0.05 drops 13/256 = 5.08%) and kept units are scaled by the exact 256/(256 - k), so the
    expectation is preserved. The mask is built in ``x``'s own memory layout and dtype, or the
    multiply falls onto a slow mixed-layout path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = round(self.p * 256)
        if dropped >= 256:
            return torch.zeros_like(x)
        keep = random_bytes_like(x) >= dropped
        scale = torch.full((), 256 / (256 - dropped), dtype=x.dtype, device=x.device)
        return x * torch.where(keep, scale, torch.zeros((), dtype=x.dtype, device=x.device))


class ChannelLayerNorm(nn.LayerNorm):
    """``ChannelLayerNorm(C)``, ConvNeXt's LayerNorm: each position's C values normalised on their own,
    per-channel affine (timm's ``LayerNorm2d``). Unlike ``ln`` (one group over C,H,W) it keeps no statistic
    shared across positions. On a channels-last tensor both permutes are free views; NCHW gets NCHW back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def make_norm(norm: str, channels: int, spatial: int, groups: int) -> nn.Module:
    """The normalisation layer for ``channels`` feature maps of side ``spatial``."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        if channels % groups:
            raise BudgetError(
                f"GroupNorm: {groups} groups do not divide {channels} channels; choose groups dividing every width"
            )
        return nn.GroupNorm(groups, channels)
    if norm == "ln":  # layer norm over (C,H,W) with per-channel affine, as used in CNNs
        return nn.GroupNorm(1, channels)
    if norm == "lnc":  # layer norm over C at each position, as in ConvNeXt and transformers
        return ChannelLayerNorm(channels)
    if norm == "lnchw":  # the seed's LayerNorm over (C,H,W) with a per-position affine
        return nn.LayerNorm([channels, spatial, spatial])
    raise BudgetError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def scale_width(channels: int, width: float, multiple: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``multiple`` (GroupNorm's group count)."""
    if width == 1.0:
        return channels
    return max(multiple, multiple * round(channels * width / multiple))


def staged_shape(cfg: ModelConfig, family: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(stem, stage widths, blocks per stage) of a three-stage family from the flat config fields:
    ``width`` scales the stem and every stage (to multiples of GroupNorm's group count)."""
    if cfg.norm == "lnchw":
        raise BudgetError(f"norm 'lnchw' (per-position LayerNorm) exists only for the seed presets; use ln for {family}")
    multiple = cfg.groups if cfg.norm == "gn" else 1
    widths = tuple(scale_width(w, cfg.width, multiple) for w in (cfg.width1, cfg.width2, cfg.width3))
    stem = scale_width(cfg.stem, cfg.width, multiple) if cfg.stem else widths[0]
    return stem, widths, tuple(n or cfg.blocks for n in (cfg.blocks1, cfg.blocks2, cfg.blocks3))
