"""The model registry, timm-style: each family file registers its builders with ``@register_model``,
and ``create_model(name, **kwargs)`` builds one by name.

A builder takes the flat ``ModelConfig`` (every model field, so an experiment file, ``--set`` and a
logged run's params all reach it the same way) and returns an ``nn.Module``. A new family is one file
under ``bench/models/`` imported by the package's ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from ..config import ModelConfig, expand_preset
from ..errors import BudgetError

Builder = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Builder
    default_norm: str  # the norm when create_model is given none
    help: str  # one phrase for ``--preset``'s help; empty: the name says it


_MODELS: dict[str, ModelEntry] = {}


def register_model(fn: Builder | None = None, *, name: str | None = None, default_norm: str = "bn", help: str = ""):
    """Register ``fn`` under ``name`` (default: the function's name); usable bare (``@register_model``)
    or with options (``@register_model(default_norm="lnchw")``)."""

    def add(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = ModelEntry(key, builder, default_norm, help)
        return builder

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(_MODELS)


def preset_help() -> str:
    """``--preset``'s help text: every registered model, with its phrase where it has one."""
    names = [f"{e.name} ({e.help})" if e.help else e.name for e in _MODELS.values()]
    return f"Model preset: {', '.join(names)}."


def get_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise BudgetError(f"unknown preset {name!r}; choose one of {', '.join(_MODELS)}")
    return _MODELS[name]


def create_model(preset: str = "seed_bn", norm: str | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``preset``; ``norm`` defaults to the model's own.

    ``kwargs`` are ``ModelConfig`` fields, so ``create_model(**dataclasses.asdict(model_config))``
    works for every model; a misspelt field is a TypeError. A named residual shape (``resnet_deep``)
    is expanded by ``config.expand_preset``, as in an experiment file: fields given beside it win.
    """
    values = expand_preset({"preset": preset, **kwargs})
    entry = get_entry(values["preset"])
    cfg = ModelConfig(**{**values, "norm": norm or entry.default_norm})
    return entry.build(cfg)
