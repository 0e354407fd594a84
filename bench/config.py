"""Experiment configuration: typed dataclasses loaded from TOML, overridable from the CLI.

An experiment file (``experiments/<name>.toml``) has the sections ``[model]``, ``[train]``,
``[budget]``, ``[tune]`` and ``[search.<hyperparameter>]``. Unknown keys and bad values are
errors that name the key. Hyperparameters live in one flat namespace (every field of ``model``
and ``train``), so ``--set lr=0.05`` or ``[search.dropout]`` need no section prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .rules import MAX_BATCH, RULES, SEED_MAX, check_value  # noqa: F401  (re-exported: config.SEED_MAX ...)

NORMS = ("bn", "gn", "ln", "lnc", "lnchw")
STUDY_NORMS = ("bn", "gn", "ln")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
PRUNERS = ("halving", "median", "none")
STEM_KINDS = ("conv", "patch", "whiten")  # convnext: 3x3 conv, 2x2 stride-2 patchify, frozen 2x2 whitening (models/stems.py)
DROPOUT_AT = ("head", "blocks")  # resnet: dropout before the classifier, or between each block's two convs


@dataclass
class ModelConfig:
    preset: str = "seed_bn"
    norm: str = "bn"
    dropout: float = 0.05
    width: float = 1.0  # multiplier on the preset's channel widths
    groups: int = 4  # GroupNorm groups (norm = "gn")
    # Residual presets only (seed presets ignore them); ``width`` scales these too.
    stem: int = 0  # stem conv width; 0 = width1
    width1: int = 16  # stage widths; stages 2 and 3 halve the resolution
    width2: int = 32
    width3: int = 40
    blocks: int = 1  # basic blocks per stage
    blocks1: int = 0  # per-stage block counts; 0 = blocks
    blocks2: int = 0
    blocks3: int = 0
    stride2: int = 2  # resnet: stride at the start of stage 2 (2 halves the resolution, 1 keeps it)
    stride3: int = 2  # and of stage 3; 1 puts a stage's parameters at 4x the positions, 4x the multiply-adds
    dropout_at: str = "head"
    drop_path: float = 0.0  # convnext: stochastic depth, rising linearly over the blocks to this rate; 0 = off
    kernel: int = 7  # convnext: depthwise kernel size (ConvNeXt's 7; 3 trains ~1.4x faster on CPU)
    stem_kind: str = "conv"  # convnext: one of STEM_KINDS
    stages: int = 3  # convnext: 2 ends at 16x16 (width3, blocks3 unused)
    expansion: int = 4  # convnext: a block's hidden width over its own (ConvNeXt's 4)
    gated: bool = False  # convnext: ReGLU feed-forward, ReLU(a) * b, instead of GELU
    layer_scale: float = 0.0  # convnext: initial per-channel scale on each block's output (ConvNeXt's layer scale); 0 = off


# Named residual shapes, each under 50,000 parameters with every norm. ``preset = "resnet_wide"`` is
# ``preset = "resnet"`` with every shape field below (fields set beside it win), so runs log, and
# ``bench confirm`` re-trains, the real shape.
RESNET_SHAPE = {k: getattr(ModelConfig(), k) for k in ("stem", "width1", "width2", "width3", "blocks", "blocks1", "blocks2", "blocks3")}
RESNET_SHAPES = {
    # two blocks at 32x32, a narrow last stage: 37,594 params; best trial of the 6-epoch resnet_bn study
    "resnet_deep": {**RESNET_SHAPE, "width3": 24, "blocks1": 2},
    # a 24-channel first stage: 48,226 params; best trial of the 10-epoch resnet_bn study
    "resnet_wide": {**RESNET_SHAPE, "width1": 24, "width3": 32},
}


def expand_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with a named residual shape turned into ``preset="resnet"`` plus its fields, under
    any field ``values`` sets itself."""
    shape = RESNET_SHAPES.get(values.get("preset"))
    return values if shape is None else {**shape, **values, "preset": "resnet"}


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1  # peak learning rate for onecycle
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    lr_warmup_epochs: float = 0.0  # cosine / constant: linear warm-up from lr/100 over this many epochs first
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # clip the gradients' global L2 norm to this before each step; 0 = off
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of the square cut out of each training image; 0 = off
    erasing: float = 0.0  # probability of random erasing per training image (torchvision's box sizes); 0 = off
    mixup: float = 0.0  # alpha of MixUp's Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # alpha of CutMix; with mixup too, each batch uses one of the two
    teacher: str = ""  # distil from this study's finished confirm runs (or run ids joined by +); bench/teacher.py
    distill: float = 0.0  # weight of the teachers' soft labels in the loss; 0 = off
    distill_temperature: float = 4.0  # softens teacher and student alike in the soft part
    val_size: int = 5000
    train_subset: int = 0  # train on the first N images of the training split; 0 = all
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast where the CPU/GPU supports it
    channels_last: str = "auto"  # auto | on | off
    eval_batch_size: int = 256  # measured: 1000 is 0.35x of 128 on CPU (activations leave the cache)
    ema: float = 0.0  # decay of an exponential moving average of the weights, used for evaluation; 0 = off
    tta_flip: bool = False  # evaluate on the mean logits of each image and its horizontal flip
    tta_shift: int = 0  # also average over copies shifted diagonally by -N and +N pixels (airbench's translate TTA); 0 = off
    tta_every_epoch: bool = True  # false: the shift joins only the last epoch's validation and the test (3x cheaper epochs)
    compile: bool = False  # torch.compile the training step: fused elementwise kernels, ~1-2 min to compile first


