"""Optuna studies: one per experiment and norm, every trial a nested MLflow run.

``--trials N`` is the study's total: finished trials (complete, pruned, rejected, diverged) count
toward it, so re-running the same command after a crash or Ctrl-C finishes the remaining ones.
A trial interrupted by Ctrl-C is marked failed and its configuration is queued to run again.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table
import torch

from . import interrupt, tracking, workers
from .config import Experiment, override
from .errors import BenchError, ConfigError, DivergedError, TrackingError
from .models import count_params_fast
from .run import load_data, train_tracked
from .stats import pareto_front
from .train import default_device, resolve_runtime, setup_threads

DEFAULT_STORAGE_FILE = Path("mlruns") / "optuna.journal"
HEARTBEAT_SECONDS = int(os.environ.get("BENCH_HEARTBEAT_SECONDS", 20))


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
    or any storage URL (sqlite:///..., postgresql://...). RDB storages get Optuna's heartbeat: a
    trial whose worker stops beating for ``3 * HEARTBEAT_SECONDS`` is failed and re-queued."""
    try:
        if url is None or url.endswith(".journal"):
            path = Path(url or DEFAULT_STORAGE_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")  # renamed in Optuna 4.9
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                    return optuna.storages.RDBStorage(rdb_url(url), heartbeat_interval=HEARTBEAT_SECONDS,
                                                      grace_period=3 * HEARTBEAT_SECONDS, **{callback: on_stale_trial})
            except Exception as err:
                # Workers starting at once on an empty database race to create Optuna's tables
                # (IntegrityError, ProgrammingError); the loser finds them on a second try.
                if attempt == 4 or type(err).__name__ not in ("IntegrityError", "ProgrammingError"):
                    raise
                time.sleep(0.5 + attempt)
    except ImportError:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} needs its database driver; for PostgreSQL: pip install 'bench[postgres]'") from None
    except Exception as err:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} cannot be opened ({type(err).__name__}); check the URL or start the database") from None


