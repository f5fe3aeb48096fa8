"""The order of the pipeline's stages, written once, and a runner that calls the library directly.

    prepare_data -> materialize teacher -> finetune_teacher -> [generate_teacher_data] -> score_teacher
                 -> materialize student -> distill_student -> evaluate

``teacher_stages`` and ``student_stages`` decide which stage runs on which inputs; a
``StageRunner`` decides how a stage runs. The Prefect flows run them as cached, tracked tasks
(flows/distill.py); the command line and the benchmarks run them as plain library calls
(``LocalStages``). Every stage reuses an output whose manifest matches its inputs, whichever runner
called it, and ``stage_target`` gives that reuse key before a stage runs (the Prefect cache key).
See docs/architecture.md, "Stages".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.outputs import TrainedModelManifest
from atkd_core.storage import Location, as_location

if TYPE_CHECKING:
    from atkd_core.training.job import TrainJob

# Trains a job (in this process, or under the DeepSpeed launcher) and returns its output manifest.
Trainer = Callable[["TrainJob"], TrainedModelManifest | None]


class TeacherOutputs(BaseModel):
    """What the teacher side of the pipeline made: the student side's inputs."""

    prepared: str = Field(description="prepare_data's output (tokenizer, splits).")
    teacher: str = Field(description="The (fine-tuned) teacher model directory or hub id.")
    train_data: str = Field(description="The prepared data the student trains on (SeqKD: the teacher's).")
    cache: str = Field(description="The teacher cache over train_data.")


