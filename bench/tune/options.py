"""What ``bench tune`` was asked for on the command line, beside the experiment file."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RuntimeOptions


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
