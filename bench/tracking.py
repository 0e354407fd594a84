"""Everything MLflow: tracking URI, experiments, parent and nested runs, metrics, models, registry.

Runs use MLflow's fluent API, so a study shows in the UI as a tree: one parent run per
``bench tune`` invocation and one nested run per trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import faults, mlflow_log
from .errors import BudgetError, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MLRUNS = Path("mlruns")
PARENT_SETTLE_SECONDS = 1.0  # longer than a create-run request takes to land (open_parent)

# Run tags this package writes, so readers (report, tune resume) use the same names.
TAG_KIND = "bench.kind"  # train | study | trial | confirm | batch_size | report
TAG_NORM = "bench.norm"
TAG_STUDY = "bench.study"
TAG_STATE = "bench.state"  # COMPLETE | PRUNED | FAIL | REJECTED | INTERRUPTED
TAG_TRIAL = "optuna.trial_number"
TAG_ERROR = "bench.error"

# MLflow's record of what an experiment is for (its UI 3.17 picks an experiment's page from its own
# GenAI / Model training switch instead: see servers.runs_url).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_KINDS = ("train", "trial", "confirm", "batch_size")  # runs that get MLflow's system metrics


_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)(?P<password>[^\s/@]+)@")


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; anything without a password unchanged.

    Works on any text, so error messages that quote a URL are masked too."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}***@", str(url))


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _quiet() -> None:
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("once", category=FutureWarning, module="mlflow")
    warnings.filterwarnings("ignore", message=".*pydantic.*")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download many small artifacts
    # MLflow prints "View run at <server URL>" for every run on a tracking server: noise between the
    # trial lines, and the URL would carry a password given in --tracking-uri.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def setup(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default: SQLite under ./mlruns); check the store answers."""
    import mlflow

    _quiet()
    faults.configure_client()
    uri = resolve_uri(uri)
    mlflow_log.route(mlflow_log.log_path(uri))  # also creates the SQLite store's folder
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    try:
        if uri.startswith("sqlite:///"):
            with faults.store_lock(Path(uri.removeprefix("sqlite:///"))):  # the first query creates the tables
                mlflow.search_experiments(max_results=1)
        else:
            mlflow.search_experiments(max_results=1)
    except Exception as err:  # the store's own exception types vary by backend
        if uri.startswith(("http://", "https://")) and faults.server_lost(err):
            raise TrackingError(f"MLflow tracking store {mask_url(uri)} is unreachable ({type(err).__name__}); start it or pass --tracking-uri") from None
        hint = "free some space" if faults.disk_full(err) else "check the store or pass --tracking-uri"
        raise TrackingError(f"MLflow tracking store {mask_url(uri)} cannot be opened ({faults.root_cause(err)}); {hint}") from None
    return uri


