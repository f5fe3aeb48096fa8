"""The evaluation summary: task x metric per model with the student's gap to the teacher."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from atkd_core.reports.figures import plot_evaluation_summary
from atkd_core.reports.tables import markdown_table


def summary_table(
    results: dict[str, dict[str, dict[str, float]]], student: str = "student", teacher: str = "teacher"
) -> list[dict[str, Any]]:
    """Rows of task x metric with one column per model and the student's gap to the teacher."""
    tasks = sorted({t for model in results.values() for t in model})
    rows = []
    for task in tasks:
        metrics = sorted({m for model in results.values() for m in model.get(task, {})})
        for metric in metrics:
            row: dict[str, Any] = {"task": task, "metric": metric}
            for model, values in results.items():
                row[model] = values.get(task, {}).get(metric, math.nan)
            if student in results and teacher in results:
                row["gap"] = row[student] - row[teacher]
            rows.append(row)
    return rows


def write_summary(rows: list[dict[str, Any]], output_dir: Path) -> str:
    """summary.md, summary.csv and summary.png; return the Markdown table."""
    columns = list(rows[0]) if rows else ["task", "metric"]
    markdown = markdown_table(
        columns,
        [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows],
    )
    (output_dir / "summary.md").write_text(markdown)
    with (output_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_evaluation_summary(
        rows, [c for c in columns if c not in ("task", "metric", "gap")], output_dir / "summary.png"
    )
    return markdown
