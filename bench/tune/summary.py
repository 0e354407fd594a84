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


def summarise_to_parent(study: optuna.Study, parent_id: str, seconds: float, final: bool = True) -> None:
    """Best trial, counts and study plots on the parent run."""
    counts = study_counts(study)
    trials_seconds = sum((t.duration.total_seconds() for t in study.trials if t.duration), 0.0)
    tracking.log_to_run(parent_id, metrics={**counts, "study_seconds": seconds, "trials_seconds_total": trials_seconds})
    best = feasible_complete(study)
    if not best:
        return
    top = max(best, key=lambda t: t.value)
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
             "parallel_coordinate": vis.plot_parallel_coordinate, "pareto_params": pareto_figure}
    html = {"study/best_trials.md": best_trials_markdown(study)}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # e.g. "importances will be equal" on a few tiny trials
                warnings.simplefilter("ignore", UserWarning)
                html[f"study/{name}.html"] = plot(study).to_html(include_plotlyjs=True)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need >= 2 complete trials
            continue
    return html


def pareto_figure(study: optuna.Study):
    """Best validation accuracy against parameters of every trained trial; the non-dominated ones
    (no trial with fewer parameters is more accurate) joined as the front."""
    import plotly.graph_objects as go

    trials = sorted(feasible_complete(study), key=lambda t: t.number)
    if not trials:
        raise ValueError("no complete trials")
    params = [t.user_attrs.get("n_params", 0) for t in trials]
    accs = [t.value for t in trials]
    hover = [f"trial {t.number}<br>{n:,} params<br>val acc {t.value:.4f}<br>{epoch_seconds(t)} s/epoch" for t, n in zip(trials, params)]
    front = pareto_front(params, accs)
    fig = go.Figure([
        go.Scatter(x=params, y=accs, mode="markers", name="trials", text=hover, hoverinfo="text"),
        go.Scatter(x=[params[i] for i in front], y=[accs[i] for i in front], mode="lines+markers", name="Pareto front",
                   text=[hover[i] for i in front], hoverinfo="text"),
    ])
    fig.update_layout(title=f"study '{study.study_name}': validation accuracy vs parameters",
                      xaxis_title="parameters", yaxis_title="best validation accuracy")
    return fig


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
