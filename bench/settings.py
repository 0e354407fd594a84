"""The environment variables that tune bench's behaviour, read and checked in one place.

Each is read when it is used (so a test or a launcher may set it), and ``check`` reads them all at the
start of every command: a bad value is one line naming the variable and a good value, before any work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Setting:
    default: float
    meaning: str  # "expected {meaning}, e.g. NAME={example}"
    example: str
    integer: bool = True
    minimum: float = 0  # allowed, unless minimum_open
    minimum_open: bool = False


SETTINGS = {
    "BENCH_MAX_RETRIES": Setting(2, "a whole number of retries >= 0", "2"),
    "BENCH_HEARTBEAT_SECONDS": Setting(20, "a whole number of seconds >= 1", "20", minimum=1),
    "BENCH_STALE_MINUTES": Setting(30, "a positive number of minutes", "30", integer=False, minimum_open=True),
    "BENCH_THREADS": Setting(0, "a whole number of threads >= 0 (0 = every core this process may use)", "2"),
}


def number(name: str) -> float:
    """The value of the setting ``name``: its environment variable if set (and valid), else its default."""
    setting = SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return setting.default
    try:
        value = int(text) if setting.integer else float(text)
    except ValueError:
        value = math.nan
    too_low = value <= setting.minimum if setting.minimum_open else value < setting.minimum
    if math.isnan(value) or math.isinf(value) or too_low:
        raise ConfigError(f"{name}={os.environ[name]!r}: expected {setting.meaning}, e.g. {name}={setting.example}")
    return value


def check() -> None:
    """Read every setting: a bad one is a ConfigError here, not a traceback later."""
    for name in SETTINGS:
        number(name)
