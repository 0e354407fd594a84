"""Which trials count toward a study's total, and recovery of trials whose worker died, lost a store
or was interrupted: each failed trial's configuration is queued again exactly once, up to a cap.

The retry record is Optuna's (``RetryHeartbeatStaleTrialCallback``): a re-queued trial carries the
system attrs ``failed_trial`` (the first try) and ``retry_history`` (every earlier try), written by
the one ``add_trial`` that creates it, with user attrs saying why, by whom and when, and how many
earlier tries failed (``failed_tries``; a Ctrl-C is not the configuration's fault and does not count).
After ``1 + BENCH_MAX_RETRIES`` failed tries the configuration is marked failed: it counts toward the
study's total, and is not queued again.

Exactly once: the storage changes a trial RUNNING -> FAIL atomically, for one process only.
- A dead worker's trial (kill -9, OOM, lost database): the process that fails it (Optuna's heartbeat
  check, or the missing process on this host) re-queues it; it is marked ``worker_lost`` first.
- A trial its own worker failed (Ctrl-C: ``interrupted``; an error: ``fail_reason``, both written
  before the state change) is re-queued by the next start, if nothing re-queued it yet.
Two processes starting at once may both re-queue the latter: the first retry popped runs, a later
one is skipped unrun (``duplicate_of``, counted as surplus).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import faults, settings, tracking
from ..tracking.handover import process_alive, worker_id

def max_retries() -> int:
    return settings.number("BENCH_MAX_RETRIES")

NOT_RETRIED = ("diverged", "surplus", "duplicate_of")  # failed by its own result, or never run


def finished(trial: FrozenTrial) -> bool:
    """Counts toward the study's total: complete (incl. rejected), pruned and diverged trials, and a
    configuration whose retries are used up; not running ones, nor those interrupted or whose
    worker died (they are re-queued)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ("diverged" in trial.user_attrs or exhausted(trial))


def finished_count(study: optuna.Study) -> int:
    return sum(finished(t) for t in study.get_trials(deepcopy=False))


def counted(trial: FrozenTrial) -> bool:
    """Finished, or running (it will finish, or be failed and re-queued if its worker dies)."""
    return finished(trial) or trial.state == TrialState.RUNNING


def feasible_complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("rejected")]


def carried_attrs(trial: FrozenTrial) -> dict:
    """What a re-run inherits from the trial it repeats: whether it is the study's baseline."""
    return {"baseline": True} if trial.user_attrs.get("baseline") else {}


def lost(trial: FrozenTrial) -> bool:
    """Failed for another reason than its own result: its worker died, lost a store or was stopped."""
    return trial.state == TrialState.FAIL and not set(NOT_RETRIED) & trial.user_attrs.keys()


def failed_tries(trial: FrozenTrial) -> int:
    """How many tries of this configuration failed, this one included (a Ctrl-C does not count)."""
    return trial.user_attrs.get("failed_tries", 0) + (0 if trial.user_attrs.get("interrupted") else 1)


def exhausted(trial: FrozenTrial) -> bool:
    return lost(trial) and not trial.user_attrs.get("interrupted") and failed_tries(trial) > max_retries()


def tries(trial: FrozenTrial) -> list[int]:
    """The trial numbers of every try of this configuration, this one last."""
    return [*trial.system_attrs.get("retry_history", []), trial.number]


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- settling one failed trial


def settle(study: optuna.Study, trial: FrozenTrial, retry_reason: str, error: str) -> bool:
    """Queue a failed trial's configuration again, or past the cap mark it failed; then end its
    MLflow run with ``error``. True if re-queued."""
    if not exhausted(trial):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={"retry_of": trial.number, "retry_reason": retry_reason, "requeued_by": worker_id(),
                        "requeued_at": time.time(), "failed_tries": failed_tries(trial), **carried_attrs(trial)},
            system_attrs={"failed_trial": trial.system_attrs.get("failed_trial", trial.number), "retry_history": tries(trial)},
        ))
        end_trial_run(study, trial, f"{error}; configuration re-queued")
        return True
    numbers = ", ".join(map(str, tries(trial)))
    say(f"trial {trial.number:>3}  params {trial.user_attrs.get('n_params', 0):>6,}  val acc      -  test acc      -  "
        f"FAILED after {failed_tries(trial)} tries (trials {numbers}): {error}; configuration marked failed, not re-queued "
        f"(BENCH_MAX_RETRIES={max_retries()})")
    end_trial_run(study, trial, f"{error}; retries used up: {failed_tries(trial)} tries failed (trials {numbers}), configuration marked failed",
                  {"bench.retries_exhausted": failed_tries(trial)})
    return False


