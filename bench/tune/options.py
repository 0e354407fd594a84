"""What ``bench tune`` was asked for on the command line, beside the experiment file."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import RuntimeOptions
from ..errors import ConfigError

STORAGE_ENV = "BENCH_STORAGE"  # the storage URL, so a password never shows on a command line (`ps`)
STORAGE_FILE_ENV = "BENCH_STORAGE_FILE"


@dataclass
class TuneOptions(RuntimeOptions):
    trials: int | None = None  # total for the study; None = the experiment's tune.trials
    more: bool = False  # treat ``trials`` as "this many more" instead of the total
    epochs: int | None = None
    study: str | None = None
    storage: str | None = None
    timeout: float | None = None
    seed: int = 0
    pruner: str | None = None


def resolve_storage(url: str | None, file: str | None) -> str | None:
    """The Optuna storage URL from ``--storage`` / $BENCH_STORAGE, or from ``--storage-file`` /
    $BENCH_STORAGE_FILE: a file holding the URL that only its owner may read (like ~/.pgpass)."""
    if url and file:
        raise ConfigError("give the storage URL once: --storage (or $BENCH_STORAGE) or --storage-file (or $BENCH_STORAGE_FILE)")
    if not file:
        return url or None
    path = Path(file)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"--storage-file {path}: cannot read it ({err.strerror}); write the storage URL into it") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--storage-file {path} is readable by others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
    if not text or len(text.splitlines()) != 1:
        raise ConfigError(f"--storage-file {path}: expected one line, the storage URL (e.g. postgresql://user:password@host/db)")
    return text


def worker_environment(storage: str | None, tracking_uri: str) -> dict[str, str]:
    """The environment of a local worker: the storage URL and tracking URI travel here, never on
    its command line."""
    env = {k: v for k, v in os.environ.items() if k not in (STORAGE_ENV, STORAGE_FILE_ENV)}
    if storage:
        env[STORAGE_ENV] = storage
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri}
