"""Markdown tables: a comparison's cells pivoted, its paired differences, its teachers, and the
evaluation summary."""

from __future__ import annotations

import math
from typing import Any

from atkd_core.grid import OBJECTIVE_AXIS


def pivot(
    rows: list[dict[str, Any]], down: list[str], across: str
) -> tuple[list[tuple[Any, ...]], list[Any], dict[tuple[tuple[Any, ...], Any], dict[str, Any]]]:
    """Lay ``rows`` out as a grid: (row keys from the ``down`` fields, columns from ``across``,
    {(row key, column): row}), both in order of first appearance."""
    cells: dict[tuple[tuple[Any, ...], Any], dict[str, Any]] = {}
    for row in rows:
        cells.setdefault((tuple(row[a] for a in down), row[across]), row)
    row_keys = list(dict.fromkeys(key for key, _ in cells))
    columns = list(dict.fromkeys(column for _, column in cells))
    return row_keys, columns, cells


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def pivot_markdown(rows: list[dict[str, Any]], axes: list[str], digits: int = 2) -> str:
    """A Markdown table of ``summarize`` rows: the last axis across, the others down, 'mean ± std'."""
    across, down = axes[-1], axes[:-1]
    row_keys, columns, cells = pivot(rows, down, across)
    body = []
    for key in row_keys:
        values = []
        for column in columns:
            row = cells.get((key, column))
            values.append(f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}" if row else "-")
        body.append([*(map(str, key) if down else ["score"]), *values])
    return markdown_table([*(down or ["cell"]), *map(str, columns)], body)


def pairs_markdown(rows: list[dict[str, Any]], axes: list[str], digits: int = 2) -> str:
    """A Markdown table of ``paired_differences`` rows."""
    others = [a for a in axes if a != OBJECTIVE_AXIS]
    body = [
        [
            *(str(row[a]) for a in others),
            row["pair"],
            f"{row['mean']:+.{digits}f}",
            f"[{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]",
            str(row["n"]),
            f"{row['detectable']:.{digits}f}" if "detectable" in row else "-",
        ]
        for row in rows
    ]
    return markdown_table([*others, "difference", "mean", "95% CI", "seeds", "detectable (80% power)"], body)


TEACHER_COLUMNS = (
    ("teacher", "teacher", "{}"),
    ("parameters", "params", "{:,}"),
    ("teacher_score", "teacher score", "{:.2f}"),
    ("teacher_perplexity", "val ppl", "{:.2f}"),
    ("val_loss", "final val loss", "{:.3f}"),
    ("val_loss_change_last_quarter", "Δ last 25% of steps", "{:+.1%}"),
    ("unc_mean", "UNC mean", "{:.3f}"),
    ("unc_median", "UNC median", "{:.3f}"),
    ("easy_share", "share UNC < 0.1", "{:.1%}"),
    ("tkd", "TKD", "{:.4g}"),
    ("dkd", "DKD", "{:.4g}"),
    ("weighted_dkd", "(1-p_g)·DKD", "{:.4g}"),
    ("weighted_dkd_share", "(1-p_g)·DKD / KL", "{:.1%}"),
)


def teachers_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the teacher analysis rows (absent values shown as '-')."""
    body = []
    for row in rows:
        cells = []
        for key, _, pattern in TEACHER_COLUMNS:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and not math.isfinite(value))
            cells.append("-" if missing else pattern.format(value))
        body.append(cells)
    return markdown_table([title for _, title, _ in TEACHER_COLUMNS], body)
