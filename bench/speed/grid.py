"""``bench speed --widths`` / ``--experiments``: training images/s of one preset at several width
multipliers, or of several experiments' models (each at its own shape and norm).

Channel counts decide CPU speed more than parameter counts (oneDNN picks blocked kernels for some
channel counts and not others), so a search over a continuous width lands most trials on slow
shapes. This measures the harness's own training step (``train_one_epoch``, its defaults) at each
width, interleaved (A B C A B C ...) so that a shared machine's drift hits all alike, and reports
each variant's images/s against the first one measured in the same run.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from ..config import TrainConfig, find_experiment, load, override, parse_assignments
from ..data import CIFAR10
from ..errors import ConfigError
from ..models import count_params, create_model
from ..runtime import cpu_name, default_device, resolve_runtime, setup_threads
from ..train import create_optimizer, step_model
from .harness import epoch_runner
from .measure import interleaved, warm_up


@dataclasses.dataclass
class GridOptions:
    widths: tuple[float, ...] = ()
    experiments: tuple[str, ...] = ()  # names or TOML paths, each with optional ":field=value" changes
    norm: str = "bn"
    preset: str = "seed_bn"
    groups: int = 4
    steps: int = 30
    repeats: int = 5
    batch_size: int = 128
    threads: int | None = None
    seed: int = 0


def channels(model: torch.nn.Module) -> list[int]:
    """The output channels of every convolution, in order: what the width really built."""
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


# The training settings a variant may change: how the step computes, not what it optimises.
RUNTIME_FIELDS = ("precision", "channels_last", "compile")


def variants(opts: GridOptions) -> dict[str | float, tuple[dict, dict]]:
    """What to measure: the experiment's label or the width -> (``create_model`` keywords, preset and
    norm included; the runtime fields it changes)."""
    if opts.experiments:
        return {label: (model, runtime) for label, model, runtime in map(experiment_variant, opts.experiments)}
    if not opts.widths or any(not w > 0 for w in opts.widths):
        raise ConfigError("--widths needs positive width multipliers, e.g. --widths 1,1.5,1.75")
    return {w: ({"preset": opts.preset, "norm": opts.norm, "width": w, "groups": opts.groups}, {}) for w in opts.widths}


def experiment_variant(spec: str) -> tuple[str, dict, dict]:
    """``convnext_ln`` or ``convnext_ln:kernel=3:channels_last=off`` -> (label, model keywords, runtime
    fields): an experiment's model, with changes checked as --set's."""
    name, *changes = spec.split(":")
    assignments = parse_assignments(changes)
    exp = override(load(name if name.endswith(".toml") else find_experiment(name, fix="name a file of experiments/ or give a .toml path")), **assignments)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unused = [k for k in assignments if k in train_fields and k not in RUNTIME_FIELDS]
    if unused:
        raise ConfigError(f"{spec}: the step benchmark trains every model with the same recipe, so {', '.join(unused)} "
                          f"would be ignored; change the model or {' / '.join(RUNTIME_FIELDS)}")
    runtime = {k: getattr(exp.train, k) for k in assignments if k in RUNTIME_FIELDS}
    return ":".join((exp.name, *changes)), dataclasses.asdict(exp.model), runtime


def run_grid(opts: GridOptions, data: CIFAR10, progress=lambda message: None) -> dict:
    if opts.steps * opts.batch_size > len(data.train):
        raise ConfigError(f"--steps x --batch-size must be <= {len(data.train)} training images")
    models = variants(opts)
    threads = setup_threads(opts.threads)
    device = default_device()
    cfg = dataclasses.replace(TrainConfig(), batch_size=opts.batch_size, seed=opts.seed)
    runners, shapes = {}, {}
    for label, (kwargs, runtime) in models.items():
        # each model in the memory layout and precision it trains in, unless the variant changes them
        variant_cfg = dataclasses.replace(cfg, **runtime)
        rt = resolve_runtime(variant_cfg, kwargs["norm"], device, kwargs.get("preset"))
        torch.manual_seed(opts.seed)
        model = create_model(**kwargs).to(device, memory_format=rt.memory_format)
        runners[label] = epoch_runner(step_model(model, variant_cfg, rt), create_optimizer(model, cfg), cfg, rt, data.train)
        shapes[label] = {"params": count_params(model), "channels": channels(model), "runtime": rt.describe()}
    images = opts.steps * opts.batch_size
    progress("warm-up")
    warm_up(runners, 3 * opts.batch_size)
    progress(f"{opts.repeats} x {opts.steps} steps per model")
    rates = interleaved(runners, images, opts.repeats)
    reference = statistics.median(next(iter(rates.values())))
    rows = [{"label": label if opts.experiments else f"{label:g}", **({} if opts.experiments else {"width": label}), **shapes[label],
             "images_per_s": statistics.median(r), "min": min(r), "max": max(r), "repeats": r,
             "ratio": statistics.median(r) / reference} for label, r in rates.items()]
    return {"options": dataclasses.asdict(opts) | {"threads": threads}, "runtime": rows[0]["runtime"],
            "cpu": cpu_name(), "torch": torch.__version__, "rows": rows}


def render_grid(report: dict, console) -> None:
    from rich.table import Table

    opts, rows = report["options"], report["rows"]
    what = "model" if opts["experiments"] else "width"
    title = ("training step by model" if opts["experiments"] else f"{opts['preset']} {opts['norm']}: training step by width")
    table = Table(title=f"{title} ({report['cpu']}, {opts['threads']} thread(s), batch {opts['batch_size']}, median of {opts['repeats']} interleaved repeats)",
                  title_justify="left")
    for col in (what, "conv channels", "params", "runtime", "images/s", "spread", f"vs {'' if opts['experiments'] else 'width '}{rows[0]['label']}"):
        table.add_column(col, justify="left" if col in (what, "conv channels", "runtime") else "right")
    for row in rows:
        convs = row["channels"]
        shown = "/".join(map(str, convs)) if len(convs) <= 12 else f"{len(convs)} convs, {min(convs)}-{max(convs)}"
        table.add_row(row["label"], shown, f"{row['params']:,}", row["runtime"], f"{row['images_per_s']:,.0f}",
                      f"{row['min']:,.0f}-{row['max']:,.0f}", f"{row['ratio']:.2f}x")
    console.print(table)
