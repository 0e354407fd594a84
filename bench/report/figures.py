"""The report's PNG figures (matplotlib's object API, no pyplot: no global backend state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import records, stats, tracking
from ..console import plural
from ..data import CLASSES
from .numbers import NormSummary, trained_trials

CURVE_KEYS = (("train_loss", "val_loss"), ("train_acc", "val_acc"))


def figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas on save

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i) for i in range(n)]


def integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curve_runs(s: NormSummary) -> list:
    return s.record.confirms or [s.record.best]


def plot_curves(summaries: list[NormSummary], path: Path) -> None:
    """Loss and accuracy per epoch, train dashed and validation solid; mean over confirm seeds with
    a min-max band (the best trial's own curve when a norm has no confirm runs)."""
    fig, axes = figure(1, 2, 12, 4.5)
    for s, color in zip(summaries, colors(len(summaries))):
        runs = curve_runs(s)
        for ax, keys in zip(axes[0], CURVE_KEYS):
            for key, style in zip(keys, ("--", "-")):
                steps, values = epoch_matrix([r.info.run_id for r in runs], key)
                if not steps:
                    continue
                ax.plot(steps, values.mean(0), style, color=color, marker="o", ms=3,
                        label=f"{s.name} {key.split('_')[0]} ({plural(len(runs), 'seed') if s.record.confirms else '1 trial run'})")
                if len(runs) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15)
    for ax, title in zip(axes[0], ("cross-entropy loss", "accuracy")):
        ax.set(xlabel="epoch", title=title)
        integer_ticks(ax)
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.savefig(path, dpi=120)


def epoch_matrix(run_ids: list[str], key: str) -> tuple[list[int], np.ndarray]:
    """Per-epoch values of ``key`` for each run, cut to the epochs every run has."""
    histories = [dict(tracking.metric_history(run_id, key)) for run_id in run_ids]
    steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    return steps, np.array([[h[step] for step in steps] for h in histories])


