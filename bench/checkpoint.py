"""Epoch checkpoints, so an interrupted long run (a ``bench confirm`` seed) resumes where it stopped.

After each epoch ``fit`` writes the whole training state to one file, replaced atomically: weights,
optimiser, learning-rate schedule, EMA, the data-order generator, torch's global generator (dropout,
mixup) and the epoch records. Resuming restores all of it, so the resumed run ends as an
uninterrupted one would (tested bit for bit on CPU).

The files live beside the MLflow store, ``mlruns/checkpoints/<run id>.pt`` (``BENCH_CHECKPOINT_DIR``
moves them), one per unfinished run; a run that finishes deletes its file. While a process trains
it holds a lock on the file, so no other process resumes a run that is still alive. ``bench confirm``
also keeps each file on its MLflow run (``tracking.handover``), for resuming on another machine.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import SPEED_ONLY, with_added_fields


CHECKPOINT_DIR_ENV = "BENCH_CHECKPOINT_DIR"


def checkpoint_dir() -> Path:
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or "mlruns/checkpoints")


def run_config(hyperparameters: dict[str, Any]) -> dict[str, str]:
    """What a checkpoint records it was trained with: every hyperparameter, as text."""
    return {k: str(v) for k, v in sorted(hyperparameters.items())}


def same_training(saved: dict[str, str], current: dict[str, str]) -> bool:
    """Whether a run saved with config ``saved`` may resume under ``current``: equal but for the
    speed-only settings (a run may resume with ``compile`` toggled). A field added to bench since the
    checkpoint was written counts at its default value, so an upgrade keeps old checkpoints resumable."""
    def learnt(config):
        return {k: v for k, v in with_added_fields(config).items() if k not in SPEED_ONLY}
    return learnt(saved) == learnt(current)


class EpochCheckpoint:
    """The training state of one run after its last finished epoch, in ``path``."""

    def __init__(self, path: str | Path, config: dict[str, str]):
        self.path = Path(path)
        self.partial_path = self.path.with_suffix(".partial")  # the next epoch's file while it is written
        self.lock_path = self.path.with_suffix(".lock")
        self.config = config
        self.on_saved: Callable[[Path], None] | None = None  # e.g. upload the file to the run (tracking.handover)
        self._lock = None

    def lock(self) -> bool:
        """Take the run for this process; False if another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock = handle
        return True

    def held(self) -> bool:
        """Whether another live process holds this run (probes the lock without keeping it)."""
        if self._lock is not None or not self.lock_path.exists():
            return False
        if not self.lock():
            return True
        self.unlock()
        return False

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    def load(self) -> dict[str, Any] | None:
        """The saved state if there is one and it was trained with this config, else None."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        return state if same_training(state.get("config") or {}, self.config) else None

    def save(self, state: dict[str, Any]) -> None:
        torch.save({**state, "config": self.config}, self.partial_path)
        os.replace(self.partial_path, self.path)  # a crash mid-write leaves the previous epoch's file whole
        if self.on_saved:
            self.on_saved(self.path)

    def files(self) -> tuple[Path, Path, Path]:
        """The checkpoint, its half-written copy and its lock, the lock last."""
        return self.path, self.partial_path, self.lock_path

    def remove(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)  # the lock file last, while a holder still holds it
        self.unlock()


def sweep_leftovers(directory: str | Path, min_age: float = 60.0) -> list[Path]:
    """Delete what killed processes left in ``directory``: the lock or half-written file of a run that
    has no checkpoint to resume (killed before its first epoch ended), that no live process holds and
    that is older than ``min_age`` seconds (a process opens its lock file an instant before taking it).
    Returns the deleted paths."""
    directory = Path(directory)
    stems = {path.stem for pattern in ("*.lock", "*.partial") for path in directory.glob(pattern) if age(path) > min_age}
    swept = []
    for stem in sorted(stems):
        leftover = EpochCheckpoint(directory / f"{stem}.pt", {})
        if leftover.path.exists() or not leftover.lock():
            continue
        swept += [path for path in leftover.files() if path.exists()]
        leftover.remove()
    return swept


def age(path: Path) -> float:
    """Seconds since ``path`` was last written; 0 if it is gone (a run that finished meanwhile removes its files)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def capture(epoch: int, parts: dict[str, Any], generator: torch.Generator, history: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """The state after ``epoch``: ``parts`` are the objects with a ``state_dict`` (model, optimiser, ...)."""
    state = {
        "epoch": epoch, "history": history, "seconds": seconds,
        "parts": {name: part.state_dict() for name, part in parts.items()},
        "generator": generator.get_state(), "global_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], parts: dict[str, Any], generator: torch.Generator) -> tuple[int, list[dict[str, float]], float]:
    """Load ``state`` into ``parts`` and the generators; returns (epochs done, their records, seconds trained)."""
    for name, part in parts.items():
        part.load_state_dict(state["parts"][name])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["global_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"], state["history"], state["seconds"]