def rdb_url(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed
    (``bench[postgres]``). ``postgres://`` is accepted as ``postgresql://``."""
    scheme, _, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def create_sampler(exp: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    # Constraint-aware: trials record their parameter excess with ``trial.set_constraint``.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=exp.tune.startup_trials, multivariate=True)


def create_pruner(name: str, exp: Experiment) -> optuna.pruners.BasePruner:
    if name == "median":
        # Rejected (over-budget) trials are complete but report no epochs, so they count toward
        # n_startup_trials; n_min_trials makes the median come from trials that really trained.
        return optuna.pruners.MedianPruner(n_startup_trials=exp.tune.startup_trials, n_warmup_steps=exp.tune.warmup_epochs,
                                           n_min_trials=exp.tune.startup_trials)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, exp.tune.warmup_epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def search_distributions(exp: Experiment) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every declared search dimension."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, dim in exp.search.items():
        if dim.choices is not None:
            dists[name] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            dists[name] = optuna.distributions.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step or 1)
        else:
            dists[name] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return dists


def suggest(trial: optuna.Trial, exp: Experiment) -> Experiment:
    """A copy of ``exp`` with every declared search dimension sampled by ``trial``."""
    values: dict[str, Any] = {}
    for name, dist in search_distributions(exp).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return override(copy.deepcopy(exp), **values)


def check_search_space(study: optuna.Study, exp: Experiment) -> None:
    """A resumed study must go on sampling the space its trials came from: otherwise TPE fits the
    new ranges on samples of the old ones and the parent run's ``space.*`` params describe neither."""
    expected = search_distributions(exp)
    for trial in reversed(study.get_trials(deepcopy=False)):
        if trial.distributions:
            changed = sorted(n for n in expected.keys() | trial.distributions.keys() if expected.get(n) != trial.distributions.get(n))
            if changed:
                raise ConfigError(f"study '{study.study_name}' was sampled from a different search space ({', '.join(changed)} "
                                  "changed); give the new space its own --study name, or restore the experiment's [search.*]")
            return


def trial_epochs(exp: Experiment, opts: TuneOptions) -> int:
    return opts.epochs or exp.tune.epochs or exp.train.epochs


def as_trial(exp: Experiment, epochs: int) -> Experiment:
    """``exp`` as a trial trains it: the tuning epochs, on the tuning subset unless train_subset is set."""
    exp.train.epochs = epochs
    if exp.tune.train_subset and not exp.train.train_subset:
        exp.train.train_subset = exp.tune.train_subset
    return exp


NOT_IN_RECIPE = {"eval_batch_size"}  # changes speed, not results


def fixed_recipe(exp: Experiment, epochs: int) -> dict[str, str]:
    """What every trial of the study shares: the settings that are not searched, as trials run them."""
    trial_exp = as_trial(copy.deepcopy(exp), epochs)
    values = {**trial_exp.hyperparameters(), "max_params": exp.budget.max_params}
    return {k: str(v) for k, v in sorted(values.items()) if k not in exp.search and k not in NOT_IN_RECIPE}


def last_trial_params(study: optuna.Study) -> dict[str, str] | None:
    """What the study's last trained trial logged to MLflow: the fixed settings of a study older
    than its ``fixed_recipe`` record; None if it has no such trial."""
    for trial in reversed(study.get_trials(deepcopy=False)):
        if trial.user_attrs.get("mlflow_run_id") and not trial.user_attrs.get("rejected"):  # rejected trials log no training params
            return tracking.run_params(trial.user_attrs["mlflow_run_id"]) or None
    return None


def check_fixed_recipe(study: optuna.Study, exp: Experiment, epochs: int) -> None:
    """A resumed study must train new trials as it trained the old ones: a changed fixed setting
    (epochs, TTA, weight decay ...) moves the objective, and TPE and the pruner would rank trials
    that measured different things. The settings are recorded on the study the first time."""
    current = fixed_recipe(exp, epochs)
    stamped = study.user_attrs.get("fixed_recipe")
    recorded = stamped or last_trial_params(study)
    if recorded:
        defaults = {k: str(v) for k, v in Experiment().hyperparameters().items()}  # settings added since the study began
        changed = [f"{k} {recorded.get(k, defaults.get(k))} -> {v}" for k, v in current.items() if recorded.get(k, defaults.get(k)) != v]
        if changed:
            raise ConfigError(f"study '{study.study_name}' ran its trials with other fixed settings ({'; '.join(changed)}); "
                              "give the new settings their own --study name, or set the old values back")
    if not stamped:
        study.set_user_attr("fixed_recipe", current)


def finished(trial: FrozenTrial) -> bool:
    """Counts toward the study's total: complete (incl. rejected), pruned and diverged trials; not
    running ones, nor those interrupted or killed (they are re-queued)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "diverged" in trial.user_attrs


def finished_count(study: optuna.Study) -> int:
    return sum(finished(t) for t in study.get_trials(deepcopy=False))


def study_target(study: optuna.Study, exp: Experiment, opts: TuneOptions) -> tuple[int, int]:
    """(finished trials, the study's total): ``--trials N`` is the total, or N more with ``--more``."""
    done, n = finished_count(study), opts.trials or exp.tune.trials
    return done, done + n if opts.more else n


def counted(trial: FrozenTrial) -> bool:
    """Finished, or running (it will finish, or be failed and re-queued if its worker dies)."""
    return finished(trial) or trial.state == TrialState.RUNNING


class SurplusTrial(BenchError):
    """A worker created a trial after the others had already filled the study's total."""


def surplus(trial: optuna.Trial, target: int) -> bool:
    """Whether the trials numbered before ``trial`` (trial numbers are assigned atomically by the
    storage) already fill the study's total: then two workers raced past StopAtTarget."""
    before = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    return sum(counted(t) for t in before) >= target


def feasible_complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("rejected")]


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again the configuration of every trial interrupted by Ctrl-C or a crash, once."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and not {"diverged", "surplus"} & t.user_attrs.keys() and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            queued.append(t.number)
    return queued


# ---------------------------------------------------------------- the objective


class Objective:
    def __init__(self, exp: Experiment, study_name: str, data, rt, console: Console, epochs: int, parent_id: str | None,
                 target: int | None = None):
        self.exp, self.study_name, self.data, self.rt, self.console = exp, study_name, data, rt, console
        self.epochs, self.parent_id, self.target = epochs, parent_id, target

    def __call__(self, trial: optuna.Trial) -> float:
        if self.target is not None and surplus(trial, self.target):  # no params sampled, no MLflow run
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            self.console.print(f"trial {trial.number:>3}  not run: other workers filled the study's {self.target} trials")
            raise SurplusTrial(f"trial {trial.number} is beyond the study's total of {self.target}")
        exp = as_trial(suggest(trial, self.exp), self.epochs)
        n_params = count_params_fast(**vars(exp.model))
        trial.set_user_attr("n_params", n_params)
        trial.set_user_attr("worker", worker_id())
        trial.set_constraint("params_over_budget", n_params - exp.budget.max_params)  # feasible when <= 0
        tags = {tracking.TAG_TRIAL: trial.number, tracking.TAG_STUDY: self.study_name, tracking.TAG_NORM: exp.model.norm}
        label = f"trial {trial.number:>3} "
        start = time.perf_counter()
        try:
            with tracking.run(self.study_name, f"trial-{trial.number}", "trial", tags=tags, parent_run_id=self.parent_id) as active:
                trial.set_user_attr("mlflow_run_id", active.info.run_id)
                if n_params > exp.budget.max_params:
                    value = self._reject(trial, exp, n_params)
                    self._line(trial, n_params, f"REJECTED (over the {exp.budget.max_params:,} budget, not trained)", start)
                    return value
                value = self._train(trial, exp, label)
        except optuna.TrialPruned:
            self._line(trial, n_params, "PRUNED", start)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            self._line(trial, n_params, "INTERRUPTED", start)
            raise
        except DivergedError as err:
            trial.set_user_attr("diverged", str(err))
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
        trial.set_user_attr("epoch_seconds", result.mean_epoch_seconds)
        trial.set_user_attr("model_uri", mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("bench.model_uri"))
        if value > best_before:
            version = tracking.register(trial.user_attrs["model_uri"], registry_name(self.study_name),
                                        tags={"study": self.study_name, "trial": str(trial.number), "val_acc": f"{value:.4f}"})
            trial.set_user_attr("registered_version", version)
            mlflow.set_tag("bench.registered_version", version)
        return value

    def _line(self, trial: optuna.Trial, n_params: int, state: str, start: float) -> None:
        values = trial.user_attrs
        val = max((v for v in trial.storage.get_trial(trial._trial_id).intermediate_values.values()), default=math.nan)
        test = values.get("test_acc", math.nan)
        self.console.print(
            f"trial {trial.number:>3}  params {n_params:>6,}  val acc {_acc(val)}  test acc {_acc(test)}  {state}  "
            f"{time.perf_counter() - start:.0f}s"
        )


def _acc(value: float) -> str:
    return "     -" if math.isnan(value) else f"{value:.4f}"


def registry_name(study: str) -> str:
    """``cifar10-bn`` for the default study of a norm; a study of another experiment (``resnet_gn``)
    gets its own name, so ``models:/cifar10-gn/latest`` never turns into a different architecture."""
    return f"cifar10-{study}"


# ---------------------------------------------------------------- running a study


def prepare_study(exp: Experiment, opts: TuneOptions) -> optuna.Study:
    if not exp.search:
        raise ConfigError(f"experiment '{exp.name}' declares no [search.*] dimensions; add at least lr and dropout")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets its own line instead
    storage = open_storage(opts.storage)
    try:
        study = optuna.create_study(
            storage=storage, study_name=opts.study or exp.name, direction="maximize", load_if_exists=True,
            sampler=create_sampler(exp, opts.seed), pruner=create_pruner(opts.pruner or exp.tune.pruner, exp),
        )
        study.set_user_attr("norm", exp.model.norm)
        study.set_user_attr("experiment", exp.name)
    except Exception as err:
        raise TrackingError(f"Optuna storage {storage_label(opts.storage)} failed ({type(err).__name__}); check it is reachable") from None
    check_search_space(study, exp)
    check_fixed_recipe(study, exp, trial_epochs(exp, opts))
    return study


def storage_label(url: str | None) -> str:
    return tracking.mask_url(str(url or DEFAULT_STORAGE_FILE))


def run_study(exp: Experiment, opts: TuneOptions, console: Console | None = None) -> optuna.Study:
    """Create or resume the study for ``exp`` and run it up to its total number of trials.

    Several processes (or machines) may run this on one study and storage: they share the
    study's total and its MLflow parent run.
    """
    console = console or Console()
    epochs = trial_epochs(exp, opts)
    setup_threads(opts.threads)
    uri = tracking.setup(opts.tracking_uri)
    study = prepare_study(exp, opts)
    recovered = fail_dead_local_trials(study)
    requeued = requeue_interrupted(study)
    done, target = study_target(study, exp, opts)
    console.print(
        f"study '{study.study_name}' ({exp.model.norm}, {epochs} epochs/trial, pruner {opts.pruner or exp.tune.pruner}) "
        f"in {storage_label(opts.storage)}: {done} finished, {max(target - done, 0)} to run"
        + (f"; recovered dead worker trial(s) {recovered}" if recovered else "")
        + (f"; re-queued interrupted trial(s) {requeued}" if requeued else "")
    )
    if target - done <= 0:
        return study
    data = load_data(exp, opts.data_dir, opts.download)
    rt = resolve_runtime(exp.train, exp.model.norm, torch.device(opts.device) if opts.device else default_device())
    parent_id = os.environ.get("BENCH_PARENT_RUN_ID")  # set by `--jobs K` for its workers
    joined = bool(parent_id)
    if not parent_id:
        parent_id, joined = open_study_parent(study, exp, opts, target, {"bench.epochs_per_trial": epochs})
    if os.environ.get("BENCH_WORKER_INDEX"):  # one of `--jobs K` workers: its own seed, not its siblings' draws
        study.sampler = create_sampler(exp, opts.seed + int(os.environ["BENCH_WORKER_INDEX"]))
    elif joined:  # another worker is on this study: the same seed would replay its random draws
        study.sampler.reseed_rng()
    objective = Objective(exp, study.study_name, data, rt, console, epochs, parent_id, target)
    status = "FINISHED"
    start = time.time()
    deadline = start + opts.timeout if opts.timeout else None
    try:
        with interrupt.deferred():
            to_run = target - done
            while to_run > 0:
                study.optimize(objective, n_trials=to_run, timeout=deadline - time.time() if deadline else None,
                               catch=(DivergedError, SurplusTrial), callbacks=[StopAtTarget(target)])
                interrupt.check()
                if deadline and time.time() >= deadline:
                    break
                to_run = wait_for_others(study, target, console)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BenchError:
        status = "FAILED"
        raise
    except Exception as err:  # storage or tracking server lost mid-study; finished trials are already stored
        status = "FAILED"
        raise TrackingError(f"lost the study's storage or tracking store ({type(err).__name__}: {tracking.mask_url(str(err))[:200]}); "
                            "finished trials are kept, re-run the same command once it is back") from None
    finally:
        if not os.environ.get("BENCH_PARENT_RUN_ID"):
            finish_parent(study, parent_id, status, time.time() - start, console)
    console.print(best_table(study))
    console.print(f"MLflow: experiment '{study.study_name}', parent run {parent_id} at {tracking.mask_url(uri)}; browse with `bench ui`")
    return study


def open_study_parent(study: optuna.Study, exp: Experiment, opts: TuneOptions, target: int, tags: dict[str, Any]) -> tuple[str, bool]:
    """(run id, joined): the study's parent run, joined if another process has it open, else created
    with the search space (``space.*`` params, which the report reads), the total and the seed."""
    parent_id, joined = tracking.open_parent(study.study_name, study.study_name, f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}", {
        tracking.TAG_NORM: exp.model.norm, "bench.storage": storage_label(opts.storage),
        "bench.pruner": opts.pruner or exp.tune.pruner, **tags,
    })
    if not joined:
        tracking.log_to_run(parent_id, params={**{f"space.{k}": _describe(v) for k, v in exp.search.items()},
                                               "trials_target": target, "seed": opts.seed})
    return parent_id, joined


