"""The model as bench logs it to MLflow: raw images in, class logits out.

Training and evaluation feed the network normalised float batches (``data.normalize``). A user who
loads ``models:/cifar10-bn@champion`` should not need bench's MEAN/STD, so the logged model is the
network wrapped in ``RawImageModel``, which normalises inside, and its MLflow metadata names the
classes and the input format.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import CLASSES, MEAN, STD

INPUT_FORMAT = "RGB images, NCHW [N, 3, 32, 32]: uint8 in 0..255 (or float in [0, 1]); normalised inside the model"
OUTPUT_FORMAT = "logits [N, 10], in the order of metadata['classes']"


class RawImageModel(nn.Module):
    """``net`` behind its input normalisation: uint8 (0..255) or float ([0, 1]) RGB NCHW in, logits out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return self.net((x - self.mean) / self.std)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a logged ``RawImageModel`` (it takes normalised batches, as bench's own
    evaluation feeds it); a model logged before the wrapper existed is returned as it is."""
    # By name: MLflow may import the logged copy of this module, whose class is another object.
    return model.net if type(model).__name__ == "RawImageModel" else model


def input_example() -> np.ndarray:
    """One mid-grey uint8 image, NCHW: what the logged model's signature and example show."""
    return np.full((1, 3, 32, 32), 128, dtype=np.uint8)


def metadata() -> dict:
    """MLflow model metadata (``Model.metadata``): class names and the input and output format."""
    return {"classes": list(CLASSES), "input": INPUT_FORMAT, "output": OUTPUT_FORMAT,
            "normalisation": {"mean": list(MEAN), "std": list(STD)}}
