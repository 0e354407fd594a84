"""Lost stores in one line: MLflow's HTTP retry budget, a visible retry notice, failing fast once a
server is known lost, the lock that makes creating a local store safe, and the one-line cause of a
storage, tracking-store or disk failure (docs/faults.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

# MLflow's client retries a lost server 7 times with a backoff factor of 2 (capped at 120 s), about
# four minutes per call, and a failing trial makes several calls: 16 minutes of silence. These are
# MLflow's own settings (mlflow/environment_variables.py); urllib3 waits 0, 2, 4, 8 s between the
# five attempts, so a refused connection is reported after about 15 s, a server that accepts but
# never answers after 5 x 20 s. A value the user set wins.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


_BEFORE_FAIL_FAST: dict[str, str | None] = {}


def configure_client() -> None:
    """MLflow's client for this process: the retry budget above (after any ``fail_fast``), one notice per retried request."""
    for name, value in _BEFORE_FAIL_FAST.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _BEFORE_FAIL_FAST.clear()
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    # MLflow's SQL store logs each database error with its traceback, then raises it: the raise is
    # what the user gets, in one line (a full disk shows five tracebacks otherwise).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logger = logging.getLogger("urllib3.connectionpool")
    logger.setLevel(logging.WARNING)  # urllib3 logs each retry as a warning; shown as one notice instead
    if not any(isinstance(f, _RetryNotice) for f in logger.filters):
        logger.addFilter(_RetryNotice())


def fail_fast() -> None:
    """The tracking server is known lost: the calls that record the failure (end the run, tag it)
    must not each wait out the retry budget again."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")):
        _BEFORE_FAIL_FAST.setdefault(name, os.environ.get(name))
        os.environ[name] = value


class _RetryNotice(logging.Filter):
    """One line on the first retry of a request to the tracking server; urllib3's own records dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        retry = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if str(record.msg).startswith("Retrying") and len(getattr(retry, "history", ())) == 1:
            from .tracking import current_uri

            retries, factor = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
            budget = sum(factor * 2 ** (n - 1) for n in range(2, retries + 1))
            print(f"warning: tracking server {current_uri()} unreachable, retrying "
                  f"(up to {retries} times over ~{budget:.0f} s, MLFLOW_HTTP_REQUEST_MAX_RETRIES)", file=sys.stderr, flush=True)
        return False


@contextlib.contextmanager
def store_lock(path: Path, timeout: float = 120) -> Iterator[None]:
    """Exclusive lock beside a local store while it is opened: two processes creating a new SQLite
    store at once race on its tables ("table ... already exists", "database is locked")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}.lock held by another process for {timeout:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- what was lost


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during (Optuna's tell raises an
    UnboundLocalError over the database error that caused it)."""
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def disk_full(err: BaseException) -> bool:
    return any(getattr(e, "errno", None) == errno.ENOSPC or "disk is full" in str(e).lower()
               or "no space left" in str(e).lower() for e in chain(err))


def server_lost(err: BaseException) -> bool:
    """A request to the tracking server failed at the connection (refused, reset, timed out)."""
    import requests

    return any(isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) for e in chain(err))


def origin(err: BaseException) -> str | None:
    """"optuna" or "mlflow": which of them called down to where the error was first raised (an
    exception out of ``study.optimize`` passes through Optuna's frames whatever raised it). A
    driver's exception wrapped by SQLAlchemy only shows the driver: look outward until one does."""
    for e in reversed(chain(err)):
        tb, found = e.__traceback__, None
        while tb is not None:
            package = tb.tb_frame.f_globals.get("__name__", "").split(".")[0]
            if package in ("optuna", "mlflow"):
                found = package
            tb = tb.tb_next
        if found:
            return found
    return None


def root_cause(err: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of the innermost exception that says something."""
    for e in reversed(chain(err)):
        # Optuna's UnboundLocalError and SQLAlchemy's pool-invalidation signal say nothing of the cause
        if not isinstance(e, UnboundLocalError) and type(e).__name__ != "InvalidatePoolError" and str(e).strip("() \n"):
            from .tracking import mask_url

            if isinstance(e, OSError) and e.strerror:  # without the source of a copy (a temporary file)
                return f"{type(e).__name__}: {e.strerror}" + (f": {e.filename2 or e.filename}" if e.filename2 or e.filename else "")
            first = mask_url(str(e).strip().splitlines()[0])
            return f"{type(e).__name__}: {first[:limit]}"
    return type(err).__name__


def lost_store_message(err: BaseException, storage: str, tracking_uri: str, kept: str = "finished trials are kept") -> str:
    """The one line for an error that stopped a study (or a confirmation): which store, why, and what to do."""
    resume = f"{kept}; re-run the same command once it is back"
    if disk_full(err):
        return f"disk full ({root_cause(err)}); {kept}; free some space and re-run the same command"
    if server_lost(err):
        return f"lost the MLflow tracking server {tracking_uri} ({root_cause(err)}); {resume}"
    if origin(err) == "optuna":
        return f"lost the Optuna storage {storage} ({root_cause(err)}); {resume}"
    if origin(err) == "mlflow":
        return f"lost the MLflow tracking store {tracking_uri} ({root_cause(err)}); {resume}"
    return f"lost the study's storage or tracking store ({root_cause(err)}); {resume}"


@contextlib.contextmanager
def tracking_lost(tracking_uri: str, kept: str) -> Iterator[None]:
    """Around training outside a study (``bench confirm``, ``bench train``): a lost tracking server or
    store, or a full disk, becomes one ``TrackingError`` line saying what ``kept`` instead of a traceback."""
    from .errors import BenchError, TrackingError
    from .tracking import mask_url

    try:
        yield
    except BenchError:
        raise
    except Exception as err:
        if not (server_lost(err) or disk_full(err) or origin(err) == "mlflow"):
            raise
        fail_fast()
        raise TrackingError(lost_store_message(err, "", mask_url(tracking_uri), kept)) from None
