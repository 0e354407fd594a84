"""The two browser UIs on the project's stores: ``bench ui`` (MLflow's, on the tracking store) and
``bench dashboard`` (optuna-dashboard, ``pip install 'bench[dashboard]'``, on the Optuna store).

The dashboard reads the same storage the studies write (``mlruns/optuna.journal``, or ``--storage``),
so it shows running studies live: history, parameter importances, parallel coordinates, timeline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import tracking
from .errors import ConfigError, TrackingError
from .tune.storage import DEFAULT_STORAGE_FILE, open_storage, storage_label


MAX_LINKS = 12  # experiments listed by `bench ui`, most recently updated first


def check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise ConfigError("optuna-dashboard is not installed; pip install 'bench[dashboard]' (or optuna-dashboard)")


def dashboard_storage(url: str | None):
    """The Optuna storage to show; a journal file that does not exist yet is an error, not a new file."""
    if url is None or url.endswith(".journal"):
        path = Path(url or DEFAULT_STORAGE_FILE)
        if not path.is_file():
            raise ConfigError(f"no Optuna journal at {path}; run `bench tune` here first, or pass --storage URL")
    return open_storage(url)


def serve_dashboard(host: str, port: int, url: str | None = None, echo=print) -> None:
    """Serve optuna-dashboard on ``url`` (default: the project's journal) until interrupted."""
    check_installed()
    storage = dashboard_storage(url)
    from optuna_dashboard import run_server

    echo(f"optuna-dashboard for {storage_label(url)} at http://{host}:{port}  (Ctrl-C to stop)")
    try:
        run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        pass


def runs_url(host: str, port: int, experiment_id: str) -> str:
    """An experiment's runs table. MLflow 3.17's UI picks an experiment's first page from its
    GenAI / Model training switch (top left, remembered per browser, GenAI by default), not from the
    experiment's kind tag; ``workflowType`` in the URL sets it for this page only."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def serve_ui(host: str, port: int, uri: str | None = None, echo=print) -> None:
    """Run ``mlflow server`` on the project's store until interrupted (Ctrl-C or SIGTERM), then stop
    it with everything it started."""
    uri = tracking.resolve_uri(uri)
    if uri.startswith("http"):
        raise TrackingError(f"{tracking.mask_url(uri)} is already a tracking server; open it in a browser")
    tracking.setup(uri)
    experiments = tracking.tag_experiments()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()]
    echo(f"MLflow UI for {tracking.mask_url(uri)} at http://{host}:{port}  (Ctrl-C to stop)")
    echo('Runs tables (or switch the UI to "Model training", top left, once per browser):')
    for experiment_id, name in experiments[:MAX_LINKS]:
        echo(f"  {name}: {runs_url(host, port, experiment_id)}")
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
