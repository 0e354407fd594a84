"""Many workers on one study: real PostgreSQL and a real MLflow tracking server (issue 6).

The server tests need ``BENCH_TEST_POSTGRES_URL`` (postgresql://bench:<password>@127.0.0.1:<port>/bench)
and ``BENCH_TEST_MLFLOW_URL`` (http://127.0.0.1:<port>), as ``.ci/services.sh start`` provides
(``. /tmp/bench-services/env``). They are skipped without them, and fail instead when
``BENCH_REQUIRE_SERVICES=1`` (CI). The journal-storage tests need no server. Every test runs
``bench tune`` as real processes on a tiny real slice (300 train / 200 val images, 1-2 epochs,
one thread), each on a study of its own.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.entities import ViewType
from optuna.trial import TrialState

from bench import tracking
from bench.tune import open_storage
from conftest import fixture_data_dir

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("BENCH_TEST_POSTGRES_URL")
MLFLOW_URL = os.environ.get("BENCH_TEST_MLFLOW_URL")
HEARTBEAT = 2  # seconds: the grace period before a silent worker's trial is failed is 3x this
TINY = ["--set", "train_subset=300", "--set", "val_size=200", "--set", "eval_batch_size=2000", "--threads", "1"]


def data_dir() -> str:
    return str(fixture_data_dir())


def password_of(url: str) -> str:
    from urllib.parse import urlsplit

    secret = urlsplit(url).password
    assert secret and len(secret) >= 6, "the test database URL must carry a password"
    return secret


def study_name(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def tune_cmd(*args: str, epochs: int = 1) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "tune", "--norm", "bn", "-e", str(REPO / "experiments/bn.toml"),
            "--data-dir", data_dir(), "--tune-epochs", str(epochs), *TINY, *args]


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "BENCH_PARENT_RUN_ID", "BENCH_WORKER_INDEX")}
    return {**env, "BENCH_HEARTBEAT_SECONDS": str(HEARTBEAT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


class Worker:
    """One ``bench tune`` process, its output in a file (no pipe to fill up)."""

    def __init__(self, cmd: list[str], cwd: Path, name: str):
        self.log = cwd / f"{name}.log"
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=worker_env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.name = name

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.name} did not finish in {timeout}s; its output:\n{self.output}")


def wait_for_line(workers: list[Worker], text: str, timeout: float = 180) -> tuple[Worker, str]:
    """The first worker whose output has a line containing ``text``, and that line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for w in workers:
            for line in w.output.splitlines():
                if text in line:
                    return w, line
            if w.proc.poll() is not None:
                pytest.fail(f"{w.name} exited ({w.proc.returncode}) before printing {text!r}:\n{w.output}")
        time.sleep(0.2)
    pytest.fail(f"no worker printed {text!r} in {timeout}s")


def study_headers(output: str, name: str) -> int:
    """How many workers opened the study (each prints its header once). Which of them then ran the
    trials is a race, not asserted: on a loaded machine one worker can finish every trial before
    another has imported torch (a fresh-clone CI run saw exactly that)."""
    return sum(line.startswith(f"study '{name}' (") for line in output.splitlines())


def mlflow_runs(tracking_uri: str, experiment: str) -> list:
    """Every run of the experiment, deleted ones included (a worker that lost the race to open the
    parent deletes its own: it must not be left RUNNING either)."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def check_one_study(study: optuna.Study, runs: list, n: int) -> tuple[object, list]:
    """Exactly n finished trials, each once in MLflow under one parent, and nothing left RUNNING."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({tuple(sorted(t.params.items())) for t in done}) == n, "two workers ran the same configuration"

    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    live = [r for r in runs if r.info.lifecycle_stage == "active"]
    parents = [r for r in live if r.data.tags[tracking.TAG_KIND] == "study"]
    assert len(parents) == 1, [(r.info.run_name, r.info.status) for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    trial_runs = [r for r in live if r.data.tags[tracking.TAG_KIND] == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)
    numbers = [int(r.data.tags[tracking.TAG_TRIAL]) for r in trial_runs]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers in MLflow: {sorted(numbers)}"
    finished_runs = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags[tracking.TAG_TRIAL]) for r in finished_runs) == sorted(t.number for t in done)
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == n
    return parent, trial_runs


def assert_secret_hidden(secret: str, outputs: list[str], runs: list, tracking_uri: str) -> None:
    """The password is in no console output, no run's params or tags, no logged model's."""
    for text in outputs:
        assert secret not in text
    for run in runs:
        assert secret not in json.dumps([run.data.params, run.data.tags, run.info.artifact_uri]), run.info.run_name
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_ids = sorted({r.info.experiment_id for r in runs})
    for model in client.search_logged_models(experiment_ids):
        assert secret not in json.dumps([model.params, model.tags, model.source_run_id])


