"""Value rules of the experiment fields: what each number must be, checked after its type.

``config`` applies them to every loaded file and every ``--set``; ``cli_options`` to command-line
options, so a bad value fails before anything runs, with a message naming the field and the range.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import ConfigError

SEED_MAX = 2**32 - 1  # NumPy's and Optuna's samplers take seeds in [0, 2**32)
MAX_BATCH = 50_000  # the training set's size


def _between(lo: float, hi: float, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: lo <= v < hi if hi_open else lo <= v <= hi


# Value rules by field name: (check, what the value must be). Types are checked first (``coerce``:
# numbers are finite, integers whole), so each check sees a number of the field's type.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dropout": (_between(0, 1, hi_open=True), "must be in [0, 1)"),
    # Upper bounds far above any model within the budget: a typo must not allocate gigabytes.
    "width": (lambda v: 0 < v <= 8, "must be > 0 and <= 8"),
    "groups": (_between(1, 256), "must be >= 1 and <= 256"),
    "stem": (_between(0, 256), "must be >= 0 and <= 256 (0 = width1)"),
    **{name: (_between(1, 256), "must be >= 1 and <= 256") for name in ("width1", "width2", "width3")},
    "blocks": (_between(1, 16), "must be >= 1 and <= 16"),
    **{name: (_between(0, 16), "must be >= 0 and <= 16 (0 = blocks)") for name in ("blocks1", "blocks2", "blocks3")},
    "epochs": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (_between(1, MAX_BATCH), f"must be in [1, {MAX_BATCH}]"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "momentum": (_between(0, 1, hi_open=True), "must be in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "label_smoothing": (_between(0, 1, hi_open=True), "must be in [0, 1)"),
    "grad_clip": (lambda v: v >= 0, "must be >= 0 (a global L2 norm, e.g. 1.0; 0 = off)"),
    "crop_padding": (_between(0, 32), "must be in [0, 32]"),
    "cutout": (_between(0, 32), "must be in [0, 32]"),
    "erasing": (_between(0, 1), "must be in [0, 1] (a probability; 0 = off)"),
    "mixup": (lambda v: v >= 0, "must be >= 0 (Beta alpha, e.g. 0.2; 0 = off)"),
    "cutmix": (lambda v: v >= 0, "must be >= 0 (Beta alpha, e.g. 1.0; 0 = off)"),
    "lr_warmup_epochs": (lambda v: v >= 0, "must be >= 0 (0 = no warm-up)"),
    "distill": (_between(0, 1), "must be in [0, 1] (the soft labels' weight; 0 = off)"),
    "distill_temperature": (lambda v: v > 0, "must be > 0 (e.g. 4; 1 = the teachers' own probabilities)"),
    "drop_path": (_between(0, 1, hi_open=True), "must be in [0, 1) (0 = off)"),
    "layer_scale": (_between(0, 1), "must be in [0, 1] (0 = off, e.g. 0.1)"),
    **{name: (lambda v: v in (1, 2), "must be 1 or 2") for name in ("stride2", "stride3")},
    "stages": (lambda v: v in (2, 3), "must be 2 or 3"),
    "expansion": (_between(1, 8), "must be >= 1 and <= 8"),
    "kernel": (lambda v: v in (3, 5, 7, 9), "must be 3, 5, 7 or 9 (an odd depthwise kernel)"),
    "val_size": (_between(0, 50_000, hi_open=True), "must be in [0, 50000)"),
    "train_subset": (lambda v: v >= 0, "must be >= 0 (0 = all)"),
    "seed": (_between(0, SEED_MAX), f"must be in [0, {SEED_MAX}]"),
    "eval_batch_size": (_between(1, MAX_BATCH), f"must be in [1, {MAX_BATCH}]"),
    "ema": (_between(0, 1, hi_open=True), "must be in [0, 1) (0 = off, e.g. 0.99)"),
    "tta_shift": (_between(0, 4), "must be in [0, 4] pixels (0 = off)"),
    "max_params": (lambda v: v >= 1, "must be >= 1"),
    "tune.trials": (lambda v: v >= 1, "must be >= 1"),
    "tune.epochs": (lambda v: v >= 0, "must be >= 0 (0 = train.epochs)"),
    "tune.train_subset": (lambda v: v >= 0, "must be >= 0 (0 = all)"),
    "tune.warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "tune.startup_trials": (lambda v: v >= 0, "must be >= 0"),
    "tune.min_epochs": (lambda v: v >= 1, "must be >= 1 (the first rung of successive halving)"),
    "tune.reduction_factor": (lambda v: v >= 2, "must be >= 2"),
}


def check_value(key: str, value: Any) -> Any:
    """``value`` if it obeys the rule of field ``key`` (``RULES``), else a ConfigError naming both."""
    rule = RULES.get(key)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{key} {rule[1]}, got {value!r}")
    return value