class StopAtTarget:
    """Stop this worker once finished plus other workers' running trials reach the study's total,
    or once Ctrl-C / SIGTERM asked it to stop."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if interrupt.requested() or sum(counted(t) for t in study.get_trials(deepcopy=False)) >= self.target:
            study.stop()


def wait_for_others(study: optuna.Study, target: int, console: Console) -> int:
    """After this worker's share, wait while other workers' trials run, so that a trial whose
    worker dies is re-run here: the heartbeat (RDB storages) or, without one, the missing process
    on this host fails it and re-queues its configuration. Returns how many trials to run next
    (0: the study has its total)."""
    announced = False
    while True:
        interrupt.check()
        if heartbeat_enabled(study):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # runs on_stale_trial for each
        else:
            fail_dead_local_trials(study)
        trials = study.get_trials(deepcopy=False)
        missing = target - sum(finished(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if missing <= 0:
            return 0
        if running < missing:
            return missing - running
        if not announced:
            console.print(f"waiting for {running} running trial(s) of other workers (a dead worker's trial is re-run here)")
            announced = True
        interrupt.sleep(HEARTBEAT_SECONDS)


def heartbeat_enabled(study: optuna.Study) -> bool:
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return bool(interval and interval())


def finish_parent(study: optuna.Study, parent_id: str, status: str, seconds: float, console: Console | None = None) -> None:
    """Summarise the study on its parent run; the last worker out closes it. Runs while an error
    may be propagating, so a failure here is reported in one line, never raised over it."""
    console = console or Console(stderr=True)
    try:
        others_running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    except Exception as err:  # the storage is gone: the parent stays as it was, the trials are safe in Optuna
        console.print(f"warning: study storage unreachable, parent run {parent_id} not summarised ({type(err).__name__})")
        return
    try:
        summarise_to_parent(study, parent_id, seconds, final=not others_running)
    except Exception as err:  # the tracking store is gone, or another worker logged the summary first
        console.print(f"warning: parent run {parent_id} not summarised: {type(err).__name__}: {tracking.mask_url(str(err))[:200]}")
    if not others_running:
        try:
            tracking.close_run(parent_id, status)
        except Exception as err:
            console.print(f"warning: parent run {parent_id} left open: {type(err).__name__}: {tracking.mask_url(str(err))[:200]}")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a worker process on this host that no longer exists (kill -9, crash):
    mark them failed and interrupted so they are re-queued, and end their MLflow runs FAILED.
    (RDB storages also detect dead workers on any host through Optuna's heartbeat.)"""
    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)) and mark_dead_trial(study, t, f"worker {worker} died"):
            requeue(study, t, "process gone")
            recovered.append(t.number)
    return recovered


