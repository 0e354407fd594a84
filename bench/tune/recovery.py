"""Which trials count toward a study's total, and recovery of trials whose worker died or was interrupted:
failed once, their configuration queued again.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import tracking


def finished(trial: FrozenTrial) -> bool:
    """Counts toward the study's total: complete (incl. rejected), pruned and diverged trials; not
    running ones, nor those interrupted or killed (they are re-queued)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "diverged" in trial.user_attrs


def finished_count(study: optuna.Study) -> int:
    return sum(finished(t) for t in study.get_trials(deepcopy=False))


def counted(trial: FrozenTrial) -> bool:
    """Finished, or running (it will finish, or be failed and re-queued if its worker dies)."""
    return finished(trial) or trial.state == TrialState.RUNNING


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
    except Exception as err:  # the tracking store is unreachable: the trial is recovered in Optuna all the same
        run = trial.user_attrs.get("mlflow_run_id") or f"of trial {trial.number}"
        logging.getLogger(__name__).warning(
            f"warning: MLflow run {run} (study '{study.study_name}') left RUNNING: {type(err).__name__}: "
            f"{tracking.mask_url(str(err))[:200]}; the trial is re-queued, the run stays open until closed in MLflow")
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
