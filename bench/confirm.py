"""Re-training a study's best configuration: several seeds (``bench confirm``) or several batch sizes
(``bench report --batch-sizes``), so the report can put a spread on every number.

Each run is nested under the study parent run that holds the best trial (``mlflow.parentRunId``),
so the MLflow UI shows it beside the trials, and carries ``bench.source_run_id`` (the trial run),
``bench.study_run_id`` and ``bench.recipe`` (epochs and overrides). Re-running skips the seeds or
batch sizes already finished with the same recipe, so an interrupted confirmation resumes; a seed
cut off mid-run continues in its own MLflow run from its last epoch (``bench.checkpoint``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from . import faults, interrupt, records, settings, tracking, workers
from .checkpoint import EpochCheckpoint, checkpoint_dir, run_config, sweep_leftovers
from .config import SPEED_ONLY, Experiment, RuntimeOptions, find_experiment, hyperparameter_types, load, norm_experiment, override
from .errors import ConfigError, DivergedError, TrackingError
from .records import StudyRecord
from .run import load_data, train_tracked
from .runtime import pick_device, resolve_runtime, setup_threads

KEPT = "finished seeds are kept and an unfinished one continues from its last epoch"


@dataclass
class ConfirmOptions(RuntimeOptions):
    seeds: int = 5
    seed_list: tuple[int, ...] = ()  # exactly these seeds instead of 0..seeds-1 (one confirmation split across cores or machines)
    epochs: int | None = None  # None: the experiment file's train.epochs
    study: str | None = None  # default: the norm's name
    trial: int | None = None  # re-train this trial number instead of the best
    overrides: dict[str, Any] = field(default_factory=dict)  # applied last, e.g. {"train_subset": 500} for a smoke run
    jobs: int = 1  # local worker processes, the seeds dealt out among them


def best_experiment(record: StudyRecord, epochs: int | None = None, overrides: dict[str, Any] | None = None) -> Experiment:
    """The experiment file the study was tuned from with the best trial's hyperparameters on top, on the full
    training set for ``epochs`` (default: the file's train.epochs, not the shorter tuning epochs).
    Speed-only settings follow the trial too (a trial from before ``compile`` existed ran eager):
    ``--set compile=true`` changes them without changing the recipe."""
    exp = load(study_experiment_file(record))
    logged = record.best.data.params
    values = {k: v for k, v in logged.items() if k in hyperparameter_types() and k not in ("epochs", "train_subset", "seed")}
    override(exp, **values, train_subset=0, epochs=epochs)
    if "max_params" in logged:
        exp.budget.max_params = int(logged["max_params"])
    return override(exp, **(overrides or {}))


def study_experiment_file(record: StudyRecord) -> Path:
    """The experiment file the study was tuned from (``bench.experiment`` on its parent runs), so that a
    field its trials did not log takes that file's value; the norm's own file for a study tuned before
    the tag existed, or when the study's file is not in experiments/ here."""
    fix = "run it from the folder holding the study's experiments/"
    tuned_from = next((p.data.tags[tracking.TAG_EXPERIMENT] for p in record.parents if tracking.TAG_EXPERIMENT in p.data.tags), None)
    if tuned_from:
        try:
            return find_experiment(tuned_from, fix=fix)
        except ConfigError:
            pass
    return find_experiment(norm_experiment(record.norm), fix=fix)


def recipe(exp: Experiment, overrides: dict[str, Any], logged: dict[str, str] | None = None) -> str:
    """``epochs=N``, the overrides that change what is learnt (a seed run with ``--set compile=true`` is
    the same recipe as one without), and each field the trial did not log (one bench gained after the
    study) that the experiment file sets away from its default: such a value reaches training from the
    file alone, so editing it between seeds must give a new recipe, never pooled with the old one."""
    defaults = Experiment().hyperparameters()
    from_file = {k: v for k, v in exp.hyperparameters().items()
                 if logged is not None and k not in logged and k not in overrides and v != defaults[k]}
    changes = {**from_file, **overrides}
    return records.recipe_text(exp.train.epochs, {k: v for k, v in changes.items() if k not in SPEED_ONLY})


def finished_runs(record: StudyRecord, kind: str, key_tag: str, recipe_text: str) -> dict[int, Any]:
    """Finished runs of ``kind`` with this recipe, by their key (seed or batch size)."""
    runs = records.derived_runs(record, kind)
    return {int(r.data.tags[key_tag]): r for r in runs if records.same_recipe(r, recipe_text) and key_tag in r.data.tags}


def finished_keys(record: StudyRecord, kind: str, key_tag: str, recipe_text: str) -> set[int]:
    return set(finished_runs(record, kind, key_tag, recipe_text))


class Trainer:
    """Loads data once per validation size and trains runs nested under a study's parent run."""

    def __init__(self, opts: ConfirmOptions, console: Console):
        self.opts, self.console = opts, console
        self._data: dict[int, Any] = {}

    def data(self, exp: Experiment):
        if exp.train.val_size not in self._data:
            self._data[exp.train.val_size] = load_data(exp, self.opts.data_dir, self.opts.download)
        return self._data[exp.train.val_size]

    def train(self, record: StudyRecord, exp: Experiment, kind: str, name: str, key: dict[str, Any]) -> str | None:
        """One run of ``kind`` identified by ``key`` (its seed or batch size and recipe tags); an
        unfinished one with a checkpoint here is resumed instead of started again, and one that another
        process finished or is training meanwhile is skipped (None)."""
        label = f"{record.norm} {name} "
        if reason := taken(record, kind, key):
            self.console.print(f"{label}skipped: {reason}")
            return None
        rt = resolve_runtime(exp.train, exp.model.norm, pick_device(self.opts.device), exp.model.preset)
        data = self.data(exp)
        tags = {
            records.TAG_STUDY_RUN: record.best_parent_id,
            records.TAG_SOURCE_RUN: record.best.info.run_id, tracking.TAG_STUDY: record.study,
            "bench.source_trial": records.trial_number(record.best), **key, **tracking.handover.stamp(),
        }
        config = run_config(exp.hyperparameters())
        unfinished, checkpoint, epochs_done = resumable_run(record, kind, key, config) or (None, None, 0)
        try:
            with tracking.run(record.study, name, kind, tags=tags, parent_run_id=record.best_parent_id or None,
                              run_id=unfinished.info.run_id if unfinished else None) as active:
                if unfinished:
                    tracking.mark_resumed(unfinished, epochs_done, rt.hardware())
                    tracking.handover.beat(active.info.run_id)  # a new run is stamped at its creation
                    self.console.print(f"{label}resuming run {active.info.run_id} after epoch {epochs_done}/{exp.train.epochs}")
                else:
                    if rival := tracking.handover.earlier_claim(active, runs_of(record, kind, key, finished=False)):
                        tracking.discard_active_run()
                        self.console.print(f"{label}skipped: {rival.data.tags[tracking.handover.TAG_WORKER]} "
                                           f"started it a moment earlier (run {rival.info.run_id})")
                        return None
                    checkpoint = EpochCheckpoint(checkpoint_dir() / f"{active.info.run_id}.pt", config)
                    checkpoint.lock()
                checkpoint.on_saved = lambda path: tracking.handover.share(active.info.run_id, path)
                _, result = train_tracked(exp, data, rt, console=self.console, label=label, checkpoint=checkpoint, resumed_epochs=epochs_done)
        except DivergedError:
            checkpoint.remove()  # resumed, it would diverge again, step for step
            tracking.handover.unshare(active)
            raise
        finally:
            if checkpoint is not None:
                checkpoint.unlock()
        checkpoint.remove()
        tracking.handover.unshare(active)
        self.console.print(f"{label}val acc {result.best_val_acc:.4f}  test acc {result.test_acc:.4f}  "
                           f"{result.seconds:.0f}s  run {active.info.run_id}")
        return active.info.run_id


def runs_of(record: StudyRecord, kind: str, key: dict[str, Any], finished: bool) -> list[Any]:
    """Finished (or unfinished) runs of ``kind`` with exactly the tags of ``key``, newest first."""
    def has(run, tag, value):
        return records.same_recipe(run, value) if tag == records.TAG_RECIPE else run.data.tags.get(tag) == str(value)
    return [run for run in records.derived_runs(record, kind, finished) if all(has(run, tag, value) for tag, value in key.items())]


def taken(record: StudyRecord, kind: str, key: dict[str, Any]) -> str | None:
    """Why a run of ``key`` is no longer this command's to train: another process finished it since the
    command listed its work, or is training it now: on this machine (its checkpoint lock is held) or
    on another one that shares the store (its heartbeat is recent)."""
    if done := runs_of(record, kind, key, finished=True):
        return f"finished meanwhile by another process (run {done[0].info.run_id})"
    for run in runs_of(record, kind, key, finished=False):
        if EpochCheckpoint(checkpoint_dir() / f"{run.info.run_id}.pt", {}).held():
            return f"another process on this machine is training it (run {run.info.run_id})"
        if elsewhere := tracking.handover.alive_elsewhere(run):
            return elsewhere
    return None


def resumable_run(record: StudyRecord, kind: str, key: dict[str, Any], config: dict[str, str]) -> tuple[Any, EpochCheckpoint, int] | None:
    """(run, its checkpoint, epochs done): the newest unfinished run of this key, held by no live process,
    whose checkpoint trained with ``config`` is in this machine's checkpoint folder or, left by a
    process on another machine, on the run in MLflow (then downloaded here); else None."""
    for run in runs_of(record, kind, key, finished=False):
        checkpoint = EpochCheckpoint(checkpoint_dir() / f"{run.info.run_id}.pt", config)
        if not checkpoint.lock():
            continue
        local = checkpoint.path.exists()
        if local or (not tracking.handover.alive_elsewhere(run) and tracking.handover.fetch(run, checkpoint.path)):
            if (state := checkpoint.load()) is not None:
                return run, checkpoint, state["epoch"]
        if local:
            checkpoint.unlock()
        else:
            checkpoint.remove()  # the lock file just made, and a downloaded checkpoint of other settings
    return None


def confirm(norm: str, opts: ConfirmOptions, console: Console | None = None) -> list[str]:
    """Re-train the best trial of ``norm``'s study (or ``opts.trial``) with seeds 0..seeds-1 (or
    ``opts.seed_list``), skipping seeds already finished with the same recipe; returns the new run
    ids. With ``opts.jobs`` > 1 the seeds are dealt out to that many ``bench confirm`` processes."""
    console = console or Console()
    settings.check()  # a bad BENCH_* setting fails here, before any work
    setup_threads(opts.threads)
    tracking.setup(opts.tracking_uri)
    record = records.load_study(norm, opts.study, opts.trial)
    exp = best_experiment(record, opts.epochs, opts.overrides)
    text = recipe(exp, opts.overrides, record.best.data.params)
    done = finished_keys(record, "confirm", records.TAG_SEED, text)
    todo = [s for s in (sorted(set(opts.seed_list)) or range(opts.seeds)) if s not in done]
    console.print(f"confirm {record.study}: trial {records.trial_number(record.best)} "
                  f"(val acc {records.metric(record.best, 'best_val_acc'):.4f}), {text}; "
                  f"seeds done {sorted(done) or 'none'}, to run {todo or 'none'}")
    if opts.jobs > 1 and len(todo) > 1:
        return confirm_in_workers(norm, record, todo, text, opts, console)
    sweep_leftovers(checkpoint_dir())
    trainer = Trainer(opts, console)
    with interrupt.deferred():  # SIGTERM too ends the seed's run as KILLED instead of leaving it RUNNING
        ids = [trainer.train(record, override(copy.deepcopy(exp), seed=seed), "confirm", f"confirm-seed-{seed}",
                             {records.TAG_SEED: seed, records.TAG_RECIPE: text}) for seed in todo]
    return [run_id for run_id in ids if run_id]


def worker_command(norm: str, opts: ConfirmOptions, seeds: list[int], threads: int) -> list[str]:
    """``bench confirm`` for exactly ``seeds`` of this confirmation, single process."""
    args = [sys.executable, "-m", "bench.cli", "confirm", "--norm", norm, "--jobs", "1", "--threads", str(threads)]
    # The tracking URI goes through the environment (confirm_in_workers): a password in it would show in `ps`.
    for flag, value in (("--study", opts.study), ("--trial", opts.trial), ("--epochs", opts.epochs), ("--data-dir", opts.data_dir),
                        ("--device", opts.device)):
        if value is not None:
            args += [flag, str(value)]
    args += [arg for key, value in opts.overrides.items() for arg in ("--set", f"{key}={value}")]
    args += ["--download"] if opts.download else []
    return args + [arg for seed in seeds for arg in ("--seed", str(seed))]


def confirm_in_workers(norm: str, record: StudyRecord, todo: list[int], text: str, opts: ConfirmOptions, console: Console) -> list[str]:
    jobs = min(opts.jobs, len(todo))
    threads = workers.threads_per_worker(jobs, opts.threads)
    shares = [todo[i::jobs] for i in range(jobs)]
    console.print(f"starting {jobs} workers x {threads} thread(s): seeds {' / '.join(map(str, shares))}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.resolve_uri(opts.tracking_uri)}
    codes, interrupted = workers.run_all([worker_command(norm, opts, share, threads) for share in shares], [env] * jobs)
    if interrupted:
        raise KeyboardInterrupt
    if any(codes):
        raise TrackingError(f"{sum(bool(c) for c in codes)} of {jobs} confirm workers failed (exit codes {codes}); "
                            f"{KEPT}; re-run the same command")
    finished = finished_runs(record, "confirm", records.TAG_SEED, text)
    return [finished[seed].info.run_id for seed in todo if seed in finished]


def train_batch_sizes(norm: str, batch_sizes: list[int], opts: ConfirmOptions, console: Console | None = None) -> list[str]:
    """Re-train the best trial of ``norm`` (or ``opts.trial``) at each batch size (seed 0), learning rate scaled linearly."""
    console = console or Console()
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-sizes: expected positive integers, got {batch_sizes}")
    setup_threads(opts.threads)
    tracking.setup(opts.tracking_uri)
    record = records.load_study(norm, opts.study, opts.trial)
    exp = best_experiment(record, opts.epochs, {**opts.overrides, "seed": 0})
    text = recipe(exp, opts.overrides, record.best.data.params)
    done = finished_keys(record, "batch_size", records.TAG_BATCH_SIZE, text)
    todo = [b for b in batch_sizes if b not in done]
    base_bs, base_lr = exp.train.batch_size, exp.train.lr
    console.print(f"batch sizes {record.study}: best configuration's batch {base_bs} at lr {base_lr:.4g}, {text}; "
                  f"done {sorted(done) or 'none'}, to run {todo or 'none'}")
    trainer = Trainer(opts, console)
    ids = []
    for bs in todo:
        scaled = override(copy.deepcopy(exp), batch_size=bs, lr=base_lr * bs / base_bs)
        ids.append(trainer.train(record, scaled, "batch_size", f"batch-size-{bs}",
                                 {records.TAG_BATCH_SIZE: bs, records.TAG_RECIPE: text, "bench.lr_scale": f"{bs}/{base_bs}"}))
    return [run_id for run_id in ids if run_id]


def norms_to_run(norm: str, study: str | None, trial: int | None = None) -> list[str]:
    """``all`` = every norm with a default-named study in MLflow (call after tracking.setup)."""
    if norm != "all":
        return [norm]
    if study or trial is not None:
        raise ConfigError(f"{'--study' if study else '--trial'} names one study's run; use it with a single --norm")
    found = records.studied_norms()
    if not found:
        raise ConfigError("no studies in MLflow; run `bench tune --norm all` first")
    return found


def run_confirm(norm: str, opts: ConfirmOptions, console: Console | None = None) -> list[str]:
    """``bench confirm``: one norm or all studied ones."""
    uri = tracking.setup(opts.tracking_uri)
    start = time.time()
    with faults.tracking_lost(uri, KEPT):
        ids = [run_id for one in norms_to_run(norm, opts.study, opts.trial) for run_id in confirm(one, opts, console)]
    (console or Console()).print(f"{len(ids)} confirm run(s) in {time.time() - start:.0f}s; `bench report` summarises them")
    return ids
