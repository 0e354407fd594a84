"""What a study produced, for the console and its MLflow parent run: counts, best trials, plots.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from .. import tracking
from ..config import norm_experiment
from ..stats import pareto_front
from .recovery import feasible_complete


def describe_dimension(dim) -> str:
    if dim.choices is not None:
        return f"choices {dim.choices}"
    return f"[{dim.low}, {dim.high}]" + (f" step {dim.step}" if dim.step else "") + (" log" if dim.log else "")


def study_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "trials_complete": sum(t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected") for t in trials),
        "trials_rejected": sum(bool(t.user_attrs.get("rejected")) for t in trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials),
    }


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The trained baseline (trial 0, or its re-run after an interruption)."""
    return next((t for t in feasible_complete(study) if t.user_attrs.get("baseline")), None)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    trained = feasible_complete(study)
    return max(trained, key=lambda t: t.value) if trained else None


def epoch_counts(study: optuna.Study, epochs: int) -> dict[str, int]:
    """Epochs the trained trials ran, against what they would have run unpruned."""
    trained = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values and not t.user_attrs.get("rejected")]
    ran = sum(len(t.intermediate_values) for t in trained)
    return {"epochs_trained": ran, "epochs_unpruned": epochs * len(trained), "epochs_saved": epochs * len(trained) - ran}


def outcome_metrics(study: optuna.Study, epochs: int) -> dict[str, float]:
    """Baseline -> best on validation and test, with the gains, and the epochs pruning saved."""
    metrics: dict[str, float] = {**epoch_counts(study, epochs)}
    for name, trial in (("baseline", baseline_trial(study)), ("best", best_trial(study))):
        if trial is not None:
            metrics |= {f"{name}_val_acc": trial.value, f"{name}_test_acc": trial.user_attrs.get("test_acc", math.nan),
                        f"{name}_trial": trial.number, f"{name}_params": trial.user_attrs.get("n_params", 0)}
    if "baseline_val_acc" in metrics and "best_val_acc" in metrics:
        metrics["gain_val_acc"] = metrics["best_val_acc"] - metrics["baseline_val_acc"]
        metrics["gain_test_acc"] = metrics["best_test_acc"] - metrics["baseline_test_acc"]
    return metrics


def outcome_table(study: optuna.Study, epochs: int) -> Table:
    """The end of a study in one table: the untuned baseline, the best trial, the gain."""
    m = outcome_metrics(study, epochs)
    table = Table(title=f"study '{study.study_name}': baseline -> best", title_justify="left",
                  caption=f"pruning: {m['epochs_trained']} of {m['epochs_unpruned']} epochs trained "
                          f"({m['epochs_saved']} saved)", caption_justify="left")
    for col in ("", "trial", "params", "val acc", "test acc"):
        table.add_column(col, justify="left" if not col else "right")
    for name in ("baseline", "best"):
        if f"{name}_trial" in m:
            table.add_row(name, str(int(m[f"{name}_trial"])), f"{int(m[f'{name}_params']):,}", f"{m[f'{name}_val_acc']:.4f}",
                          f"{m[f'{name}_test_acc']:.4f}")
    if "gain_val_acc" in m:
        table.add_row("gain", "", "", f"{m['gain_val_acc']:+.4f}", f"{m['gain_test_acc']:+.4f}")
    return table


def next_steps(study: optuna.Study, norm: str, registry_name: str, experiment: str | None = None) -> list[str]:
    """What the user has, and the commands that take it further; ``experiment`` names a file other
    than the norm's own (experiments/<norm>.toml), which a resume must be given again."""
    lines = []
    version = tracking.champion(registry_name)
    if version is not None:
        lines.append(f"champion: {tracking.champion_uri(registry_name)} = version {version.version} (trial {version.tags.get('trial')}, "
                     f"val acc {version.tags.get('val_acc')}, test acc {version.tags.get('test_acc')}); the alias moves only on improvement")
    study_flag = "" if study.study_name == norm else f" --study {study.study_name}"
    best, n = best_trial(study), len(study.trials)
    if best is not None and best.user_attrs.get("baseline") and n > 1:
        lines.append(f"no trial beat the baseline in {n} trials; more trials resume this study: "
                     f"bench tune {tune_source(norm, experiment)}{study_flag} --trials {2 * n}")
    lines += [f"next: bench confirm --norm {norm}{study_flag} --seeds 3   (re-train the best with 3 seeds)",
              "      bench report                                  (compare the norms, with statistics)",
              "      bench ui                                      (browse every trial in MLflow)"]
    return lines


def tune_source(norm: str, experiment: str | None) -> str:
    """``--norm bn`` for the norm's own experiment, else ``-e experiments/NAME.toml``."""
    if experiment is None or experiment == norm_experiment(norm):
        return f"--norm {norm}"
    return f"-e experiments/{experiment}.toml"


