"""The pipeline flow: prepare_data -> finetune_teacher -> score_teacher -> distill_student -> evaluate.

Its one parameter is the pipeline config model, so the Prefect UI renders it as a validated form.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from pydantic import BaseModel, Field

from atkd_core.config import PipelineConfig
from infra.tracking import pipeline_run
from tasks.data import generate_teacher_data_task, prepare_data_task
from tasks.evaluate import evaluate_task
from tasks.scoring import materialize_teacher_task, score_teacher_task
from tasks.train import distill_student_task, finetune_teacher_task


class PipelineResult(BaseModel):
    """What one pipeline run made and where its tracking lives."""

    workdir: str = Field(description="The run's working directory.")
    outputs: dict[str, str] = Field(description="Stage name -> output directory.")
    mlflow_tracking_uri: str | None = Field(description="MLflow tracking URI (null when tracking is off).")
    mlflow_run_id: str | None = Field(description="The parent MLflow run (null when tracking is off).")
    prefect_flow_run_id: str | None = Field(description="The Prefect flow run.")


@flow(name="distill_pipeline")
def distill_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:  # noqa: B008 (UI form default)
    """Run every stage of the ATKD pipeline on ``config``; return the output paths and run ids."""
    logger = get_run_logger()
    flow_run_id = str(get_run_context().flow_run.id)
    config.workdir.mkdir(parents=True, exist_ok=True)
    with pipeline_run(config, tags={"prefect.flow_run_id": flow_run_id}) as parent:
        prepared = prepare_data_task(config, parent.run_id)
        teacher_init = materialize_teacher_task(config, prepared)
        teacher = finetune_teacher_task(config, prepared, teacher_init, parent.run_id)
        # SeqKD trains on the teacher's own responses; everything else on the ground truth.
        train_data = prepared
        if config.distill.data_source == "teacher_generated":
            train_data = generate_teacher_data_task(config, prepared, teacher, parent.run_id)
        cache = score_teacher_task(config, train_data, teacher, parent.run_id)
        student = distill_student_task(config, train_data, cache, teacher, parent.run_id)
        outputs = {
            "prepare_data": prepared,
            "finetune_teacher": teacher,
            "score_teacher": cache,
            "distill_student": student,
        }
        if config.eval.enabled:
            outputs["evaluate"] = evaluate_task(config, prepared, student, teacher, parent.run_id)
    logger.info("pipeline finished: %s", outputs)
    return PipelineResult(
        workdir=str(config.workdir),
        outputs=outputs,
        mlflow_tracking_uri=parent.tracking_uri,
        mlflow_run_id=parent.run_id,
        prefect_flow_run_id=flow_run_id,
    )
