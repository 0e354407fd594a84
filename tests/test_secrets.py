"""Passwords stay out of sight (issue 14): never on a worker's command line (``ps`` shows every
user's), never in MLflow tags, params or artifacts, the console or an error line.

The end-to-end test runs ``bench tune --jobs 2`` on a real PostgreSQL whose URL carries a password
(``BENCH_TEST_POSTGRES_URL``, from ``.ci/services.sh start``); it is skipped without one, and fails
instead under ``BENCH_REQUIRE_SERVICES=1`` (CI). The other tests need no server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest

from bench import tracking
from bench.confirm import ConfirmOptions, worker_command
from bench.errors import ConfigError
from bench.tune import worker_argv
from bench.tune.options import resolve_storage, worker_environment
from conftest import fixture_data_dir

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Pa55word"
POSTGRES_URL = os.environ.get("BENCH_TEST_POSTGRES_URL")


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_URI", "BENCH_PARENT_RUN_ID", "BENCH_WORKER_INDEX", "BENCH_STORAGE", "BENCH_STORAGE_FILE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **extra}


def files_containing(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` (MLflow's database, artifacts, logs) whose bytes hold ``secret``."""
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# ---------------------------------------------------------------- no server needed


def test_error_tag_of_a_failed_run_is_masked(isolated_mlruns):
    tracking.setup()
    with pytest.raises(RuntimeError):
        with tracking.run("secrets", "boom", "train") as active:
            raise RuntimeError(f"lost postgresql://bench:{SECRET}@db.example:5432/bench")
    tags = mlflow.get_run(active.info.run_id).data.tags
    assert SECRET not in tags[tracking.TAG_ERROR] and "postgresql://bench:***@db.example" in tags[tracking.TAG_ERROR]
    run_id = mlflow.MlflowClient().create_run(tracking.experiment_id("secrets")).info.run_id
    tracking.close_run(run_id, "FAILED", error=f"worker died on postgresql://u:{SECRET}@h/db")
    assert SECRET not in mlflow.get_run(run_id).data.tags[tracking.TAG_ERROR]


def test_workers_get_urls_through_the_environment_not_argv():
    argv = ["--norm", "bn", "--storage", f"postgresql://u:{SECRET}@h/db", f"--tracking-uri=http://u:{SECRET}@h",
            "--storage-file", "/home/me/.bench-storage", "--set", "lr=0.1"]
    assert worker_argv(argv, "bn") == ["--set", "lr=0.1", "--norm", "bn"]
    env = worker_environment(f"postgresql://u:{SECRET}@h/db", f"http://u:{SECRET}@h")
    assert env["BENCH_STORAGE"] == f"postgresql://u:{SECRET}@h/db" and env["MLFLOW_TRACKING_URI"] == f"http://u:{SECRET}@h"
    cmd = worker_command("bn", ConfirmOptions(tracking_uri=f"http://u:{SECRET}@h", study="s"), [0, 1], 1)
    assert not any(SECRET in arg for arg in cmd) and "--tracking-uri" not in cmd


def test_storage_file_must_be_private(tmp_path):
    path = tmp_path / "storage"
    path.write_text(f"postgresql://u:{SECRET}@h/db\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 644\); run `chmod 600"):
        resolve_storage(None, str(path))
    path.chmod(0o600)
    assert resolve_storage(None, str(path)) == f"postgresql://u:{SECRET}@h/db"
    with pytest.raises(ConfigError, match="give the storage URL once"):
        resolve_storage("postgresql://x@h/db", str(path))
    with pytest.raises(ConfigError, match="cannot read it"):
        resolve_storage(None, str(tmp_path / "missing"))
    assert resolve_storage("", None) is None  # an empty $BENCH_STORAGE is the default journal


def test_unreachable_storage_error_is_masked(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bench.cli", "tune", "--norm", "bn", "--trials", "1", "--data-dir", str(fixture_data_dir())]
    env = clean_env(BENCH_STORAGE=f"postgresql://bench:{SECRET}@127.0.0.1:{port}/bench")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr and "bench:***@127.0.0.1" in result.stderr
    assert files_containing(tmp_path, SECRET) == []


# ---------------------------------------------------------------- a real study on PostgreSQL


class MaskedURL(str):
    """The URL, shown masked: pytest prints a failing test's arguments, and CI logs are read by many."""

    def __repr__(self) -> str:
        return repr(tracking.mask_url(self))


@pytest.fixture
def postgres_url() -> str:
    if not POSTGRES_URL:
        reason = "BENCH_TEST_POSTGRES_URL not set: run .ci/services.sh start and source its env file"
        if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (BENCH_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)
    assert urlsplit(POSTGRES_URL).password, "the test database URL must carry a password"
    return MaskedURL(POSTGRES_URL)


def bench_command_lines() -> dict[int, str]:
    """pid -> command line of every ``bench.cli`` process on the machine, as ``ps`` shows them to any user."""
    lines = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in args if a)
        if "bench.cli" in text:
            lines[int(proc.name)] = text
    return lines


def test_jobs_study_on_postgres_shows_its_password_nowhere(postgres_url, tmp_path):
    password = urlsplit(postgres_url).password
    study = f"secrets-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "bench.cli", "tune", "--norm", "bn", "-e", str(REPO / "experiments/bn.toml"),
           "--study", study, "--trials", "2", "--tune-epochs", "1", "--jobs", "2", "--data-dir", str(fixture_data_dir()),
           "--set", "train_subset=300", "--set", "val_size=200", "--set", "eval_batch_size=2000"]
    out = tmp_path / "console.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(BENCH_STORAGE=postgres_url), stdout=log, stderr=subprocess.STDOUT)
        seen: dict[int, str] = {}
        while proc.poll() is None:
            seen.update((pid, line) for pid, line in bench_command_lines().items() if study in line)
            time.sleep(0.2)
    console = out.read_text()
    assert proc.returncode == 0, tracking.mask_url(console)
    workers = [line for line in seen.values() if "--jobs 1" in line]
    assert len(workers) >= 2, seen  # both workers were seen running, so the check below saw them
    leaks = [line for line in seen.values() if password in line]
    assert not leaks, [tracking.mask_url(line) for line in leaks]
    assert "starting 2 workers" in console and password not in console
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        assert not any(password in f"{k}={v}" for k, v in {**run.data.tags, **run.data.params}.items()), run.info.run_id
    assert any(r.data.tags.get("bench.storage", "").startswith("postgresql://bench:***@") for r in runs)
    assert files_containing(tmp_path, password) == []  # MLflow's database, every artifact, the console log
