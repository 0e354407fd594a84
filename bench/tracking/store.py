"""Where runs go: the tracking URI (masked in every message), the store check, experiments tagged as
model training.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from .. import faults
from . import mlflow_log
from ..errors import TrackingError


DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MLRUNS = Path("mlruns")

# Run tags this package writes, so readers (report, tune resume) use the same names.
TAG_KIND = "bench.kind"  # train | study | trial | confirm | batch_size | report
TAG_NORM = "bench.norm"
TAG_STUDY = "bench.study"
TAG_EXPERIMENT = "bench.experiment"  # on a study's parent run: the experiment file it was tuned from (its name)
TAG_STATE = "bench.state"  # COMPLETE | PRUNED | FAIL | REJECTED | INTERRUPTED
TAG_TRIAL = "optuna.trial_number"
TAG_ERROR = "bench.error"
TAG_RESUMED = "bench.resumed_after_epoch"  # a confirm run reopened from its epoch checkpoint
TAG_HARDWARE = "bench.hardware"  # the CPU model or GPU a training run ran on

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
