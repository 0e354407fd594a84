"""Local worker processes for ``bench tune --jobs`` and ``bench confirm --jobs``: one single-threaded
process per core beats one process on every core, since these small convolutions scale poorly across
threads (README, "Parallel and distributed studies")."""

from __future__ import annotations

import os
import signal
import subprocess

from .runtime import default_device


def auto_jobs(device: str | None, threads: int | None = None, shareable: bool = True) -> int:
    """``--jobs auto``: one worker per core on CPU; one where workers cannot share the work or would share one GPU."""
    on_cpu = (device or default_device().type) == "cpu"
    return max(1, threads or len(os.sched_getaffinity(0))) if shareable and on_cpu else 1


def threads_per_worker(jobs: int, threads: int | None = None) -> int:
    return max(1, (threads or len(os.sched_getaffinity(0))) // jobs)


def run_all(cmds: list[list[str]], envs: list[dict[str, str]] | None = None) -> tuple[list[int], bool]:
    """Start every command and wait for all: (exit codes, interrupted). SIGINT from a terminal reaches
    the workers by itself; SIGTERM is forwarded, so each worker can record its work before exiting."""
    workers: list[subprocess.Popen] = []

    def forward_sigterm(signum, frame):
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    # Installed before the first worker starts: a SIGTERM in between would kill this process and orphan them.
    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        for cmd, env in zip(cmds, envs or [None] * len(cmds)):
            workers.append(subprocess.Popen(cmd, env=env))
        return [w.wait() for w in workers], False
    except KeyboardInterrupt:  # the workers got the signal too; let them finish recording
        return [w.wait() for w in workers], True
    finally:
        signal.signal(signal.SIGTERM, previous)
