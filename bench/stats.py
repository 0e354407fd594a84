"""Small-sample statistics for seed comparisons: Student t quantiles, t-intervals, Welch's test, a
single run against several seeds, Holm.

No SciPy: the t distribution's CDF is integrated numerically (Simpson's rule on its density),
which is exact to ~1e-9 for the degrees of freedom seed counts give (1 to a few hundred).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))


def t_cdf(x: float, df: float, nodes: int = 4001) -> float:
    grid = np.linspace(0.0, abs(x), nodes)
    y = t_pdf(grid, df)
    h = grid[1] - grid[0]
    area = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 0.5 + math.copysign(min(area, 0.5), x)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


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
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


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
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical values within each group: any difference is exact
        return t_test(diff, se, math.nan, level)
    return t_test(diff, se, (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)), level)


def t_test(diff: float, se: float, df: float, level: float = 0.95) -> Welch:
    """Two-sided t-test of ``diff`` with standard error ``se``; se 0 makes any difference exact."""
    if se == 0:
        return Welch(diff, diff, diff, math.copysign(math.inf, diff) if diff else 0.0, df, 0.0 if diff else 1.0)
    t = diff / se
    half = t_quantile(0.5 + level / 2, df) * se
    return Welch(diff, diff - half, diff + half, t, df, min(1.0, 2 * (1 - t_cdf(abs(t), df))))


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
