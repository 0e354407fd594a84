"""``bench report``: BN vs GN vs LN from what MLflow holds (studies, confirm seeds, batch-size runs).

Reads MLflow only; the optional batch-size runs are trained by ``bench.confirm`` before the report
reads them back. Writes ``report.md`` and PNG figures to a folder and logs that folder as the
artifacts of a run (``bench.kind=report``) in the MLflow experiment ``reports``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from . import records, stats, tracking
from .config import RuntimeOptions
from .console import duration
from .data import CLASSES
from .errors import ConfigError
from .records import StudyRecord

REPORT_EXPERIMENT = "reports"
ALPHA = 0.05
CURVE_KEYS = (("train_loss", "val_loss"), ("train_acc", "val_acc"))


# ---------------------------------------------------------------- numbers


@dataclass
class NormSummary:
    record: StudyRecord
    n_params: int
    best_val_acc: float
    best_trial: int
    test_values: list[float]  # test accuracy of each confirm seed, under the report's TTA recipe
    test: stats.Summary  # of test_values
    counts: dict[str, int]
    study_seconds: float  # all `bench tune` invocations of the study
    epoch_seconds: float
    epoch_seconds_from: str  # "confirm" or "trial" (no confirm runs yet)
    hyperparameters: dict[str, str]
    batch_acc: dict[int, float] = field(default_factory=dict)  # batch size -> test accuracy (seed 0)
    tta: str | None = None  # TTA recipe of test_values; None = as each run was trained

    @property
    def confirm_epochs(self) -> list[int]:
        return sorted({int(r.data.params["epochs"]) for r in self.record.confirms if "epochs" in r.data.params})

    @property
    def confirm_minutes(self) -> float:
        """Mean wall time of a confirm run: training, per-epoch validation and the final test pass."""
        return float(np.mean([records.metric(r, "total_seconds") for r in self.record.confirms])) / 60 if self.record.confirms else math.nan

    @property
    def trained_tta(self) -> list[str]:
        return sorted({records.trained_tta(r) for r in self.record.confirms})

    @property
    def name(self) -> str:
        return self.record.study  # the norm itself unless the study was given a name


def searched_names(record: StudyRecord) -> list[str]:
    """Hyperparameters the study searched (the parents' ``space.*`` params), in declaration order."""
    names: dict[str, None] = {}
    for parent in reversed(record.parents):
        names.update(dict.fromkeys(k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")))
    return list(names)


def summarize_norm(record: StudyRecord, tta: str | None = None) -> NormSummary:
    """``tta``: read every confirm seed's test accuracy under this TTA recipe (none, flip, flip_shiftN)
    instead of as it was trained, so that norms trained with different TTA compare like with like."""
    best = record.best
    confirms = record.confirms
    test_values = [records.test_accuracy(r, tta) for r in confirms]
    epoch_runs, source = (confirms, "confirm") if confirms else ([best], "trial")
    params = best.data.params
    return NormSummary(
        record=record,
        n_params=int(records.metric(best, "n_params")),
        best_val_acc=records.metric(best, "best_val_acc"),
        best_trial=records.trial_number(best),
        test_values=test_values,
        test=stats.summarize(test_values),
        counts=records.trial_counts(record.trials),
        study_seconds=sum(records.metric(p, "study_seconds") for p in record.parents if "study_seconds" in p.data.metrics),
        epoch_seconds=float(np.mean([records.metric(r, "mean_epoch_seconds") for r in epoch_runs])),
        epoch_seconds_from=source,
        hyperparameters={k: params[k] for k in searched_names(record) if k in params},
        batch_acc=batch_accuracies(record),
        tta=tta,
    )


def batch_accuracies(record: StudyRecord) -> dict[int, float]:
    """Test accuracy per batch size; the confirm seed-0 run stands for the configuration's own batch
    size when it was trained with the same recipe (same seed, epochs and data)."""
    acc = {int(r.data.tags[records.TAG_BATCH_SIZE]): records.metric(r, "test_acc") for r in record.batch_runs}
    if not acc:
        return acc
    recipe = record.batch_runs[0].data.tags.get(records.TAG_RECIPE)
    for run in record.confirms:
        if run.data.tags.get(records.TAG_SEED) == "0" and run.data.tags.get(records.TAG_RECIPE) == recipe:
            acc.setdefault(int(run.data.params["batch_size"]), records.metric(run, "test_acc"))
    return dict(sorted(acc.items()))


@dataclass
class Comparison:
    a: str
    b: str
    test: stats.Welch | None  # None when neither norm has 2 confirm seeds, or one has none
    single: str = ""  # the norm with a single confirm run, tested against the other's seed spread
    adjusted_p: float = math.nan

    @property
    def exceeds_spread(self) -> bool:
        return self.test is not None and self.adjusted_p < ALPHA


def pair_test(a: NormSummary, b: NormSummary) -> tuple[stats.Welch | None, str]:
    """Welch's test when both norms have 2+ seeds; a single run against the other norm's seeds when one has 1."""
    n_a, n_b = len(a.test_values), len(b.test_values)
    if min(n_a, n_b) >= 2:
        return stats.welch(a.test_values, b.test_values), ""
    if min(n_a, n_b) == 1 and max(n_a, n_b) >= 2:
        return stats.single_run_test(a.test_values, b.test_values), a.name if n_a == 1 else b.name
    return None, ""


def compare(summaries: list[NormSummary]) -> list[Comparison]:
    """A t-test on confirm test accuracies for every pair of norms, Holm-adjusted together."""
    out = [Comparison(a.name, b.name, *pair_test(a, b)) for a, b in combinations(summaries, 2)]
    tested = [c for c in out if c.test is not None]
    for c, p in zip(tested, stats.holm([c.test.p for c in tested])):
        c.adjusted_p = p
    return out


# ---------------------------------------------------------------- formatting


def pct(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def points(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.4g}"


def test_cell(s: NormSummary) -> str:
    t = s.test
    if t.n == 0:
        return "no confirm runs"
    return f"{pct(t.mean)} ± {100 * t.std:.2f} pp (n={t.n})" if t.n > 1 else f"{pct(t.mean)} (n=1)"


def interval_cell(s: NormSummary) -> str:
    return f"[{pct(s.test.low)}, {pct(s.test.high)}]" if s.test.n > 1 else "—"


def confirm_cell(s: NormSummary) -> str:
    if not s.record.confirms:
        return "—"
    epochs = "/".join(str(e) for e in s.confirm_epochs) or "?"
    return f"{epochs} epochs, {s.confirm_minutes:.0f} min"


def summary_table(summaries: list[NormSummary]) -> list[str]:
    head = ("norm", "params", "best val acc (trial)", "test acc mean ± std (seeds)", "95% t-interval", "each confirm run",
            "trials complete / pruned / failed / rejected", "study wall time", "s / epoch", "best hyperparameters")
    lines = [row(head), row(["---"] * len(head))]
    for s in summaries:
        c = s.counts
        hp = ", ".join(f"{k}={short(v)}" for k, v in s.hyperparameters.items())
        epoch = f"{s.epoch_seconds:.1f}" + (" (trial)" if s.epoch_seconds_from == "trial" else "")
        lines.append(row([s.name, f"{s.n_params:,}", f"{pct(s.best_val_acc)} (#{s.best_trial})", test_cell(s), interval_cell(s), confirm_cell(s),
                          f"{c['complete']} / {c['pruned']} / {c['failed']} / {c['rejected']}", duration(s.study_seconds), epoch, hp]))
    return lines


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tta_lines(summaries: list[NormSummary]) -> list[str]:
    """Which TTA the test accuracies were scored with; a warning when norms differ in it."""
    if summaries and summaries[0].tta:
        return [f"Test accuracies of every confirm run are scored under the same test-time augmentation, `{summaries[0].tta}` "
                "(`bench report --tta`; from `bench rescore` or the run's own end-of-training ablation)."]
    trained = {s.name: ", ".join(s.trained_tta) for s in summaries if s.record.confirms}
    if len(set(trained.values())) > 1:
        used = "; ".join(f"{name}: `{tta}`" for name, tta in trained.items())
        return [f"**Warning:** the norms' confirm runs were scored with different test-time augmentation ({used}), so "
                "their differences mix norm and evaluation; re-run with `--tta` naming one recipe to compare like with like."]
    return [f"Test accuracies are scored as trained, test-time augmentation `{next(iter(trained.values()))}`."] if trained else []


def statement(comparisons: list[Comparison]) -> list[str]:
    rule = ("Rule: for each pair of norms, Welch's two-sided t-test on the test accuracies of the confirm seeds; "
            "where one norm has a single confirm run, that run is tested against the other norm's seeds, its spread "
            "taken to equal theirs (t = difference / (s·√(1 + 1/n)), n − 1 degrees of freedom); "
            f"the p-values of the {sum(c.test is not None for c in comparisons)} tested pair(s) are Holm-adjusted together. A difference is "
            f"**larger than the seed-to-seed spread** when its adjusted p < {ALPHA}, otherwise it is **within the spread**. "
            "The interval is the 95% interval of the difference of means.")
    lines = [rule, ""]
    for c in comparisons:
        lines.append(f"- {comparison_line(c)}")
    larger = [f"{c.a} vs {c.b}" for c in comparisons if c.exceeds_spread]
    within = [f"{c.a} vs {c.b}" for c in comparisons if c.test is not None and not c.exceeds_spread]
    untested = [f"{c.a} vs {c.b}" for c in comparisons if c.test is None]
    lines += ["", f"**Larger than the seed-to-seed spread:** {', '.join(larger) or 'none'}.",
              f"**Within the spread:** {', '.join(within) or 'none'}."]
    if untested:
        lines.append(f"**Not testable (no norm of the pair has 2 confirm seeds):** {', '.join(untested)}; run `bench confirm --seeds 3` or more.")
    if not comparisons:
        lines.append("Only one norm in this report: nothing to compare.")
    return lines


def comparison_line(c: Comparison) -> str:
    if c.test is None:
        return f"{c.a} vs {c.b}: not testable, neither norm has 2 confirm seeds (or one has none)."
    w = c.test
    leader = c.a if w.diff >= 0 else c.b
    verdict = "larger than the seed-to-seed spread" if c.exceeds_spread else "within the seed-to-seed spread"
    single = f" ({c.single} is a single run, its spread taken to equal the other's seeds')" if c.single else ""
    return (f"{c.a} − {c.b} = {points(w.diff)} (95% interval {points(w.low)} to {points(w.high)}){single}, "
            f"t = {w.t:.2f}, df = {w.df:.1f}, p = {w.p:.3g}, Holm-adjusted p = {c.adjusted_p:.3g}: "
            f"{leader}'s mean is higher, **{verdict}**.")


def batch_table(summaries: list[NormSummary]) -> list[str]:
    """Accuracy per batch size and the drop (best minus worst); the drop is called larger than seed
    noise when it exceeds the 95% bound for the difference of two single runs, t(0.975, n-1)·s·√2."""
    sizes = sorted({b for s in summaries for b in s.batch_acc})
    if not sizes:
        return ["No batch-size runs in MLflow for these studies; `bench report --batch-sizes 16,64,256` trains them."]
    head = ["norm", *(f"batch {b}" for b in sizes), "drop (best − worst)", "seed noise bound", "verdict"]
    lines = [row(head), row(["---"] * len(head))]
    for s in summaries:
        acc = s.batch_acc
        drop = max(acc.values()) - min(acc.values()) if acc else math.nan
        bound = stats.two_run_bound(s.test)
        verdict = "—" if math.isnan(drop) or math.isnan(bound) else ("larger than seed noise" if drop > bound else "within seed noise")
        cells = [pct(acc[b]) if b in acc else "—" for b in sizes]
        lines.append(row([s.name, *cells, f"{100 * drop:.2f} pp" if acc else "—",
                          f"{100 * bound:.2f} pp" if not math.isnan(bound) else "—", verdict]))
    return lines


# ---------------------------------------------------------------- figures


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
                        label=f"{s.name} {key.split('_')[0]} ({len(runs)} {'seeds' if s.record.confirms else 'trial run'})")
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


def trained_trials(s: NormSummary) -> list:
    """The study's complete (trained, within budget) trial runs, best first."""
    return sorted(records.trained(s.record.trials), key=lambda r: -records.metric(r, "best_val_acc"))


def trials_table(summaries: list[NormSummary], top_k: int = 5) -> list[str]:
    lines = [row(["study", "trial", "params", "best val acc", "test acc (trial)", "s / epoch", "hyperparameters"]),
             row(["---"] * 7)]
    for s in summaries:
        for r in trained_trials(s)[:top_k]:
            hp = ", ".join(f"{k}={short(v)}" for k, v in r.data.params.items() if k in s.hyperparameters)
            lines.append(row([s.name, f"#{records.trial_number(r)}", f"{int(records.metric(r, 'n_params')):,}",
                              pct(records.metric(r, "best_val_acc")), pct(records.metric(r, "test_acc")),
                              f"{records.metric(r, 'mean_epoch_seconds'):.1f}", hp]))
    return lines


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
        ax.set(xlabel="predicted", ylabel="true", title=f"{s.name} ({len(found)} run{'s' if len(found) != 1 else ''})")
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


# ---------------------------------------------------------------- the report


def parse_norms(text: str | None) -> list[tuple[str, str | None, int | None]]:
    """``"bn,gn=my-gn-study,ln=resnet_ln@6"`` -> [("bn", None, None), ("gn", "my-gn-study", None),
    ("ln", "resnet_ln", 6)]: norm, study (None: the norm's own), trial (None: the study's best).
    None or "all" -> every studied norm."""
    if not text or text == "all":
        found = records.studied_norms()
        if not found:
            raise ConfigError("no studies in MLflow; run `bench tune --norm all` first, or pass --norms")
        return [(n, None, None) for n in found]
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, at, trial = item.partition("@")
        if at and not trial.strip().isdigit():
            raise ConfigError(f"--norms {item!r}: after @ give a trial number, e.g. bn=resnet_bn@31")
        norm, _, study = head.partition("=")
        out.append((norm.strip(), study.strip() or None, int(trial) if at else None))
    if not out:
        raise ConfigError(f"--norms {text!r}: expected e.g. bn,gn,ln")
    return out


def gather(norms: str | None, tta: str | None = None, confirm_epochs: int | None = None) -> list[NormSummary]:
    """Every number the report needs, from MLflow; raises TrackingError naming a missing study.
    ``confirm_epochs`` keeps only the confirm runs trained for that many epochs."""
    summaries = []
    for norm, study, trial in parse_norms(norms):
        record = records.load_study(norm, study, trial)
        if confirm_epochs:
            record = records.with_derived_runs(record, confirm_epochs)
        summaries.append(summarize_norm(record, tta))
    return summaries


def markdown(summaries: list[NormSummary], comparisons: list[Comparison], figures: dict[str, str], sources: list[str],
             run_id: str, uri: str) -> str:
    names = ", ".join(s.name for s in summaries)
    seeds = "; ".join(f"{s.name} {s.test.n}" for s in summaries)
    parts = [
        f"# Normalisation benchmark: {names}", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow at `{tracking.mask_url(uri)}` (report run `{run_id}`). "
        "Every number below is read from MLflow: study and trial runs from `bench tune`, "
        f"confirm runs (best configuration re-trained with seeds 0..n−1: {seeds}) from `bench confirm`.", "",
        "## Results per norm", "",
        "Best val acc: the study's best complete trial (the tuning objective, tuning epochs). Test acc: the confirm seeds "
        "(mean ± sample std; 95% t-interval of the mean). Trial counts are the study's trial runs by final state. "
        "Study wall time sums every `bench tune` invocation. s / epoch: training seconds per epoch, mean over confirm runs "
        "('(trial)': from the best trial, no confirm runs yet). Each confirm run: its epochs and mean wall time "
        "(training, per-epoch validation and the final test pass). A study given as NORM=STUDY@TRIAL reports that trial "
        "and its confirm runs instead of the best.", "",
        *summary_table(summaries), "", *tta_lines(summaries), "",
        "## Which differences are larger than the seed-to-seed spread", "",
        *statement(comparisons), "",
        "## Training curves", "", figures["curves"], "",
        "Train (dashed) and validation (solid) loss and accuracy per epoch of each norm's best configuration; "
        "mean over the confirm seeds with a min–max band.", "",
        "## Optimisation history", "", figures["history"], "",
        "Validation accuracy of every trial by trial number; the red step is the running best of complete trials.", "",
        "## Accuracy against parameters", "",
        "The best trained trials of each study (tuning epochs and data; test acc is that trial's own model) and every "
        "trained trial by parameters and validation accuracy. The line joins each study's Pareto front: the trials that "
        "no trial with fewer parameters beats.", "",
        *trials_table(summaries), "", figures["pareto"], "",
        "## Misclassified test images", "", figures["misclassified"], "",
        "The first 10 misclassified test images (true → predicted) of each norm's first confirm run, or its best trial "
        f"when it has no confirm runs (runs {', '.join(f'`{r}`' for r in sources)}).", "",
        "## Confusion matrices", "", figures["confusion"], "",
        "Test-set counts (rows: true class) summed over each norm's confirm seeds; shading is the share of the row.", "",
        "## Batch-size sensitivity", "",
        "Best configuration re-trained at each batch size with seed 0, learning rate scaled linearly, same epochs. "
        "The configuration's own batch size is its confirm seed-0 run when that used the same epochs. "
        "A drop is larger than seed noise when it exceeds t(0.975, n−1)·s·√2 (the 95% bound on the difference of two "
        "single runs), s being the norm's confirm-seed std.", "",
        *batch_table(summaries), "", figures.get("batch_sizes", ""), "",
        "## Sources", "", *source_lines(summaries),
    ]
    return "\n".join(parts) + "\n"


def source_lines(summaries: list[NormSummary]) -> list[str]:
    lines = []
    for s in summaries:
        r = s.record
        lines.append(f"- {s.name}: study '{r.study}' (MLflow experiment {r.experiment_id}), study runs "
                     f"{', '.join(f'`{p.info.run_id}`' for p in r.parents)}; best trial #{s.best_trial} run `{r.best.info.run_id}`; "
                     f"confirm runs {', '.join(f'`{c.info.run_id}`' for c in r.confirms) or 'none'}{recipe_note(r.confirms)}; "
                     f"batch-size runs {', '.join(f'`{b.info.run_id}`' for b in r.batch_runs) or 'none'}{recipe_note(r.batch_runs)}.")
    return lines


def recipe_note(runs: list) -> str:
    return f" (recipe `{runs[0].data.tags.get(records.TAG_RECIPE, '')}`)" if runs else ""


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


def build_report(norms: str | None = None, out: str | Path | None = None, tracking_uri: str | None = None, echo=print,
                 tta: str | None = None, confirm_epochs: int | None = None) -> Path:
    """Read MLflow, write ``<out>/report.md`` and figures, log them as a report run; returns the folder.
    ``tta`` and ``confirm_epochs``: see ``gather``."""
    uri = tracking.setup(tracking_uri)
    summaries = gather(norms, tta, confirm_epochs)
    comparisons = compare(summaries)
    out = Path(out or Path("reports") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    tags = {"bench.norms": ",".join(s.name for s in summaries), "bench.report_dir": str(out.resolve()), "bench.tta": tta or "as trained"}
    with tracking.run(REPORT_EXPERIMENT, f"report-{time.strftime('%Y%m%d-%H%M%S')}", "report", tags=tags) as active:
        figures, sources = write_figures(summaries, out)
        (out / "report.md").write_text(markdown(summaries, comparisons, figures, sources, active.info.run_id, uri))
        tracking.log_metrics(report_metrics(summaries))
        stored = tracking.log_folder(out)
    echo(f"report written to {out / 'report.md'} and logged to MLflow run {active.info.run_id} "
         f"(experiment '{REPORT_EXPERIMENT}', artifacts {tracking.mask_url(stored)})")
    return out


def run_report(norms: str | None = None, out: str | Path | None = None, batch_sizes: list[int] | None = None,
               opts: RuntimeOptions | None = None, console=None, tta: str | None = None, confirm_epochs: int | None = None,
               epochs: int | None = None) -> Path:
    """``bench report``: with ``batch_sizes``, first train the missing batch-size runs (``epochs`` each) of
    each norm's best configuration (the only training a report does), then read everything back from MLflow."""
    from rich.console import Console

    console = console or Console()
    opts = opts or RuntimeOptions()
    if batch_sizes:
        from .confirm import ConfirmOptions, train_batch_sizes  # training code, only when asked to train

        tracking.setup(opts.tracking_uri)
        for norm, study, trial in parse_norms(norms):
            confirm_opts = ConfirmOptions(**asdict(opts), epochs=epochs, study=study, trial=trial)
            train_batch_sizes(norm, batch_sizes, confirm_opts, console)
    return build_report(norms, out, opts.tracking_uri, console.print, tta, confirm_epochs)


def report_metrics(summaries: list[NormSummary]) -> dict[str, float]:
    metrics = {}
    for s in summaries:
        metrics.update({f"{s.name}.best_val_acc": s.best_val_acc, f"{s.name}.test_acc_mean": s.test.mean,
                        f"{s.name}.test_acc_std": s.test.std, f"{s.name}.confirm_seeds": s.test.n})
    return metrics