def mark_dead_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Fail a RUNNING trial whose worker is gone and end its MLflow run FAILED. False when another
    process got there first (then it re-queues the trial, not this one)."""
    storage = study._storage
    if trial.state == TrialState.RUNNING:
        try:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    try:
        run_id = trial.user_attrs.get("mlflow_run_id") or tracking.find_trial_run(study.study_name, trial.number)
        if run_id:
            tracking.close_run(run_id, "FAILED", error=reason)
    except Exception:
        pass
    return True


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Queue a dead trial's configuration again; the retry records who noticed, how and when."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry_reason": reason,
                                                  "requeued_by": worker_id(), "requeued_at": time.time()}, skip_if_exists=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat check failed a trial whose worker stopped beating: end its MLflow run and
    queue its configuration, so a surviving worker runs it again."""
    mark_dead_trial(study, trial, "worker stopped sending heartbeats (killed or lost)")  # already FAIL: Optuna failed it
    requeue(study, trial, "heartbeat stale")


# ---------------------------------------------------------------- several local workers


def auto_jobs(opts: TuneOptions) -> int:
    """``--jobs auto``: one single-threaded worker per core. Measured on 2 cores (README, "Parallel
    and distributed studies"): 2 workers x 1 thread trained 1.54x the images/s of 1 worker x 2
    threads. One worker where workers cannot share the study (SQLite) or would share one GPU."""
    return workers.auto_jobs(opts.device, opts.threads, shareable=not (opts.storage or "").startswith("sqlite"))