# Train fields that change how fast a run computes, not what it learns: a study's fixed settings, a
# confirmation's recipe and a checkpoint's identity ignore them, so they may differ between resumptions.
SPEED_ONLY = frozenset({"eval_batch_size", "compile"})


def tta_name(flip: bool, shift: int) -> str:
    """none, flip, flip_shift1 ...: how `bench rescore` and `bench report --tta` name a TTA recipe."""
    return "_".join([*(["flip"] if flip else []), *([f"shift{shift}"] if shift else [])]) or "none"


def tta_names(shifts: tuple[int, ...] = (1, 2, 3, 4)) -> list[str]:
    """The TTA recipes a test accuracy can be read under (``bench report --tta``)."""
    return [tta_name(False, 0), *(tta_name(True, s) for s in (0, *shifts))]


@dataclass
class RuntimeOptions:
    """Where a command runs and records, from its command line (--device, --threads, --tracking-uri,
    --data-dir, --download); ``bench tune`` and ``bench confirm`` extend it with their own options."""

    tracking_uri: str | None = None
    data_dir: str | None = None
    download: bool = False
    threads: int | None = None
    device: str | None = None


@dataclass
class BudgetConfig:
    max_params: int = 50_000


@dataclass
class TuneConfig:
    trials: int = 20
    epochs: int = 0  # epochs per trial; 0 = train.epochs
    train_subset: int = 0  # trials train on the first N training images (0 = all); confirm runs use all
    pruner: str = "halving"
    min_epochs: int = 3  # halving: the first rung; survivors go on to min_epochs * reduction_factor**k epochs
    reduction_factor: int = 3  # halving: the best 1/reduction_factor of the trials at a rung go on
    warmup_epochs: int = 1  # median: epochs a trial runs before it may be pruned
    startup_trials: int = 5  # trials before the median pruner and TPE take over
    baseline: bool = True  # trial 0 trains the experiment's own values of the searched hyperparameters


@dataclass
class Dimension:
    """One search dimension: a numeric range (low/high, optional log/step) or a list of choices."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] | None = None


@dataclass
class Experiment:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    search: dict[str, Dimension] = field(default_factory=dict)

    def hyperparameters(self) -> dict[str, Any]:
        """The flat namespace of model and train fields, as logged to MLflow."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.train)}