def plot_history(summaries: list[NormSummary], path: Path) -> None:
    """Each study's trials by number: best val acc of complete trials, last val acc of pruned ones,
    and the running best of the complete trials (the study's objective)."""
    fig, axes = figure(1, len(summaries), 4.5 * len(summaries), 3.8)
    for ax, s in zip(axes[0], summaries):
        trials = sorted(s.record.trials, key=records.trial_number)
        complete = [(records.trial_number(r), records.metric(r, "best_val_acc")) for r in trials if records.state(r) == "COMPLETE"]
        pruned = [(records.trial_number(r), records.metric(r, "val_acc")) for r in trials if records.state(r) == "PRUNED"]
        if complete:
            x, y = zip(*complete)
            ax.plot(x, y, "o", color="tab:blue", label="complete")
            ax.step(x, np.maximum.accumulate(y), where="post", color="tab:red", label="running best")
        if pruned:
            ax.plot(*zip(*pruned), "o", mfc="none", color="tab:gray", label="pruned (last val acc)")
        c = s.counts
        ax.set(xlabel="trial", ylabel="validation accuracy", title=f"{s.name}: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed")
        integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def plot_pareto(summaries: list[NormSummary], path: Path) -> None:
    """Best validation accuracy against parameters of every trained trial, each study's Pareto front
    (no trial with fewer parameters is more accurate) as a line."""
    fig, axes = figure(1, 1, 7, 4.5)
    ax = axes[0][0]
    for s, color in zip(summaries, colors(len(summaries))):
        trials = trained_trials(s)
        params = [records.metric(r, "n_params") for r in trials]
        accs = [records.metric(r, "best_val_acc") for r in trials]
        ax.plot(params, accs, "o", color=color, alpha=0.4, ms=4)
        front = stats.pareto_front(params, accs)
        ax.plot([params[i] for i in front], [accs[i] for i in front], "-o", color=color, label=f"{s.name} ({len(trials)} trials)")
    ax.set(xlabel="parameters", ylabel="best validation accuracy (tuning epochs)", title="accuracy vs parameters: Pareto fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


class Predictions:
    """``predictions/test.npz`` per run, downloaded once."""

    def __init__(self):
        self._cache: dict[str, dict | None] = {}

    def __call__(self, run_id: str) -> dict | None:
        if run_id not in self._cache:
            self._cache[run_id] = tracking.load_predictions(run_id)
        return self._cache[run_id]


def plot_misclassified(summaries: list[NormSummary], preds: Predictions, path: Path, k: int = 10) -> list[str]:
    """Row per norm: the first ``k`` misclassified test images of its first confirm seed (or best trial)."""
    fig, axes = figure(len(summaries), k, 1.3 * k, 1.6 * len(summaries))
    sources = []
    for ax_row, s in zip(axes, summaries):
        run = curve_runs(s)[0]
        sources.append(run.info.run_id)
        npz = preds(run.info.run_id)
        for j, ax in enumerate(ax_row):
            ax.set_axis_off()
            if npz is None or j >= len(npz["wrong_index"]):
                continue
            i = npz["wrong_index"][j]
            ax.imshow(npz["wrong_images"][j].transpose(1, 2, 0), interpolation="nearest")
            ax.set_title(f"{CLASSES[npz['labels'][i]]}\n→ {CLASSES[npz['predicted'][i]]}", fontsize=7)
        ax_row[0].text(-0.15, 0.5, s.name, transform=ax_row[0].transAxes, ha="right", va="center", fontsize=10, weight="bold")
    fig.savefig(path, dpi=120)
    return sources


def confusion(npz_list: list[dict]) -> np.ndarray:
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    for npz in npz_list:
        np.add.at(matrix, (npz["labels"].astype(int), npz["predicted"].astype(int)), 1)
    return matrix


def plot_confusion(summaries: list[NormSummary], preds: Predictions, path: Path) -> dict[str, np.ndarray]:
    """Per norm, test-set confusion counts summed over its confirm seeds, shaded by row share."""
    fig, axes = figure(1, len(summaries), 5.2 * len(summaries), 5)
    matrices = {}
    for ax, s in zip(axes[0], summaries):
        found = [npz for npz in (preds(r.info.run_id) for r in curve_runs(s)) if npz is not None]
        matrix = matrices[s.name] = confusion(found)
        share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=6, color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=90, fontsize=7)
        ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=f"{s.name} ({plural(len(found), 'run')})")
    fig.savefig(path, dpi=120)
    return matrices


def plot_batch_sizes(summaries: list[NormSummary], path: Path) -> bool:
    if not any(s.batch_acc for s in summaries):
        return False
    fig, axes = figure(1, 1, 6, 4)
    ax = axes[0][0]
    for s, color in zip(summaries, colors(len(summaries))):
        if s.batch_acc:
            ax.plot(list(s.batch_acc), list(s.batch_acc.values()), "o-", color=color, label=s.name)
    ax.set_xscale("log", base=2)
    sizes = sorted({b for s in summaries for b in s.batch_acc})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set(xlabel="batch size (learning rate scaled linearly)", ylabel="test accuracy (seed 0)", title="batch-size sensitivity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return True


def write_figures(summaries: list[NormSummary], out: Path) -> tuple[dict[str, str], list[str]]:
    preds = Predictions()
    plot_curves(summaries, out / "curves.png")
    plot_history(summaries, out / "history.png")
    plot_pareto(summaries, out / "pareto.png")
    sources = plot_misclassified(summaries, preds, out / "misclassified.png")
    plot_confusion(summaries, preds, out / "confusion.png")
    names = ["curves", "history", "pareto", "misclassified", "confusion"]
    if plot_batch_sizes(summaries, out / "batch_sizes.png"):
        names.append("batch_sizes")
    return {n: f"![{n}]({n}.png)" for n in names}, sources
