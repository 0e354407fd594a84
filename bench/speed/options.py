"""``bench speed``'s options and their checks: each bad value is a one-line ``ConfigError`` naming its flag."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NORMS
from ..data import CIFAR10
from ..errors import ConfigError
from .ablation import EVAL_KNOBS, TRAIN_KNOBS


@dataclass
class SpeedOptions:
    norm: str = "bn"
    preset: str | None = None  # default: seed_gn for the seed LayerNorm, else seed_bn
    steps: int = 50  # training steps per repeat, at --batch-size
    repeats: int = 5
    batch_size: int = 128
    threads: int | None = None  # default: the cores this process may use
    workers: int = 2  # the seed notebooks' DataLoader workers
    eval_images: int = 10_000
    warmup_steps: int = 3  # untimed steps per contender: allocator, oneDNN primitives, compilation
    ablate: bool = False
    knobs: tuple[str, ...] = ()  # limit --ablate to these knobs; empty = all
    profile: bool = False
    seed: int = 0

    @property
    def model_preset(self) -> str:
        return self.preset or ("seed_gn" if self.norm == "lnchw" else "seed_bn")


def validate(opts: SpeedOptions, data: CIFAR10) -> None:
    checks = [
        ("--norm", opts.norm in NORMS, f"must be one of {', '.join(NORMS)}"),
        ("--steps", opts.steps >= 1, "must be >= 1"),
        ("--repeats", opts.repeats >= 1, "must be >= 1"),
        ("--batch-size", opts.batch_size >= 1, "must be >= 1"),
        ("--threads", opts.threads is None or opts.threads >= 1, "must be >= 1"),
        ("--workers", opts.workers >= 0, "must be >= 0"),
        ("--eval-images", 1 <= opts.eval_images <= len(data.test), f"must be in [1, {len(data.test)}]"),
        ("--steps x --batch-size", train_images(opts) <= len(data.train), f"must be <= {len(data.train)} training images"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{flag} {rule}")
    unknown = set(opts.knobs) - set(TRAIN_KNOBS) - set(EVAL_KNOBS)
    if unknown:
        raise ConfigError(f"unknown knob {sorted(unknown)[0]!r}; choose from {', '.join(dict.fromkeys([*TRAIN_KNOBS, *EVAL_KNOBS]))}")


def train_images(opts: SpeedOptions) -> int:
    return opts.steps * opts.batch_size
