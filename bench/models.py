"""Small CIFAR-10 CNNs: presets that reproduce the seed models, and a residual family.

The seed topology (both seed READMEs) is three stages of 3x3 convolutions, each conv followed by
ReLU, then the norm, then dropout (the seeds put ReLU before the norm); stages 1 and 2 end in a 1x1
"transition" conv and a 2x2 max-pool; global average pool and a 1x1 conv classify. No conv has a
bias. Padding is fixed by the topology: stage 1 (0, 0), stage 2 (1, 0, 1), stage 3 (1, 1, 1).

The residual family (preset ``resnet``) is a post-activation CIFAR ResNet (He et al. 2016): a 3x3
stem conv-norm-ReLU, three stages of basic blocks (conv-norm-ReLU-conv-norm, plus the shortcut,
then ReLU), stride 2 at the start of stages 2 and 3 with a 1x1 conv-norm projection shortcut wherever
channels or resolution change, global average pooling, dropout and a linear classifier. Its shape
comes from the flat ``ModelConfig`` fields ``stem``, ``width1..3``, ``blocks`` (or per stage
``blocks1..3``) and ``dropout_at``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DROPOUT_AT, NORMS, RESNET_SHAPES, ModelConfig
from .errors import BudgetError


@dataclass(frozen=True)
class SeedTopology:
    stages: tuple[tuple[int, ...], ...]  # conv widths per stage
    transitions: tuple[int, ...]  # 1x1 conv width after stages 1 and 2
    default_norm: str


PADDINGS = ((0, 0), (1, 0, 1), (1, 1, 1))
NUM_CLASSES = 10

PRESETS = {
    # shared/seeds/000: BatchNorm CNN, 18,064 parameters
    "seed_bn": SeedTopology(stages=((16, 32), (16, 16, 16), (16, 16, 16)), transitions=(10, 10), default_norm="bn"),
    # shared/seeds/001: the "GroupNorm" CNN that uses LayerNorm over (C,H,W), 47,236 parameters
    "seed_gn": SeedTopology(stages=((4, 8), (10, 16, 16), (16, 16, 16)), transitions=(4, 10), default_norm="lnchw"),
}
# resnet: shape from the ModelConfig fields (defaults 16/32/40, one block per stage); the named shapes fix theirs
RESIDUAL_PRESETS = ("resnet", *RESNET_SHAPES)
ALL_PRESETS = (*PRESETS, *RESIDUAL_PRESETS)


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
    if norm == "lnchw":  # the seed's LayerNorm over (C,H,W) with a per-position affine
        return nn.LayerNorm([channels, spatial, spatial])
    raise BudgetError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def scale_width(channels: int, width: float, multiple: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``multiple`` (GroupNorm's group count)."""
    if width == 1.0:
        return channels
    return max(multiple, multiple * round(channels * width / multiple))


class SeedNet(nn.Module):
    def __init__(self, topology: SeedTopology, norm: str, dropout: float = 0.05, width: float = 1.0, groups: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, side = 3, 32
        for stage, (widths, pads) in enumerate(zip(topology.stages, PADDINGS)):
            for out_ch, pad in zip(widths, pads):
                out_ch = scale_width(out_ch, width, groups if norm == "gn" else 1)
                side = side + 2 * pad - 2
                layers += [
                    nn.Conv2d(in_ch, out_ch, 3, padding=pad, bias=False),
                    nn.ReLU(),
                    make_norm(norm, out_ch, side, groups),
                    Dropout(dropout),
                ]
                in_ch = out_ch
            if stage < len(topology.transitions):
                out_ch = topology.transitions[stage]
                layers += [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.MaxPool2d(2)]
                in_ch, side = out_ch, side // 2
        layers += [nn.AvgPool2d(side), nn.Conv2d(in_ch, NUM_CLASSES, 1, bias=False)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)


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
                 dropout: float = 0.0, dropout_at: str = "head"):
        super().__init__()
        block_dropout = dropout if dropout_at == "blocks" else 0.0
        self.stem = nn.Sequential(*conv_norm(3, stem, 3, 1, norm, groups), nn.ReLU())
        self.stages = nn.Sequential(*(
            make_stage(in_ch, out_ch, n_blocks, 1 if i == 0 else 2, norm, groups, block_dropout)
            for i, (in_ch, out_ch, n_blocks) in enumerate(zip((stem, *widths), widths, blocks))
        ))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = Dropout(dropout if dropout_at == "head" else 0.0)
        self.classifier = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.stages(self.stem(x))).flatten(1)))