def _probe_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds: MLflow's client retries an unreachable server for about four minutes."""
    import urllib.error
    import urllib.request

    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    # urllib would take "user:password@host" for the host name: probe the host alone (MLflow's own
    # client sends the credentials as HTTP basic auth).
    probe = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        urllib.request.urlopen(probe.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answers (perhaps behind auth): MLflow's own check decides
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {mask_url(uri)} is unreachable ({reason}); start it or pass --tracking-uri") from None
    except ValueError:
        return  # a URL urllib cannot open (e.g. credentials in it): MLflow's own check decides


def artifact_location(uri: str, name: str) -> str | None:
    """For a local SQLite store, keep artifacts beside it under mlruns/artifacts/<experiment>."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides its own artifact root
    root = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / re.sub(r"[^\w.-]", "_", name)
    return root.resolve().as_uri()


def experiment_id(name: str) -> str:
    """The MLflow experiment called ``name``, created if needed, tagged as model training."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before bench tagged its experiments
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri(), name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created meanwhile by another worker
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def tag_experiments() -> list[tuple[str, str]]:
    """Tag every experiment of the store that has no kind yet (created before bench tagged them);
    returns (id, name) of each experiment that has runs or is not MLflow's empty Default."""
    import mlflow

    client = mlflow.MlflowClient()
    found = []
    for exp in client.search_experiments(order_by=["last_update_time DESC"]):
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if exp.experiment_id != "0" or client.search_runs([exp.experiment_id], max_results=1):
            found.append((exp.experiment_id, exp.name))
    return found


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


# ---------------------------------------------------------------- parent runs shared by workers


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


def log_model(model: torch.nn.Module, registered_name: str | None = None) -> str:
    """Log ``model`` (fp32, CPU, eval mode) as a model of raw images (``inference.RawImageModel``),
    with a signature, an input example and the class names in its metadata; returns its model URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    import bench

    from . import inference

    net = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    packaged = inference.RawImageModel(net).eval()
    example = inference.input_example()
    with torch.inference_mode():
        output = packaged(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        packaged,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        metadata=inference.metadata(),
        code_paths=[str(Path(bench.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        registered_model_name=registered_name,
        serialization_format="pickle",  # a plain nn.Module; torch.export would fix the batch size to 1
    )
    mlflow.set_tag("bench.model_uri", info.model_uri)
    return info.model_uri


def log_predictions(predicted: torch.Tensor, test, n_examples: int = 10) -> None:
    """Test-set predictions as ``predictions/test.npz``: predicted and true labels for every image,
    plus the first ``n_examples`` misclassified images, so reports need nothing but MLflow."""
    import mlflow

    predicted = predicted.numpy().astype(np.int8)
    labels = test.labels.numpy().astype(np.int8)
    wrong = np.flatnonzero(predicted != labels)[:n_examples]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.npz"
        np.savez_compressed(path, predicted=predicted, labels=labels, wrong_index=wrong,
                            wrong_images=test.images[torch.from_numpy(wrong)].numpy())
        mlflow.log_artifact(str(path), "predictions")


CHAMPION = "champion"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def champion(name: str):
    """The model version registered model ``name``'s champion alias points at, or None."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no such model, or no alias yet
        return None


def promote_champion(model_uri: str, name: str, val_acc: float, tags: dict[str, Any]) -> str | None:
    """Register ``model_uri`` as a new version of ``name`` and point the champion alias at it, if its
    validation accuracy beats the current champion's; returns the new version, or None. Validation,
    never test, decides: the test set chooses nothing."""
    import mlflow

    current = champion(name)
    if current is not None and val_acc <= float(current.tags.get("val_acc", "-inf")):
        return None
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()}).version
    client = mlflow.MlflowClient()
    latest = champion(name)  # another worker may have promoted a better model meanwhile
    if latest is None or val_acc > float(latest.tags.get("val_acc", "-inf")):
        client.set_registered_model_alias(name, CHAMPION, version)
        return version
    client.set_model_version_tag(name, version, "superseded_by", latest.version)
    return None


def set_tags(tags: dict[str, Any]) -> None:
    """Tags on the active run."""
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def active_model_uri() -> str | None:
    """The model URI ``log_model`` recorded on the active run."""
    import mlflow

    return mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("bench.model_uri")


def load_model(model_uri: str) -> torch.nn.Module:
    """The trained network of a logged model, which takes normalised batches as bench's evaluation
    feeds them (``data.normalize``); users load the model itself, which takes raw images."""
    import mlflow.pytorch

    from .inference import unwrap

    return unwrap(mlflow.pytorch.load_model(model_uri, map_location="cpu"))


# ---------------------------------------------------------------- reading runs back (records, report, rescore)


PREDICTIONS = "predictions/test.npz"  # written by log_predictions


def current_uri() -> str:
    """The store MLflow reads and writes now, its password masked, for messages."""
    import mlflow

    return mask_url(mlflow.get_tracking_uri())


def search_runs(experiment: str, kind: str, where: str = "") -> list[Any]:
    """Runs of the experiment named ``experiment`` tagged ``bench.kind = kind`` (and the filter
    ``where``), newest first; none when there is no such experiment."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`{TAG_KIND}` = '{kind}'" + (f" and {where}" if where else "")
    return mlflow.search_runs([exp.experiment_id], query, output_format="list", order_by=["attributes.start_time DESC"])


def get_run(run_id: str) -> Any | None:
    """The run, or None when this store has no run with that id."""
    import mlflow

    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def load_run_model(run) -> torch.nn.Module | None:
    """The model ``run`` logged (``log_model``), on the CPU; None when it logged none."""
    uri = run.data.tags.get("bench.model_uri")
    return load_model(uri) if uri else None


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a per-epoch metric, by step."""
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def load_predictions(run_id: str) -> dict[str, np.ndarray] | None:
    """The run's ``predictions/test.npz`` (predicted, labels, wrong_index, wrong_images), or None when
    the run has none (logged before predictions were). One that exists but cannot be read is a
    warning naming the run, not a silent empty panel."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            if PREDICTIONS not in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, Path(PREDICTIONS).parent.as_posix())}:
                return None
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS, dst_path=tmp)
            with np.load(Path(path)) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception as err:  # the store's exception types vary by backend
            logging.getLogger(__name__).warning(
                f"warning: {PREDICTIONS} of run {run_id} could not be read ({type(err).__name__}: "
                f"{mask_url(str(err))[:200]}); its confusion matrix and examples are left out")
            return None


def log_folder(folder: str | Path) -> str:
    """Every file under ``folder`` as artifacts of the active run; returns where they are stored."""
    import mlflow

    mlflow.log_artifacts(str(folder))
    return mlflow.get_artifact_uri()
