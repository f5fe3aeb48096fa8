"""Evaluation, tracking, and the whole pipeline's config."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import Field, model_validator

from atkd_core.config.base import StrictModel
from atkd_core.config.data import DataConfig, TokenizerConfig
from atkd_core.config.training import DistillConfig, FinetuneConfig, LossConfig, ModelConfig, ScoringConfig
from atkd_core.layout import RunLayout


class EvalConfig(StrictModel):
    """Evaluation with lm-evaluation-harness."""

    enabled: bool = Field(True, description="Run the evaluate stage.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Greedy generation budget. Range: 1..4096.")
    batch_size: int = Field(16, ge=1, le=4096, description="Evaluation batch size. Range: 1..4096.")
    limit: int | None = Field(None, ge=1, description="Examples per task (null for all). Range: >= 1.")
    harness_tasks: list[str] = Field(
        default_factory=list, description="Named lm-eval tasks passed through (e.g. mmlu)."
    )
    instruction_files: list[Path] = Field(
        default_factory=list,
        description="User instruction sets (JSONL, data.field_preset fields) scored like the paper: greedy, ROUGE-L.",
    )
    include_teacher: bool = Field(True, description="Score the teacher beside the student as a reference.")


class TrackingConfig(StrictModel):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI when set, else sqlite:///<workdir>/mlflow.db.",
    )
    experiment_name: str = Field("atkd", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Name of the pipeline's parent run; null: generated.")
    register_model: bool = Field(
        True,
        description="Log the distilled student's weights and register them in the MLflow model registry.",
    )
    registered_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Model registry name of the student; null: '<name>-student'.",
    )


class PipelineConfig(StrictModel):
    """The whole pipeline: prepare_data -> finetune_teacher -> score_teacher -> distill_student -> evaluate."""

    name: str = Field(
        "atkd", min_length=1, max_length=100, description="A short name for this pipeline's outputs."
    )
    workdir: Path = Field(Path("runs/demo"), description="Directory where every stage writes its output.")
    data: DataConfig = Field(default_factory=DataConfig, description="Instruction data.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer.")
    teacher: ModelConfig = Field(
        default_factory=lambda: ModelConfig(preset="neox-small"), description="Teacher model."
    )
    student: ModelConfig = Field(
        default_factory=lambda: ModelConfig(preset="neox-tiny"), description="Student model."
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Teacher fine-tuning.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Teacher scoring cache.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Distillation loss.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Student distillation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")

    @model_validator(mode="after")
    def _check_cross(self) -> PipelineConfig:
        if (
            self.tokenizer.source == "train"
            and self.data.source != "embedded"
            and self.teacher.path is not None
        ):
            raise ValueError(
                "tokenizer.source: 'train' with a pretrained teacher would not match its vocabulary; use 'teacher'"
            )
        # The cache is in the teacher's vocabulary: its own tokenizer's, when it has one.
        scored, section = (
            (self.teacher.tokenizer, "teacher.tokenizer")
            if self.teacher.tokenizer is not None
            else (self.tokenizer, "tokenizer")
        )
        trained_vocabulary = scored.pad_to or scored.vocab_size
        if scored.source == "train" and self.scoring.top_k > trained_vocabulary:
            raise ValueError(
                f"scoring.top_k: {self.scoring.top_k} is over the trained tokenizer's vocabulary "
                f"({section}.{'pad_to' if scored.pad_to else 'vocab_size'} = {trained_vocabulary}); "
                f"set it to at most {trained_vocabulary}"
            )
        self._check_cross_tokenizer()
        from atkd_core.models.presets import PRESETS  # light: a dict of sizes

        for role, spec in (("teacher", self.teacher), ("student", self.student)):
            if spec.preset is not None and self.data.max_length > PRESETS[spec.preset][1].max_positions:
                positions = PRESETS[spec.preset][1].max_positions
                raise ValueError(
                    f"data.max_length: {self.data.max_length} is over the {role} preset {spec.preset}'s "
                    f"{positions} positions; set it to at most {positions}"
                )
        return self

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the teacher has its own tokenizer (teacher.tokenizer): distillation over spans."""
        return self.teacher.tokenizer is not None

    def _check_cross_tokenizer(self) -> None:
        """What distillation across tokenizers cannot do, refused at load (ValueError)."""
        if self.student.tokenizer is not None:
            raise ValueError(
                "student.tokenizer: the student reads the pipeline's tokenizer (the tokenizer section); "
                "give the teacher its own with teacher.tokenizer"
            )
        if self.teacher.tokenizer is None:
            return
        if self.teacher.tokenizer.source == "teacher" and self.teacher.path is None:
            raise ValueError(
                "teacher.tokenizer.source: 'teacher' needs teacher.path (a preset has no tokenizer)"
            )
        if self.loss.objective in ("taid", "adakd"):
            raise ValueError(
                f"loss.objective: {self.loss.objective} across tokenizers is not supported (it compares the "
                "two models token by token); use kd or atkd"
            )
        if self.distill.data_source != "ground_truth":
            raise ValueError(
                f"distill.data_source: {self.distill.data_source!r} across tokenizers is not supported: "
                "generated responses would need aligning step by step; use ground_truth"
            )
        if self.loss.objective == "atkd" and self.loss.split_scope == "sequence":
            raise ValueError(
                "loss.split_scope: 'sequence' across tokenizers is not supported (spans are split per "
                "micro-batch or at a threshold); use batch or threshold"
            )
        if self.loss.objective == "atkd" and self.loss.hard_fraction in ("auto", "epsilon"):
            raise ValueError(
                f"loss.hard_fraction: {self.loss.hard_fraction} reads the teacher's token UNC, and across "
                "tokenizers the split is over spans; give k (a number in (0, 1)) or a threshold "
                "(split_scope: threshold with unc_threshold, the same rule over spans)"
            )

    @property
    def resolved_tracking_uri(self) -> str:
        """Where this config's runs are tracked: ``resolve_tracking_uri`` of its settings."""
        return resolve_tracking_uri(self.tracking.tracking_uri, self.workdir)

    @property
    def layout(self) -> RunLayout:
        """Where each stage writes under ``workdir``."""
        return RunLayout(self.workdir)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections (what a stage's cache key depends on)."""
        payload = {name: self.model_dump(mode="json")[name] for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resolve_tracking_uri(tracking_uri: str | None, workdir: Path) -> str:
    """The configured tracking URI, else ``$MLFLOW_TRACKING_URI`` (as MLflow users expect; ``atkd
    serve`` prints it), else a SQLite store inside ``workdir``."""
    return (
        tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    )
