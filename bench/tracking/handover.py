"""A confirm run's epoch checkpoint and heartbeat, kept on the run itself, so a run cut off on one
machine resumes on any machine that shares the tracking store.

After each epoch the training process uploads its checkpoint file as the run's artifact
``checkpoint/<run id>.pt`` (under 1 MB at 50k parameters) and stamps the run with ``bench.worker``
(host:pid) and ``bench.heartbeat`` (the time). ``bench.confirm`` reads them: a run RUNNING on another
host that beat within ``stale_minutes()`` is alive there; any other unfinished run with the
artifact may be resumed here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import settings

TAG_WORKER = "bench.worker"
TAG_HEARTBEAT = "bench.heartbeat"
FOLDER = "checkpoint"
STALE_ENV = "BENCH_STALE_MINUTES"


def stale_minutes() -> float:
    """How long a run on another host may go without a heartbeat before its machine counts as gone
    (``BENCH_STALE_MINUTES``, default 30: several epochs of a 50k-parameter model on one CPU core)."""
    return settings.number(STALE_ENV)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(run_id: str) -> None:
    """Stamp ``run_id`` as alive in this process now (one request)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(TAG_WORKER, worker_id()), RunTag(TAG_HEARTBEAT, f"{time.time():.0f}")])


def share(run_id: str, path: Path) -> None:
    """Upload the checkpoint file at ``path`` to the run, then beat."""
    from mlflow import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), FOLDER)
    beat(run_id)


def fetch(run: Any, dest: Path) -> bool:
    """Download ``run``'s shared checkpoint to ``dest`` (replaced whole); False if it has none."""
    import mlflow
    from mlflow import MlflowClient

    name = f"{FOLDER}/{run.info.run_id}.pt"
    if name not in {a.path for a in MlflowClient().list_artifacts(run.info.run_id, FOLDER)}:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as folder:
        os.replace(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=folder), dest)
    return True


def unshare(run: Any) -> None:
    """Delete ``run``'s shared checkpoint once the run is over (its model is logged on its own). A
    leftover is only wasted space, never resumed: so a store that refuses is not an error."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with contextlib.suppress(Exception):
        get_artifact_repository(run.info.artifact_uri).delete_artifacts(FOLDER)


def stamp() -> dict[str, str]:
    """The worker and heartbeat tags of a run this process creates: it is claimed from its first moment."""
    return {TAG_WORKER: worker_id(), TAG_HEARTBEAT: f"{time.time():.0f}"}


def silent_minutes(run: Any) -> float:
    return (time.time() - float(run.data.tags.get(TAG_HEARTBEAT, 0))) / 60


def alive_elsewhere(run: Any) -> str | None:
    """Who trains ``run`` on another host, if it is RUNNING there and beat within ``stale_minutes()``;
    on this host the checkpoint's file lock says whether its process lives."""
    worker = run.data.tags.get(TAG_WORKER, "")
    host = worker.rpartition(":")[0]
    silent = silent_minutes(run)
    if run.info.status != "RUNNING" or not host or host == socket.gethostname() or silent >= stale_minutes():
        return None
    return (f"{worker} is training it (run {run.info.run_id}, last heartbeat {silent:.0f} min ago; "
            f"after {stale_minutes():g} min without one, {STALE_ENV}, it resumes here)")


def trained_by_another(run: Any) -> bool:
    """``run`` is RUNNING for another live process: one on this host whose pid exists, or one on
    another host that beat within ``stale_minutes()``."""
    worker = run.data.tags.get(TAG_WORKER, "")
    host, _, pid = worker.rpartition(":")
    if run.info.status != "RUNNING" or not host or worker == worker_id():
        return False
    if host == socket.gethostname():
        return pid.isdigit() and process_alive(int(pid))
    return silent_minutes(run) < stale_minutes()


def earlier_claim(mine: Any, runs: list[Any]) -> Any | None:
    """Of ``runs`` (the unfinished runs of one seed), the first that another live process started
    before ``mine``. Two machines that start one seed in the same moment each create a run before
    seeing the other's; both then see both, and only the later one gives way."""
    def order(run):
        return run.info.start_time, run.info.run_id
    rivals = [r for r in runs if r.info.run_id != mine.info.run_id and order(r) < order(mine) and trained_by_another(r)]
    return min(rivals, key=order, default=None)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
