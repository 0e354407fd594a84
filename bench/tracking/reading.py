"""Reading runs back for records, report and rescore: searches, metric histories, models, predictions."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
