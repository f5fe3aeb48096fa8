"""Prefect task for the evaluate stage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from atkd_core import stages
from atkd_core.config import PipelineConfig
from infra.tracking import stage_run
from tasks.policies import StageInputs


@task(name="evaluate", cache_policy=StageInputs(stage="evaluate"))
def evaluate_task(
    config: PipelineConfig, prepared_dir: str, models: dict[str, str], parent_run_id: str | None
) -> str:
    """Score ``models`` (name -> directory: the student, the teacher as reference, or the teacher
    alone) with lm-evaluation-harness into ``<workdir>/eval``; return that path."""
    logger = get_run_logger()
    output = config.layout.eval
    with stage_run(config, parent_run_id, "evaluate") as run:
        run.log_params(
            {
                "models": ",".join(models),
                "max_new_tokens": config.eval.max_new_tokens,
                "limit": config.eval.limit,
                "harness_tasks": ",".join(config.eval.harness_tasks),
            }
        )
        report = stages.evaluate(
            config,
            Path(prepared_dir),
            {name: Path(directory) for name, directory in models.items()},
            logger.info,
        )
        metrics = {
            f"eval/{model}/{task_name}/{metric}": value
            for model, tasks in report["results"].items()
            for task_name, values in tasks.items()
            for metric, value in values.items()
            if metric != "sample_len"
        }
        if report["difficulty"]:
            for group in ("easy", "hard"):
                for key in ("forward_kl", "top1_agreement", "teacher_unc"):
                    metrics[f"difficulty/{group}/{key}"] = report["difficulty"][group][key]
            for model in models:
                metrics[f"eval/{model}/validation_perplexity"] = report["difficulty"][
                    f"{model}_validation_perplexity"
                ]
        run.log_metrics(metrics)
        for name in sorted(p.name for p in output.iterdir() if p.is_file()):
            run.log_artifact(output / name, "eval")
        if report["errors"]:
            logger.warning("named tasks that could not be run: %s", report["errors"])
    return str(output)
