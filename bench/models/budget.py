"""Parameter counts (on the meta device: no memory, ~ms), the budget check and the layer summary."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import BudgetError
from .registry import create_model


def count_params(model: nn.Module) -> int:
    # Frozen weights (the whitening stem's) count against the budget too: the model needs them.
    return sum(p.numel() for p in model.parameters())


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
    from torchinfo.enums import Units

    text = str(summary(model, input_size=(1, 3, 32, 32), col_names=("output_size", "num_params"), depth=3, verbose=0, device="cpu"))
    # torchinfo 1.8 formats its unit enum by name on Python >= 3.11: "mult-adds (Units.MEGABYTES)" means "(M)".
    return text.replace(f"({Units.MEGABYTES})", "(M)").replace(f"({Units.GIGABYTES})", "(G)")
