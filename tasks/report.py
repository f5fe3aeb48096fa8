"""Prefect task writing a comparison's report and logging it to the comparison's MLflow run."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from atkd_core.grid import Grid
from atkd_core.reports.comparison import teacher_analysis, write_report
from infra.tracking import attach_run
from tasks.policies import IO_RETRIES


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