def summarise_to_parent(study: optuna.Study, parent_id: str, seconds: float, final: bool = True, epochs: int | None = None) -> None:
    """Best trial, baseline -> best, counts and study plots on the parent run."""
    counts = study_counts(study)
    trials_seconds = sum((t.duration.total_seconds() for t in study.trials if t.duration), 0.0)
    outcome = outcome_metrics(study, epochs) if epochs else {}
    tracking.log_to_run(parent_id, metrics={**counts, **outcome, "study_seconds": seconds, "trials_seconds_total": trials_seconds})
    top = best_trial(study)
    if top is None:
        return
    tracking.log_to_run(
        parent_id,
        metrics={"best_val_acc": top.value, "best_test_acc": top.user_attrs.get("test_acc"), "best_trial": top.number},
        tags={"bench.best_run_id": top.user_attrs.get("mlflow_run_id", ""), **{f"best.{k}": v for k, v in top.params.items()}},
        params={f"best.{k}": v for k, v in top.params.items()} if final else None,
        texts=study_plots(study) if final else None,
    )


def study_plots(study: optuna.Study) -> dict[str, str]:
    """Optimisation history, parameter importances, parallel coordinates and the accuracy-parameters
    Pareto front as self-contained HTML, plus the best trials as a Markdown table."""
    import optuna.visualization as vis

    plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate, "pareto_params": pareto_figure,
             "pareto_seconds": pareto_cost_figure}
    html = {"study/best_trials.md": best_trials_markdown(study)}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # e.g. "importances will be equal" on a few tiny trials
                warnings.simplefilter("ignore", UserWarning)
                html[f"study/{name}.html"] = plot(study).to_html(include_plotlyjs=True)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need >= 2 complete trials
            continue
    return html


def pareto_figure(study: optuna.Study, cost: str = "n_params"):
    """Best validation accuracy against a cost (``n_params``, or ``epoch_seconds``: training seconds per
    epoch) of every trained trial; the non-dominated ones (no cheaper trial is more accurate) joined as the front."""
    import plotly.graph_objects as go

    trials = sorted((t for t in feasible_complete(study) if t.user_attrs.get(cost) is not None), key=lambda t: t.number)
    if not trials:
        raise ValueError("no complete trials")
    costs = [t.user_attrs[cost] for t in trials]
    accs = [t.value for t in trials]
    hover = [f"trial {t.number}<br>{t.user_attrs.get('n_params', 0):,} params<br>val acc {t.value:.4f}<br>{epoch_seconds(t)} s/epoch"
             for t in trials]
    front = pareto_front(costs, accs)
    label = {"n_params": "parameters", "epoch_seconds": "training seconds per epoch"}[cost]
    fig = go.Figure([
        go.Scatter(x=costs, y=accs, mode="markers", name="trials", text=hover, hoverinfo="text"),
        go.Scatter(x=[costs[i] for i in front], y=[accs[i] for i in front], mode="lines+markers", name="Pareto front",
                   text=[hover[i] for i in front], hoverinfo="text"),
    ])
    fig.update_layout(title=f"study '{study.study_name}': validation accuracy vs {label}", xaxis_title=label,
                      yaxis_title="best validation accuracy")
    return fig


def pareto_cost_figure(study: optuna.Study):
    return pareto_figure(study, "epoch_seconds")


BEST_COLUMNS = ("trial", "params", "val acc", "test acc", "seconds", "s / epoch", "hyperparameters")


def best_rows(study: optuna.Study, top_k: int) -> list[list[str]]:
    """The best trained trials as BEST_COLUMNS cells, for the console and the parent run's table."""
    return [
        [str(t.number), f"{t.user_attrs.get('n_params', 0):,}", f"{t.value:.4f}", f"{t.user_attrs.get('test_acc', math.nan):.4f}",
         f"{t.duration.total_seconds():.0f}" if t.duration else "", epoch_seconds(t), format_params(t.params)]
        for t in sorted(feasible_complete(study), key=lambda t: -t.value)[:top_k]
    ]


def best_trials_markdown(study: optuna.Study, top_k: int = 10) -> str:
    """The best trained trials: parameters, accuracy, seconds per epoch, hyperparameters."""
    lines = [f"# Study '{study.study_name}': best trials", "", "| " + " | ".join(BEST_COLUMNS) + " |", "| --- " * len(BEST_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in best_rows(study, top_k)]
    return "\n".join(lines) + "\n"


def epoch_seconds(trial: FrozenTrial) -> str:
    """Mean training seconds per epoch, or "-" for trials recorded before bench stored it."""
    value = trial.user_attrs.get("epoch_seconds")
    return "-" if value is None else f"{value:.1f}"


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def best_table(study: optuna.Study, top_k: int = 5) -> Table:
    counts = ", ".join(f"{v} {k.removeprefix('trials_')}" for k, v in study_counts(study).items())
    table = Table(title=f"study '{study.study_name}': best trials ({counts})")
    for col in BEST_COLUMNS:
        table.add_column(col)
    for cells in best_rows(study, top_k):
        table.add_row(*cells)
    return table


def print_outcome(study: optuna.Study, console, norm: str, epochs: int, registry_name: str, experiment: str | None = None) -> None:
    """The end of ``bench tune``: best trials, baseline -> best, the champion and what to run next."""
    console.print(best_table(study))
    console.print(outcome_table(study, epochs))
    for line in next_steps(study, norm, registry_name, experiment):
        console.print(line)
