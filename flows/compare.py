"""The comparison flow: a grid of pipeline runs (objective x teacher size x seed, or a k / lam sweep).

Cells that can share them share the prepared data and the teacher side (fine-tuned teacher and its
cache): each teacher group runs once as a ``teacher_stages`` sub-flow, each cell as a
``student_stages`` sub-flow. MLflow gets one run for the comparison with the groups and cells
nested under it; the comparison's tables, figures and report go to MLflow and to a Prefect
artifact. A failed cell does not stop the others: the report is written from the cells that
finished, and the flow then fails naming the ones that did not.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel, Field

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.grid import Cell, Grid, load_grid, teacher_label
from atkd_core.pipeline import TeacherOutputs, student_stages, teacher_stages
from atkd_core.reports.comparison import cell_scores
from atkd_core.reports.publishing import inline_images
from atkd_core.workdir import workdir_lock
from flows.distill import PrefectStages, flow_run_links, publish, run_tags
from infra.readiness import ensure_ready_once, format_table
from infra.tracking import attach_run, pipeline_run
from tasks.publish import artifact_key
from tasks.report import comparison_report_task


class ComparisonResult(BaseModel):
    """Where a comparison's report lives and how its cells went."""

    report_dir: str = Field(description="Directory of report.md, the tables and figures.")
    cells: int = Field(description="Runs in the grid (cells x seeds).")
    failed: list[str] = Field(description="Runs that failed (label and seed).")
    mlflow_run_id: str | None = Field(description="The comparison's MLflow run (null when tracking is off).")
    prefect_flow_run_id: str = Field(description="The Prefect flow run.")


@flow(name="teacher_stages", flow_run_name="teacher {label}")
def teacher_flow(
    config: PipelineConfig, prepared: str, parent_run_id: str | None, label: str
) -> TeacherOutputs:
    """One teacher group: materialize, fine-tune, [generate], score, and evaluate the teacher once;
    tracked as a nested MLflow run."""
    flow_run_id, flow_run_url = flow_run_links()
    named = config.model_copy(
        update={"tracking": config.tracking.model_copy(update={"run_name": f"teacher {label}"})}
    )
    with pipeline_run(named, tags=run_tags(flow_run_id, flow_run_url), parent_run_id=parent_run_id) as run:
        stages = PrefectStages(config, run.run_id)
        upstream = teacher_stages(config, stages, prepared)
        if config.eval.enabled and config.eval.include_teacher:
            stages.evaluate(prepared, {"teacher": upstream.teacher})
        return upstream


@flow(name="student_stages", flow_run_name="{label} seed {seed}")
def student_flow(
    config: PipelineConfig,
    upstream: TeacherOutputs,
    parent_run_id: str | None,
    label: str,
    seed: int,
    metric: str,
) -> dict[str, Any]:
    """One cell: distill and evaluate against a shared teacher; returns its scores."""
    flow_run_id, flow_run_url = flow_run_links()
    with pipeline_run(config, tags=run_tags(flow_run_id, flow_run_url), parent_run_id=parent_run_id) as run:
        outputs = student_stages(config, PrefectStages(config, run.run_id), upstream)
        publish(config, run, outputs)
        scores = cell_scores(Path(outputs["evaluate"]), metric) if "evaluate" in outputs else {}
        run.log_metrics(scores)
    return {**scores, "outputs": outputs, "mlflow_run_id": run.run_id}


