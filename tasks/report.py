"""Prefect task writing a comparison's report: tables, figures, the teacher analysis, MLflow artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from atkd_core.compare import Grid, cell_scores, teacher_label, write_report
from atkd_core.manifest import read_manifest
from atkd_core.reports import cache_unc, kl_decomposition_magnitudes
from atkd_core.scoring import TeacherCache
from infra.tracking import attach_run
from tasks.policies import IO_RETRIES


def validation_convergence(metrics_path: Path) -> dict[str, float]:
    """A training run's final validation loss and its relative change over the last quarter of
    the steps (how flat the curve was at the end); empty when the run logged no validation loss."""
    if not metrics_path.is_file():
        return {}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not curve:
        return {}
    final_step, final = curve[-1]
    earlier = [loss for step, loss in curve if step <= 0.75 * final_step] or [curve[0][1]]
    return {"val_loss": final, "val_loss_change_last_quarter": final / earlier[-1] - 1}


def teacher_analysis(
    grid: Grid, teachers: dict[str, Any], results: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per teacher group: its score, UNC statistics and the KL terms against the untrained student;
    and every group's UNC values for the figure."""
    rows, unc_by_teacher = [], {}
    for key, config in grid.teacher_configs.items():
        upstream = teachers[key]
        name = teacher_label(config)
        cache = TeacherCache(Path(upstream.cache))
        unc = cache_unc(cache, Path(upstream.train_data))
        unc_by_teacher[name] = unc.numpy()
        row: dict[str, Any] = {
            "teacher": name,
            "parameters": (read_manifest(config.layout.teacher_init) or {}).get("parameters"),
            "unc_mean": float(unc.mean()),
            "unc_median": float(unc.median()),
            "easy_share": float((unc < 0.1).double().mean()),
        }
        row.update(validation_convergence(Path(upstream.teacher) / "metrics.jsonl"))
        if (config.layout.eval / "summary.csv").is_file():
            scores = cell_scores(config.layout.eval, grid.comparison.score_metric)
            row.update(teacher_score=scores["teacher_score"], teacher_perplexity=scores["teacher_perplexity"])
        # The same untrained student (the first seed's init) against every teacher.
        first = next((r for r in results if r["teacher_key"] == key), None)
        student_init = Path(first["workdir"]) / "models" / "student-init" if first else None
        if student_init is not None and student_init.is_dir():
            row.update(kl_decomposition_magnitudes(cache, Path(upstream.train_data), student_init))
        rows.append(row)
    return rows, unc_by_teacher


@task(name="comparison_report", cache_policy=NO_CACHE, **IO_RETRIES)
def comparison_report_task(
    grid: Grid,
    results: list[dict[str, Any]],
    teachers: dict[str, Any],
    failed: list[str],
    elapsed_s: float,
    command: str,
    run_id: str | None,
) -> str:
    """Write the report into the grid's output directory and log it to the comparison's MLflow run;
    return the directory."""
    logger = get_run_logger()
    rows, unc_by_teacher = teacher_analysis(grid, teachers, results)
    markdown = write_report(grid, results, rows, unc_by_teacher, failed, elapsed_s, command)
    run = attach_run(grid.base, run_id)
    run.log_artifact(grid.output_dir, "report")
    for row in rows:
        run.log_metrics(
            {
                f"teacher/{row['teacher']}/{k}": v
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    logger.info("comparison report: %s\n%s", grid.output_dir / "report.md", markdown)
    return str(grid.output_dir)
