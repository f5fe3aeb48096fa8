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
    differences ATKD − baseline (same seed, so same init and data order), their mean and 95% CI."""
    if OBJECTIVE_AXIS not in axes:
        return []
    others = [a for a in axes if a != OBJECTIVE_AXIS]
    by_cell = {
        (tuple(r["values"][a] for a in others), r["values"][OBJECTIVE_AXIS], r["seed"]): r[key]
        for r in results
    }
    rows = []
    contexts = sorted({context for context, _, _ in by_cell}, key=str)
    for baseline, atkd in pairs:
        for context in contexts:
            seeds = sorted(
                s for c, o, s in by_cell if c == context and o == atkd and (c, baseline, s) in by_cell
            )
            diffs = [by_cell[(context, atkd, s)] - by_cell[(context, baseline, s)] for s in seeds]
            diffs = [d for d in diffs if math.isfinite(d)]
            if not diffs:
                continue
            mean, low, high = confidence_interval(diffs)
            rows.append(
                {
                    **dict(zip(others, context, strict=True)),
                    "pair": f"{atkd} - {baseline}",
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n": len(diffs),
                }
            )
    return rows
