"""Errors a user can fix. The CLI prints their message as one line and exits 2; anything else is a bug."""


class BenchError(Exception):
    """Base of every user-facing error."""


class ConfigError(BenchError, ValueError):
    """A bad experiment file, override or search space. The message names the key."""


class DataError(BenchError, RuntimeError):
    """Missing, truncated or corrupt CIFAR-10 files. The message names the file and the fix."""


class BudgetError(BenchError, ValueError):
    """A model over the parameter budget, or a norm/width combination that cannot be built."""


class DivergedError(BenchError, RuntimeError):
    """The training loss became NaN or infinite."""


class TrackingError(BenchError, RuntimeError):
    """The MLflow tracking store or the Optuna storage cannot be reached or holds no such record."""