def run_workers(exp: Experiment, opts: TuneOptions, worker_argv: list[str], jobs: int, console: Console | None = None) -> None:
    """Start ``jobs`` worker processes on one study, each with an equal share of the cores,
    all nesting their trials under one parent run."""
    console = console or Console()
    if opts.storage and opts.storage.startswith("sqlite"):
        raise ConfigError("--jobs needs a storage safe for concurrent writers: the default journal file or postgresql://...; not SQLite")
    tracking.setup(opts.tracking_uri)
    study = prepare_study(exp, opts)  # created once here, so workers do not race to create it
    done, target = study_target(study, exp, opts)
    parent_id, _ = open_study_parent(study, exp, opts, target, {"bench.jobs": jobs})
    threads = workers.threads_per_worker(jobs, opts.threads)
    # The total is fixed here: with --more, workers starting at different moments would each add N.
    cmd = [sys.executable, "-m", "bench.cli", "tune", *worker_argv, "--trials", str(target), "--jobs", "1", "--threads", str(threads)]
    console.print(f"starting {jobs} workers x {threads} thread(s) on study '{study.study_name}' ({done} of {target} trials finished)")
    start = time.time()
    codes, interrupted = workers.run_all([cmd] * jobs, [{**os.environ, "BENCH_PARENT_RUN_ID": parent_id, "BENCH_WORKER_INDEX": str(i)} for i in range(jobs)])
    status = "KILLED" if interrupted else "FINISHED"
    recovered = fail_dead_local_trials(study)  # trials of workers killed outright (kill -9, OOM)
    done = finished_count(study)
    if status == "FINISHED" and any(codes):
        if done < target:
            status = "FAILED"
        else:
            console.print(f"worker exit codes {codes}: the others re-ran what the failed worker left; the study has its {target} trials")
    finish_parent(study, parent_id, status, time.time() - start, console)
    if status == "KILLED":
        raise KeyboardInterrupt
    console.print(best_table(study))
    if status == "FAILED":
        raise TrackingError(f"{sum(bool(c) for c in codes)} of {jobs} workers failed (exit codes {codes}); {done} of {target} trials finished"
                            + (f", dead workers' trial(s) {recovered} re-queued" if recovered else "") + "; re-run the same command to resume")


