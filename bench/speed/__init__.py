"""``bench speed``: the harness's training and evaluation throughput against the seed notebooks' pipeline.

Two contenders run in one process, interleaved (A B A B ...) so that drift of a shared machine hits
both alike:

- baseline: what the seed notebooks did. A ``Dataset`` that turns each uint8 image into a PIL image
  and applies torchvision's per-image transforms, a ``DataLoader`` with worker processes, the seed
  model with ``nn.Dropout``, eager fp32 NCHW, plain SGD with Nesterov momentum.
- bench: the harness's own path with its defaults: ``resolve_runtime`` on the default ``TrainConfig``,
  ``create_model``, ``create_optimizer`` and ``train_one_epoch`` itself.

One module per concern:

- ``options``: ``SpeedOptions`` and ``validate`` (one-line errors naming the flag).
- ``measure``: the runner contract, interleaved timing, spread, matmul peak, FLOPs, op profile.
- ``seed``: the seed notebooks' pipeline (the baseline).
- ``harness``: the harness's pipeline as runners (the bench side).
- ``ablation``: ``--ablate``'s knobs, each alone against the seed's step.
- ``benchmark``: ``run_speed``, the whole measurement, and ``run_ablation``.
- ``render``: the tables and ``write_json``.
- ``to_accuracy``: ``--to-accuracy``, wall clock to a test accuracy.
- ``grid``: ``--widths``, the training step at several width multipliers.
"""

from .benchmark import run_speed
from .grid import GridOptions, render_grid, run_grid
from .harness import bench_model, epoch_runner
from .measure import interleaved, warm_up
from .options import SpeedOptions
from .render import render, write_json
from .seed import seed_model
from .to_accuracy import render_time_to_accuracy, time_to_accuracy

__all__ = [
    "GridOptions", "SpeedOptions", "bench_model", "epoch_runner", "interleaved", "render", "render_grid",
    "render_time_to_accuracy", "run_grid", "run_speed", "seed_model", "time_to_accuracy", "warm_up", "write_json",
]
