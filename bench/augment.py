"""Training-time augmentation of whole batches, one idea per function.

Per image, vectorised over the batch (uint8 or normalised tensors, any device): ``crop_and_flip``,
``cutout``, ``random_erasing``. Per batch, mixing images and their labels: ``batch_mixer`` (MixUp and
CutMix from torchvision.transforms.v2, which return soft targets that sum to one).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# torchvision's RandomErasing defaults: the box covers 2%-33% of the image, aspect ratio 0.3-3.3.
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)


def crop_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, as one gather over the batch."""
    b, c, h, w = images.shape
    if padding:
        images = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    rows = dy + torch.arange(h)
    cols = dx + torch.arange(w)
    if flip:
        flipped = torch.rand(b, 1, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    rows, cols = rows.to(images.device), cols.to(images.device)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    chan = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return images[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def box_mask(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B,1,h,w] boolean mask, true inside each image's box (per-image corners and sides, shape [B])."""
    ys = torch.arange(h, device=top.device).view(1, h, 1)
    xs = torch.arange(w, device=top.device).view(1, 1, w)
    top, left, height, width = (t.view(-1, 1, 1) for t in (top, left, height, width))
    inside = (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)
    return inside.unsqueeze(1)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square (clipped at the border) at a random centre of each image."""
    b, _, h, w = images.shape
    top = torch.randint(0, h, (b,), generator=generator) - size // 2
    left = torch.randint(0, w, (b,), generator=generator) - size // 2
    side = torch.full((b,), size)
    return images * ~box_mask(top, left, side, side, h, w).to(images.device)


def random_erasing(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) with torchvision's box distribution, vectorised: each image,
    with probability ``p``, has one box of random area and aspect ratio set to zero (the mean colour
    once normalised). torchvision redraws a box that does not fit; here its sides are clipped to the image."""
    b, _, h, w = images.shape
    area = h * w * torch.empty(b).uniform_(*ERASING_SCALE, generator=generator)
    ratio = torch.empty(b).uniform_(math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1]), generator=generator).exp()
    height = (area * ratio).sqrt().round().clamp(1, h).long()
    width = (area / ratio).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, generator=generator) * (h - height + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - width + 1)).long()
    erased = torch.rand(b, generator=generator) < p
    mask = box_mask(top, left, height, width, h, w) & erased.view(b, 1, 1, 1)
    return images.masked_fill(mask.to(images.device), 0)


def batch_mixer(mixup: float, cutmix: float, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) -> (images, targets). ``mixup`` / ``cutmix``: the Beta(alpha, alpha) of each,
    0 = off; with both on, each batch uses one of the two at random (as timm does). With neither, the
    targets are the class indices unchanged; otherwise they are soft, [B, num_classes], each row summing to one.
    Both draw from torch's global generator, which ``fit`` seeds."""
    from torchvision.transforms import v2  # here: importing torchvision costs every command ~1.6 s

    mixers = [cls(alpha=alpha, num_classes=num_classes) for alpha, cls in ((mixup, v2.MixUp), (cutmix, v2.CutMix)) if alpha]
    if not mixers:
        return lambda images, labels: (images, labels)
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def shown_labels(targets: torch.Tensor) -> torch.Tensor:
    """The class each training image mostly shows: its label, or under MixUp / CutMix the class with
    the largest share of its soft target. Training accuracy is counted against these: against the
    unmixed labels it halves under MixUp with a small alpha (half the batches are mostly the neighbour)."""
    return targets.argmax(1) if targets.ndim == 2 else targets
