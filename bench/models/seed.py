"""The seed topology (both seed READMEs), as the presets ``seed_bn`` and ``seed_gn``.

Three stages of 3x3 convolutions, each conv followed by ReLU, then the norm, then dropout (the seeds
put ReLU before the norm); stages 1 and 2 end in a 1x1 "transition" conv and a 2x2 max-pool; global
average pool and a 1x1 conv classify. No conv has a bias. Padding is fixed by the topology: stage 1
(0, 0), stage 2 (1, 0, 1), stage 3 (1, 1, 1). ``width`` scales the 3x3 convs, not the transitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import NUM_CLASSES, Dropout, make_norm, scale_width
from .registry import register_model


@dataclass(frozen=True)
class SeedTopology:
    stages: tuple[tuple[int, ...], ...]  # conv widths per stage
    transitions: tuple[int, ...]  # 1x1 conv width after stages 1 and 2
    default_norm: str


PADDINGS = ((0, 0), (1, 0, 1), (1, 1, 1))

PRESETS = {
    # shared/seeds/000: BatchNorm CNN, 18,064 parameters
    "seed_bn": SeedTopology(stages=((16, 32), (16, 16, 16), (16, 16, 16)), transitions=(10, 10), default_norm="bn"),
    # shared/seeds/001: the "GroupNorm" CNN that uses LayerNorm over (C,H,W), 47,236 parameters
    "seed_gn": SeedTopology(stages=((4, 8), (10, 16, 16), (16, 16, 16)), transitions=(4, 10), default_norm="lnchw"),
}


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


def seed_net(name: str, cfg: ModelConfig) -> SeedNet:
    """The seed topology ``name`` from the config; the residual fields do not apply to it."""
    return SeedNet(PRESETS[name], cfg.norm, dropout=cfg.dropout, width=cfg.width, groups=cfg.groups)


@register_model(default_norm=PRESETS["seed_bn"].default_norm)
def seed_bn(cfg: ModelConfig) -> SeedNet:
    return seed_net("seed_bn", cfg)


@register_model(default_norm=PRESETS["seed_gn"].default_norm)
def seed_gn(cfg: ModelConfig) -> SeedNet:
    return seed_net("seed_gn", cfg)
