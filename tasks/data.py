"""Prefect task for the prepare_data stage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from atkd_core import stages
from atkd_core.config import PipelineConfig
from atkd_core.data.prepare import teacher_prepared_dir
from atkd_core.manifest import read_manifest
from atkd_core.outputs import PreparedManifest
from infra.tracking import stage_run
from tasks.policies import IO_RETRIES, StageInputs


@task(name="prepare_data", cache_policy=StageInputs(stage="prepare_data"), **IO_RETRIES)
def prepare_data_task(config: PipelineConfig, parent_run_id: str | None) -> str:
    """Build the suite (or read the user's files), tokenizer and tokenised splits; return the output path."""
    logger = get_run_logger()
    output = config.layout.prepared
    with stage_run(config, parent_run_id, "prepare_data") as run:
        made = stages.prepare(config, logger.info)
        manifest = made.manifest
        run.log_params({"source": manifest.source, "vocab_size": manifest.vocab_size, "reused": made.reused})
        metrics: dict[str, float] = {}
        for split, counts in manifest.counts.items():
            metrics.update(
                {
                    f"{split}/rows": counts.rows,
                    f"{split}/tokens": counts.tokens,
                    f"{split}/label_tokens": counts.label_tokens,
                }
            )
            metrics.update({f"{split}/overlong_{outcome}": n for outcome, n in counts.overlong.items()})
        teacher = (
            read_manifest(teacher_prepared_dir(config, output), PreparedManifest)
            if config.cross_tokenizer
            else None
        )
        if teacher is not None:
            # A teacher with its own tokenizer: its token counts, and how much of the text the two
            # tokenizers cut alike (the share of student label tokens in one-to-one spans).
            run.log_params({"teacher_vocab_size": teacher.vocab_size})
            for split, counts in teacher.counts.items():
                metrics.update(
                    {
                        f"{split}/teacher_tokens": counts.tokens,
                        f"{split}/teacher_label_tokens": counts.label_tokens,
                    }
                )
                if counts.matched_share is not None:
                    metrics[f"{split}/matched_share"] = counts.matched_share
        run.log_metrics(metrics)
        run.log_artifact(output / "manifest.json")
        if teacher is not None:
            run.log_artifact(output / "teacher" / "manifest.json", "teacher")
    return str(output)


@task(name="generate_teacher_data", cache_policy=StageInputs(stage="generate_teacher_data"), **IO_RETRIES)
def generate_teacher_data_task(
    config: PipelineConfig, prepared_dir: str, teacher_dir: str, parent_run_id: str | None
) -> str:
    """SeqKD: the teacher's responses to the training prompts as a prepared-data directory; return its path."""
    logger = get_run_logger()
    with stage_run(config, parent_run_id, "generate_teacher_data") as run:
        made = stages.generate(config, Path(prepared_dir), Path(teacher_dir), logger.info)
        output, manifest = config.layout.teacher_generated, made.manifest
        run.log_params(
            {
                "teacher": teacher_dir,
                "max_new_tokens": config.distill.generation_max_new_tokens,
                "temperature": config.distill.generation_temperature,
            }
        )
        run.log_metrics(
            {
                "train/rows": manifest.counts["train"].rows,
                "empty_responses": manifest.empty_responses,
            }
        )
        run.log_artifact(output / "raw" / "train.jsonl")
    return str(output)
