"""Optuna studies: one per experiment and norm, every trial a nested MLflow run.

``--trials N`` is the study's total: finished trials (complete, pruned, rejected, diverged) count
toward it, so re-running the same command after a crash or Ctrl-C finishes the remaining ones.
A trial interrupted by Ctrl-C is marked failed and its configuration is queued to run again.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from . import tracking
from .config import Experiment, override
from .errors import BudgetError, ConfigError, DivergedError, TrackingError
from .models import count_params_fast
from .run import load_data, train_tracked
from .train import default_device, resolve_runtime, setup_threads

DEFAULT_STORAGE_FILE = Path("mlruns") / "optuna.journal"


@dataclass
class TuneOptions:
    trials: int | None = None  # total for the study; None = the experiment's tune.trials
    more: bool = False  # treat ``trials`` as "this many more" instead of the total
    epochs: int | None = None
    study: str | None = None
    storage: str | None = None
    timeout: float | None = None
    seed: int = 0
    pruner: str | None = None
    tracking_uri: str | None = None
    data_dir: str | None = None
    download: bool = False
    threads: int | None = None
    device: str | None = None


# ---------------------------------------------------------------- study pieces


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file under mlruns/ by default (safe for several local processes),
    or any storage URL (sqlite:///..., postgresql://...)."""
    try:
        if url is None or url.endswith(".journal"):
            path = Path(url or DEFAULT_STORAGE_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                          failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2))
    except Exception as err:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} cannot be opened ({type(err).__name__}); check the URL or start the database") from None


