"""Optuna storages: the default journal file under mlruns/, or any storage URL (PostgreSQL for several machines).
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from pathlib import Path

import optuna

from .. import faults, settings, tracking
from ..errors import ConfigError, TrackingError
from . import journal
from .recovery import on_stale_trial


DEFAULT_STORAGE_FILE = Path("mlruns") / "optuna.journal"


def heartbeat_seconds() -> int:
    return settings.number("BENCH_HEARTBEAT_SECONDS")


CONNECT_TIMEOUT_SECONDS = 10


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file under mlruns/ by default (safe for several local processes),
    or any storage URL (sqlite:///..., postgresql://...). RDB storages get Optuna's heartbeat: a
    trial whose worker stops beating for ``3 * heartbeat_seconds()`` is failed and re-queued."""
    try:
        if url is None or url.endswith(".journal"):
            return open_journal(Path(url or DEFAULT_STORAGE_FILE))
        callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")  # renamed in Optuna 4.9
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                    return QuietHeartbeatRDBStorage(rdb_url(url), heartbeat_interval=heartbeat_seconds(), grace_period=3 * heartbeat_seconds(),
                                                    engine_kwargs=engine_kwargs(url), **{callback: on_stale_trial})
            except Exception as err:
                # Workers starting at once on an empty database race to create Optuna's tables
                # (IntegrityError, ProgrammingError); the loser finds them on a second try.
                if attempt == 4 or type(err).__name__ not in ("IntegrityError", "ProgrammingError"):
                    raise
                time.sleep(0.5 + attempt)
    except TrackingError:
        raise
    except ImportError:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} needs its database driver; for PostgreSQL: pip install 'bench[postgres]'") from None
    except Exception as err:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} cannot be opened ({faults.root_cause(err)}); check the URL or start the database") from None


def open_journal(path: Path) -> optuna.storages.JournalStorage:
    """The journal file at ``path``, its torn records (a write cut off) dropped first, with a backup."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        repaired = journal.repair(path)
    except OSError as err:
        path.with_name(f"{path.name}.repairing").unlink(missing_ok=True)
        hint = "free some space and re-run the same command" if faults.disk_full(err) else "check the folder's permissions"
        raise TrackingError(f"Optuna journal {path} has a torn record (a write cut off) and cannot be repaired ({err.strerror}); {hint}") from None
    if repaired:
        print(f"warning: {repaired}", file=sys.stderr, flush=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


class QuietHeartbeatRDBStorage(optuna.storages.RDBStorage):
    """Optuna's heartbeat thread dies with a traceback on the first beat the database refuses. Here a
    lost beat is tried again at the next interval (a database back within the grace period loses no
    trial), and the worker's next write of its own reports the lost database in one line."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception:
            pass


def engine_kwargs(url: str) -> dict:
    """PostgreSQL: give up connecting after 10 s (a host gone from the network would otherwise hang
    for minutes), and check a pooled connection before use (a restarted server drops them all)."""
    if url.startswith(("postgres://", "postgresql")):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}}
    return {}


def rdb_url(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed
    (``bench[postgres]``). ``postgres://`` is accepted as ``postgresql://``."""
    scheme, _, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def storage_label(url: str | None) -> str:
    return tracking.mask_url(str(url or DEFAULT_STORAGE_FILE))


def heartbeat_enabled(study: optuna.Study) -> bool:
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return bool(interval and interval())


def load_existing_study(name: str, url: str | None = None) -> optuna.Study:
    """A study that must already exist in the storage; a one-line error listing the studies there if not."""
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        raise ConfigError(f"no study '{name}' in {storage_label(url)} (studies: {', '.join(sorted(names)) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)