def with_added_fields(saved: dict[str, str]) -> dict[str, str]:
    """Settings recorded as text (a checkpoint's, a study's) with each field bench added since at its default."""
    return {**{k: str(v) for k, v in Experiment().hyperparameters().items()}, **saved}


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "budget": BudgetConfig, "tune": TuneConfig}
CHOICES = {
    "norm": NORMS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "channels_last": ("auto", "on", "off"),
    "pruner": PRUNERS,
    "dropout_at": DROPOUT_AT,
    "stem_kind": STEM_KINDS,
}
# Model fields only one family reads: set away from their default on another preset, they are an error.
FAMILY_FIELDS = {**dict.fromkeys(("drop_path", "kernel", "stem_kind", "stages", "expansion", "gated", "layer_scale"),
                                 "convnext"),
                 "stride2": "resnet", "stride3": "resnet"}


def _field_types(cls) -> dict[str, type]:
    types = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: types[f.type] for f in fields(cls)}


def coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise naming the key."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        try:
            value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind in (int, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return kind(value)


def _section(cls, key: str, table: dict) -> Any:
    types = _field_types(cls)
    table = expand_preset(table) if cls is ModelConfig else table
    obj = cls()
    for name, value in table.items():
        if name not in types:
            raise ConfigError(f"unknown key '{key}.{name}' (known: {', '.join(types)})")
        setattr(obj, name, coerce(f"{key}.{name}", value, types[name]))
    return obj


def hyperparameter_types() -> dict[str, type]:
    return {**_field_types(ModelConfig), **_field_types(TrainConfig)}


def _dimension(name: str, table: Any) -> Dimension:
    key = f"search.{name}"
    types = hyperparameter_types()
    if name not in types:
        raise ConfigError(f"unknown search dimension '{key}' (known: {', '.join(types)})")
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table with low/high or choices")
    allowed = {"low", "high", "log", "step", "choices"}
    for extra in set(table) - allowed:
        raise ConfigError(f"unknown key '{key}.{extra}' (known: {', '.join(sorted(allowed))})")
    kind = types[name]
    if "choices" in table:
        choices = table["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{key}.choices: expected a non-empty list")
        return Dimension(name, choices=[coerce(key, c, kind) for c in choices])
    if kind not in (int, float):
        raise ConfigError(f"{key}: '{name}' is not numeric; give choices = [...]")
    if "low" not in table or "high" not in table:
        raise ConfigError(f"{key}: needs both low and high (or choices)")
    low, high = coerce(f"{key}.low", table["low"], kind), coerce(f"{key}.high", table["high"], kind)
    if low > high:
        raise ConfigError(f"{key}: low ({low}) is greater than high ({high})")
    log = coerce(f"{key}.log", table.get("log", False), bool)
    if log and low <= 0:
        raise ConfigError(f"{key}: a log scale needs low > 0, got {low}")
    step = None if table.get("step") is None else coerce(f"{key}.step", table["step"], kind)
    if step is not None and step <= 0:
        raise ConfigError(f"{key}.step must be > 0, got {step}")
    if step is not None and log:
        raise ConfigError(f"{key}: give step or log = true, not both (Optuna samples a log scale without steps)")
    return Dimension(name, low, high, log, step)


def _check_dimension(exp: Experiment, dim: Dimension) -> None:
    """Every value a search dimension can take obeys its field's own rule (``RULES``), so no trial
    fails on a value the experiment file allowed."""
    values = {"choices": dim.choices} if dim.choices is not None else {"low": [dim.low], "high": [dim.high]}
    for which, candidates in values.items():
        for value in candidates:
            trial = copy.deepcopy(exp)
            setattr(trial.model if hasattr(trial.model, dim.name) else trial.train, dim.name, value)
            try:
                validate(trial)
            except ConfigError as err:
                raise ConfigError(f"search.{dim.name}.{which} = {value!r}: {err}") from None


def from_dict(data: dict, name: str = "experiment") -> Experiment:
    exp = Experiment(name=str(data.get("name", name)), description=str(data.get("description", "")))
    for key, table in data.items():
        if key in ("name", "description"):
            continue
        if key == "search":
            exp.search = {n: _dimension(n, t) for n, t in table.items()}
        elif key in SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(f"[{key}] must be a table")
            setattr(exp, key, _section(SECTIONS[key], key, table))
        else:
            raise ConfigError(f"unknown section '{key}' (known: name, description, {', '.join(SECTIONS)}, search)")
    validate(exp)
    for dim in exp.search.values():
        _check_dimension(exp, dim)
    return exp


def load(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found; pass --experiment with an existing .toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return from_dict(data, name=path.stem)


def override(exp: Experiment, **values: Any) -> Experiment:
    """Set hyperparameters by flat name (``lr=0.05``); ``None`` values are ignored."""
    types = hyperparameter_types()
    for name, value in expand_preset(values).items():
        if value is None:
            continue
        if name not in types:
            raise ConfigError(f"unknown hyperparameter '{name}' (known: {', '.join(types)})")
        section = exp.model if hasattr(exp.model, name) else exp.train
        setattr(section, name, coerce(name, value, types[name]))
    validate(exp)
    return exp


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["lr=0.1", "cutout=8"]`` -> ``{"lr": "0.1", "cutout": "8"}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r}: expected NAME=VALUE, e.g. --set weight_decay=1e-4")
        out[name.strip()] = value.strip()
    return out


def parse_value(name: str, value: Any) -> Any:
    """A hyperparameter from the command line: converted to its field's type and checked by its rule."""
    return check_value(name, coerce(name, value, hyperparameter_types()[name]))


def validate(exp: Experiment) -> None:
    """Value checks that types alone cannot express."""
    m, t = exp.model, exp.train
    for section in (m, t, exp.tune):
        for name, allowed in CHOICES.items():
            if hasattr(section, name) and getattr(section, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(section, name)!r} is not one of {', '.join(allowed)}")
    for prefix, section in (("", m), ("", t), ("", exp.budget), ("tune.", exp.tune)):
        for f in fields(section):
            check_value(prefix + f.name, getattr(section, f.name))
    if t.lr_warmup_epochs and t.schedule == "onecycle":
        raise ConfigError("lr_warmup_epochs: onecycle has its own warm-up; use schedule=cosine or set lr_warmup_epochs=0")
    if t.lr_warmup_epochs >= t.epochs:
        raise ConfigError(f"lr_warmup_epochs ({t.lr_warmup_epochs:g}) must be below epochs ({t.epochs}); shorten the warm-up")
    for name, preset in FAMILY_FIELDS.items():
        default = getattr(ModelConfig, name)
        if getattr(m, name) != default and m.preset != preset:
            shown = f"{default:g}" if isinstance(default, float) else default
            raise ConfigError(f"{name} applies to preset {preset}, not {m.preset!r}; remove it or set {name}={shown}")
    if m.stem_kind == "whiten" and m.stem:
        raise ConfigError(f"stem = {m.stem}: the whitening stem has 24 channels (12 directions and their negatives); set stem=0")
    if bool(t.distill) != bool(t.teacher):
        raise ConfigError("distill and teacher go together: set both (e.g. teacher=gated_bn distill=0.5) or neither")
    if t.distill and (t.mixup or t.cutmix):
        raise ConfigError("distill with mixup/cutmix: the teachers label whole images, not mixed ones; set mixup=0 cutmix=0")
    if t.optimizer == "sgd" and t.nesterov and t.momentum == 0:
        raise ConfigError("nesterov = true needs momentum > 0; set momentum (e.g. 0.9) or nesterov=false")


# The seed LayerNorm only fits the budget in its own topology; ConvNeXt's channel LayerNorm is studied in its family.
EXPERIMENT_FOR_NORM = {"lnchw": "seed_gn", "lnc": "convnext_lnc"}


def norm_experiment(norm: str | None) -> str:
    """The name of a norm's own experiment file: ``<norm>``, but for the exceptions above (bn by default)."""
    return EXPERIMENT_FOR_NORM.get(norm, norm or "bn")


def find_experiment(name: str, search_dirs: list[Path] | None = None, fix: str = "pass --experiment FILE") -> Path:
    """``experiments/<name>.toml`` in the working directory, else beside the installed package;
    ``fix`` ends the error, for commands without --experiment."""
    dirs = search_dirs or [Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"]
    for d in dirs:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise ConfigError(f"no experiment file {name}.toml in {', '.join(map(str, dirs))}; {fix}")
