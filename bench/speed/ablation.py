"""``bench speed --ablate``: each optimisation (a knob) alone against the seed's fp32 eager NCHW step
on the harness's batched data, and the seeds' test loop for evaluation.

``TRAIN_KNOBS`` and ``EVAL_KNOBS`` name the knobs ``--knob`` accepts and the change each makes to
the reference ``StepSetup`` / ``EvalSetup``; ``train_ablation`` and ``eval_ablation`` build one
runner per chosen knob, reference first. ``benchmark.run_ablation`` times them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..data import CIFAR10, Split, eval_batches
from ..runtime import Runtime
from ..train import step_model
from .harness import bench_config, bench_model, epoch_runner
from .measure import Runner
from .seed import seed_model, seed_sgd

if TYPE_CHECKING:
    from .options import SpeedOptions


@dataclass(frozen=True)
class StepSetup:
    """How a training step runs. The defaults are the seed notebook's fp32 eager NCHW step."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    sgd: str = "for-loop"
    packed_dropout: bool = False
    batch_size: int | None = None  # None: --batch-size
    compile: bool = False
    threads: int | None = None  # None: the benchmark's thread count


@dataclass(frozen=True)
class EvalSetup:
    """How an evaluation pass runs. The defaults are the seeds' test loop on the harness's data."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    batch_size: int = 128
    inference_mode: bool = False


# knob name -> (label, change to the reference setup, what it does to the numbers)
TRAIN_KNOBS = {
    "bf16": ("bf16 autocast", {"dtype": torch.bfloat16}, "bf16 matmuls/convs, fp32 weights"),
    "channels_last": ("channels-last", {"channels_last": True}, "same math, other layout"),
    "foreach": ("foreach SGD", {"sgd": "foreach"}, "same math"),
    "fused": ("fused SGD", {"sgd": "fused"}, "same math"),
    "dropout": ("packed-bytes Dropout", {"packed_dropout": True}, "other random stream, p to 1/256"),
    "batch256": ("batch 256", {"batch_size": 256}, "fewer steps: retune lr"),
    "batch512": ("batch 512", {"batch_size": 512}, "fewer steps: retune lr"),
    "compile": ("torch.compile", {"compile": True}, "same math, fused kernels"),
    "threads": ("threads", {}, "same math"),  # the thread count is filled in at run time
}


EVAL_KNOBS = {
    "inference_mode": ("inference_mode", {"inference_mode": True}, "same"),
    "eval_batch256": ("eval batch 256", {"batch_size": 256}, "same"),
    "eval_batch1000": ("eval batch 1000", {"batch_size": 1000}, "same"),
    "bf16": ("bf16 autocast", {"dtype": torch.bfloat16}, "bf16 logits: rare argmax ties"),
    "channels_last": ("channels-last", {"channels_last": True}, "same"),
}


def other_thread_count(threads: int) -> int | None:
    """The thread count the ``threads`` knob compares against: 1 when using more, else all cores."""
    other = 1 if threads > 1 else len(os.sched_getaffinity(0))
    return None if other == threads else other


def setup_train_runner(setup: StepSetup, opts: SpeedOptions, data: CIFAR10, device: torch.device) -> Runner:
    cfg = dataclasses.replace(bench_config(opts), batch_size=setup.batch_size or opts.batch_size, compile=setup.compile)
    rt = Runtime(device, setup.dtype, torch.channels_last if setup.channels_last else torch.contiguous_format)
    build = bench_model if setup.packed_dropout else seed_model
    model = build(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format)
    optimizer = seed_sgd(model, cfg, setup.sgd)
    return epoch_runner(step_model(model, cfg, rt), optimizer, cfg, rt, data.train, setup.threads)


def setup_eval_runner(setup: EvalSetup, opts: SpeedOptions, split: Split, device: torch.device) -> Runner:
    rt = Runtime(device, setup.dtype, torch.channels_last if setup.channels_last else torch.contiguous_format)
    model = seed_model(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format).eval()
    grad_mode = torch.inference_mode if setup.inference_mode else torch.no_grad

    def run(images: int) -> int:
        with grad_mode(), rt.autocast:
            for x, y in eval_batches(split.take(images), setup.batch_size, device, memory_format=rt.memory_format):
                (model(x).argmax(1) == y).sum().item()
        return images

    return run


def wanted(knob: str, opts: SpeedOptions) -> bool:
    return not opts.knobs or knob in opts.knobs


def train_ablation(opts: SpeedOptions, data: CIFAR10, device: torch.device, threads: int) -> dict[str, tuple]:
    """name -> (label, numerics, runner); the first entry is the reference."""
    variants = {"reference": ("seed step: fp32 eager NCHW, F.dropout, for-loop SGD", "", StepSetup())}
    for knob, (label, change, numerics) in TRAIN_KNOBS.items():
        if knob == "threads":
            other = other_thread_count(threads)
            if other is None:
                continue
            label, change = f"{other} thread{'s' * (other > 1)} (not {threads})", {"threads": other}
        if wanted(knob, opts):
            variants[knob] = (label, numerics, StepSetup(**change))
    return {name: (label, numerics, setup_train_runner(setup, opts, data, device)) for name, (label, numerics, setup) in variants.items()}


def eval_ablation(opts: SpeedOptions, split: Split, device: torch.device) -> dict[str, tuple]:
    variants = {"reference": ("seed test loop: fp32 NCHW, no_grad, batch 128", "", EvalSetup())}
    for knob, (label, change, numerics) in EVAL_KNOBS.items():
        if wanted(knob, opts):
            variants[knob] = (label, numerics, EvalSetup(**change))
    return {name: (label, numerics, setup_eval_runner(setup, opts, split, device)) for name, (label, numerics, setup) in variants.items()}
