"""Seed statistics for every recipe kind: a mean with its 95% t-interval, and paired differences between two
configurations run on the same seeds (the same data, initialization and batch order)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile for `df` degrees of freedom (`scipy.stats.t.ppf((1 + level) / 2, df)`)."""
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """`{"mean", "lo", "hi", "n"}`: the mean of `values` and its t-interval (NaN bounds with fewer than 2 values)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": 1}
    half = t_quantile(n - 1, level) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_difference(treatment: Mapping, control: Mapping, level: float = 0.95) -> dict:
    """
    The paired difference `treatment[seed] - control[seed]` over the seeds both mappings hold: [`mean_ci`] of the
    differences, plus `seeds`, `wins` (seeds where the treatment is higher) and `ties`.
    """
    seeds = [s for s in treatment if s in control]
    diffs = [float(treatment[s]) - float(control[s]) for s in seeds]
    return {
        **mean_ci(diffs, level),
        "seeds": seeds,
        "diffs": diffs,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
    }


def format_ci(summary: Mapping, fmt: str = "+.3f") -> str:
    """`+0.028 [+0.014, +0.042]` (or the mean alone when the interval is undefined)."""
    mean, lo, hi = summary["mean"], summary["lo"], summary["hi"]
    if math.isnan(lo):
        return format(mean, fmt)
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
