"""The measuring core of ``bench speed``: the runner contract, interleaved timing and its spread,
the machine's matmul peak, FLOPs per image and the op profile.

A runner is ``run(images) -> images done``: it trains or evaluates on that many images. Everything
here times runners or models without knowing which pipeline they belong to.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

Runner = Callable[[int], int]  # run(images) trains or evaluates on that many images, returns the count


def interleaved(runners: dict[str, Runner], images: int, repeats: int) -> dict[str, list[float]]:
    """images/s of each runner per repeat, running them in turn (A B A B ...)."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            done = run(images)
            rates[name].append(done / (time.perf_counter() - start))
    return rates


def spread(rates: list[float]) -> dict[str, float | list[float]]:
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def warm_up(runners: dict[str, Runner], images: int) -> None:
    for run in runners.values():
        run(images)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n`` x ``n`` ``torch.mm``: the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def flops_per_image(model: nn.Module, batch_size: int, train: bool) -> float:
    """FLOPs (2 per multiply-add) per image of one forward (+ backward when ``train``) pass, in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, 3, 32, 32)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def profile_runner(run: Runner, images: int, top: int = 12) -> list[dict[str, float | str]]:
    """The ops taking the most self CPU time while ``run`` trains on ``images`` images."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(images)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked]


