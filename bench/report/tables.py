"""The report's text: markdown tables, the verdict sentences and the page itself."""

from __future__ import annotations

import math
import time

from .. import records, stats, tracking
from ..console import duration, plural
from .numbers import ALPHA, Comparison, NormSummary, trained_trials


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
    changed = recipe_changes(s.record.confirms[0])
    return f"{epochs} epochs{f' ({changed})' if changed else ''}, {s.confirm_minutes:.0f} min"


def recipe_changes(run) -> str:
    """What a confirm run was re-trained with beyond the trial's settings and its epochs: ``lr=0.05, ...``;
    the best-hyperparameters column shows the trial's values, so a changed one must show here."""
    return ", ".join(part for part in run.data.tags.get(records.TAG_RECIPE, "").split() if not part.startswith("epochs="))


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


def hardware_line(summaries: list[NormSummary]) -> str:
    """Which processors the timings come from: seconds per epoch compare only on one."""
    processors = {cpu for s in summaries for cpu in s.hardware}
    if len(processors) == 1:
        return f"Timings (s / epoch, wall time) from runs on one processor: {processors.pop()}."
    each = "; ".join(f"{s.name}: " + ", ".join(f"{cpu} ({plural(n, 'run')})" for cpu, n in s.hardware.items()) for s in summaries)
    return (f"**Timings come from different processors** ({each}): compare s / epoch only within one; "
            "`bench speed --experiments` times models side by side on one machine.")


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
    untested = [f"{c.a} vs {c.b} ({c.untestable})" for c in comparisons if c.test is None]
    lines += ["", f"**Larger than the seed-to-seed spread:** {', '.join(larger) or 'none'}.",
              f"**Within the spread:** {', '.join(within) or 'none'}."]
    if untested:
        lines.append(f"**Not testable:** {'; '.join(untested)}; confirm more seeds (`bench confirm --seeds 3` or more).")
    if not comparisons:
        lines.append("Only one norm in this report: nothing to compare.")
    return lines


def comparison_line(c: Comparison) -> str:
    if c.test is None:
        return f"{c.a} vs {c.b}: not testable, {c.untestable}."
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


def markdown(summaries: list[NormSummary], comparisons: list[Comparison], figures: dict[str, str], sources: list[str],
             run_id: str, uri: str) -> str:
    names = ", ".join(s.name for s in summaries)
    seeds = "; ".join(f"{s.name} {s.test.n or 'none yet'}" for s in summaries)
    parts = [
        f"# Normalisation benchmark: {names}", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow at `{tracking.mask_url(uri)}` (report run `{run_id}`). "
        "Every number below is read from MLflow: study and trial runs from `bench tune`, "
        f"confirm runs (best configuration re-trained with seeds 0..n−1, runs per norm: {seeds}) from `bench confirm`.", "",
        "## Results per norm", "",
        "Best val acc: the study's best complete trial (the tuning objective, tuning epochs). Test acc: the confirm seeds "
        "(mean ± sample std; 95% t-interval of the mean). Trial counts are the study's trial runs by final state. "
        "Study wall time sums every `bench tune` invocation. s / epoch: training seconds per epoch, mean over confirm runs "
        "('(trial)': from the best trial, no confirm runs yet). Each confirm run: its epochs, any setting it changed from the trial (`--set` at `bench confirm`) and mean wall time "
        "(training, per-epoch validation and the final test pass). A study given as NORM=STUDY@TRIAL reports that trial "
        "and its confirm runs instead of the best.", "",
        *summary_table(summaries), "", *tta_lines(summaries), "", hardware_line(summaries), "",
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