class StageArguments(BaseModel):
    """A stage's inputs, by the names its Prefect task gives its arguments (other arguments, e.g. a
    parent MLflow run id, are ignored). A stage missing one it needs is a UserError."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prepared_dir: Path | None = Field(None, description="prepare_data's output (default: the layout's).")
    teacher_init: Path | None = Field(None, description="The teacher's initial weights (finetune_teacher).")
    teacher_dir: Path | None = Field(None, description="The teacher model (generate, score, distill).")
    student_init: Path | None = Field(None, description="The student's initial weights (distill_student).")
    cache_dir: str | None = Field(
        None, description="The teacher cache, a directory or a URL (distill_student)."
    )
    models: dict[str, Path] | None = Field(None, description="Name -> model directory (evaluate).")

    def needed(self, name: str, stage: str) -> Path:
        """The input ``name`` (a path), or a UserError saying ``stage`` needs it."""
        value = getattr(self, name)
        if value is None:
            raise UserError(f"{stage}: needs its input {name}")
        return Path(value)

    def needed_cache(self, stage: str) -> Location:
        """The teacher cache (a directory or a URL), or a UserError saying ``stage`` needs it."""
        if self.cache_dir is None:
            raise UserError(f"{stage}: needs its input cache_dir")
        return as_location(self.cache_dir)


@dataclass(frozen=True)
class StageTarget:
    """A stage's output directory, the fingerprint of the inputs it must be made from, and whether
    the output on disk was made from exactly those (then the stage reuses it)."""

    output: Path
    fingerprint: str
    current: bool


def stage_target(stage: str, config: PipelineConfig, inputs: StageArguments) -> StageTarget | None:
    """The target of ``stage`` on ``inputs``, computed exactly as the stage computes it to decide
    reuse; None for a stage that writes nothing (a user's model used where it is). Raises UserError
    when an input is missing or unusable.
    """
    from atkd_core.data.generate import generation_fingerprint
    from atkd_core.data.prepare import prepare_inputs_fingerprint
    from atkd_core.evaluation.harness import evaluation_fingerprint
    from atkd_core.manifest import fingerprint, is_up_to_date
    from atkd_core.models.build import init_fingerprint
    from atkd_core.scoring import config_scoring_spec
    from atkd_core.training.job import distill_job, finetune_job

    layout = config.layout

    def target(output: Path, fingerprint: str) -> StageTarget:
        return StageTarget(output, fingerprint, is_up_to_date(output, fingerprint))

    prepared = inputs.prepared_dir or layout.prepared
    if stage == "prepare_data":
        return target(layout.prepared, prepare_inputs_fingerprint(config))
    if stage in ("materialize_teacher", "materialize_student"):
        spec, output = (
            (config.teacher, layout.teacher_init)
            if stage == "materialize_teacher"
            else (config.student, layout.student_init)
        )
        return (
            None if spec.path is not None else target(output, init_fingerprint(spec, prepared / "tokenizer"))
        )
    if stage == "finetune_teacher":
        job = finetune_job(config, prepared, inputs.needed("teacher_init", stage))
        return target(job.output_dir, job.fingerprint())
    if stage == "generate_teacher_data":
        teacher = inputs.needed("teacher_dir", stage)
        return target(layout.teacher_generated, generation_fingerprint(config, prepared, teacher))
    if stage == "score_teacher":
        teacher = inputs.needed("teacher_dir", stage)
        cache_fingerprint = config_scoring_spec(config, teacher, prepared).fingerprint()
        # The stage also writes the teacher's token-difficulty report, which depends on k.
        hard_fraction = config.loss.hard_fraction
        report = layout.teacher_report / "difficulty.json"
        report_current = (
            report.is_file() and json.loads(report.read_text()).get("hard_fraction") == hard_fraction
        )
        identity: dict[str, Any] = {"cache": cache_fingerprint, "report_hard_fraction": hard_fraction}
        location = config.scoring.location
        if location is not None:
            # The stage hands on where the cache is read from: another location is another output.
            identity["location"] = location
        return StageTarget(
            layout.teacher_cache,
            fingerprint(identity),
            is_up_to_date(location or layout.teacher_cache, cache_fingerprint) and report_current,
        )
    if stage == "distill_student":
        student_init, teacher = (inputs.needed(name, stage) for name in ("student_init", "teacher_dir"))
        cache = inputs.needed_cache(stage)
        job = distill_job(config, prepared, student_init, cache, teacher)
        return target(job.output_dir, job.fingerprint())
    if stage == "evaluate":
        if inputs.models is None:
            raise UserError(f"{stage}: needs its input models")
        return target(layout.eval, evaluation_fingerprint(config, prepared, inputs.models))
    raise ValueError(f"unknown stage {stage!r}")


class StageRunner(Protocol):
    """Runs one stage on its inputs (output directories of earlier stages) and returns its output's path."""

    def prepare_data(self) -> str:
        """Tokenizer and tokenised splits."""
        ...

    def materialize_teacher(self, prepared: str) -> str:
        """The teacher as a save_pretrained directory (a preset built with the run's tokenizer)."""
        ...

    def finetune_teacher(self, prepared: str, teacher_init: str) -> str:
        """The teacher fine-tuned on the training split."""
        ...

    def generate_teacher_data(self, prepared: str, teacher: str) -> str:
        """SeqKD: the teacher's responses as prepared data."""
        ...

    def score_teacher(self, train_data: str, teacher: str) -> str:
        """The teacher's sparse cache over the training data."""
        ...

    def materialize_student(self, prepared: str) -> str:
        """The student's initial weights as a save_pretrained directory (a preset built once)."""
        ...

    def distill_student(self, train_data: str, student_init: str, cache: str, teacher: str) -> str:
        """The student distilled from the teacher."""
        ...

    def evaluate(self, prepared: str, models: dict[str, str]) -> str:
        """Harness scores of ``models`` (name -> directory)."""
        ...


def teacher_stages(config: PipelineConfig, runner: StageRunner, prepared: str) -> TeacherOutputs:
    """[audit] -> materialize -> [finetune] -> [SeqKD generation] -> score.

    The audit refuses, before any model is trained, config values that cannot run on the prepared
    data (e.g. scoring.top_k over its vocabulary; see atkd_core.audit)."""
    from atkd_core.audit import audit_prepared
    from atkd_core.data.prepare import teacher_prepared_dir

    audit_prepared(config, Path(prepared))
    # A teacher with its own tokenizer is built, fine-tuned and scored on its own prepared data.
    teacher_prepared = str(teacher_prepared_dir(config, Path(prepared)))
    teacher = runner.materialize_teacher(teacher_prepared)
    if config.finetune.enabled:
        teacher = runner.finetune_teacher(teacher_prepared, teacher)
    # SeqKD trains on the teacher's own responses; everything else on the ground truth.
    train_data = prepared
    if config.distill.data_source == "teacher_generated":
        train_data = runner.generate_teacher_data(prepared, teacher)
    cache = runner.score_teacher(teacher_prepared if config.cross_tokenizer else train_data, teacher)
    return TeacherOutputs(prepared=prepared, teacher=teacher, train_data=train_data, cache=cache)


def student_stages(
    config: PipelineConfig, runner: StageRunner, upstream: TeacherOutputs, evaluate: bool = True
) -> dict[str, str]:
    """materialize -> distill -> [evaluate, when ``evaluate`` and the config say so]; returns stage ->
    output directory."""
    student_init = runner.materialize_student(upstream.prepared)
    student = runner.distill_student(upstream.train_data, student_init, upstream.cache, upstream.teacher)
    outputs = {"distill_student": student}
    if evaluate and config.eval.enabled:
        models = {"student": outputs["distill_student"]}
        if config.eval.include_teacher:
            models["teacher"] = upstream.teacher
        outputs["evaluate"] = runner.evaluate(upstream.prepared, models)
    return outputs


def pipeline_outputs(config: PipelineConfig, runner: StageRunner) -> dict[str, str]:
    """Every stage in order; returns stage -> output directory."""
    prepared = runner.prepare_data()
    upstream = teacher_stages(config, runner, prepared)
    return {
        "prepare_data": prepared,
        "finetune_teacher": upstream.teacher,
        "score_teacher": upstream.cache,
        **student_stages(config, runner, upstream),
    }


class LocalStages:
    """The stages as plain library calls: no Prefect, no MLflow; ``log`` gets one line per stage.

    ``train`` runs the training stages (the caller chooses in-process or the DeepSpeed launcher).
    """

    def __init__(self, config: PipelineConfig, train: Trainer, log: Callable[[str], None] = print) -> None:
        self.config, self.train, self.log = config, train, log

    def prepare_data(self) -> str:
        """See StageRunner."""
        from atkd_core import stages

        return str(stages.prepare(self.config, self.log).directory)

    def materialize_teacher(self, prepared: str) -> str:
        """See StageRunner."""
        from atkd_core.models.build import materialize_model

        return materialize_model(
            self.config.teacher, Path(prepared) / "tokenizer", self.config.layout.teacher_init
        )

    def materialize_student(self, prepared: str) -> str:
        """See StageRunner."""
        from atkd_core.models.build import materialize_model

        return materialize_model(
            self.config.student, Path(prepared) / "tokenizer", self.config.layout.student_init
        )

    def finetune_teacher(self, prepared: str, teacher_init: str) -> str:
        """See StageRunner."""
        from atkd_core.training.job import finetune_job

        return self._train(finetune_job(self.config, Path(prepared), Path(teacher_init)))

    def generate_teacher_data(self, prepared: str, teacher: str) -> str:
        """See StageRunner."""
        from atkd_core import stages

        return str(stages.generate(self.config, Path(prepared), Path(teacher), self.log).directory)

    def score_teacher(self, train_data: str, teacher: str) -> str:
        """See StageRunner."""
        from atkd_core import stages

        cache, _ = stages.score(self.config, Path(train_data), Path(teacher), self.log)
        return str(cache.directory)

    def distill_student(self, train_data: str, student_init: str, cache: str, teacher: str) -> str:
        """See StageRunner."""
        from atkd_core import stages

        job = stages.distill_plan(
            self.config, Path(train_data), Path(student_init), as_location(cache), Path(teacher), self.log
        )
        return self._train(job)

    def evaluate(self, prepared: str, models: dict[str, str]) -> str:
        """See StageRunner."""
        from atkd_core import stages

        stages.evaluate(self.config, Path(prepared), {n: Path(d) for n, d in models.items()}, self.log)
        return str(self.config.layout.eval)

    def _train(self, job: TrainJob) -> str:
        """Train ``job``; return its output directory."""
        manifest = self.train(job)
        if manifest is not None:
            self.log(f"{job.stage}: {job.output_dir}: final {manifest.final}")
        return str(job.output_dir)
