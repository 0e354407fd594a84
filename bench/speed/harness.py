"""The harness's own pipeline as ``bench speed`` times it: ``train_one_epoch`` and ``predict()``
with the default ``TrainConfig`` and ``resolve_runtime``, wrapped as runners (see ``measure``)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..data import CIFAR10, Split
from ..models import create_model
from ..runtime import Runtime, resolve_runtime
from ..train import create_optimizer, create_scheduler, predict, train_one_epoch
from .measure import Runner

if TYPE_CHECKING:
    from .options import SpeedOptions


def bench_model(preset: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(preset=preset, norm=norm)


def bench_config(opts: SpeedOptions) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), batch_size=opts.batch_size, seed=opts.seed)


def constant_schedule(optimizer):
    # A benchmark has no epoch budget to anneal over; any scheduler's step() costs the same.
    return create_scheduler(optimizer, dataclasses.replace(TrainConfig(), schedule="constant"), 0)


@contextlib.contextmanager
def thread_count(threads: int | None):
    """Run with ``threads`` CPU threads (None: leave as is), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epoch_runner(model, optimizer, cfg: TrainConfig, rt: Runtime, split: Split, threads: int | None = None) -> Runner:
    """``train_one_epoch`` itself, on the first ``images`` images of ``split``."""
    scheduler = constant_schedule(optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)

    def run(images: int) -> int:
        with thread_count(threads):
            train_one_epoch(model, split.take(images), optimizer, scheduler, cfg, rt, generator)
        return images

    return run


def bench_train_runner(opts: SpeedOptions, data: CIFAR10, device: torch.device) -> tuple[Runner, Runtime, nn.Module]:
    cfg = bench_config(opts)
    rt = resolve_runtime(cfg, opts.norm, device, opts.model_preset)
    model = bench_model(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format)
    return epoch_runner(model, create_optimizer(model, cfg), cfg, rt, data.train), rt, model


def bench_eval_runner(model: nn.Module, split: Split, rt: Runtime) -> Runner:
    batch_size = TrainConfig().eval_batch_size

    def run(images: int) -> int:
        return len(predict(model, split.take(images), rt, batch_size))

    return run


def describe(rt: Runtime) -> str:
    precision = "fp32" if rt.dtype == torch.float32 else f"{str(rt.dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"
    layout = "channels-last" if rt.memory_format == torch.channels_last else "NCHW"
    return f"{precision} {layout}"
