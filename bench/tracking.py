"""Everything MLflow: tracking URI, experiments, parent and nested runs, metrics, models, registry.

Runs use MLflow's fluent API, so a study shows in the UI as a tree: one parent run per
``bench tune`` invocation and one nested run per trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import BudgetError, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MLRUNS = Path("mlruns")

# Run tags this package writes, so readers (report, tune resume) use the same names.
TAG_KIND = "bench.kind"  # train | study | trial | confirm | batch_size | report
TAG_NORM = "bench.norm"
TAG_STUDY = "bench.study"
TAG_STATE = "bench.state"  # COMPLETE | PRUNED | FAIL | REJECTED | INTERRUPTED
TAG_TRIAL = "optuna.trial_number"
TAG_ERROR = "bench.error"


_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)(?P<password>[^\s/@]+)@")


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; anything without a password unchanged.

    Works on any text, so error messages that quote a URL are masked too."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}***@", str(url))


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _deprecations_and_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "deprecat" in record.getMessage().lower()


def _quiet() -> None:
    for name in ("alembic", "urllib3", "git", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow's chatter stays quiet, but not what will break: its deprecation notices (FutureWarning
    # from its @deprecated, or a logged warning) show, once each. DeprecationWarnings raised inside
    # MLflow's own code (SQLAlchemy's about MLflow's queries) are MLflow's to fix and stay hidden.
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.setLevel(logging.WARNING)
    own = [h for h in mlflow_logger.handlers if h not in logging.getLogger().handlers]  # MLflow's, not shared ones
    for handler in own:  # on the handler: a logger's filter misses its children's records
        if _deprecations_and_errors not in handler.filters:
            handler.addFilter(_deprecations_and_errors)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("once", category=FutureWarning, module="mlflow")
    warnings.filterwarnings("ignore", message=".*pydantic.*")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download many small artifacts
    # MLflow prints "View run at <server URL>" for every run on a tracking server: noise between the
    # trial lines, and the URL would carry a password given in --tracking-uri.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def setup(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default: SQLite under ./mlruns); check the store answers."""
    import mlflow

    _quiet()
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    try:
        mlflow.search_experiments(max_results=1)
    except Exception as err:  # the store's own exception types vary by backend
        raise TrackingError(f"MLflow tracking store {mask_url(uri)} is unreachable ({type(err).__name__}); start it or pass --tracking-uri") from None
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
    """The MLflow experiment called ``name``, created if needed."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri(), name))
    except Exception:  # created meanwhile by another worker
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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
    )
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.set_tag(TAG_STATE, "INTERRUPTED")
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        state = _state_of(err)
        mlflow.set_tag(TAG_STATE, state)
        if state == "FAIL":
            mlflow.set_tag(TAG_ERROR, mask_url(f"{type(err).__name__}: {err}")[:5000])
        mlflow.end_run("FINISHED" if state in ("PRUNED", "REJECTED") else "FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


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


def close_run(run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    if error:
        client.set_tag(run_id, TAG_STATE, "FAIL")
        client.set_tag(run_id, TAG_ERROR, mask_url(error)[:5000])
    client.set_terminated(run_id, status)


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


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: v for k, v in params.items()})


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


def log_epoch(epoch: int, record: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in record.items() if np.isfinite(v)}, step=epoch)


def log_metrics(metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})


def log_model(model: torch.nn.Module, registered_name: str | None = None) -> str:
    """Log ``model`` (fp32, CPU, eval mode) with signature and input example; returns its model URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    import bench

    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
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
    import tempfile

    import mlflow

    predicted = predicted.numpy().astype(np.int8)
    labels = test.labels.numpy().astype(np.int8)
    wrong = np.flatnonzero(predicted != labels)[:n_examples]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.npz"
        np.savez_compressed(path, predicted=predicted, labels=labels, wrong_index=wrong,
                            wrong_images=test.images[torch.from_numpy(wrong)].numpy())
        mlflow.log_artifact(str(path), "predictions")


def register(model_uri: str, name: str, tags: dict[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of registered model ``name``; returns the version."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags)
    return version.version


def load_model(model_uri: str) -> torch.nn.Module:
    import mlflow.pytorch

    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
