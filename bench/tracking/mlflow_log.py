"""MLflow's own output goes to a log file beside the store, not between bench's lines and progress bars.

MLflow prints its registry messages ("Successfully registered model ...", "Created version ...")
with ``print(file=MLFLOW_LOGGING_STREAM)``, a stream that forwards to stderr, and its loggers
(store migrations, the system-metrics monitor, artifact uploads) write to that stream too. bench
points both at one file, ``mlruns/bench.log`` for the default store. What will break still reaches
the user on stderr: MLflow's errors and its logged deprecation notices.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

LOG_FILE = "bench.log"

# Loggers MLflow configures (mlflow, alembic, huey, sqlalchemy.engine) and others it drives.
LEVELS = {"mlflow": logging.INFO, "alembic": logging.WARNING, "huey": logging.WARNING, "sqlalchemy.engine": logging.WARNING,
          "urllib3": logging.WARNING, "git": logging.WARNING, "torch._export": logging.ERROR}


class _BenchLogHandler(logging.FileHandler):
    """The handler bench installs (so a second ``route`` replaces it rather than adding one)."""


def deprecations_and_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "deprecat" in record.getMessage().lower()


class _PrintsToLog(io.TextIOBase):
    """A stream for MLflow's prints: each line becomes an INFO record of the ``mlflow`` logger."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logging.getLogger("mlflow").info(line)
        return len(text)


def log_path(uri: str) -> Path:
    """Beside a SQLite store (``mlruns/bench.log`` by default), else ``./mlruns/bench.log``."""
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path("mlruns")
    return folder / LOG_FILE


def route(path: Path) -> Path:
    """Send MLflow's log records and prints to ``path`` (appended); returns it. Call after ``import mlflow``,
    which installs MLflow's own stderr handlers."""
    from mlflow.utils import logging_utils

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _BenchLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(logging_utils.LOGGING_LINE_FORMAT, logging_utils.LOGGING_DATETIME_FORMAT))
    to_user = logging.StreamHandler(sys.stderr)
    to_user.setLevel(logging.WARNING)
    to_user.addFilter(deprecations_and_errors)  # on the handler: a logger's filter misses its children's records
    for name, level in LEVELS.items():
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if isinstance(old, _BenchLogHandler) and old is not handler:
                old.close()
        logger.handlers = [handler, to_user] if name == "mlflow" else [handler]
        logger.setLevel(level)
        logger.propagate = False
    # MLflow has no setting for where eprint goes; it reads this module global at each call.
    logging_utils.MLFLOW_LOGGING_STREAM = _PrintsToLog()
    return path