# ---------------------------------------------------------------- PostgreSQL + MLflow server


def test_workers_share_one_postgres_study_under_one_parent_without_showing_the_password(servers, tmp_path):
    pg, server = servers
    secret = password_of(pg)
    tracking_uri = server.replace("://", f"://bench:{secret}@", 1)  # MLflow sends it as basic auth; must never show
    name, n = study_name("workers"), 3
    cmd = tune_cmd("--storage", pg, "--study", name, "--tracking-uri", tracking_uri, "--trials", str(n))
    workers = [Worker(cmd, tmp_path, f"worker{i}") for i in range(3)]
    codes = [w.wait() for w in workers]
    outputs = [w.output for w in workers]
    assert codes == [0, 0, 0], "\n\n".join(outputs)

    study = optuna.load_study(study_name=name, storage=open_storage(pg))
    runs = mlflow_runs(server, name)
    parent, trial_runs = check_one_study(study, runs, n)
    assert len(trial_runs) == n
    assert [study_headers(text, name) for text in outputs] == [1, 1, 1], "\n\n".join(outputs)
    for text in outputs:
        assert "Traceback" not in text and "postgresql://bench:***@" in text
    assert parent.data.tags["bench.storage"] == tracking.mask_url(pg)
    assert_secret_hidden(secret, outputs, runs, server)


def test_jobs_2_on_postgres_runs_the_total_under_one_parent(servers, tmp_path):
    pg, server = servers
    name, n = study_name("jobs"), 2
    launcher = Worker(tune_cmd("--storage", pg, "--study", name, "--tracking-uri", server, "--trials", str(n), "--jobs", "2"), tmp_path, "launcher")
    assert launcher.wait() == 0, launcher.output
    assert "starting 2 workers x 1 thread(s)" in launcher.output

    study = optuna.load_study(study_name=name, storage=open_storage(pg))
    runs = mlflow_runs(server, name)
    parent, trial_runs = check_one_study(study, runs, n)
    assert len(trial_runs) == n and parent.data.tags["bench.jobs"] == "2"
    assert study_headers(launcher.output, name) == 2, launcher.output
    assert_secret_hidden(password_of(pg), [launcher.output], runs, server)


