"""What ``bench tune`` was asked for on the command line, beside the experiment file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TuneOptions:
    trials: int | None = None  # total for the study; None = the experiment's tune.trials
    more: bool = False  # treat ``trials`` as "this many more" instead of the total
    epochs: int | None = None
    study: str | None = None
    storage: str | None = None
    timeout: float | None = None
    seed: int = 0
    pruner: str | None = None
    tracking_uri: str | None = None
    data_dir: str | None = None
    download: bool = False
    threads: int | None = None
    device: str | None = None
