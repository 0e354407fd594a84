"""Optuna storages: the default journal file under mlruns/, or any storage URL (PostgreSQL for several machines).
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from pathlib import Path

import optuna

from .. import tracking
from ..errors import ConfigError, TrackingError
from .recovery import on_stale_trial


DEFAULT_STORAGE_FILE = Path("mlruns") / "optuna.journal"


HEARTBEAT_SECONDS = int(os.environ.get("BENCH_HEARTBEAT_SECONDS", 20))


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file under mlruns/ by default (safe for several local processes),
    or any storage URL (sqlite:///..., postgresql://...). RDB storages get Optuna's heartbeat: a
    trial whose worker stops beating for ``3 * HEARTBEAT_SECONDS`` is failed and re-queued."""
    try:
        if url is None or url.endswith(".journal"):
            path = Path(url or DEFAULT_STORAGE_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")  # renamed in Optuna 4.9
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                    return optuna.storages.RDBStorage(rdb_url(url), heartbeat_interval=HEARTBEAT_SECONDS,
                                                      grace_period=3 * HEARTBEAT_SECONDS, **{callback: on_stale_trial})
            except Exception as err:
                # Workers starting at once on an empty database race to create Optuna's tables
                # (IntegrityError, ProgrammingError); the loser finds them on a second try.
                if attempt == 4 or type(err).__name__ not in ("IntegrityError", "ProgrammingError"):
                    raise
                time.sleep(0.5 + attempt)
    except ImportError:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} needs its database driver; for PostgreSQL: pip install 'bench[postgres]'") from None
    except Exception as err:
        raise TrackingError(f"Optuna storage {tracking.mask_url(str(url))} cannot be opened ({type(err).__name__}); check the URL or start the database") from None


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
