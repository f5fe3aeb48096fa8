"""Prefect tasks for the training stages: finetune_teacher and distill_student."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from atkd_core.config import PipelineConfig
from atkd_core.models.build import materialize_model
from atkd_core.training.loop import TrainJob
from infra.launcher import launch_training
from infra.tracking import RunHandle, flatten, stage_run


def _safe_metrics(run: RunHandle, logger) -> callable:
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
    job = TrainJob(
        stage="finetune",
        config=config,
        prepared_dir=Path(prepared_dir),
        init_dir=Path(teacher_init),
        output_dir=config.workdir / "models" / "teacher",
        checkpoint_dir=config.workdir / "checkpoints" / "finetune",
    )
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
    offline = config.distill.teacher_source == "offline"
    job = TrainJob(
        stage="distill",
        config=config,
        prepared_dir=Path(prepared_dir),
        init_dir=Path(student_init),
        output_dir=config.workdir / "models" / "student",
        checkpoint_dir=config.workdir / "checkpoints" / "distill",
        cache_dir=Path(cache_dir) if offline else None,
        teacher_dir=None if offline else Path(teacher_dir),
    )
    with stage_run(config, parent_run_id, "distill_student") as run:
        run.log_params(flatten(config.loss.model_dump(mode="json"), "loss."))
        _train(job, run, logger)
    return str(job.output_dir)