def create_resnet(cfg: ModelConfig) -> ResNet:
    """The ``resnet`` preset from the flat config fields; ``width`` scales the stem and every stage."""
    if cfg.norm == "lnchw":
        raise BudgetError("norm 'lnchw' (per-position LayerNorm) exists only for the seed presets; use ln for residual models")
    if cfg.dropout_at not in DROPOUT_AT:
        raise BudgetError(f"dropout_at {cfg.dropout_at!r} is not one of {', '.join(DROPOUT_AT)}")
    multiple = cfg.groups if cfg.norm == "gn" else 1
    widths = tuple(scale_width(w, cfg.width, multiple) for w in (cfg.width1, cfg.width2, cfg.width3))
    stem = scale_width(cfg.stem, cfg.width, multiple) if cfg.stem else widths[0]
    blocks = tuple(n or cfg.blocks for n in (cfg.blocks1, cfg.blocks2, cfg.blocks3))
    return ResNet(stem, widths, blocks, cfg.norm, cfg.groups, cfg.dropout, cfg.dropout_at)


def create_model(
    preset: str = "seed_bn", norm: str | None = None, dropout: float = 0.05, width: float = 1.0, groups: int = 4, **arch
) -> nn.Module:
    """Build a model from a named preset; ``norm`` defaults to the preset's own (``bn`` for resnet).

    ``arch`` takes the residual fields of ``ModelConfig`` (stem, width1..3, blocks, blocks1..3, dropout_at), so
    ``create_model(**dataclasses.asdict(model_config))`` works for every preset; seed presets ignore them and
    the named residual shapes (``resnet_deep``, ``resnet_wide``) replace the shape fields with their own.
    """
    if preset in RESNET_SHAPES:
        preset, arch = "resnet", {**arch, **RESNET_SHAPES[preset]}
    cfg = ModelConfig(preset=preset, dropout=dropout, width=width, groups=groups, **arch)  # unknown field: TypeError
    if preset in RESIDUAL_PRESETS:
        cfg.norm = norm or "bn"
        return create_resnet(cfg)
    if preset not in PRESETS:
        raise BudgetError(f"unknown preset {preset!r}; choose one of {', '.join(ALL_PRESETS)}")
    topology = PRESETS[preset]
    return SeedNet(topology, norm or topology.default_norm, dropout=dropout, width=width, groups=groups)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_params_fast(**model_kwargs) -> int:
    """Parameter count of ``create_model(**model_kwargs)`` built on the meta device: no memory, ~ms."""
    with torch.device("meta"):
        return count_params(create_model(**model_kwargs))


def check_budget(n_params: int, max_params: int) -> None:
    if n_params > max_params:
        raise BudgetError(
            f"model has {n_params:,} parameters, over the budget of {max_params:,}; "
            "lower width (resnet: width1..3 or blocks/blocks1..3) or change the preset"
        )


def build_checked(max_params: int, **model_kwargs) -> nn.Module:
    """``create_model`` after a meta-device budget check, so an over-budget model costs nothing."""
    check_budget(count_params_fast(**model_kwargs), max_params)
    return create_model(**model_kwargs)


def max_width(max_params: int, **model_kwargs) -> float:
    """The largest width multiplier (to 0.01) that keeps the model within ``max_params``."""
    lo, hi = 0.01, 8.0
    for _ in range(20):
        mid = math.sqrt(lo * hi)
        if count_params_fast(**{**model_kwargs, "width": mid}) <= max_params:
            lo = mid
        else:
            hi = mid
    return math.floor(lo * 100) / 100


def make_summary(model: nn.Module) -> str:
    """Per-layer table (layer, output shape, parameters) for one CIFAR-10 image, as torchinfo prints it."""
    from torchinfo import summary

    return str(summary(model, input_size=(1, 3, 32, 32), col_names=("output_size", "num_params"), depth=3, verbose=0, device="cpu"))
