"""Where a multi-fidelity pruner may judge: how well each epoch's validation accuracy ranks trials
as their final result does.

Over the trials of a study that trained every epoch (e.g. one run with ``--pruner none``), the
Spearman rank correlation between the validation accuracy at epoch k and the trial's objective
(best validation accuracy over all epochs) says how safely successive halving can cut at epoch k.
OneCycle's warm-up makes early epochs favour low learning rates, so early correlations can be low
or negative even when late ones are near 1.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState
from scipy import stats

from ..errors import ConfigError


def full_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials that reported every epoch up to the longest any trial ran."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.intermediate_values]
    epochs = max((len(t.intermediate_values) for t in trials), default=0)
    return [t for t in trials if len(t.intermediate_values) == epochs]


def distinct(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """One trial per configuration: pooled studies with the same sampler seed draw the same first trials."""
    seen, out = set(), []
    for t in trials:
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def rank_correlations(studies: optuna.Study | list[optuna.Study], reduction_factor: int = 3) -> dict:
    """Per epoch: Spearman's rho (and its p-value) between that epoch's validation accuracy and the
    objective, and whether the eventual best trial is in the best 1/reduction_factor at that epoch.
    Several studies of one procedure pool their fully trained trials."""
    studies = studies if isinstance(studies, list) else [studies]
    trials = distinct([t for study in studies for t in full_trials(study)])
    names = ", ".join(s.study_name for s in studies)
    if len({len(t.intermediate_values) for t in trials}) > 1:
        raise ConfigError(f"studies {names} trained different numbers of epochs; pool only studies of one procedure")
    if len(trials) < 3:
        raise ConfigError(f"study '{names}' has {len(trials)} fully trained trial(s); rank correlations need 3 or more "
                          "(run a few trials with --pruner none)")
    finals = [t.value for t in trials]
    best = max(range(len(trials)), key=finals.__getitem__)
    keep = math.ceil(len(trials) / reduction_factor)
    rows = []
    for epoch in sorted(trials[0].intermediate_values):
        at_epoch = [t.intermediate_values[epoch] for t in trials]
        rho, p = stats.spearmanr(at_epoch, finals)
        rank_of_best = sorted(at_epoch, reverse=True).index(at_epoch[best]) + 1
        rows.append({"epoch": epoch, "spearman": float(rho), "p_value": float(p), "best_rank": rank_of_best,
                     "best_kept": rank_of_best <= keep})
    return {"study": names, "trials": len(trials), "reduction_factor": reduction_factor,
            "kept_per_rung": keep, "rows": rows}


def render_rungs(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"study '{result['study']}': epoch-k validation accuracy vs the final objective, "
                        f"{result['trials']} fully trained trials", title_justify="left",
                  caption=f"best kept: the eventual best trial is among the top {result['kept_per_rung']} "
                          f"(1/{result['reduction_factor']}) at that epoch", caption_justify="left")
    for col in ("epoch", "Spearman rho", "p", "rank of the best", "best kept"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["epoch"]), f"{row['spearman']:+.2f}", f"{row['p_value']:.3f}", str(row["best_rank"]),
                      "yes" if row["best_kept"] else "no")
    console.print(table)
