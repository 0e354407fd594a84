"""No error is swallowed (issue 14): a dead trial's run that cannot be closed, predictions that cannot
be read and MLflow's deprecation warnings each reach the user."""

from __future__ import annotations

import logging
import uuid
import warnings

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from bench import tracking
from bench.tracking import mlflow_log
from bench.tune import recovery


def test_dead_trial_whose_run_cannot_be_closed_is_a_warning_naming_the_run(monkeypatch, caplog):
    study = optuna.create_study()
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", "abc123")
    frozen = study._storage.get_trial(trial._trial_id)

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server at http://u:s3cret@host:5000 is down")

    monkeypatch.setattr(tracking, "close_run", unreachable)
    assert recovery.mark_dead_trial(study, frozen, "worker died")
    with caplog.at_level(logging.WARNING):
        recovery.end_trial_run(study, frozen, "worker died")
    assert study.trials[0].state == TrialState.FAIL  # settled in Optuna all the same
    [line] = [r.getMessage() for r in caplog.records if r.name == "bench.tune.recovery"]
    assert "MLflow run abc123" in line and "left RUNNING" in line and "ConnectionError" in line
    assert "s3cret" not in line


@pytest.fixture
def run_with_predictions(isolated_mlruns):
    tracking.setup()
    with tracking.run("preds", "r", "train") as active:
        path = isolated_mlruns / "test.npz"
        np.savez_compressed(path, predicted=np.arange(3), labels=np.arange(3), wrong_index=np.array([], dtype=int),
                            wrong_images=np.zeros((0, 3, 32, 32), dtype=np.uint8))
        mlflow.log_artifact(str(path), "predictions")
    with tracking.run("preds", "none", "train") as bare:
        pass
    return active.info.run_id, bare.info.run_id


def test_predictions_read_back_and_absent_ones_are_none_quietly(run_with_predictions, caplog):
    with_preds, without = run_with_predictions
    with caplog.at_level(logging.WARNING):
        assert tracking.load_predictions(with_preds)["predicted"].tolist() == [0, 1, 2]
        assert tracking.load_predictions(without) is None
    assert not [r for r in caplog.records if r.name == "bench.tracking"]


def test_predictions_that_fail_to_download_are_a_warning(run_with_predictions, monkeypatch, caplog):
    with_preds, _ = run_with_predictions

    def broken(*args, **kwargs):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    with caplog.at_level(logging.WARNING):
        assert tracking.load_predictions(with_preds) is None
    [line] = [r.getMessage() for r in caplog.records if r.name.startswith("bench.tracking")]
    assert f"predictions/test.npz of run {with_preds} could not be read (OSError: artifact store unreachable)" in line


def test_mlflow_deprecations_show_once_and_other_mlflow_warnings_stay_quiet():
    deprecated, noise, internal = (f"{text} {uuid.uuid4()}" for text in ("old_api is deprecated", "chatter", "sqlalchemy noload"))
    with warnings.catch_warnings(record=True) as caught:
        tracking._quiet()
        for _ in range(2):
            warnings.warn_explicit(deprecated, FutureWarning, "mlflow/x.py", 1, module="mlflow.x")  # MLflow's @deprecated
            warnings.warn_explicit(noise, UserWarning, "mlflow/x.py", 2, module="mlflow.x")
            warnings.warn_explicit(internal, DeprecationWarning, "mlflow/x.py", 3, module="mlflow.x")  # a library's, about MLflow
    assert [str(w.message) for w in caught] == [deprecated]


def test_mlflow_logged_deprecations_reach_the_user_and_its_chatter_only_the_log(isolated_mlruns, capsys):
    log = mlflow_log.route(isolated_mlruns / "bench.log")  # what tracking.setup does
    child = logging.getLogger("mlflow.models.model")
    child.warning("`artifact_path` is deprecated. Please use `name` instead.")
    child.warning("Creating initial MLflow database tables...")
    child.info("Updating database tables")
    child.error("could not write the artifact")
    err = capsys.readouterr().err
    assert "`artifact_path` is deprecated" in err and "could not write the artifact" in err
    assert "database tables" not in err
    assert "Creating initial MLflow database tables" in log.read_text()
