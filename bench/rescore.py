"""Re-score a logged model under each test-time augmentation recipe, on the validation and test
splits, without re-training (``bench rescore RUN_ID``).

A TTA recipe is chosen on validation accuracy; the test column is there to report, not to choose.
The scores are logged back to the run as ``rescore.val_acc_<recipe>`` / ``rescore.test_acc_<recipe>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tracking
from .config import TrainConfig, tta_name
from .data import load_cifar10
from .errors import ConfigError, DataError
from .runtime import pick_device, resolve_runtime, setup_threads
from .train import evaluate


@dataclass(frozen=True)
class Recipe:
    flip: bool
    shift: int

    @property
    def name(self) -> str:
        return tta_name(self.flip, self.shift)


def recipes(shifts: tuple[int, ...] = (1, 2)) -> list[Recipe]:
    """No TTA, flip, and flip with each shift."""
    return [Recipe(False, 0), Recipe(True, 0), *(Recipe(True, s) for s in shifts)]


def find_run(run_id: str):
    """The run, if it logged a model; ConfigError naming the problem otherwise."""
    run = tracking.get_run(run_id)
    if run is None:
        raise ConfigError(f"no MLflow run {run_id} in {tracking.current_uri()}; copy a run id from the MLflow UI or `bench report`")
    if "bench.model_uri" not in run.data.tags:
        raise ConfigError(f"run {run_id} logged no model (a pruned, rejected or failed trial?); pick a finished training, trial or confirm run")
    return run


def rescore(run_id: str, shifts: tuple[int, ...] = (1, 2), data_dir: str | None = None, download: bool = False,
            device: str | None = None, threads: int | None = None, tracking_uri: str | None = None) -> dict[str, dict[str, float]]:
    """{recipe name: {"val": accuracy, "test": accuracy}} of the run's logged model, on the run's own validation split."""
    if any(not 1 <= s <= 4 for s in shifts):
        raise ConfigError(f"--shift {shifts}: shifts must be in [1, 4] pixels")
    setup_threads(threads)
    tracking.setup(tracking_uri)
    run = find_run(run_id)
    params = run.data.params
    cfg = TrainConfig(val_size=int(params.get("val_size", TrainConfig.val_size)), precision=params.get("precision", "auto"),
                      channels_last=params.get("channels_last", "auto"))
    data = load_cifar10(data_dir, val_size=cfg.val_size, seed=0, download=download)
    logged_digest = run.data.tags.get("bench.data_digest")
    if logged_digest and logged_digest != data.digest:
        raise DataError(f"this CIFAR-10 copy (digest {data.digest}) is not the one run {run_id} trained on ({logged_digest}); "
                        "point BENCH_DATA_DIR or --data-dir at that copy")
    rt = resolve_runtime(cfg, params.get("norm", "bn"), pick_device(device), params.get("preset"))
    model = tracking.load_run_model(run).to(rt.device, memory_format=rt.memory_format)
    scores = {}
    for recipe in recipes(shifts):
        scores[recipe.name] = {split: evaluate(model, getattr(data, split), rt, cfg.eval_batch_size, recipe.flip, recipe.shift)[1]
                               for split in ("val", "test")}
    tracking.log_to_run(run_id, metrics={f"rescore.{split}_acc_{name}": accs[split] for name, accs in scores.items() for split in ("val", "test")})
    return scores
