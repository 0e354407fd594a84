"""Stems of the ConvNeXt family (``stem_kind``): what turns the 32x32 image into stage 1's input.

- ``conv``: 3x3 conv (stride 1, no bias) and norm, stage 1 at 32x32 (the default);
- ``patch``: ConvNeXt's patchify stem at CIFAR scale, a 2x2 conv with stride 2 and norm, so every
  stage runs at half the resolution (16, 8, 4) and about 4x cheaper;
- ``whiten``: airbench's first layer, a frozen 2x2 conv whose filters whiten the training images'
  2x2 patches (the 12 eigenvectors of their covariance scaled to unit variance, and their negatives),
  then GELU; stage 1 at 31x31. Its filters are fitted to the data (``whitening_layers``, then ``fit``) before
  the first step and are parameters that never train (they count against the budget all the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH = 2
WHITEN_IMAGES = 5000  # airbench fits its whitening on the first 5,000 training images
WHITEN_EPS = 5e-4  # keeps the near-zero-variance directions from being amplified without bound


class WhiteningStem(nn.Module):
    """GELU(conv(x)) with frozen whitening filters; ``fit`` sets them from normalised images."""

    dims = 3 * PATCH * PATCH
    out_channels = 2 * dims  # each direction and its negative: GELU then keeps both signs

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.out_channels, PATCH, bias=False)
        self.conv.weight.requires_grad_(False)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        # unfold orders a patch as (channel, row, column), the layout of a conv weight.
        patches = F.unfold(images.float(), PATCH).transpose(1, 2).reshape(-1, self.dims)
        covariance = patches.T @ patches / len(patches)
        variances, directions = torch.linalg.eigh(covariance)
        filters = (directions.T / (variances + WHITEN_EPS).sqrt()[:, None]).view(self.dims, 3, PATCH, PATCH)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv(x))


def make_stem(kind: str, width: int, norm_layer) -> tuple[nn.Module, int]:
    """(stem, its output channels). ``norm_layer(channels)`` builds the family's norm."""
    if kind == "whiten":
        return WhiteningStem(), WhiteningStem.out_channels
    kernel, stride, padding = (PATCH, PATCH, 0) if kind == "patch" else (3, 1, 1)
    return nn.Sequential(nn.Conv2d(3, width, kernel, stride, padding, bias=False), norm_layer(width)), width


def whitening_layers(model: nn.Module) -> list[WhiteningStem]:
    """The layers of ``model`` to ``fit`` to the training images before the first step."""
    return [m for m in model.modules() if isinstance(m, WhiteningStem)]
