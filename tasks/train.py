"""Prefect tasks for the training stages: finetune_teacher and distill_student."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from atkd_core.config import PipelineConfig
from atkd_core.models.build import materialize_model
from atkd_core.training.loop import MetricsFn, TrainJob, distill_job, finetune_job
from infra.launcher import launch_training
from infra.tracking import RunHandle, flatten, stage_run


def _safe_metrics(run: RunHandle, logger) -> MetricsFn:
    """A metrics callback that never lets a tracking failure kill training (it warns once)."""
    failed = []

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        try:
            run.log_metrics(metrics, step)
        except Exception as exc:  # the tracking server's errors are not the training's
            if not failed:
                logger.warning("metrics logging failed, training continues: %s", exc)
            failed.append(step)

    return log_metrics


def _train(job: TrainJob, run: RunHandle, logger) -> dict:
    run.log_params(flatten(job.training.model_dump(mode="json"), "training."))
    manifest = launch_training(job, _safe_metrics(run, logger), logger.info)
    for name in ("ds_config.json", "metrics.jsonl", "README.md", "manifest.json"):
        if (job.output_dir / name).is_file():
            run.log_artifact(job.output_dir / name)
    run.log_artifact(job.output_dir, "model")
    run.log_metrics({f"final_{k}": v for k, v in manifest.get("final", {}).items() if k != "step"})
    return manifest


@task(name="finetune_teacher")
def finetune_teacher_task(
    config: PipelineConfig, prepared_dir: str, teacher_init: str, parent_run_id: str | None
) -> str:
    """Supervised fine-tuning of the teacher on the training split; the teacher unchanged when disabled."""
    if not config.finetune.enabled:
        return teacher_init
    logger = get_run_logger()
    job = finetune_job(config, Path(prepared_dir), Path(teacher_init))
    with stage_run(config, parent_run_id, "finetune_teacher") as run:
        _train(job, run, logger)
    return str(job.output_dir)


@task(name="distill_student")
def distill_student_task(
    config: PipelineConfig, prepared_dir: str, cache_dir: str, teacher_dir: str, parent_run_id: str | None
) -> str:
    """Distil the student from the teacher (cache offline, or live online); return the student's directory."""
    logger = get_run_logger()
    student_init = materialize_model(
        config.student, Path(prepared_dir) / "tokenizer", config.workdir / "models" / "student-init"
    )
    job = distill_job(config, Path(prepared_dir), Path(student_init), Path(cache_dir), Path(teacher_dir))
    with stage_run(config, parent_run_id, "distill_student") as run:
        run.log_params(flatten(config.loss.model_dump(mode="json"), "loss."))
        _train(job, run, logger)
    return str(job.output_dir)
