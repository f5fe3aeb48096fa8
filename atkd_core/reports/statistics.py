"""Statistics of a comparison: mean ± std per cell, paired differences with Student-t intervals."""

from __future__ import annotations

import math
from typing import Any

from atkd_core.grid import OBJECTIVE_AXIS


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; infinite with a single value."""
    from scipy import stats

    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


def detectable_effect(values: list[float], level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference a paired t-test on ``len(values)`` pairs with this spread
    detects with ``power`` at two-sided ``level``: (t_(1+level)/2 + t_power) * sd / sqrt(n), with
    n - 1 degrees of freedom (the usual approximation); infinite with fewer than two values."""
    from scipy import stats

    if len(values) < 2:
        return math.inf
    _, std = mean_std(values)
    n = len(values)
    return float((stats.t.ppf(0.5 + level / 2, n - 1) + stats.t.ppf(power, n - 1)) * std / math.sqrt(n))


POOLED = "all (mean over them per seed)"


def summarize(results: list[dict[str, Any]], axes: list[str], key: str) -> list[dict[str, Any]]:
    """One row per cell: its axis values, ``key``'s mean and std over seeds, and the seed count."""
    groups: dict[tuple, list[float]] = {}
    for result in results:
        groups.setdefault(tuple(result["values"][a] for a in axes), []).append(result[key])
    rows = []
    for values, scores in groups.items():
        finite = [s for s in scores if math.isfinite(s)]
        mean, std = mean_std(finite) if finite else (math.nan, math.nan)
        rows.append({**dict(zip(axes, values, strict=True)), "mean": mean, "std": std, "n": len(finite)})
    return rows


def paired_differences(
    results: list[dict[str, Any]], axes: list[str], pairs: list[tuple[str, str]], key: str
) -> list[dict[str, Any]]:
    """For each (baseline, ATKD) pair and each combination of the other axes: the per-seed
    differences ATKD − baseline (same seed, so same init and data order), their mean, 95% CI and
    the smallest effect the seeds could detect. With several combinations (e.g. teachers), one more
    row pools them: per seed, the mean of its differences over the combinations, so the seed stays
    the unit (runs of one seed share the student's init and data order)."""
    if OBJECTIVE_AXIS not in axes:
        return []
    others = [a for a in axes if a != OBJECTIVE_AXIS]
    by_cell = {
        (tuple(r["values"][a] for a in others), r["values"][OBJECTIVE_AXIS], r["seed"]): r[key]
        for r in results
    }
    rows = []
    contexts = sorted({context for context, _, _ in by_cell}, key=str)

    def row(context: tuple, pair: str, diffs: list[float]) -> dict[str, Any]:
        mean, low, high = confidence_interval(diffs)
        return {
            **dict(zip(others, context, strict=True)),
            "pair": pair,
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "n": len(diffs),
            "detectable": detectable_effect(diffs),
        }

    for baseline, atkd in pairs:
        per_seed: dict[int, dict[tuple, float]] = {}
        for context in contexts:
            for seed in sorted(s for c, o, s in by_cell if c == context and o == atkd):
                if (context, baseline, seed) in by_cell:
                    diff = by_cell[(context, atkd, seed)] - by_cell[(context, baseline, seed)]
                    if math.isfinite(diff):
                        per_seed.setdefault(seed, {})[context] = diff
            diffs = [d[context] for _, d in sorted(per_seed.items()) if context in d]
            if diffs:
                rows.append(row(context, f"{atkd} - {baseline}", diffs))
        complete = [sum(d.values()) / len(d) for d in per_seed.values() if len(d) == len(contexts)]
        if len(contexts) > 1 and complete:
            rows.append(row((POOLED,) * len(others), f"{atkd} - {baseline}", complete))
    return rows
