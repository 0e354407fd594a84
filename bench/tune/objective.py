"""The objective: one trial = sample a configuration, reject it untrained if over budget, else train it
in a nested MLflow run, pruned on per-epoch validation accuracy.
"""

from __future__ import annotations

import math
import time

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console

from .. import tracking
from ..config import Experiment
from ..errors import BenchError, DivergedError
from ..models import count_params_fast
from ..run import train_tracked
from .space import suggest, as_trial
from .recovery import counted, worker_id


class SurplusTrial(BenchError):
    """A worker created a trial after the others had already filled the study's total."""


def surplus(trial: optuna.Trial, target: int) -> bool:
    """Whether the trials numbered before ``trial`` (trial numbers are assigned atomically by the
    storage) already fill the study's total: then two workers raced past StopAtTarget."""
    before = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    return sum(counted(t) for t in before) >= target


def last_one_running(study: optuna.Study, target: int) -> bool:
    """Whether this is the study's only running trial and none is left to start."""
    trials = study.get_trials(deepcopy=False)
    return sum(t.state == TrialState.RUNNING for t in trials) == 1 and sum(counted(t) for t in trials) >= target


class Objective:
    """``lone_threads``: the threads a ``--jobs`` worker takes once its trial is the last one running
    (its siblings then sit idle; one bn trial at width 1.75 trains 1.39x faster on 2 threads than on 1)."""

    def __init__(self, exp: Experiment, study_name: str, data, rt, console: Console, epochs: int, parent_id: str | None,
                 target: int | None = None, lone_threads: int | None = None):
        self.exp, self.study_name, self.data, self.rt, self.console = exp, study_name, data, rt, console
        self.epochs, self.parent_id, self.target = epochs, parent_id, target
        self.threads, self.lone_threads = torch.get_num_threads(), lone_threads

    def __call__(self, trial: optuna.Trial) -> float:
        if self.target is not None and surplus(trial, self.target):  # no params sampled, no MLflow run
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            self.console.print(f"trial {trial.number:>3}  not run: other workers filled the study's {self.target} trials")
            raise SurplusTrial(f"trial {trial.number} is beyond the study's total of {self.target}")
        torch.set_num_threads(self.threads)  # a previous trial may have taken the idle cores
        exp = as_trial(suggest(trial, self.exp), self.epochs)
        n_params = count_params_fast(**vars(exp.model))
        trial.set_user_attr("n_params", n_params)
        trial.set_user_attr("worker", worker_id())
        trial.set_constraint("params_over_budget", n_params - exp.budget.max_params)  # feasible when <= 0
        tags = {tracking.TAG_TRIAL: trial.number, tracking.TAG_STUDY: self.study_name, tracking.TAG_NORM: exp.model.norm}
        label = f"trial {trial.number:>3} " + ("(baseline) " if trial.user_attrs.get("baseline") else "")
        start = time.perf_counter()
        try:
            with tracking.run(self.study_name, f"trial-{trial.number}", "trial", tags=tags, parent_run_id=self.parent_id) as active:
                trial.set_user_attr("mlflow_run_id", active.info.run_id)
                if n_params > exp.budget.max_params:
                    value = self._reject(trial, exp, n_params)
                    self._line(trial, n_params, f"REJECTED (over the {exp.budget.max_params:,} budget, not trained)", start)
                    return value
                value = self._train(trial, exp, label)
        except optuna.TrialPruned:
            self._line(trial, n_params, f"PRUNED at epoch {len(trial.storage.get_trial(trial._trial_id).intermediate_values)}", start)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            self._line(trial, n_params, "INTERRUPTED", start)
            raise
        except DivergedError as err:
            trial.set_user_attr("diverged", str(err))
            self._line(trial, n_params, f"FAIL ({err})", start)
            raise
        version = trial.user_attrs.get("registered_version")
        self._line(trial, n_params, "COMPLETE" + (f", new champion (v{version})" if version else ""), start)
        return value

    def _reject(self, trial: optuna.Trial, exp: Experiment, n_params: int) -> float:
        """Over budget: never trained. Recorded as a complete trial with no accuracy, and the sampler
        is told through the constraint so it learns the feasible region."""
        trial.set_user_attr("rejected", True)
        tracking.log_params(exp.hyperparameters())
        tracking.log_metrics({"n_params": n_params})
        tracking.set_tags({tracking.TAG_STATE: "REJECTED", "bench.rejected_reason": f"{n_params:,} params > budget {exp.budget.max_params:,}"})
        return 0.0

    def _train(self, trial: optuna.Trial, exp: Experiment, label: str) -> float:
        baseline = bool(trial.user_attrs.get("baseline"))

        def report(epoch: int, record: dict[str, float]) -> None:
            trial.report(record["val_acc"], epoch)
            # The baseline always trains in full (its test accuracy is the reference), yet should_prune
            # records its value at each rung: the other trials then have to beat the defaults to go on.
            if trial.should_prune() and not baseline:
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {epoch}")
            self._take_idle_cores(trial, epoch)

        if baseline:
            tracking.set_tags({"bench.baseline": "true"})
        model, result = train_tracked(exp, self.data, self.rt, on_epoch=report, console=self.console, label=label)
        tracking.set_tags({tracking.TAG_STATE: "COMPLETE"})
        value = result.best_val_acc
        trial.set_user_attr("test_acc", result.test_acc)
        trial.set_user_attr("seconds", result.seconds)
        trial.set_user_attr("epoch_seconds", result.mean_epoch_seconds)
        trial.set_user_attr("model_uri", tracking.active_model_uri())
        version = tracking.promote_champion(trial.user_attrs["model_uri"], registry_name(self.study_name), value, tags={
            "study": self.study_name, "trial": str(trial.number), "norm": exp.model.norm, "params": str(trial.user_attrs["n_params"]),
            "val_acc": f"{value:.4f}", "test_acc": f"{result.test_acc:.4f}", "baseline": str(baseline).lower()})
        if version:
            trial.set_user_attr("registered_version", version)
            tracking.set_tags({"bench.registered_version": version})
        return value

    def _take_idle_cores(self, trial: optuna.Trial, epoch: int) -> None:
        if (self.lone_threads and self.target and self.rt.device.type == "cpu" and torch.get_num_threads() < self.lone_threads
                and epoch < self.epochs and last_one_running(trial.study, self.target)):
            torch.set_num_threads(self.lone_threads)
            self.console.print(f"trial {trial.number:>3}  the last one running: {self.lone_threads} threads from epoch {epoch + 1}")

    def _line(self, trial: optuna.Trial, n_params: int, state: str, start: float) -> None:
        values = trial.user_attrs
        val = max((v for v in trial.storage.get_trial(trial._trial_id).intermediate_values.values()), default=math.nan)
        test = values.get("test_acc", math.nan)
        self.console.print(
            f"trial {trial.number:>3}{' (baseline)' if values.get('baseline') else ''}  params {n_params:>6,}  val acc {_acc(val)}  test acc {_acc(test)}  {state}  "
            f"{time.perf_counter() - start:.0f}s"
        )


def _acc(value: float) -> str:
    return "     -" if math.isnan(value) else f"{value:.4f}"


def registry_name(study: str) -> str:
    """``cifar10-bn`` for the default study of a norm; a study of another experiment (``resnet_gn``)
    gets its own name, so ``models:/cifar10-gn@champion`` never turns into a different architecture."""
    return f"cifar10-{study}"
