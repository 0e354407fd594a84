"""The numbers of a report: per-norm summaries read from MLflow records, and the pairwise
comparisons against seed noise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from .. import records, stats, tracking
from ..errors import ConfigError
from ..records import StudyRecord

ALPHA = 0.05


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
    def hardware(self) -> dict[str, int]:
        """Processor -> number of the runs behind the timings (the confirm runs, else the best trial)."""
        runs = self.record.confirms or [self.record.best]
        return dict(Counter(r.data.tags.get(tracking.TAG_HARDWARE, "not recorded") for r in runs))

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
    recipe = record.batch_runs[0].data.tags.get(records.TAG_RECIPE, "")
    for run in record.confirms:
        if run.data.tags.get(records.TAG_SEED) == "0" and records.same_recipe(run, recipe):
            acc.setdefault(int(run.data.params["batch_size"]), records.metric(run, "test_acc"))
    return dict(sorted(acc.items()))


@dataclass
class Comparison:
    a: str
    b: str
    test: stats.Welch | None  # None when the pair cannot be tested (``untestable`` says why)
    single: str = ""  # the norm with a single confirm run, tested against the other's seed spread
    untestable: str = ""
    adjusted_p: float = math.nan

    @property
    def exceeds_spread(self) -> bool:
        return self.test is not None and self.adjusted_p < ALPHA


def pair_test(a: NormSummary, b: NormSummary) -> tuple[stats.Welch | None, str, str]:
    """Welch's test when both norms have 2+ seeds; a single run against the other norm's seeds when
    one has 1; (None, "", why) when there is no seed spread to test against."""
    n_a, n_b = len(a.test_values), len(b.test_values)
    if min(n_a, n_b) < 1 or max(n_a, n_b) < 2:
        return None, "", "no norm of the pair has 2 confirm seeds (or one has none)"
    seeded = [s for s in (a, b) if len(s.test_values) >= 2]
    # Test accuracies come in steps of one image (0.01 points on 10,000): seeds that agree exactly
    # say the spread is below that step, not that it is zero, and a zero spread would call any gap real.
    if all(np.ptp(s.test_values) == 0 for s in seeded):
        names = " and ".join(s.name for s in seeded)
        return None, "", f"the confirm seeds of {names} score exactly alike, so they show no spread to test against"
    if min(n_a, n_b) >= 2:
        return stats.welch(a.test_values, b.test_values), "", ""
    return stats.single_run_test(a.test_values, b.test_values), a.name if n_a == 1 else b.name, ""


def compare(summaries: list[NormSummary]) -> list[Comparison]:
    """A t-test on confirm test accuracies for every pair of norms, Holm-adjusted together."""
    out = [Comparison(a.name, b.name, *pair_test(a, b)) for a, b in combinations(summaries, 2)]
    tested = [c for c in out if c.test is not None]
    for c, p in zip(tested, stats.holm([c.test.p for c in tested])):
        c.adjusted_p = p
    return out


def trained_trials(s: NormSummary) -> list:
    """The study's complete (trained, within budget) trial runs, best first."""
    return sorted(records.trained(s.record.trials), key=lambda r: -records.metric(r, "best_val_acc"))


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
