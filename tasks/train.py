"""Prefect tasks for the training stages: finetune_teacher and distill_student."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from atkd_core import stages
from atkd_core.config import PipelineConfig
from atkd_core.models.build import materialize_model
from atkd_core.storage import as_location
from atkd_core.training.job import TrainJob, finetune_job
from infra.launcher import launch_training
from infra.tracking import MetricsBuffer, RunHandle, flatten, stage_run
from tasks.policies import StageInputs

# Small files that describe a trained model; the weights themselves are logged once, by the
# register_student task, so a large teacher is not copied into the artifact store on every run.
MODEL_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "ds_config.json",
    "metrics.jsonl",
    "README.md",
)


def _train(job: TrainJob, run: RunHandle, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    run.log_params(flatten(job.training.model_dump(mode="json"), "training."))
    metrics = MetricsBuffer(run, logger.warning)
    try:
        manifest = launch_training(job, metrics, logger.info)
    finally:
        metrics.close()
    for name in (*MODEL_METADATA_FILES, "manifest.json"):
        if (job.output_dir / name).is_file():
            run.log_artifact(job.output_dir / name, "model")
    if manifest is not None:
        run.log_metrics({f"final_{k}": v for k, v in manifest.final.items() if k != "step"})


@task(name="materialize_student", cache_policy=StageInputs(stage="materialize_student"))
def materialize_student_task(config: PipelineConfig, prepared_dir: str) -> str:
    """The student's initial weights as a save_pretrained directory (a preset is built once)."""
    return materialize_model(config.student, Path(prepared_dir) / "tokenizer", config.layout.student_init)


@task(name="finetune_teacher", cache_policy=StageInputs(stage="finetune_teacher"))
def finetune_teacher_task(
    config: PipelineConfig, prepared_dir: str, teacher_init: str, parent_run_id: str | None
) -> str:
    """Supervised fine-tuning of the teacher on the training split; return the fine-tuned teacher's directory."""
    logger = get_run_logger()
    job = finetune_job(config, Path(prepared_dir), Path(teacher_init))
    with stage_run(config, parent_run_id, "finetune_teacher") as run:
        _train(job, run, logger)
    return str(job.output_dir)


@task(name="distill_student", cache_policy=StageInputs(stage="distill_student"))
def distill_student_task(
    config: PipelineConfig,
    prepared_dir: str,
    student_init: str,
    cache_dir: str,
    teacher_dir: str,
    parent_run_id: str | None,
) -> str:
    """Distil the student from the teacher (cache offline, or live online); return the student's directory."""
    logger = get_run_logger()
    paths = (Path(prepared_dir), Path(student_init), as_location(cache_dir), Path(teacher_dir))
    job = stages.distill_plan(config, *paths, logger.info)
    with stage_run(config, parent_run_id, "distill_student") as run:
        run.log_params(flatten(config.loss.model_dump(mode="json"), "loss."))
        if config.loss.hard_fraction in ("auto", "epsilon"):
            rule = config.loss.hard_fraction
            resolved = {
                f"{rule}_unc_threshold": float(job.config.loss.unc_threshold or 0.0),
                f"{rule}_hard_fraction": float(job.config.loss.hard_fraction),
            }
            run.log_params({f"loss.{key}": value for key, value in resolved.items()})
            run.log_metrics(resolved)
        _train(job, run, logger)
    return str(job.output_dir)
