"""Prefect task for the score_teacher stage (and materialising preset models it needs)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from atkd_core import stages
from atkd_core.config import PipelineConfig
from atkd_core.models.build import materialize_model
from infra.tracking import stage_run
from tasks.policies import IO_RETRIES, StageInputs


@task(name="materialize_teacher", cache_policy=StageInputs(stage="materialize_teacher"))
def materialize_teacher_task(config: PipelineConfig, prepared_dir: str) -> str:
    """The teacher as a save_pretrained directory (a preset is built once with the run's tokenizer)."""
    return materialize_model(config.teacher, Path(prepared_dir) / "tokenizer", config.layout.teacher_init)


@task(name="score_teacher", cache_policy=StageInputs(stage="score_teacher"), **IO_RETRIES)
def score_teacher_task(
    config: PipelineConfig, prepared_dir: str, teacher_dir: str, parent_run_id: str | None
) -> str:
    """Score the teacher over the training split into a verified sparse cache; return its path."""
    logger = get_run_logger()
    scoring = config.scoring
    with stage_run(config, parent_run_id, "score_teacher") as run:
        run.log_params(
            {
                "teacher": teacher_dir,
                "top_k": scoring.top_k,
                "temperature": config.loss.temperature,
                "storage_dtype": scoring.storage_dtype,
                "encoding": scoring.encoding,
                "logprob_bits": scoring.logprob_bits,
                "shard_size": scoring.shard_size,
                "location": scoring.location or str(config.layout.teacher_cache),
            }
        )
        made, report = stages.score(config, Path(prepared_dir), Path(teacher_dir), logger.info)
        output, manifest = made.directory, made.manifest
        run.log_metrics(
            {
                "examples": manifest.num_examples,
                "tokens": manifest.tokens,
                "cache_bytes": manifest.cache_bytes,
                "unc_mean": manifest.unc_mean,
                "hard_share": report["hard_share"],
                **{f"unc_q{q}": v for q, v in manifest.unc_quantiles.items()},
            }
        )
        run.log_text(manifest.model_dump_json(indent=2) + "\n", "manifest.json")
        run.log_artifact(config.layout.teacher_report, "difficulty")
    return str(output)