def end_trial_run(study: optuna.Study, trial: FrozenTrial, error: str, tags: dict[str, Any] | None = None) -> None:
    """End the trial's MLflow run FAILED (KILLED if interrupted) with the reason. If the tracking
    store is down too, a warning names the run, and the next start ends it (``end_runs_of_failed_trials``)."""
    try:
        run_id = trial.user_attrs.get("mlflow_run_id") or tracking.find_trial_run(study.study_name, trial.number)
        if run_id:
            tracking.close_run(run_id, "KILLED" if trial.user_attrs.get("interrupted") else "FAILED", error=error, tags=tags)
    except Exception as err:  # the tracking store is unreachable: the trial is settled in Optuna all the same
        run = trial.user_attrs.get("mlflow_run_id") or f"of trial {trial.number}"
        logging.getLogger(__name__).warning(
            f"warning: MLflow run {run} (study '{study.study_name}') left RUNNING: {type(err).__name__}: "
            f"{tracking.mask_url(str(err))[:200]}; the next `bench tune` of this study ends it")


def mark_dead_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Fail a RUNNING trial whose worker is gone. False when another process got there first (then
    it settles the trial, not this one)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "worker_lost", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a worker process on this host that no longer exists (kill -9, crash,
    lost database): fail them, re-queue their configuration, end their MLflow runs FAILED.
    (RDB storages also detect dead workers on any host through Optuna's heartbeat.)"""
    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not process_alive(int(pid)) and mark_dead_trial(study, t, f"worker {worker} died"):
            settle(study, study._storage.get_trial(t._trial_id), "process gone", f"worker {worker} died")
            recovered.append(t.number)
    return recovered


def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat check failed a trial whose worker stopped beating (it alone changed its
    state): queue its configuration again, end its MLflow run."""
    settle(study, trial, "heartbeat stale", "worker stopped sending heartbeats (killed or lost)")


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again the configuration of every trial its own worker failed (Ctrl-C, a lost tracking
    store) and that nothing re-queued yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        own = t.user_attrs.get("interrupted") or t.user_attrs.get("fail_reason")
        if lost(t) and own and "worker_lost" not in t.user_attrs and t.number not in retried:
            if settle(study, t, "interrupted" if t.user_attrs.get("interrupted") else "failed", failure_reason(t)):
                queued.append(t.number)
    return queued


def recover(study: optuna.Study) -> tuple[list[int], list[int]]:
    """At a start: (dead workers' trials, trials their worker failed) re-queued; MLflow runs of
    failed trials ended, so MLflow and Optuna agree."""
    recovered, requeued = fail_dead_local_trials(study), requeue_interrupted(study)
    end_runs_of_failed_trials(study)
    return recovered, requeued


def failure_reason(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    if attrs.get("interrupted"):
        return "interrupted (Ctrl-C or SIGTERM)"
    return attrs.get("worker_lost") or attrs.get("fail_reason") or "worker stopped sending heartbeats (killed or lost)"


def end_runs_of_failed_trials(study: optuna.Study) -> list[int]:
    """End FAILED (KILLED if interrupted) every MLflow run of a trial Optuna holds failed that is
    still RUNNING or was ended FINISHED (its worker lost the tracking server, or Optuna lost the
    result): both stores then agree trial for trial. Returns their trial numbers."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if not failed:
        return []
    runs = tracking.trial_runs(study.study_name)
    retry = {t.user_attrs["retry_of"]: t.number for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
    ended = []
    for t in failed:
        run = runs.get(t.number)
        if run is not None and run.info.status not in ("FAILED", "KILLED"):
            reason = failure_reason(t) + (f"; re-run as trial {retry[t.number]}" if t.number in retry else "")
            tracking.close_run(run.info.run_id, "KILLED" if t.user_attrs.get("interrupted") else "FAILED", error=reason)
            ended.append(t.number)
    return ended


# ---------------------------------------------------------------- around the objective


def guard(objective: Callable[[optuna.Trial], float], console) -> Callable[[optuna.Trial], float]:
    """The objective, except that a second retry of one failed trial is skipped unrun, and a trial
    that raises records why in Optuna before Optuna marks it failed (the MLflow run may not get it)."""

    def guarded(trial: optuna.Trial) -> float:
        first = first_retry(trial)
        if first is not None:
            from .objective import SurplusTrial

            trial.set_user_attr("surplus", True)
            trial.set_user_attr("duplicate_of", first)
            console.print(f"trial {trial.number:>3}  not run: trial {trial.user_attrs['retry_of']} was re-queued twice, trial {first} runs it")
            raise SurplusTrial(f"trial {trial.number} repeats trial {first}")
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            with contextlib.suppress(Exception):
                trial.set_user_attr("fail_reason", faults.root_cause(err, 400))
            raise

    return guarded


def first_retry(trial: optuna.Trial) -> int | None:
    """The number of an earlier retry of the same failed trial, if there is one."""
    of = trial.user_attrs.get("retry_of")
    if of is None:
        return None
    earlier = [t.number for t in trial.study.get_trials(deepcopy=False) if t.user_attrs.get("retry_of") == of and t.number < trial.number]
    return min(earlier, default=None)


