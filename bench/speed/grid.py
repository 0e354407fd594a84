"""``bench speed --widths``: training images/s of one preset at several width multipliers.

Channel counts decide CPU speed more than parameter counts (oneDNN picks blocked kernels for some
channel counts and not others), so a search over a continuous width lands most trials on slow
shapes. This measures the harness's own training step (``train_one_epoch``, its defaults) at each
width, interleaved (A B C A B C ...) so that a shared machine's drift hits all alike, and reports
each width's images/s against the first width measured in the same run.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from ..config import TrainConfig
from ..data import CIFAR10
from ..errors import ConfigError
from ..models import count_params, create_model
from ..runtime import default_device, resolve_runtime, setup_threads
from ..train import create_optimizer
from .harness import epoch_runner
from .measure import interleaved, warm_up


@dataclasses.dataclass
class GridOptions:
    widths: tuple[float, ...]
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


def run_grid(opts: GridOptions, data: CIFAR10, progress=lambda message: None) -> dict:
    if not opts.widths or any(not w > 0 for w in opts.widths):
        raise ConfigError("--widths needs positive width multipliers, e.g. --widths 1,1.5,1.75")
    if opts.steps * opts.batch_size > len(data.train):
        raise ConfigError(f"--steps x --batch-size must be <= {len(data.train)} training images")
    threads = setup_threads(opts.threads)
    device = default_device()
    cfg = dataclasses.replace(TrainConfig(), batch_size=opts.batch_size, seed=opts.seed)
    rt = resolve_runtime(cfg, opts.norm, device)
    runners, shapes = {}, {}
    for width in opts.widths:
        torch.manual_seed(opts.seed)
        model = create_model(opts.preset, opts.norm, width=width, groups=opts.groups).to(device, memory_format=rt.memory_format)
        runners[width] = epoch_runner(model, create_optimizer(model, cfg), cfg, rt, data.train)
        shapes[width] = {"params": count_params(model), "channels": channels(model)}
    images = opts.steps * opts.batch_size
    progress("warm-up")
    warm_up(runners, 3 * opts.batch_size)
    progress(f"{opts.repeats} x {opts.steps} steps per width")
    rates = interleaved(runners, images, opts.repeats)
    reference = statistics.median(rates[opts.widths[0]])
    rows = [{"width": w, **shapes[w], "images_per_s": statistics.median(r), "min": min(r), "max": max(r), "repeats": r,
             "ratio": statistics.median(r) / reference} for w, r in rates.items()]
    return {"options": dataclasses.asdict(opts) | {"threads": threads}, "runtime": rt.describe(),
            "torch": torch.__version__, "rows": rows}


def render_grid(report: dict, console) -> None:
    from rich.table import Table

    opts = report["options"]
    table = Table(title=f"{opts['preset']} {opts['norm']}: training step by width ({report['runtime']}, {opts['threads']} thread(s), "
                        f"median of {opts['repeats']} interleaved repeats)", title_justify="left")
    for col in ("width", "conv channels", "params", "images/s", "spread", f"vs width {opts['widths'][0]:g}"):
        table.add_column(col, justify="left" if col == "conv channels" else "right")
    for row in report["rows"]:
        table.add_row(f"{row['width']:g}", "/".join(map(str, row["channels"])), f"{row['params']:,}", f"{row['images_per_s']:,.0f}",
                      f"{row['min']:,.0f}-{row['max']:,.0f}", f"{row['ratio']:.2f}x")
    console.print(table)
