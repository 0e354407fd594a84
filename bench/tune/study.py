"""Running a study: create or resume it, check it, run trials up to its total, share it with other workers.

``--trials N`` is the study's total: finished trials (complete, pruned, rejected, diverged) count
toward it, so re-running the same command after a crash or Ctrl-C finishes the remaining ones.
A trial interrupted by Ctrl-C is marked failed and its configuration is queued to run again.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
import torch

from .. import faults, interrupt, settings, tracking
from ..console import plural
from ..config import Experiment
from ..errors import BenchError, ConfigError, DivergedError, TrackingError
from ..run import load_data
from ..runtime import default_device, resolve_runtime, setup_threads
from .storage import heartbeat_seconds, open_storage, storage_label, heartbeat_enabled
from .options import TuneOptions
from .space import baseline_params, check_fixed_recipe, check_search_space, create_pruner, create_sampler, enqueue_baseline, rungs, sampler_seed, trial_epochs
from .recovery import finished, finished_count, counted, fail_dead_local_trials, guard, recover
from .objective import SurplusTrial, Objective
from .objective import registry_name
from .summary import describe_dimension, print_outcome, summarise_to_parent


def prepare_study(exp: Experiment, opts: TuneOptions) -> tuple[optuna.Study, bool]:
    """(study, created): the study checked against ``exp``; ``created`` is true for the one process
    that made it, which alone queues the baseline and keeps ``--seed`` (others may start at once)."""
    if not exp.search:
        raise ConfigError(f"experiment '{exp.name}' declares no [search.*] dimensions; add at least lr and dropout")
    if exp.tune.baseline:
        baseline_params(exp)  # a default outside its search range is an error before any work
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets its own line instead
    storage = open_storage(opts.storage)
    try:
        study, created = create_or_load(storage, opts.study or exp.name, create_sampler(exp, opts.seed),
                                        create_pruner(opts.pruner or exp.tune.pruner, exp))
    except Exception as err:
        raise storage_error(opts, err) from None
    check_search_space(study, exp)
    check_fixed_recipe(study, exp, trial_epochs(exp, opts))
    try:  # only once the checks pass: a refused run leaves the study's labels as they were
        study.set_user_attr("norm", exp.model.norm)
        study.set_user_attr("experiment", exp.name)
        with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
            study.set_metric_names(["val_acc"])  # optuna-dashboard labels the objective with it
    except Exception as err:
        raise storage_error(opts, err) from None
    if created:
        enqueue_baseline(study, exp)
    return study, created


def storage_error(opts: TuneOptions, err: Exception) -> TrackingError:
    return TrackingError(f"Optuna storage {storage_label(opts.storage)} failed ({faults.root_cause(err)}); check it is reachable")


def create_or_load(storage, name: str, sampler, pruner) -> tuple[optuna.Study, bool]:
    """The storage makes creation atomic: of processes starting one study at once, one creates it."""
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner), False


def study_target(study: optuna.Study, exp: Experiment, opts: TuneOptions) -> tuple[int, int]:
    """(finished trials, the study's total): ``--trials N`` is the total, or N more with ``--more``."""
    done, n = finished_count(study), opts.trials or exp.tune.trials
    return done, done + n if opts.more else n


def run_study(exp: Experiment, opts: TuneOptions, console: Console | None = None) -> optuna.Study:
    """Create or resume the study for ``exp`` and run it up to its total number of trials.

    Several processes (or machines) may run this on one study and storage: they share the
    study's total and its MLflow parent run.
    """
    console = console or Console()
    settings.check()  # BENCH_MAX_RETRIES is read only when a worker dies: a bad value fails here, not hours in
    epochs = trial_epochs(exp, opts)
    setup_threads(opts.threads)
    uri = tracking.setup(opts.tracking_uri)
    study, created = prepare_study(exp, opts)
    recovered, requeued = ([], []) if os.environ.get("BENCH_PARENT_RUN_ID") else recover(study)  # `--jobs K`: the launcher did
    done, target = study_target(study, exp, opts)
    console.print(
        f"study '{study.study_name}' ({exp.model.norm}, {plural(epochs, 'epoch')}/trial, {pruner_label(exp, opts, epochs)}) "
        f"in {storage_label(opts.storage)}: {done} finished, {max(target - done, 0)} to run"
        + (f"; recovered dead worker trial(s) {recovered}" if recovered else "")
        + (f"; re-queued failed trial(s) {requeued}" if requeued else "")
    )
    if target - done <= 0:
        return study
    data = load_data(exp, opts.data_dir, opts.download)
    rt = resolve_runtime(exp.train, exp.model.norm, torch.device(opts.device) if opts.device else default_device(), exp.model.preset)
    parent_id = os.environ.get("BENCH_PARENT_RUN_ID")  # set by `--jobs K` for its workers
    if not parent_id:
        parent_id, _ = open_study_parent(study, exp, opts, target, {"bench.epochs_per_trial": epochs})
    trials_run = len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    study.sampler = create_sampler(exp, sampler_seed(opts.seed, os.environ.get("BENCH_WORKER_INDEX"), trials_run, created))
    lone_threads = int(os.environ.get("BENCH_LONE_THREADS", 0)) or None  # set by `--jobs K`: all K workers' threads
    objective = guard(Objective(exp, study.study_name, data, rt, console, epochs, parent_id, target, lone_threads), console)
    status, lost = "FINISHED", False
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
    except Exception as err:  # storage or tracking server lost mid-study, or disk full; finished trials are already stored
        status, lost = "FAILED", True
        raise TrackingError(faults.lost_store_message(err, storage_label(opts.storage), tracking.mask_url(uri))) from None
    finally:
        # After a lost store the parent run is left open: the resume joins it (one parent per study),
        # and the error stays the one line (no warnings, no waiting on a server that is gone).
        if not os.environ.get("BENCH_PARENT_RUN_ID") and not lost:
            finish_parent(study, parent_id, status, time.time() - start, console, epochs)
    if not os.environ.get("BENCH_PARENT_RUN_ID"):  # a --jobs worker leaves the summary to its launcher
        print_outcome(study, console, exp.model.norm, epochs, registry_name(study.study_name), exp.name)
        print_where(study, parent_id, uri, console)
    return study


def print_where(study: optuna.Study, parent_id: str, uri: str, console: Console) -> None:
    console.print(f"MLflow: experiment '{study.study_name}', parent run {parent_id} at {tracking.mask_url(uri)}; browse with `bench ui`")


def open_study_parent(study: optuna.Study, exp: Experiment, opts: TuneOptions, target: int, tags: dict[str, Any]) -> tuple[str, bool]:
    """(run id, joined): the study's parent run, joined if another process has it open, else created
    with the search space (``space.*`` params, which the report reads), the total and the seed."""
    parent_id, joined = tracking.open_parent(study.study_name, study.study_name, f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}", {
        tracking.TAG_NORM: exp.model.norm, tracking.TAG_EXPERIMENT: exp.name, "bench.storage": storage_label(opts.storage),
        "bench.pruner": opts.pruner or exp.tune.pruner, **tags,
    })
    if not joined:
        tracking.log_to_run(parent_id, params={**{f"space.{k}": describe_dimension(v) for k, v in exp.search.items()},
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
        interrupt.sleep(heartbeat_seconds())


def pruner_label(exp: Experiment, opts: TuneOptions, epochs: int) -> str:
    name = opts.pruner or exp.tune.pruner
    if name == "halving":
        at = rungs(exp, epochs)
        if not at:  # trials shorter than min_epochs: nothing to compare before a trial ends
            return f"successive halving: no rung within {plural(epochs, 'epoch')}, every trial runs to the end"
        return f"successive halving at epochs {', '.join(map(str, at))} (best 1/{exp.tune.reduction_factor} go on)"
    return f"pruner {name}"


def finish_parent(study: optuna.Study, parent_id: str, status: str, seconds: float, console: Console | None = None,
                  epochs: int | None = None) -> None:
    """Summarise the study on its parent run; the last worker out closes it. Runs while an error
    may be propagating, so a failure here is reported in one line, never raised over it."""
    console = console or Console(stderr=True)
    try:
        others_running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    except Exception as err:  # the storage is gone: the parent stays as it was, the trials are safe in Optuna
        console.print(f"warning: study storage unreachable, parent run {parent_id} not summarised ({type(err).__name__})")
        return
    try:
        summarise_to_parent(study, parent_id, seconds, final=not others_running, epochs=epochs)
    except Exception as err:  # the tracking store is gone, or another worker logged the summary first
        console.print(f"warning: parent run {parent_id} not summarised: {type(err).__name__}: {tracking.mask_url(str(err))[:200]}")
    if not others_running:
        try:
            tracking.close_run(parent_id, status)
        except Exception as err:
            console.print(f"warning: parent run {parent_id} left open: {type(err).__name__}: {tracking.mask_url(str(err))[:200]}")
