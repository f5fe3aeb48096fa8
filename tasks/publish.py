"""Prefect tasks that publish a finished run: the student in the MLflow model registry, and a
Prefect Markdown artifact linking the flow run to its MLflow run with the evaluation summary."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from atkd_core.config import PipelineConfig
from atkd_core.manifest import read_manifest
from atkd_core.outputs import TrainedModelManifest
from atkd_core.reports.publishing import png_data_uri
from infra.tracking import attach_run, register_model
from tasks.policies import IO_RETRIES


def version_tags(config: PipelineConfig, student_dir: Path) -> dict[str, str]:
    """What tells registered students apart: the objective and its settings, the teacher, the seed
    and the training data's content hash (from the student's manifest)."""
    loss = config.loss
    student = read_manifest(student_dir, TrainedModelManifest)
    return {
        "objective": loss.objective,
        "divergence": loss.divergence if loss.objective in ("kd", "adakd") else "-",
        "setting": loss.setting if loss.objective == "atkd" else "-",
        "hard_fraction": str(loss.hard_fraction) if loss.objective == "atkd" else "-",
        "lam": str(loss.lam) if loss.objective == "atkd" else "-",
        "ce_weight": str(loss.ce_weight),
        "teacher": config.teacher.preset or str(config.teacher.path),
        "student": config.student.preset or str(config.student.path),
        "seed": str(config.distill.training.seed),
        "data_sha256": student.train_data_sha256 if student is not None else "unknown",
    }


def registered_model_name(config: PipelineConfig) -> str:
    """The registry name of the pipeline's students."""
    return config.tracking.registered_model_name or f"{config.name}-student"


@task(name="register_student", **IO_RETRIES)
def register_student_task(
    config: PipelineConfig, run_id: str | None, student_dir: str, summary: str
) -> str | None:
    """Log the student's weights to the pipeline's run and register them with the eval summary as
    the version's description; return the version (None when tracking is off)."""
    run = attach_run(config, run_id)
    manifest = read_manifest(Path(student_dir))
    content_hash = manifest.content_sha256 if manifest is not None else "unknown"
    description = f"Distilled by pipeline run {run.run_id} ({config.name}).\n\n{summary}"
    version = register_model(
        run,
        Path(student_dir),
        registered_model_name(config),
        description,
        content_hash,
        version_tags(config, Path(student_dir)),
    )
    if version is not None:
        run.set_tags({"registered_model": f"{registered_model_name(config)}/{version}"})
        get_run_logger().info("registered %s version %s", registered_model_name(config), version)
    return version


def artifact_key(name: str) -> str:
    """A Prefect artifact key from a run name (keys allow lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"atkd-{name}".lower()).strip("-")


@task(name="publish_summary", **IO_RETRIES)
def publish_summary_task(
    config: PipelineConfig,
    run_id: str | None,
    registered_version: str | None,
    summary: str,
    figure: str | None = None,
) -> str:
    """A Prefect Markdown artifact: the MLflow run (linked when it is on a server), the eval table
    and its figure (``figure``, embedded)."""
    run = attach_run(config, run_id)
    lines = [f"## ATKD pipeline `{config.name}`", ""]
    if run.run_id is not None:
        url = run.web_url()
        where = f"[{run.run_id}]({url})" if url else f"`{run.run_id}` in `{run.tracking_uri}`"
        lines.append(f"- MLflow run: {where} (experiment `{config.tracking.experiment_name}`)")
        if url is None:
            lines.append(f"- Open it with `mlflow ui --backend-store-uri {run.tracking_uri}`")
    if registered_version is not None:
        lines.append(f"- Registered model: `{registered_model_name(config)}` version {registered_version}")
    lines += ["", "### Evaluation (gap = student - teacher)", "", summary or "(evaluation disabled)"]
    if figure is not None:
        # Inside the artifact: a link to a file would not resolve in the Prefect UI.
        lines += ["", f"![evaluation summary]({png_data_uri(Path(figure))})"]
    artifact_id = create_markdown_artifact(
        "\n".join(lines), key=artifact_key(config.name), description=f"ATKD pipeline {config.name}"
    )
    return str(artifact_id)