def _run_cells(
    grid: Grid,
    teachers: dict[str, TeacherOutputs],
    run_id: str | None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    started_unix: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every cell as a sub-flow, in grid order; (finished cells' results, failed cells' lines)."""
    results, failed = [], []
    for index, cell in enumerate(grid.cells, start=1):
        logger.info("cell %d/%d: %s seed %d", index, len(grid.cells), cell.label, cell.seed)
        state = student_flow(
            cell.config,
            teachers[cell.teacher_key],
            run_id,
            label=cell.label,
            seed=cell.seed,
            metric=grid.comparison.score_metric,
            return_state=True,
        )
        if state.is_completed():
            results.append(_result_row(cell, state.result(), started_unix))
        else:
            failed.append(f"{cell.label} seed {cell.seed}: {state.message}")
            logger.error("cell %s seed %d failed: %s", cell.label, cell.seed, state.message)
    return results, failed


def _result_row(cell: Cell, outcome: dict[str, Any], started_unix: float) -> dict[str, Any]:
    manifest = cell.config.layout.student / "manifest.json"
    return {
        "label": cell.label,
        "values": cell.values,
        "seed": cell.seed,
        "teacher_key": cell.teacher_key,
        "workdir": str(cell.config.workdir),
        # A student trained before this invocation started came from the caches: the report's run
        # time then is not the grid's cost.
        "reused": manifest.is_file() and manifest.stat().st_mtime < started_unix,
        **outcome,
    }


def compare_run_name() -> str:
    """The comparison flow run's name: what it compares, not a random "adjective-animal"."""
    parameters = current_flow_run.parameters
    ablation = parameters.get("ablation")
    return f"compare {parameters['config_path']}" + (f" --ablation {ablation}" if ablation else "")


@flow(name="compare", flow_run_name=compare_run_name)
def compare(
    config_path: str, overrides: list[str] | None = None, ablation: str | None = None
) -> ComparisonResult:
    """Run the grid of the comparison config at ``config_path`` (or its named ablation) and report it.

    Args:
        config_path: A comparison YAML, relative to the checkout (e.g. configs/compare-demo.yaml).
        overrides: KEY=VALUE overrides of the comparison YAML, as with `atkd compare --set`.
        ablation: The name of one of its ablations to run instead of its axes (null: the axes).
    """
    logger = get_run_logger()
    started, started_unix = time.perf_counter(), time.time()
    grid = load_grid(config_path, overrides, ablation)
    comparison = grid.comparison
    # What every cell shares (models, data, harness tasks, devices, disk) is checked before any runs.
    readiness = ensure_ready_once(grid.base)
    if readiness is not None:
        logger.info("ready to run:\n%s", format_table(readiness))
    logger.info(
        "comparison %s: %d runs (%s x %d seeds), %d teacher group(s)",
        comparison.name,
        len(grid.cells),
        " x ".join(f"{len(v)} {k}" for k, v in grid.axes.items()),
        len(grid.seeds),
        len(grid.teacher_configs),
    )
    flow_run_id, flow_run_url = flow_run_links()
    root = grid.base.model_copy(
        update={
            "name": comparison.name,
            "workdir": comparison.workdir,
            "tracking": grid.base.tracking.model_copy(update={"run_name": f"compare {comparison.name}"}),
        }
    )
    with (
        workdir_lock(root.workdir, warn=logger.warning),
        pipeline_run(root, tags={**run_tags(flow_run_id, flow_run_url), "atkd.kind": "comparison"}) as run,
    ):
        run.log_params({f"compare.{k}": v for k, v in comparison.model_dump(mode="json").items()})
        prepared = {
            key: PrefectStages(config, run.run_id).prepare_data() for key, config in grid.data_configs.items()
        }
        teachers = {}
        for key, config in grid.teacher_configs.items():
            data_key = next(c.data_key for c in grid.cells if c.teacher_key == key)
            teachers[key] = teacher_flow(config, prepared[data_key], run.run_id, label=teacher_label(config))
        results, failed = _run_cells(grid, teachers, run.run_id, logger, started_unix)
        elapsed = time.perf_counter() - started
        command = "atkd compare " + " ".join(
            [
                config_path,
                *(f"--set {o}" for o in overrides or []),
                *([f"--ablation {ablation}"] if ablation else []),
            ]
        )
        if deployment.name is not None:
            # Run by a deployment (the UI, a schedule), not the command line: say which.
            command = f"the Prefect deployment compare/{deployment.name} (equivalent: {command})"
        report_dir = comparison_report_task(grid, results, teachers, failed, elapsed, command, run.run_id)
        report = (Path(report_dir) / "report.md").read_text()
        create_markdown_artifact(
            inline_images(report, Path(report_dir)),
            key=artifact_key(f"compare-{comparison.name}"),
            description=f"comparison {comparison.name}",
        )
        attach_run(root, run.run_id).set_tags({"atkd.failed_runs": json.dumps(failed)})
    if failed:
        raise UserError(
            f"{len(failed)} of {len(grid.cells)} runs failed (report written from the rest): {failed}"
        )
    return ComparisonResult(
        report_dir=report_dir,
        cells=len(grid.cells),
        failed=failed,
        mlflow_run_id=run.run_id,
        prefect_flow_run_id=flow_run_id,
    )