def create_sampler(exp: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    # Constraint-aware: trials record their parameter excess with ``trial.set_constraint``.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=exp.tune.startup_trials, multivariate=True)


def create_pruner(name: str, exp: Experiment) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=exp.tune.startup_trials, n_warmup_steps=exp.tune.warmup_epochs)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, exp.tune.warmup_epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, exp: Experiment) -> Experiment:
    """A copy of ``exp`` with every declared search dimension sampled by ``trial``."""
    values: dict[str, Any] = {}
    for name, dim in exp.search.items():
        if dim.choices is not None:
            values[name] = trial.suggest_categorical(name, dim.choices)
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            values[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            values[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    return override(copy.deepcopy(exp), **values)


def finished(trial: FrozenTrial) -> bool:
    """Counts toward the study's total: everything but running or interrupted trials."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted", False)


def feasible_complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("rejected")]


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again the configuration of every trial interrupted by Ctrl-C or a crash, once."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            queued.append(t.number)
    return queued


# ---------------------------------------------------------------- the objective


class Objective:
    def __init__(self, exp: Experiment, study_name: str, data, rt, console: Console, epochs: int):
        self.exp, self.study_name, self.data, self.rt, self.console = exp, study_name, data, rt, console
        self.epochs = epochs

    def __call__(self, trial: optuna.Trial) -> float:
        exp = suggest(trial, self.exp)
        exp.train.epochs = self.epochs
        n_params = count_params_fast(**vars(exp.model))
        trial.set_user_attr("n_params", n_params)
        trial.set_constraint("params_over_budget", n_params - exp.budget.max_params)  # feasible when <= 0
        tags = {tracking.TAG_TRIAL: trial.number, tracking.TAG_STUDY: self.study_name, tracking.TAG_NORM: exp.model.norm}
        label = f"trial {trial.number:>3} "
        start = time.perf_counter()
        try:
            with tracking.run(self.study_name, f"trial-{trial.number}", "trial", tags=tags, nested=True) as active:
                trial.set_user_attr("mlflow_run_id", active.info.run_id)
                if n_params > exp.budget.max_params:
                    return self._reject(trial, exp, n_params)
                value = self._train(trial, exp, label)
        except optuna.TrialPruned:
            self._line(trial, n_params, "PRUNED", start)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            self._line(trial, n_params, "INTERRUPTED", start)
            raise
        except DivergedError as err:
            trial.set_user_attr("error", str(err))
            self._line(trial, n_params, f"FAIL ({err})", start)
            raise
        self._line(trial, n_params, "COMPLETE", start)
        return value

    def _reject(self, trial: optuna.Trial, exp: Experiment, n_params: int) -> float:
        """Over budget: never trained. Recorded as a complete trial with no accuracy, and the sampler
        is told through the constraint so it learns the feasible region."""
        trial.set_user_attr("rejected", True)
        tracking.log_params(exp.hyperparameters())
        tracking.log_metrics({"n_params": n_params})
        import mlflow

        mlflow.set_tags({tracking.TAG_STATE: "REJECTED", "bench.rejected_reason": f"{n_params:,} params > budget {exp.budget.max_params:,}"})
        return 0.0

    def _train(self, trial: optuna.Trial, exp: Experiment, label: str) -> float:
        def report(epoch: int, record: dict[str, float]) -> None:
            trial.report(record["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {epoch}")

        study = trial.study
        best_before = max((t.value for t in feasible_complete(study)), default=-math.inf)
        model, result = train_tracked(exp, self.data, self.rt, on_epoch=report, console=self.console, label=label)
        import mlflow

        mlflow.set_tag(tracking.TAG_STATE, "COMPLETE")
        value = result.best_val_acc
        trial.set_user_attr("test_acc", result.test_acc)
        trial.set_user_attr("seconds", result.seconds)
        trial.set_user_attr("model_uri", mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("bench.model_uri"))
        if value > best_before:
            version = tracking.register(trial.user_attrs["model_uri"], registry_name(exp.model.norm),
                                        tags={"study": self.study_name, "trial": str(trial.number), "val_acc": f"{value:.4f}"})
            trial.set_user_attr("registered_version", version)
            mlflow.set_tag("bench.registered_version", version)
        return value

    def _line(self, trial: optuna.Trial, n_params: int, state: str, start: float) -> None:
        values = trial.user_attrs
        val = max((v for v in trial.storage.get_trial(trial._trial_id).intermediate_values.values()), default=math.nan)
        self.console.print(
            f"trial {trial.number:>3}  params {n_params:>6,}  val acc {val:.4f}  "
            f"test acc {values.get('test_acc', math.nan):.4f}  {state}  {time.perf_counter() - start:.0f}s"
        )


def registry_name(norm: str) -> str:
    return f"cifar10-{norm}"


# ---------------------------------------------------------------- running a study


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_study(exp: Experiment, opts: TuneOptions, console: Console | None = None) -> optuna.Study:
    """Create or resume the study for ``exp`` and run it to its total number of trials."""
    console = console or Console()
    total = opts.trials or exp.tune.trials
    epochs = opts.epochs or exp.tune.epochs or exp.train.epochs
    pruner_name = opts.pruner or exp.tune.pruner
    if not exp.search:
        raise ConfigError(f"experiment '{exp.name}' declares no [search.*] dimensions; add at least lr and dropout")
    study_name = opts.study or exp.name
    setup_threads(opts.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets its own line below
    uri = tracking.setup(opts.tracking_uri)
    storage = open_storage(opts.storage)
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
        sampler=create_sampler(exp, opts.seed), pruner=create_pruner(pruner_name, exp),
    )
    study.set_user_attr("norm", exp.model.norm)
    study.set_user_attr("experiment", exp.name)
    requeued = requeue_interrupted(study)
    done = sum(finished(t) for t in study.get_trials(deepcopy=False))
    remaining = total if opts.more else total - done
    target = done + remaining
    console.print(
        f"study '{study_name}' ({exp.model.norm}, {epochs} epochs/trial, pruner {pruner_name}) in "
        f"{tracking.mask_url(str(opts.storage or DEFAULT_STORAGE_FILE))}: {done} finished, {max(remaining, 0)} to run"
        + (f"; re-queued interrupted trial(s) {requeued}" if requeued else "")
    )
    if remaining <= 0:
        return study
    data = load_data(exp, opts.data_dir, opts.download)
    rt = resolve_runtime(exp.train, exp.model.norm, default_device() if not opts.device else __import__("torch").device(opts.device))
    objective = Objective(exp, study_name, data, rt, console, epochs)

    def stop_at_target(study: optuna.Study, trial: FrozenTrial) -> None:
        if sum(finished(t) for t in study.get_trials(deepcopy=False)) >= target:
            study.stop()

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    start = time.time()
    try:
        with tracking.run(study_name, f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}", "study", tags={
            tracking.TAG_STUDY: study_name, tracking.TAG_NORM: exp.model.norm, "bench.storage": tracking.mask_url(str(opts.storage or DEFAULT_STORAGE_FILE)),
            "bench.pruner": pruner_name, "bench.epochs_per_trial": epochs,
        }) as parent:
            tracking.log_params({**{f"space.{k}": _describe(v) for k, v in exp.search.items()}, "trials_target": target, "seed": opts.seed})
            try:
                study.optimize(objective, n_trials=remaining, timeout=opts.timeout, catch=(DivergedError,), callbacks=[stop_at_target])
            finally:
                summarise_to_parent(study, time.time() - start)
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(best_table(study))
    console.print(f"MLflow: experiment '{study_name}', parent run {parent.info.run_id} at {tracking.mask_url(uri)}; browse with `bench ui`")
    return study


def _describe(dim) -> str:
    if dim.choices is not None:
        return f"choices {dim.choices}"
    return f"[{dim.low}, {dim.high}]" + (" log" if dim.log else "")


def study_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "trials_complete": sum(t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected") for t in trials),
        "trials_rejected": sum(bool(t.user_attrs.get("rejected")) for t in trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
    }


def summarise_to_parent(study: optuna.Study, seconds: float) -> None:
    """Best trial, counts and study plots on the active (parent) run."""
    import mlflow

    counts = study_counts(study)
    tracking.log_metrics({**counts, "study_seconds": seconds,
                          "trials_seconds_total": sum((t.duration.total_seconds() for t in study.trials if t.duration), 0.0)})
    best = feasible_complete(study)
    if not best:
        return
    top = max(best, key=lambda t: t.value)
    tracking.log_metrics({"best_val_acc": top.value, "best_test_acc": top.user_attrs.get("test_acc"), "best_trial": top.number})
    mlflow.set_tags({"bench.best_run_id": top.user_attrs.get("mlflow_run_id", ""), "bench.best_params": str(top.params)})
    for name, value in top.params.items():
        mlflow.log_param(f"best.{name}", value)
    log_study_plots(study)


def log_study_plots(study: optuna.Study) -> None:
    """Optimisation history, parameter importances and parallel coordinates as HTML artifacts."""
    import optuna.visualization as vis

    plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate}
    for name, plot in plots.items():
        try:
            fig = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need >= 2 complete trials
            continue
        tracking.log_figure_html(fig.to_html(include_plotlyjs=True), f"study/{name}.html")


def best_table(study: optuna.Study, top_k: int = 5) -> Table:
    counts = ", ".join(f"{v} {k.removeprefix('trials_')}" for k, v in study_counts(study).items())
    table = Table(title=f"study '{study.study_name}': best trials ({counts})")
    for col in ("trial", "val acc", "test acc", "params", "seconds", "hyperparameters"):
        table.add_column(col)
    for t in sorted(feasible_complete(study), key=lambda t: -t.value)[:top_k]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        table.add_row(str(t.number), f"{t.value:.4f}", f"{t.user_attrs.get('test_acc', math.nan):.4f}",
                      f"{t.user_attrs.get('n_params', 0):,}", f"{t.duration.total_seconds():.0f}" if t.duration else "", params)
    return table
