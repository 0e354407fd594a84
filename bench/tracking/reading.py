"""Reading runs back for records, report and rescore: searches, metric histories, models, predictions."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, coerce, hyperparameter_types, with_added_fields
from ..errors import ConfigError
from .store import TAG_KIND, mask_url
from .models import load_model


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
    """The model ``run`` logged (``log_model``), on the CPU, as today's code builds it; None when it logged none.

    The logged model is a pickled module: it keeps the attributes its classes had when it was logged, and
    in this process those classes are today's, whose ``forward`` may read attributes added since. So the
    network is rebuilt from the run's logged model settings and given the logged weights, as a checkpoint
    is; a run whose settings no longer build those weights keeps the module as it was pickled."""
    from ..models import create_model  # here, so reading runs (bench report) imports no model code

    uri = run.data.tags.get("bench.model_uri")
    if not uri:
        return None
    logged = load_model(uri)
    try:
        rebuilt = create_model(**model_settings(run.data.params))
        rebuilt.load_state_dict(logged.state_dict())
    except (ConfigError, TypeError, KeyError, RuntimeError):  # settings or weights of another shape
        return logged
    return rebuilt.eval()


def model_settings(params: dict[str, str]) -> dict[str, Any]:
    """A run's logged params (text) as ``ModelConfig`` fields, typed; fields added since at their defaults."""
    saved = with_added_fields(params)
    types = hyperparameter_types()
    return {f.name: coerce(f.name, saved[f.name], types[f.name]) for f in dataclasses.fields(ModelConfig)}


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
