"""Small-sample statistics for seed comparisons, on ``scipy.stats``: t-intervals, Welch's test, a
single run against several seeds, Holm's adjustment, the Pareto front.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for n < 2
    low: float  # 95% t-interval of the mean; nan for n < 2
    high: float


def summarize(values, level: float = 0.95) -> Summary:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    low, high = sps.t.interval(level, n - 1, loc=mean, scale=std / math.sqrt(n)) if std else (mean, mean)
    return Summary(n, mean, std, float(low), float(high))


def two_run_bound(s: Summary, level: float = 0.95) -> float:
    """The ``level`` bound on the difference of two single runs drawn with ``s``'s spread,
    t(0.5 + level/2, n-1)·s·√2: a larger difference between two runs is more than seed noise."""
    return float(sps.t.ppf(0.5 + level / 2, s.n - 1)) * s.std * math.sqrt(2) if s.n > 1 else math.nan


@dataclass
class Welch:
    diff: float  # mean(a) - mean(b)
    low: float  # 95% interval of the difference
    high: float
    t: float
    df: float
    p: float  # two-sided


def welch(a, b, level: float = 0.95) -> Welch:
    """Welch's unequal-variance t-test of mean(a) == mean(b); needs at least 2 values in each."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least 2 values per group")
    diff = float(a.mean() - b.mean())
    if a.var() == 0 and b.var() == 0:
        raise ValueError("Welch's test needs a spread: every value within each group is the same")
    with warnings.catch_warnings():  # one group of identical values: its variance is exactly 0, not a precision loss
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        result = sps.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(level)
    return Welch(diff, float(low), float(high), float(result.statistic), float(result.df), float(result.pvalue))


def t_test(diff: float, se: float, df: float, level: float = 0.95) -> Welch:
    """Two-sided t-test of ``diff`` with standard error ``se`` (> 0)."""
    if se == 0:
        raise ValueError("a t-test needs a spread: the standard error is 0")
    t = diff / se
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    return Welch(diff, diff - half, diff + half, t, df, float(2 * sps.t.sf(abs(t), df)))


def single_run_test(a, b, level: float = 0.95) -> Welch:
    """mean(a) == mean(b) when one side is a single run: its spread is taken to equal the other side's
    (the prediction-interval test), t = diff / (s·√(1 + 1/n)) with n − 1 degrees of freedom, s and n
    those of the side with at least 2 values. ``diff`` is mean(a) − mean(b) in the order given."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    sample = a if len(b) == 1 else b
    if min(len(a), len(b)) != 1 or len(sample) < 2:
        raise ValueError("the single-run test needs one value on one side and at least 2 on the other")
    diff = float(a.mean() - b.mean())
    se = float(sample.std(ddof=1)) * math.sqrt(1 + 1 / len(sample))
    return t_test(diff, se, len(sample) - 1, level)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): reject where adjusted p < alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pareto_front(costs, scores) -> list[int]:
    """Indices of the points no other point beats, i.e. none has cost <= and score >= with one strict
    (e.g. fewer parameters and higher accuracy), sorted by cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], -math.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front
