"""``bench ui``: the MLflow UI on the project's store, as an ``mlflow server`` it starts and stops
with everything that server starts (uvicorn workers, the job runner and its huey consumers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import TrackingError
from .tracking import mask_url, resolve_uri


def serve_ui(host: str, port: int, uri: str | None = None, echo=print) -> None:
    """Run ``mlflow server`` on the project's store until interrupted (Ctrl-C or SIGTERM), then stop
    it with everything it started."""
    uri = resolve_uri(uri)
    if uri.startswith("http"):
        raise TrackingError(f"{mask_url(uri)} is already a tracking server; open it in a browser")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()]
    echo(f"MLflow UI for {mask_url(uri)} at http://{host}:{port}  (Ctrl-C to stop)")
    # Its own process group: the server starts uvicorn workers and a job runner with its huey
    # consumers, which outlive it unless the whole group is stopped.
    server = subprocess.Popen(cmd, start_new_session=True)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_process_group(server)


def stop_process_group(proc, timeout: float = 20.0) -> None:
    """SIGTERM to ``proc``'s process group (``proc`` leads it), then SIGKILL to whatever is left
    after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members
