"""One training run end to end: data, budget-checked model, ``fit`` with a progress bar, MLflow record.

Used by ``bench train`` directly and by tuning and confirmation for each of their runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from . import faults, interrupt, teacher, tracking
from .checkpoint import EpochCheckpoint
from .config import Experiment
from .console import epoch_progress, table
from .data import CIFAR10, load_cifar10
from .models import build_checked, count_params
from .runtime import Runtime, pick_device, resolve_runtime, setup_threads
from .train import Result, fit


def load_data(exp: Experiment, data_dir: str | None = None, download: bool = False) -> CIFAR10:
    # The split seed is fixed (not the training seed) so every run validates on the same images.
    return load_cifar10(data_dir, val_size=exp.train.val_size, seed=0, download=download)


def build_model(exp: Experiment) -> torch.nn.Module:
    torch.manual_seed(exp.train.seed)
    return build_checked(exp.budget.max_params, **dataclasses.asdict(exp.model))


def train_tracked(
    exp: Experiment,
    data: CIFAR10,
    rt: Runtime,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
    console: Console | None = None,
    label: str = "",
    track: bool = True,
    registered_name: str | None = None,
    checkpoint: EpochCheckpoint | None = None,
    resumed_epochs: int = 0,
) -> tuple[torch.nn.Module, Result]:
    """Train ``exp`` inside the active MLflow run (if ``track``), logging params, per-epoch metrics,
    the final test metrics and the model. ``on_epoch`` runs after each epoch's metrics are logged.
    ``checkpoint``: see ``fit``; a run resumed after ``resumed_epochs`` has its params logged already."""
    model = build_model(exp)
    n_params = count_params(model)
    if track and not resumed_epochs:
        tracking.log_params({**exp.hyperparameters(), "max_params": exp.budget.max_params}, metrics={"n_params": n_params},
                            tags={tracking.TAG_NORM: exp.model.norm, "bench.preset": exp.model.preset, "bench.runtime": rt.describe(),
                                  tracking.TAG_HARDWARE: rt.hardware()})
        tracking.log_dataset(data)

    def after_epoch(epoch: int, record: dict[str, float]) -> None:
        if track:
            tracking.log_metrics(record, step=epoch)
        show_epoch(epoch, record)
        if on_epoch:
            on_epoch(epoch, record)

    if exp.train.distill:
        data = with_teachers(exp, data, rt, console or Console(), track)
    images = min(len(data.train), exp.train.train_subset or len(data.train))
    with epoch_progress(console, exp.train.epochs, images, label, first_epoch=resumed_epochs + 1) as (on_step, show_epoch):
        result = fit(model, data, exp.train, rt, on_epoch=after_epoch, on_step=on_step, checkpoint=checkpoint)
    if track:
        tracking.log_metrics({
            "test_loss": result.test_loss, "test_acc": result.test_acc, "best_val_acc": result.best_val_acc,
            "final_val_acc": result.history[-1]["val_acc"], "total_seconds": result.seconds,
            "mean_epoch_seconds": result.mean_epoch_seconds,
            **result.recipe_ablation,
        })
        tracking.log_predictions(result.test_predictions, data.test)  # the pass that gave test_acc
        tracking.log_model(model, registered_name)
    return model, result


def with_teachers(exp: Experiment, data: CIFAR10, rt: Runtime, console: Console, track: bool) -> CIFAR10:
    """``data`` whose training split carries the teachers' soft labels (bench/teacher.py). A resumed run
    keeps the teachers it started with (its tag), though more runs of the study may have finished since."""
    import mlflow

    active = mlflow.active_run() if track else None
    started_with = active and mlflow.get_run(active.info.run_id).data.tags.get(teacher.TAG_TEACHERS)
    run_ids = started_with.split("+") if started_with else teacher.resolve(exp.train.teacher, data.digest)
    if track and not started_with:
        tracking.set_tags({teacher.TAG_TEACHERS: "+".join(run_ids)})
    console.print(f"distilling from {len(run_ids)} teacher run(s) of {exp.train.teacher!r} (weight {exp.train.distill:g}, "
                  f"temperature {exp.train.distill_temperature:g})")
    soft = teacher.soft_labels(run_ids, data.train, rt, exp.train.distill_temperature, say=console.print)
    agree = (soft.argmax(1) == data.train.labels).float().mean().item()
    console.print(f"the teachers' most likely class is the label of {agree:.1%} of the training images")
    return dataclasses.replace(data, train=dataclasses.replace(data.train, soft=soft))


def save_checkpoint(model: torch.nn.Module, exp: Experiment, path: str | Path) -> None:
    """State dict plus the experiment that built it: ``load_checkpoint`` rebuilds the model."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model": dataclasses.asdict(exp.model)}, path)


def load_checkpoint(path: str | Path) -> torch.nn.Module:
    from .models import create_model

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(**ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def result_table(exp: Experiment, result: Result, n_params: int) -> Table:
    last = result.history[-1]
    mean_speed = sum(r["images_per_s"] for r in result.history) / len(result.history)
    return table(
        f"{exp.name}: {exp.model.preset} norm={exp.model.norm}, {n_params:,} params, {exp.train.epochs} epochs",
        ("train acc", "val acc", "test acc", "wall time", "train img/s"),
        [(f"{last['train_acc']:.2%}", f"{last['val_acc']:.2%}", f"{result.test_acc:.2%}", f"{result.seconds / 60:.1f} min", f"{mean_speed:,.0f}")],
    )


def run_training(
    exp: Experiment,
    data_dir: str | None = None,
    download: bool = False,
    save: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    tracking_uri: str | None = "",
    console: Console | None = None,
) -> Result:
    """``bench train``: one run, logged to MLflow unless ``tracking_uri`` is None."""
    console = console or Console()
    setup_threads(threads)
    rt = resolve_runtime(exp.train, exp.model.norm, pick_device(device), exp.model.preset)
    build_model(exp)  # budget check before loading data
    track = tracking_uri is not None
    uri = tracking.setup(tracking_uri or None) if track else None
    if exp.train.teacher and not track:  # the teachers are read from the store even when this run is not logged
        tracking.setup(None)
    data = load_data(exp, data_dir, download)
    console.print(f"data {data.source} ({len(data.train):,} train / {len(data.val):,} val / {len(data.test):,} test); {rt.describe()}")
    lost = faults.tracking_lost(uri, "bench train keeps no checkpoint (bench confirm does)") if track else contextlib.nullcontext()
    with lost, interrupt.deferred(), tracking.run("train", f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}", "train") if track else contextlib.nullcontext() as active:
        model, result = train_tracked(exp, data, rt, console=console, track=track)
    console.print(result_table(exp, result, count_params(model)))
    if track:
        console.print(f"MLflow run {active.info.run_id} in experiment 'train' at {tracking.mask_url(uri)}")
    if save:
        save_checkpoint(model, exp, save)
        console.print(f"saved model to {save}")
    return result
