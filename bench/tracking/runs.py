"""Runs: the run context every training uses, the parent run workers share, params, metrics, tags,
datasets.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import numpy as np

from .. import faults
from ..errors import BudgetError
from .store import TAG_KIND, TAG_STUDY, TAG_STATE, TAG_TRIAL, TAG_ERROR, TAG_RESUMED, TAG_HARDWARE, TRAINING_KINDS, mask_url, experiment_id


@contextlib.contextmanager
def run(experiment: str, run_name: str, kind: str, tags: dict[str, Any] | None = None, nested: bool = False,
        run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run as a context; its end status follows the outcome.

    FINISHED on success or pruning (the trial's state is in the ``bench.state`` tag), FAILED on an
    error (text in ``bench.error``), KILLED on Ctrl-C. Nothing is left RUNNING.
    """
    import mlflow

    all_tags = {TAG_KIND: kind, **{k: str(v) for k, v in (tags or {}).items()}}  # a tracking server takes strings only
    active = mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else experiment_id(experiment), run_name=None if run_id else run_name,
        nested=nested, tags=all_tags if not run_id else None, parent_run_id=parent_run_id,
        log_system_metrics=kind in TRAINING_KINDS and system_metrics_enabled(),
    )
    try:
        yield active
    except KeyboardInterrupt:
        _end_active_run("KILLED", {TAG_STATE: "INTERRUPTED"})
        raise
    except BaseException as err:
        state = _state_of(err)
        if faults.server_lost(err):
            faults.fail_fast()
        tags = {TAG_STATE: state, **({TAG_ERROR: mask_url(f"{type(err).__name__}: {err}")[:5000]} if state == "FAIL" else {})}
        _end_active_run("FINISHED" if state in ("PRUNED", "REJECTED") else "FAILED", tags)
        raise
    else:
        mlflow.end_run("FINISHED")


def mark_resumed(run: Any, epochs_done: int, hardware: str) -> None:
    """On the reopened ``run``: drop the interruption's state and error tags, record where it resumed,
    and add ``hardware`` to the processors its epochs ran on when this machine is another one."""
    import mlflow

    for tag in (TAG_STATE, TAG_ERROR):
        if tag in run.data.tags:
            mlflow.delete_tag(tag)
    mlflow.set_tag(TAG_RESUMED, epochs_done)
    ran_on = run.data.tags.get(TAG_HARDWARE)
    if ran_on and ran_on.split(", then ")[-1] != hardware:
        mlflow.set_tag(TAG_HARDWARE, f"{ran_on}, then {hardware}")


def discard_active_run() -> None:
    """End the active run and delete it: a run that lost the race to train its configuration."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    mlflow.end_run("KILLED")
    mlflow.MlflowClient().delete_run(run_id)


def system_metrics_enabled() -> bool:
    """MLflow's per-run CPU, memory, disk and network samples (``system/*`` metrics): on where psutil
    is installed, unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise. Sampling every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's default 10)."""
    import importlib.util

    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined:
        return MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()
    return importlib.util.find_spec("psutil") is not None


def _end_active_run(status: str, tags: dict[str, str]) -> None:
    """End the active run while an error propagates. If the store is gone this fails: the error
    that is propagating matters more, and ``end_run`` still takes the run off MLflow's stack (left
    there, MLflow's exit hook would end it FINISHED). The next resume ends it FAILED instead."""
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.set_tags(tags)
    with contextlib.suppress(Exception):
        mlflow.end_run(status)


def _state_of(err: BaseException) -> str:
    import optuna

    if isinstance(err, optuna.TrialPruned):
        return "PRUNED"
    if isinstance(err, BudgetError):
        return "REJECTED"
    return "FAIL"


def log_params(params: dict[str, Any], metrics: dict[str, float] | None = None, tags: dict[str, Any] | None = None) -> None:
    """The active run's configuration in one request to the store (each fluent call is one): params,
    constant metrics such as ``n_params``, and tags."""
    import mlflow

    log_to_run(mlflow.active_run().info.run_id, metrics=metrics, params=params, tags=tags)