VALUE_OPTIONS = ("--jobs", "--threads", "--norm", "--trials")  # set by run_workers for each worker
FLAG_OPTIONS = ("--more",)


def worker_argv(argv: list[str], norm: str) -> list[str]:
    """The user's ``bench tune`` arguments for one worker: this norm, without --jobs/--threads/--trials/--more."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in VALUE_OPTIONS:
            skip = "=" not in arg
            continue
        if name in FLAG_OPTIONS:
            continue
        out.append(arg)
    return [*out, "--norm", norm]


def _describe(dim) -> str:
    if dim.choices is not None:
        return f"choices {dim.choices}"
    return f"[{dim.low}, {dim.high}]" + (f" step {dim.step}" if dim.step else "") + (" log" if dim.log else "")


def study_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "trials_complete": sum(t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected") for t in trials),
        "trials_rejected": sum(bool(t.user_attrs.get("rejected")) for t in trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials),
    }


def summarise_to_parent(study: optuna.Study, parent_id: str, seconds: float, final: bool = True) -> None:
    """Best trial, counts and study plots on the parent run."""
    counts = study_counts(study)
    trials_seconds = sum((t.duration.total_seconds() for t in study.trials if t.duration), 0.0)
    tracking.log_to_run(parent_id, metrics={**counts, "study_seconds": seconds, "trials_seconds_total": trials_seconds})
    best = feasible_complete(study)
    if not best:
        return
    top = max(best, key=lambda t: t.value)
    tracking.log_to_run(
        parent_id,
        metrics={"best_val_acc": top.value, "best_test_acc": top.user_attrs.get("test_acc"), "best_trial": top.number},
        tags={"bench.best_run_id": top.user_attrs.get("mlflow_run_id", ""), **{f"best.{k}": v for k, v in top.params.items()}},
        params={f"best.{k}": v for k, v in top.params.items()} if final else None,
        texts=study_plots(study) if final else None,
    )


def study_plots(study: optuna.Study) -> dict[str, str]:
    """Optimisation history, parameter importances, parallel coordinates and the accuracy-parameters
    Pareto front as self-contained HTML, plus the best trials as a Markdown table."""
    import optuna.visualization as vis

    plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate, "pareto_params": pareto_figure}
    html = {"study/best_trials.md": best_trials_markdown(study)}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # e.g. "importances will be equal" on a few tiny trials
                warnings.simplefilter("ignore", UserWarning)
                html[f"study/{name}.html"] = plot(study).to_html(include_plotlyjs=True)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need >= 2 complete trials
            continue
    return html


def pareto_figure(study: optuna.Study):
    """Best validation accuracy against parameters of every trained trial; the non-dominated ones
    (no trial with fewer parameters is more accurate) joined as the front."""
    import plotly.graph_objects as go

    trials = sorted(feasible_complete(study), key=lambda t: t.number)
    if not trials:
        raise ValueError("no complete trials")
    params = [t.user_attrs.get("n_params", 0) for t in trials]
    accs = [t.value for t in trials]
    hover = [f"trial {t.number}<br>{n:,} params<br>val acc {t.value:.4f}<br>{epoch_seconds(t)} s/epoch" for t, n in zip(trials, params)]
    front = pareto_front(params, accs)
    fig = go.Figure([
        go.Scatter(x=params, y=accs, mode="markers", name="trials", text=hover, hoverinfo="text"),
        go.Scatter(x=[params[i] for i in front], y=[accs[i] for i in front], mode="lines+markers", name="Pareto front",
                   text=[hover[i] for i in front], hoverinfo="text"),
    ])
    fig.update_layout(title=f"study '{study.study_name}': validation accuracy vs parameters",
                      xaxis_title="parameters", yaxis_title="best validation accuracy")
    return fig


BEST_COLUMNS = ("trial", "params", "val acc", "test acc", "seconds", "s / epoch", "hyperparameters")


def best_rows(study: optuna.Study, top_k: int) -> list[list[str]]:
    """The best trained trials as BEST_COLUMNS cells, for the console and the parent run's table."""
    return [
        [str(t.number), f"{t.user_attrs.get('n_params', 0):,}", f"{t.value:.4f}", f"{t.user_attrs.get('test_acc', math.nan):.4f}",
         f"{t.duration.total_seconds():.0f}" if t.duration else "", epoch_seconds(t), format_params(t.params)]
        for t in sorted(feasible_complete(study), key=lambda t: -t.value)[:top_k]
    ]


def best_trials_markdown(study: optuna.Study, top_k: int = 10) -> str:
    """The best trained trials: parameters, accuracy, seconds per epoch, hyperparameters."""
    lines = [f"# Study '{study.study_name}': best trials", "", "| " + " | ".join(BEST_COLUMNS) + " |", "| --- " * len(BEST_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in best_rows(study, top_k)]
    return "\n".join(lines) + "\n"


def epoch_seconds(trial: FrozenTrial) -> str:
    """Mean training seconds per epoch, or "-" for trials recorded before bench stored it."""
    value = trial.user_attrs.get("epoch_seconds")
    return "-" if value is None else f"{value:.1f}"


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def best_table(study: optuna.Study, top_k: int = 5) -> Table:
    counts = ", ".join(f"{v} {k.removeprefix('trials_')}" for k, v in study_counts(study).items())
    table = Table(title=f"study '{study.study_name}': best trials ({counts})")
    for col in BEST_COLUMNS:
        table.add_column(col)
    for cells in best_rows(study, top_k):
        table.add_row(*cells)
    return table
