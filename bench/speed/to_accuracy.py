"""``bench speed --to-accuracy``: wall clock until test accuracy first reaches a target, the seed
pipeline against the harness's ``fit``, same recipe and epochs, a timed test pass after every epoch."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..config import TrainConfig
from ..data import CIFAR10
from ..runtime import default_device, resolve_runtime, setup_threads
from ..train import create_scheduler, evaluate, fit
from .harness import bench_model
from .seed import SEED_CROP_PADDING, seed_epoch, seed_loader, seed_model, seed_sgd, seed_test_accuracy


def baseline_curve(data: CIFAR10, cfg: TrainConfig, preset: str, norm: str, workers: int, device: torch.device) -> list[dict]:
    """Seed pipeline trained for ``cfg.epochs`` with the same recipe; test accuracy after every epoch."""
    model = seed_model(preset, norm, cfg.seed).to(device)
    optimizer = seed_sgd(model, cfg)
    train_loader = seed_loader(data.train, cfg.batch_size, workers, train=True, seed=cfg.seed)
    test_loader = seed_loader(data.test, 1000, workers, train=False)
    scheduler = create_scheduler(optimizer, cfg, cfg.epochs * len(train_loader))
    curve, start = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        seed_epoch(model, train_loader, optimizer, scheduler, device)
        curve.append({"epoch": epoch, "test_acc": seed_test_accuracy(model, test_loader, device), "seconds": time.perf_counter() - start})
    return curve


def bench_curve(data: CIFAR10, cfg: TrainConfig, preset: str, norm: str, device: torch.device) -> list[dict]:
    """The harness's ``fit`` with its defaults; test accuracy after every epoch (timed, like the baseline)."""
    rt = resolve_runtime(cfg, norm, device, preset)
    model = bench_model(preset, norm, cfg.seed)
    curve, start = [], time.perf_counter()

    def test_each_epoch(epoch: int, record: dict) -> None:
        curve.append({"epoch": epoch, "test_acc": evaluate(model, data.test, rt, cfg.eval_batch_size)[1],
                      "seconds": time.perf_counter() - start})

    fit(model, data, cfg, rt, on_epoch=test_each_epoch)
    return curve


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["test_acc"] >= target), None)


def time_to_accuracy(data: CIFAR10, cfg: TrainConfig, target: float = 0.70, preset: str = "seed_bn", norm: str = "bn",
                     workers: int = 2, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Wall clock until test accuracy first reaches ``target``, seed pipeline vs harness, same recipe and epochs.
    The clock includes each epoch's test pass, for both. Both crop as the seeds do, whatever the
    experiment's ``crop_padding``, so that only the pipeline differs."""
    cfg = dataclasses.replace(cfg, crop_padding=SEED_CROP_PADDING)
    device = default_device()
    setup_threads(None)
    progress(f"baseline, {cfg.epochs} epochs")
    baseline = baseline_curve(data, cfg, preset, norm, workers, device)
    progress(f"bench, {cfg.epochs} epochs")
    bench = bench_curve(data, cfg, preset, norm, device)
    result = {"target": target, "epochs": cfg.epochs, "recipe": dataclasses.asdict(cfg), "curves": {"baseline": baseline, "bench": bench}}
    for name, curve in (("baseline", baseline), ("bench", bench)):
        hit = first_reaching(curve, target)
        result[name] = {"epoch": hit and hit["epoch"], "seconds": hit and hit["seconds"], "final_test_acc": curve[-1]["test_acc"],
                        "total_seconds": curve[-1]["seconds"]}
    return result


def render_time_to_accuracy(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"time to {result['target']:.0%} test accuracy, {result['epochs']} epochs, same recipe")
    for col in ("pipeline", "reached at epoch", "wall clock", "final test acc", "total wall clock"):
        table.add_column(col, justify="right")
    for name in ("baseline", "bench"):
        r = result[name]
        reached = f"{r['seconds'] / 60:.1f} min" if r["seconds"] else "not reached"
        table.add_row(name, str(r["epoch"] or "-"), reached, f"{r['final_test_acc']:.2%}", f"{r['total_seconds'] / 60:.1f} min")
    console.print(table)
    if result["baseline"]["seconds"] and result["bench"]["seconds"]:
        console.print(f"bench reaches {result['target']:.0%} {result['baseline']['seconds'] / result['bench']['seconds']:.2f}x sooner")