def log_dataset(data) -> None:
    """Record CIFAR-10 as an MLflow dataset input (name, source folder, content digest)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    folder = data.source.split(":", 1)[1]
    dataset = MetaDataset(resolve_dataset_source(folder), name="cifar10", digest=data.digest)
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context="training")
            break
        except mlflow.exceptions.MlflowException as err:
            # Workers logging the same dataset to one experiment at once race to create its row
            # (UNIQUE constraint on a tracking server's store); the retry finds it and links it.
            if attempt == 2 or "unique" not in str(err).lower():
                raise
            time.sleep(0.2 + attempt)
    mlflow.set_tags({"bench.data_digest": data.digest, "bench.data_source": data.source})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics of the active run (at ``step``, e.g. the epoch); None and non-finite values are left out."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Tags on the active run."""
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


PARENT_SETTLE_SECONDS = 1.0  # longer than a create-run request takes to land (open_parent)


def open_parent(experiment: str, study: str, run_name: str, tags: dict[str, Any]) -> tuple[str, bool]:
    """The study's RUNNING parent run if a worker already opened one, else a new one.

    Returns (run_id, joined). Workers on other machines find the parent by its tags. MLflow has
    no create-if-absent, so workers starting at once may each create one: every worker then
    takes the oldest RUNNING parent (start time, then run id) and deletes its own if it lost, so
    they all agree on one. (Start times come from the workers' clocks: keep them in sync.)
    """
    import mlflow

    exp_id = experiment_id(experiment)
    client = mlflow.MlflowClient()

    def running_parents() -> list:
        found = client.search_runs(
            [exp_id], f"tags.`{TAG_KIND}` = 'study' AND tags.`{TAG_STUDY}` = '{study}' AND attributes.status = 'RUNNING'",
            max_results=50, order_by=["attributes.start_time ASC"],
        )
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    running = running_parents()
    if running:
        return running[0].info.run_id, True
    tags = {TAG_KIND: "study", TAG_STUDY: study, **{k: str(v) for k, v in tags.items()}}  # a server takes strings only
    created = client.create_run(exp_id, run_name=run_name, tags=tags)
    # A run's start time is taken by its client before the request goes out: a sibling's create can
    # land after our search with an earlier time. Search again once such requests have landed.
    for settle in (0.0, PARENT_SETTLE_SECONDS):
        time.sleep(settle)
        oldest = running_parents()
        if oldest and oldest[0].info.run_id != created.info.run_id:
            client.set_terminated(created.info.run_id, "KILLED")  # another worker's parent came first
            client.delete_run(created.info.run_id)
            return oldest[0].info.run_id, True
    return created.info.run_id, False


def find_trial_run(study: str, trial_number: int) -> str | None:
    """The RUNNING MLflow run of an Optuna trial, by its tags (for a worker that died before
    recording the run id in the trial)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(study)
    if exp is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [exp.experiment_id], f"tags.`{TAG_STUDY}` = '{study}' AND tags.`{TAG_TRIAL}` = '{trial_number}' AND attributes.status = 'RUNNING'",
        max_results=1)
    return runs[0].info.run_id if runs else None


def run_params(run_id: str) -> dict[str, str]:
    """The params a run logged; empty if the run is gone from this tracking store."""
    import mlflow

    try:
        return dict(mlflow.MlflowClient().get_run(run_id).data.params)
    except mlflow.exceptions.MlflowException:
        return {}


def close_run(run_id: str, status: str = "FINISHED", error: str | None = None, tags: dict[str, Any] | None = None) -> None:
    import mlflow
    from mlflow.entities import RunTag

    client = mlflow.MlflowClient()
    if error and (before := client.get_run(run_id).data.tags.get(TAG_ERROR)):  # what the worker recorded before it died
        error = f"{before}; then {error}"
    tags = {**({TAG_STATE: "FAIL", TAG_ERROR: mask_url(error)[:5000]} if error else {}), **(tags or {})}
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def trial_runs(study: str) -> dict[int, Any]:
    """The MLflow runs of a study's trials, by trial number (none if the experiment does not exist)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(study)
    if exp is None:
        return {}
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'trial' AND tags.`{TAG_STUDY}` = '{study}'",
                                             max_results=50000)
    return {int(r.data.tags[TAG_TRIAL]): r for r in runs if r.data.tags.get(TAG_TRIAL, "").isdigit()}


def log_to_run(run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
               tags: dict[str, Any] | None = None, texts: dict[str, str] | None = None) -> None:
    """Log to a run that is not the active one (a parent shared by several workers)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None and np.isfinite(v)],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
    for artifact_file, text in (texts or {}).items():
        client.log_text(run_id, text, artifact_file)
