"""A study's search space and procedure: sampler, pruner, the distributions of ``[search.*]``, what a trial trains,
and the checks that a resumed study still samples the same space with the same fixed settings.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import optuna

from .. import tracking
from ..config import SPEED_ONLY, Experiment, override, validate, with_added_fields
from ..errors import ConfigError
from .options import TuneOptions


def create_sampler(exp: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    # Constraint-aware: trials record their parameter excess with ``trial.set_constraint``.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=exp.tune.startup_trials, multivariate=True)


def sampler_seed(seed: int, worker: str | None, trials_run: int, created: bool) -> int | None:
    """The sampler's seed. TPE draws its startup trials from its seeded RNG, so a second worker, or a
    resumed study, seeded as before would replay configurations the study already ran.

    - the process that created the study: ``seed`` itself (same seed, same draws);
    - worker ``i`` of ``--jobs K`` (the launcher created the study): derived from (seed, i, trials run);
    - any other process (a resume, or one of several started by hand, which cannot know whether a
      sibling started at the same instant): fresh entropy (None)."""
    if worker is not None:
        return seed if int(worker) == 0 and not trials_run else int(np.random.SeedSequence([seed, int(worker), trials_run]).generate_state(1)[0])
    return seed if created else None


def create_pruner(name: str, exp: Experiment) -> optuna.pruners.BasePruner:
    if name == "median":
        # Rejected (over-budget) trials are complete but report no epochs, so they count toward
        # n_startup_trials; n_min_trials makes the median come from trials that really trained.
        return optuna.pruners.MedianPruner(n_startup_trials=exp.tune.startup_trials, n_warmup_steps=exp.tune.warmup_epochs,
                                           n_min_trials=exp.tune.startup_trials)
    if name == "halving":
        # Asynchronous successive halving over epochs: rungs at min_epochs * reduction_factor**k; at each
        # rung a trial goes on only if it is in the best 1/reduction_factor of the trials that reached it.
        # docs/tuning.md has the rank correlations the default rung comes from.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=exp.tune.min_epochs, reduction_factor=exp.tune.reduction_factor)
    return optuna.pruners.NopPruner()


def rungs(exp: Experiment, epochs: int) -> list[int]:
    """The epochs at which the halving pruner judges a trial of ``epochs`` epochs."""
    out, rung = [], exp.tune.min_epochs
    while rung < epochs:
        out.append(rung)
        rung *= exp.tune.reduction_factor
    return out


def baseline_params(exp: Experiment) -> dict[str, Any]:
    """The experiment's own value of every searched hyperparameter: trial 0 of every study, so a study
    measures its gain over the untuned configuration. Each value must lie in its search dimension."""
    values = exp.hyperparameters()
    params = {name: values[name] for name in exp.search}
    for name, dist in search_distributions(exp).items():
        inside = (params[name] in dist.choices if isinstance(dist, optuna.distributions.CategoricalDistribution)
                  else dist.low <= params[name] <= dist.high)
        if not inside:
            raise ConfigError(f"the baseline trial needs {name} = {params[name]} inside [search.{name}]; widen the search "
                              "dimension, change the default, or set [tune] baseline = false")
    return params


def enqueue_baseline(study: optuna.Study, exp: Experiment) -> bool:
    """Queue the baseline as the study's first trial; only a new study gets one, so a resumed study
    keeps its baseline and never queues it twice."""
    if not exp.tune.baseline or study.get_trials(deepcopy=False):
        return False
    study.enqueue_trial(baseline_params(exp), user_attrs={"baseline": True})
    return True


def search_distributions(exp: Experiment) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every declared search dimension."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, dim in exp.search.items():
        if dim.choices is not None:
            dists[name] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            dists[name] = optuna.distributions.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step or 1)
        else:
            dists[name] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return dists


def suggest(trial: optuna.Trial, exp: Experiment) -> Experiment:
    """A copy of ``exp`` with every declared search dimension sampled by ``trial``."""
    values: dict[str, Any] = {}
    for name, dist in search_distributions(exp).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return override(copy.deepcopy(exp), **values)


def check_search_space(study: optuna.Study, exp: Experiment) -> None:
    """A resumed study must go on sampling the space its trials came from: otherwise TPE fits the
    new ranges on samples of the old ones and the parent run's ``space.*`` params describe neither."""
    expected = search_distributions(exp)
    for trial in reversed(study.get_trials(deepcopy=False)):
        if trial.distributions:
            changed = sorted(n for n in expected.keys() | trial.distributions.keys() if expected.get(n) != trial.distributions.get(n))
            if changed:
                raise ConfigError(f"study '{study.study_name}' was sampled from a different search space ({', '.join(changed)} "
                                  "changed); give the new space its own --study name, or restore the experiment's [search.*]")
            return


def trial_epochs(exp: Experiment, opts: TuneOptions) -> int:
    return opts.epochs or exp.tune.epochs or exp.train.epochs


def as_trial(exp: Experiment, epochs: int) -> Experiment:
    """``exp`` as a trial trains it: the tuning epochs, on the tuning subset unless train_subset is set.
    Checked again, since rules that tie fields to the epochs (the warm-up) must hold for the trial's."""
    exp.train.epochs = epochs
    if exp.tune.train_subset and not exp.train.train_subset:
        exp.train.train_subset = exp.tune.train_subset
    validate(exp)
    return exp


def fixed_recipe(exp: Experiment, epochs: int) -> dict[str, str]:
    """What every trial of the study shares: the settings that are not searched, as trials run them."""
    trial_exp = as_trial(copy.deepcopy(exp), epochs)
    values = {**trial_exp.hyperparameters(), "max_params": exp.budget.max_params}
    return {k: str(v) for k, v in sorted(values.items()) if k not in exp.search and k not in SPEED_ONLY}


def last_trial_params(study: optuna.Study) -> dict[str, str] | None:
    """What the study's last trained trial logged to MLflow: the fixed settings of a study older
    than its ``fixed_recipe`` record; None if it has no such trial."""
    for trial in reversed(study.get_trials(deepcopy=False)):
        if trial.user_attrs.get("mlflow_run_id") and not trial.user_attrs.get("rejected"):  # rejected trials log no training params
            return tracking.run_params(trial.user_attrs["mlflow_run_id"]) or None
    return None


def check_fixed_recipe(study: optuna.Study, exp: Experiment, epochs: int) -> None:
    """A resumed study must train new trials as it trained the old ones: a changed fixed setting
    (epochs, TTA, weight decay ...) moves the objective, and TPE and the pruner would rank trials
    that measured different things. The settings are recorded on the study the first time."""
    current = fixed_recipe(exp, epochs)
    stamped = study.user_attrs.get("fixed_recipe")
    recorded = stamped or last_trial_params(study)
    if recorded:
        recorded = with_added_fields(recorded)  # settings added since the study began
        changed = [f"{k} {recorded.get(k)} -> {v}" for k, v in current.items() if recorded.get(k) != v]
        if changed:
            raise ConfigError(f"study '{study.study_name}' ran its trials with other fixed settings ({'; '.join(changed)}); "
                              "give the new settings their own --study name, or set the old values back")
    if not stamped:
        study.set_user_attr("fixed_recipe", current)
