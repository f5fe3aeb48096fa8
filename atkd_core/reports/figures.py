"""Figures of the reports: comparison scores, teachers' UNC, the evaluation summary, token difficulty."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from atkd_core.reports.tables import pivot


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display on servers and workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` as a PNG at ``path`` (its folder made) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def plot_summary(rows: list[dict[str, Any]], axes: list[str], path: Path, ylabel: str) -> None:
    """Grouped bars of the cell means with ±std error bars: the last axis as the bars in a group."""
    plt = pyplot()

    across, down = axes[-1], axes[:-1]
    groups, columns, cell = pivot(rows, down, across)
    width = 0.8 / len(columns)
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(columns) / 2 + 3), 4))
    for index, column in enumerate(columns):
        means, stds = [], []
        for group in groups:
            row = cell.get((group, column))
            means.append(row["mean"] if row else math.nan)
            stds.append(row["std"] if row else 0.0)
        positions = [g + (index - (len(columns) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, means, width, yerr=stds, capsize=3, label=str(column))
    axis.set_xticks(range(len(groups)), [", ".join(map(str, g)) or "all" for g in groups])
    axis.set(ylabel=ylabel, xlabel=", ".join(down) or "", title=f"mean ± std over seeds, by {across}")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_unc(unc_by_teacher: dict[str, Any], path: Path) -> None:
    """One figure of the teachers' UNC distributions (density histograms, shared bins)."""
    import numpy as np

    plt = pyplot()

    bins = np.linspace(0.0, 1.0, 41)
    figure, (density, cumulative) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in unc_by_teacher.items():
        array = np.asarray(values, dtype=float)
        density.hist(array, bins=bins, density=True, histtype="step", linewidth=1.8, label=name)
        ordered = np.sort(array)
        cumulative.plot(ordered, np.arange(1, len(ordered) + 1) / max(len(ordered), 1), label=name)
    density.set(xlabel="teacher UNC = 1 - p(target)", ylabel="density", title="UNC per teacher")
    density.set_yscale("log")
    cumulative.set(xlabel="teacher UNC", ylabel="share of tokens with UNC <= x", title="cumulative")
    for axis in (density, cumulative):
        axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_evaluation_summary(rows: list[dict[str, Any]], models: list[str], path: Path) -> None:
    """Bars of each model's ROUGE-L and exact match (as 0-100) per task; nothing when neither is there."""
    plt = pyplot()

    shown = [r for r in rows if r["metric"] in ("rougeL", "exact_match")]
    if not shown:
        return
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(shown) * len(models)), 4))
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        values = [r[model] if r["metric"] == "rougeL" else 100 * r[model] for r in shown]
        axis.bar([i + index * width for i in range(len(shown))], values, width, label=model)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))])
    axis.set_xticklabels(
        [f"{r['task'].removeprefix('atkd_')}\n{r['metric']}" for r in shown], rotation=45, ha="right"
    )
    axis.set_ylabel("score (0-100)")
    axis.legend()
    save_figure(figure, path)


def plot_token_difficulty(
    unc_values: Any,
    unc_counts: Any,
    threshold: float,
    hard_fraction: float | str,
    hard_share: float,
    family_unc_means: dict[str, float],
    path: Path,
) -> None:
    """The UNC histogram of the training tokens (``unc_counts`` tokens at each of ``unc_values``,
    e.g. a fine histogram's bin centres) with the hard threshold, beside the mean UNC per family."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(unc_values, bins=50, range=(0, 1), weights=unc_counts, color="#4C72B0")
    left.axvline(
        threshold,
        color="#C44E52",
        linestyle="--",
        label=f"hard if UNC >= {threshold:.3f} (k={hard_fraction}, {hard_share:.0%} of tokens)",
    )
    left.set(
        xlabel="teacher UNC = 1 - p(target)",
        ylabel="tokens",
        title="Teacher uncertainty over training tokens",
    )
    left.legend()
    names = list(family_unc_means)
    right.barh(names, [family_unc_means[n] for n in names], color="#55A868")
    right.set(xlabel="mean UNC", title="UNC by task family")
    save_figure(figure, path)
