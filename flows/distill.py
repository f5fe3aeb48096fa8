"""The pipeline flow: prepare_data -> finetune_teacher -> score_teacher -> distill_student -> evaluate.

Its one parameter is the pipeline config model, so the Prefect UI renders it as a validated form.
The stage order is atkd_core.pipeline's; here each stage runs as a cached, tracked Prefect task
(``PrefectStages``). The comparison flow (flows/compare.py) runs the teacher side and the student
side as sub-flows so that many students share one teacher's outputs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.utilities.urls import url_for
from pydantic import BaseModel, Field

from atkd_core.config import PipelineConfig, load_config
from atkd_core.pipeline import pipeline_outputs
from atkd_core.reports.comparison import cell_scores
from atkd_core.workdir import workdir_lock
from infra.readiness import ensure_ready_once, format_table
from infra.tracking import OUTBOX_NAME, RunHandle, pipeline_run, unsent_calls
from tasks.data import generate_teacher_data_task, prepare_data_task
from tasks.evaluate import evaluate_task
from tasks.policies import run_cached
from tasks.publish import publish_summary_task, register_student_task, registered_model_name
from tasks.scoring import materialize_teacher_task, score_teacher_task
from tasks.train import distill_student_task, finetune_teacher_task, materialize_student_task


class PipelineResult(BaseModel):
    """What one pipeline run made and where its tracking lives."""

    workdir: str = Field(description="The run's working directory.")
    outputs: dict[str, str] = Field(description="Stage name -> output directory.")
    mlflow_tracking_uri: str | None = Field(description="MLflow tracking URI (null when tracking is off).")
    mlflow_run_id: str | None = Field(description="The parent MLflow run (null when tracking is off).")
    mlflow_run_url: str | None = Field(None, description="The run's MLflow UI page when on a server.")
    registered_model: str | None = Field(None, description="'name/version' in the MLflow model registry.")
    prefect_flow_run_id: str | None = Field(description="The Prefect flow run.")
    prefect_flow_run_url: str | None = Field(None, description="The flow run's page in the Prefect UI.")
    summary: str = Field("", description="The evaluation summary table (Markdown).")
    unsent_tracking_calls: int = Field(
        0, description="Tracking calls the server did not take, kept for `atkd sync` (0: all sent)."
    )


class PrefectStages:
    """The pipeline's stages as Prefect tasks, each cached on the library's reuse key and tracked as
    a child of the MLflow run ``run_id`` (the order is atkd_core.pipeline's)."""

    def __init__(self, config: PipelineConfig, run_id: str | None) -> None:
        self.config, self.run_id = config, run_id

    def prepare_data(self) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(prepare_data_task, config=self.config, parent_run_id=self.run_id)

    def materialize_teacher(self, prepared: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(materialize_teacher_task, config=self.config, prepared_dir=prepared)

    def finetune_teacher(self, prepared: str, teacher_init: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(
            finetune_teacher_task,
            config=self.config,
            prepared_dir=prepared,
            teacher_init=teacher_init,
            parent_run_id=self.run_id,
        )

    def generate_teacher_data(self, prepared: str, teacher: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(
            generate_teacher_data_task,
            config=self.config,
            prepared_dir=prepared,
            teacher_dir=teacher,
            parent_run_id=self.run_id,
        )

    def score_teacher(self, train_data: str, teacher: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(
            score_teacher_task,
            config=self.config,
            prepared_dir=train_data,
            teacher_dir=teacher,
            parent_run_id=self.run_id,
        )

    def materialize_student(self, prepared: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(materialize_student_task, config=self.config, prepared_dir=prepared)

    def distill_student(self, train_data: str, student_init: str, cache: str, teacher: str) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(
            distill_student_task,
            config=self.config,
            prepared_dir=train_data,
            student_init=student_init,
            cache_dir=cache,
            teacher_dir=teacher,
            parent_run_id=self.run_id,
        )

    def evaluate(self, prepared: str, models: dict[str, str]) -> str:
        """See atkd_core.pipeline.StageRunner."""
        return run_cached(
            evaluate_task, config=self.config, prepared_dir=prepared, models=models, parent_run_id=self.run_id
        )


def headline_metrics(eval_dir: Path) -> dict[str, float]:
    """What two pipeline runs are compared on, for their parent run: the student's and teacher's
    ROUGE-L averaged over the generation tasks, their validation perplexities and the gap."""
    scores = cell_scores(eval_dir, "rougeL")
    return {**scores, "score_gap": scores["student_score"] - scores["teacher_score"]}


def read_summary(outputs: dict[str, str]) -> str:
    """The evaluation summary table of a run's outputs ('' when evaluation was off)."""
    summary = Path(outputs.get("evaluate", "")) / "summary.md"
    return summary.read_text() if "evaluate" in outputs and summary.is_file() else ""


def publish(config: PipelineConfig, run: RunHandle, outputs: dict[str, str]) -> tuple[str | None, str]:
    """Register the student (when tracking and registration are on) and write the Prefect summary
    artifact; returns ('name/version' or None, the summary table)."""
    summary = read_summary(outputs)
    version = None
    if run.run_id is not None and config.tracking.register_model:
        version = register_student_task(config, run.run_id, outputs["distill_student"], summary)
    figure = Path(outputs.get("evaluate", "")) / "summary.png"
    publish_summary_task(config, run.run_id, version, summary, str(figure) if figure.is_file() else None)
    return version, summary


def flow_run_links() -> tuple[str, str | None]:
    """(id, UI URL or None) of the current Prefect flow run."""
    flow_run_id = str(current_flow_run.id)
    # The UI's own route (runs/flow-run/<id>): prefect.runtime's flow_run.ui_url builds
    # flow-runs/flow-run/<id>, a page the UI does not have. None without a UI (the temporary API).
    url = url_for("flow-run", obj_id=flow_run_id)
    return flow_run_id, url if url and url.startswith(("http://", "https://")) else None


def run_tags(flow_run_id: str, flow_run_url: str | None) -> dict[str, str]:
    """MLflow tags that lead from a run back to its Prefect flow run."""
    tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": current_flow_run.name or ""}
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    return tags


# What the ad-hoc deployment's form opens on: the demo config, in a workdir and under a name (hence
# a registered model, adhoc-student) of its own, so a run from the UI never touches `make demo`'s.
ADHOC_DEFAULT = load_config(
    Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", ["name=adhoc", "workdir=runs/adhoc"]
)

# The run's name says what it trains, not a random "adjective-animal" (Prefect's default).
RUN_NAME = (
    "{config.name}: {config.loss.objective} k={config.loss.hard_fraction} lam={config.loss.lam} "
    "seed={config.distill.training.seed}"
)


@flow(name="distill_pipeline", flow_run_name=RUN_NAME)
def distill_pipeline(config: PipelineConfig = ADHOC_DEFAULT) -> PipelineResult:
    """Run every stage of the ATKD pipeline on ``config``; return the output paths and run ids."""
    logger = get_run_logger()
    # A flow started by a deployment's worker gets the checks `atkd run` makes before it.
    readiness = ensure_ready_once(config)
    if readiness is not None:
        logger.info("ready to run:\n%s", format_table(readiness))
    flow_run_id, flow_run_url = flow_run_links()
    with (
        workdir_lock(config.workdir, warn=logger.warning),
        pipeline_run(config, tags=run_tags(flow_run_id, flow_run_url)) as parent,
    ):
        outputs = pipeline_outputs(config, PrefectStages(config, parent.run_id))
        if "evaluate" in outputs:
            parent.log_metrics(headline_metrics(Path(outputs["evaluate"])))
        version, summary = publish(config, parent, outputs)
    logger.info("pipeline finished: %s", outputs)
    unsent = unsent_calls(config)
    if unsent:
        logger.warning(
            "%d tracking calls (metrics, params, artifacts, registration) did not reach MLflow; they are "
            "kept in %s: send them with `atkd sync CONFIG` once the server is back",
            unsent,
            config.workdir / OUTBOX_NAME,
        )
    return PipelineResult(
        workdir=str(config.workdir),
        outputs=outputs,
        mlflow_tracking_uri=parent.tracking_uri,
        mlflow_run_id=parent.run_id,
        mlflow_run_url=parent.web_url(),
        registered_model=None if version is None else f"{registered_model_name(config)}/{version}",
        prefect_flow_run_id=flow_run_id,
        prefect_flow_run_url=flow_run_url,
        summary=summary,
        unsent_tracking_calls=unsent,
    )


@flow(name="distill_config_file")
def distill_config_file(
    config_path: str = "configs/demo.yaml", overrides: list[str] | None = None
) -> PipelineResult:
    """Run the pipeline on a config file of the checkout with ``--set``-style overrides (for
    scheduled deployments, whose parameters should follow the file rather than copy it).

    Args:
        config_path: A pipeline YAML config, relative to the checkout (e.g. configs/demo.yaml).
        overrides: KEY=VALUE overrides applied to it, as with `atkd run --set` (e.g. workdir=runs/nightly).
    """
    return distill_pipeline(load_config(config_path, overrides))
