"""``bench ui`` stopped by SIGTERM or Ctrl-C leaves no process behind (issue 14): MLflow's server
starts uvicorn workers and a job runner with huey consumers, which used to outlive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.servers import group_members

START_SECONDS = 300  # mlflow server takes ~30 s to answer on an idle 2-core machine, minutes on a busy one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return out


def descendants(root: int) -> set[int]:
    table = processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_bench_ui_stops_every_process_it_started(tmp_path, stop):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen([sys.executable, "-m", "bench.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not healthy(port):
            assert ui.poll() is None, f"bench ui exited with {ui.returncode} before serving"
            assert time.monotonic() < deadline, f"no /health on port {port} after {START_SECONDS} s"
            time.sleep(1)
        time.sleep(5)  # the job runner starts its consumers after the server answers
        table = processes()
        started = descendants(ui.pid)
        groups = {table[pid][1] for pid in started if pid in table}
        assert len(started) >= 2, started  # the server and its workers: the check below has something to check
        ui.send_signal(stop)
        assert ui.wait(timeout=60) in (0, 130)
        time.sleep(1)
        alive = processes()
        survivors = {pid for pid in started if pid in alive} | {pid for pid, (_, pgid) in alive.items() if pgid in groups}
        assert not survivors, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in survivors}
        assert not any(group_members(g) for g in groups)
    finally:  # on a failure, leave nothing running either
        for pid in started | ({ui.pid} if ui.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
