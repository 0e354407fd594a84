"""``bench dashboard``: optuna-dashboard (``pip install 'bench[dashboard]'``) on the project's Optuna store.

The dashboard reads the same storage the studies write (``mlruns/optuna.journal``, or ``--storage``),
so it shows running studies live: history, parameter importances, parallel coordinates, timeline.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .tune.storage import DEFAULT_STORAGE_FILE, open_storage, storage_label


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