def test_sigkill_mid_trial_is_failed_by_heartbeat_and_rerun_by_a_survivor(servers, tmp_path):
    pg, server = servers
    name, n = study_name("kill9"), 2
    cmd = tune_cmd("--storage", pg, "--study", name, "--tracking-uri", server, "--trials", str(n), epochs=2)
    workers = [Worker(cmd, tmp_path, f"worker{i}") for i in range(2)]
    victim, line = wait_for_line(workers, "epoch   1/2")  # mid-trial: the second epoch is still to come
    killed_number = int(line.split()[1])
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait()
    survivor = next(w for w in workers if w is not victim)
    assert survivor.wait() == 0, survivor.output

    study = optuna.load_study(study_name=name, storage=open_storage(pg))
    trials = study.get_trials(deepcopy=False)
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker"].endswith(f":{victim.proc.pid}")
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed_number]
    assert len(retries) == 1, [(t.number, t.user_attrs) for t in trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["retry_reason"] == "heartbeat stale"
    assert retry.user_attrs["requeued_by"] == retry.user_attrs["worker"] == f"{socket.gethostname()}:{survivor.proc.pid}"
    # Failed only after the grace period (3 heartbeats, the last up to one heartbeat before the kill).
    assert retry.user_attrs["requeued_at"] - killed_at >= 3 * HEARTBEAT - HEARTBEAT - 0.5

    runs = mlflow_runs(server, name)
    parent, trial_runs = check_one_study(study, runs, n)
    by_number = {int(r.data.tags[tracking.TAG_TRIAL]): r for r in trial_runs}
    assert by_number[killed_number].info.status == "FAILED"
    assert "heartbeats" in by_number[killed_number].data.tags[tracking.TAG_ERROR]
    assert len(trial_runs) == n + 1  # the killed trial's run stays, ended FAILED
    assert "Traceback" not in survivor.output

    record = kill_record(trials, runs, killed_number, victim, survivor, killed_at)
    (tmp_path / "kill9_record.json").write_text(json.dumps(record, indent=2))
    print("\nkill -9 record:\n" + json.dumps(record, indent=2))


def kill_record(trials, runs, killed_number, victim, survivor, killed_at) -> dict:
    def since_kill(when) -> float | None:
        if when is None:
            return None
        stamp = when.timestamp() if isinstance(when, datetime.datetime) else when
        return round(stamp - killed_at, 1)

    return {
        "killed": {"trial": killed_number, "worker_pid": victim.proc.pid,
                   "at": datetime.datetime.fromtimestamp(killed_at).isoformat(timespec="seconds")},
        "survivor_pid": survivor.proc.pid,
        "heartbeat_s": HEARTBEAT, "grace_s": 3 * HEARTBEAT,
        "trials": [{"number": t.number, "state": t.state.name, "worker": t.user_attrs.get("worker"),
                    "retry_of": t.user_attrs.get("retry_of"), "retry_reason": t.user_attrs.get("retry_reason"),
                    "requeued_s_after_kill": since_kill(t.user_attrs.get("requeued_at")),
                    "started_s_after_kill": since_kill(t.datetime_start), "ended_s_after_kill": since_kill(t.datetime_complete),
                    "value": t.value} for t in trials],
        "mlflow_runs": [{"name": r.info.run_name, "kind": r.data.tags.get(tracking.TAG_KIND), "status": r.info.status,
                         "lifecycle": r.info.lifecycle_stage, "bench.state": r.data.tags.get(tracking.TAG_STATE),
                         "error": r.data.tags.get(tracking.TAG_ERROR)} for r in runs],
    }


# ---------------------------------------------------------------- unreachable stores (no server needed)


def test_unreachable_storage_or_tracking_server_is_one_line_with_the_password_masked(tmp_path):
    secret = "s3cret-" + uuid.uuid4().hex[:8]
    cases = {
        "storage": (["--storage", f"postgresql://bench:{secret}@127.0.0.1:1/nope"], "postgresql://bench:***@127.0.0.1:1/nope"),
        "tracking": (["--tracking-uri", f"http://bench:{secret}@127.0.0.1:9"], "http://bench:***@127.0.0.1:9"),
    }
    procs = {key: Worker(tune_cmd("--study", study_name("down"), "--trials", "1", *args), tmp_path, key)
             for key, (args, _) in cases.items()}
    for key, (_, masked) in cases.items():
        assert procs[key].wait(120) == 2
        out = procs[key].output
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and masked in lines[0], out
        assert secret not in out and "Traceback" not in out


# ---------------------------------------------------------------- the default journal storage (no server needed)


def local_store(tmp_path: Path) -> tuple[optuna.Study, list]:
    study = optuna.load_study(study_name="bn", storage=open_storage(str(tmp_path / "mlruns/optuna.journal")))
    return study, mlflow_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "bn")


def test_jobs_2_on_the_journal_storage_runs_the_total_under_one_parent(tmp_path):
    data_dir()
    launcher = Worker(tune_cmd("--trials", "2", "--jobs", "2"), tmp_path, "launcher")
    assert launcher.wait() == 0, launcher.output
    study, runs = local_store(tmp_path)
    parent, trial_runs = check_one_study(study, runs, 2)
    assert len(trial_runs) == 2
    assert study_headers(launcher.output, "bn") == 2, launcher.output
    assert {"space.lr", "space.dropout", "trials_target"} <= set(parent.data.params)  # what the report's table reads
    where = [line for line in launcher.output.splitlines() if line.startswith("MLflow: experiment")]
    assert where == [f"MLflow: experiment 'bn', parent run {parent.info.run_id} at sqlite:///mlruns/mlflow.db; browse with `bench ui`"]  # once, not per worker


def test_sigkilled_worker_on_the_journal_storage_is_recovered_by_the_next_run(tmp_path):
    cmd = tune_cmd("--trials", "1", epochs=2)
    first = Worker(cmd, tmp_path, "first")
    wait_for_line([first], "epoch   1/2")
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    study, runs = local_store(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]  # what kill -9 leaves behind
    assert {r.data.tags[tracking.TAG_KIND]: r.info.status for r in runs} == {"study": "RUNNING", "trial": "RUNNING"}

    second = Worker(cmd, tmp_path, "second")
    assert second.wait() == 0, second.output
    assert "recovered dead worker trial(s) [0]" in second.output
    study, runs = local_store(tmp_path)
    killed, retry = study.trials
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker_lost"].endswith(" died")
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0 and retry.params == killed.params
    parent, trial_runs = check_one_study(study, runs, 1)  # the second run joined the first run's parent and closed it
    killed_run = next(r for r in trial_runs if r.data.tags[tracking.TAG_TRIAL] == "0")
    assert killed_run.info.status == "FAILED" and f":{first.proc.pid} died" in killed_run.data.tags[tracking.TAG_ERROR]
