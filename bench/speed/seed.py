"""The seed notebooks' pipeline, rebuilt as ``bench speed``'s baseline.

A ``Dataset`` that turns each uint8 image into a PIL image and applies torchvision's per-image
transforms, a ``DataLoader`` with worker processes, the seed model with ``nn.Dropout``, eager fp32
NCHW, plain SGD with Nesterov momentum; their training loop, epoch and test pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from ..data import MEAN, STD, Split
from ..models import Dropout
from .harness import bench_model, constant_schedule
from .measure import Runner


class SeedStyleCIFAR10(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: an HWC uint8 array to a PIL image, then the transform."""

    def __init__(self, split: Split, transform):
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


SEED_CROP_PADDING = 4  # the seed notebooks' RandomCrop(32, padding=4)


def seed_transform(train: bool):
    from torchvision import transforms as T

    augment = [T.RandomCrop(32, padding=SEED_CROP_PADDING), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*augment, T.ToTensor(), T.Normalize(MEAN, STD)])


def seed_loader(split: Split, batch_size: int, workers: int, train: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        SeedStyleCIFAR10(split, seed_transform(train)), batch_size=batch_size, shuffle=train,
        num_workers=workers, generator=torch.Generator().manual_seed(seed),
    )


def seed_model(preset: str, norm: str, seed: int = 0) -> nn.Module:
    """The seed notebook's model: the harness's topology, same weights, with torch's own ``nn.Dropout``."""
    model = bench_model(preset, norm, seed)
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return model


def seed_sgd(model: nn.Module, cfg: TrainConfig, implementation: str = "for-loop") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over all parameters, as the seeds built it; ``implementation``
    picks torch's per-tensor loop (the CPU default), ``foreach`` or ``fused`` kernels."""
    kernels = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, **kernels,
    )


def endless(loader):
    while True:
        yield from loader  # a new epoch restarts the workers, as in the seeds' epoch loop


def seed_train_runner(model: nn.Module, optimizer, loader, device: torch.device) -> Runner:
    """The seed notebooks' training loop, including their per-batch accuracy ``.item()``."""
    scheduler = constant_schedule(optimizer)
    batches = endless(loader)  # one iterator across repeats: steady state, no worker start-up per repeat

    def run(images: int) -> int:
        model.train()
        seen = correct = 0
        while seen < images:
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        return seen

    return run


def seed_eval_runner(model: nn.Module, split: Split, batch_size: int, workers: int, device: torch.device) -> Runner:
    """The seeds' test pass: a fresh DataLoader iteration per pass, ``no_grad``, fp32."""
    loader = seed_loader(split, batch_size, workers, train=False)

    def run(images: int) -> int:
        return seed_test(model, loader, device, images)[1]

    return run


def seed_test(model: nn.Module, loader, device: torch.device, images: int | None = None) -> tuple[int, int]:
    """The seeds' test loop (``no_grad``, per-batch ``.item()``): (correct, seen) over up to ``images``."""
    model.eval()
    seen = correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            seen += len(y)
            if images is not None and seen >= images:
                break
    return correct, seen


def seed_epoch(model: nn.Module, loader, optimizer, scheduler, device: torch.device) -> None:
    """One epoch of the seed notebooks' training loop."""
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()


def seed_test_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    correct, seen = seed_test(model, loader, device)
    return correct / seen
