"""Reading a study back from MLflow: its parent runs, trial runs, best trial, confirm and batch-size runs.

Shared by ``bench confirm`` (which needs the best trial) and ``bench report`` (which needs everything).
Runs are found by the ``bench.*`` tags that tune, confirm and report write; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import tracking
from .config import NORMS, coerce, hyperparameter_types, norm_experiment, tta_name
from .errors import ConfigError, TrackingError

# Tags of confirm and batch-size runs (beside tracking.TAG_*).
TAG_SOURCE_RUN = "bench.source_run_id"  # the trial run whose configuration was re-trained
TAG_STUDY_RUN = "bench.study_run_id"  # that trial's parent (study) run; also mlflow.parentRunId
TAG_SEED = "bench.seed"
TAG_BATCH_SIZE = "bench.batch_size"
TAG_RECIPE = "bench.recipe"  # how the configuration was re-trained: epochs and what differs from the trial (recipe_text)
PARENT = "mlflow.parentRunId"


@dataclass
class StudyRecord:
    norm: str
    study: str  # Optuna study name == MLflow experiment name
    experiment_id: str
    parents: list[Any]  # bench.kind=study runs, one per `bench tune` invocation, newest first
    trials: list[Any]  # bench.kind=trial runs
    best: Any  # the COMPLETE trial run with the highest best_val_acc
    confirms: list[Any] = field(default_factory=list)  # of ``best``, one recipe, one run per seed
    batch_runs: list[Any] = field(default_factory=list)  # of ``best``, one recipe, one run per batch size

    @property
    def best_parent_id(self) -> str:
        return self.best.data.tags.get(PARENT, "")


def state(run) -> str:
    return run.data.tags.get(tracking.TAG_STATE, "")


def trial_number(run) -> int:
    return int(run.data.tags.get(tracking.TAG_TRIAL, -1))


def trained(trials: list[Any]) -> list[Any]:
    """COMPLETE trial runs that trained (rejected ones are not COMPLETE and have no best_val_acc)."""
    return [r for r in trials if state(r) == "COMPLETE" and "best_val_acc" in r.data.metrics]


def best_trial(trials: list[Any]) -> Any | None:
    """Highest best_val_acc among COMPLETE trials (the study's objective); ties go to the earlier trial."""
    return max(trained(trials), key=lambda r: (r.data.metrics["best_val_acc"], -trial_number(r)), default=None)


def trial_counts(trials: list[Any]) -> dict[str, int]:
    """Trial runs by final state; INTERRUPTED trials count as failed, as Optuna records them."""
    states = [state(r) for r in trials]
    return {
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL") + states.count("INTERRUPTED"),
        "rejected": states.count("REJECTED"),
    }


def load_study(norm: str, study: str | None = None, trial: int | None = None) -> StudyRecord:
    """Everything MLflow holds about the study of ``norm`` (named ``study``, default the name of the
    norm's own experiment file, as `bench tune --norm` names it); with
    ``trial``, that trained trial stands in for the best (see ``with_trial``)."""
    name = study or norm_experiment(norm)
    parents = tracking.search_runs(name, "study")
    if not parents:
        raise TrackingError(f"no study '{name}' in MLflow at {tracking.current_uri()}; run `bench tune --norm {norm}` first")
    trials = tracking.search_runs(name, "trial")
    best = best_trial(trials)
    if best is None:
        counts = ", ".join(f"{v} {k}" for k, v in trial_counts(trials).items())
        raise TrackingError(f"study '{name}' has no complete trial yet ({len(trials)} trial runs: {counts}); run `bench tune --norm {norm}` to finish some")
    record = StudyRecord(norm, name, parents[0].info.experiment_id, parents, trials, best)
    return with_trial(record, trial) if trial is not None else with_derived_runs(record)


def with_derived_runs(record: StudyRecord, epochs: int | None = None) -> StudyRecord:
    """``record`` with the confirm and batch-size runs of its ``best`` trial filled in; with ``epochs``,
    only confirm runs trained for that many epochs."""
    confirms = [r for r in derived_runs(record, "confirm") if epochs is None or r.data.params.get("epochs") == str(epochs)]
    record.confirms = main_recipe(confirms, TAG_SEED)
    record.batch_runs = main_recipe(derived_runs(record, "batch_size"), TAG_BATCH_SIZE)
    return record


def derived_runs(record: StudyRecord, kind: str, finished: bool = True) -> list[Any]:
    """Finished (or, with ``finished=False``, unfinished) runs of ``kind`` that re-trained the study's
    best trial, newest first."""
    where = f"tags.`{TAG_SOURCE_RUN}` = '{record.best.info.run_id}' and attributes.status {'=' if finished else '!='} 'FINISHED'"
    return tracking.search_runs(record.study, kind, where)


def recipe_text(epochs: int, changes: dict[str, Any]) -> str:
    """The ``bench.recipe`` tag: ``epochs=N`` and each change from the trial, sorted, each value in one
    spelling (``grad_clip=8`` whether typed 8, 8.0 or set as ``8`` in a file; ``true`` / ``false``)."""
    return " ".join([f"epochs={epochs}", *(f"{k}={spelled(k, v)}" for k, v in sorted(changes.items()))])


def spelled(name: str, value: Any) -> str:
    kind = hyperparameter_types().get(name)
    try:
        value = coerce(name, value, kind) if kind else value
    except ConfigError:
        return str(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def canonical_recipe(text: str) -> str:
    """A ``bench.recipe`` tag in today's spelling, so a tag written as ``weight_decay=1e-4`` or
    ``grad_clip=8.0`` by an older bench matches the same recipe written now."""
    pairs = dict(part.partition("=")[::2] for part in text.split())
    epochs = pairs.pop("epochs", None)
    return recipe_text(epochs, pairs) if epochs is not None else text


def same_recipe(run, text: str) -> bool:
    return canonical_recipe(run.data.tags.get(TAG_RECIPE, "")) == canonical_recipe(text)


def main_recipe(runs: list[Any], key_tag: str) -> list[Any]:
    """Runs of one recipe, the newest per ``key_tag`` (seed or batch size), sorted by that key.

    The recipe with the most distinct keys wins (the newest on a tie), so a one-seed smoke run with
    other epochs neither mixes into nor hides a full confirmation."""
    by_recipe: dict[str, dict[int, Any]] = {}
    for run in runs:  # newest first: the first run per key is the newest
        chosen = by_recipe.setdefault(canonical_recipe(run.data.tags.get(TAG_RECIPE, "")), {})
        chosen.setdefault(int(run.data.tags.get(key_tag, -1)), run)
    if not by_recipe:
        return []
    newest = {recipe: max(r.info.start_time for r in chosen.values()) for recipe, chosen in by_recipe.items()}
    best = max(by_recipe, key=lambda recipe: (len(by_recipe[recipe]), newest[recipe]))
    return [by_recipe[best][k] for k in sorted(by_recipe[best])]


def studied_norms() -> list[str]:
    """Norms whose default-named study (MLflow experiment named after the norm's file) has a study run."""
    return [norm for norm in NORMS if tracking.search_runs(norm_experiment(norm), "study")]


def metric(run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def with_trial(record: StudyRecord, number: int) -> StudyRecord:
    """``record`` with trained trial ``number`` in place of the best, for ``bench confirm --trial``
    (the runner-up, or a smaller model of the Pareto front); its confirm runs are that trial's."""
    chosen = [r for r in trained(record.trials) if trial_number(r) == number]
    if not chosen:
        numbers = ", ".join(str(n) for n in sorted(trial_number(r) for r in trained(record.trials)))
        raise ConfigError(f"study '{record.study}' has no trained trial {number}; choose one of {numbers}")
    return with_derived_runs(dataclasses.replace(record, best=chosen[0]))


def trained_tta(run) -> str:
    """The TTA recipe the run's own ``test_acc`` was scored with."""
    params = run.data.params
    return tta_name(params.get("tta_flip", "False") == "True", int(params.get("tta_shift", 0)))


def test_accuracy(run, tta: str | None = None) -> float:
    """The run's test accuracy as trained (``tta`` None), or under TTA recipe ``tta`` (none, flip,
    flip_shiftN) from ``bench rescore`` or from fit's end-of-run ablation of the weights it kept."""
    if tta is None or tta == trained_tta(run):
        return metric(run, "test_acc")
    weights = "ema" if "test_acc_ema" in run.data.metrics else "raw"
    ablation = f"test_acc_{weights}" + {"none": ""}.get(tta, "_" + tta.replace("flip", "tta", 1))
    for key in (f"rescore.test_acc_{tta}", ablation):
        if key in run.data.metrics:
            return run.data.metrics[key]
    shift = f" --shift {tta.removeprefix('flip_shift')}" if tta.startswith("flip_shift") else ""
    raise TrackingError(f"run {run.info.run_id} has no test accuracy under TTA '{tta}'; "
                        f"score it with `bench rescore {run.info.run_id}{shift}` first")
