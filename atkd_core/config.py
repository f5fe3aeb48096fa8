"""The whole pipeline's configuration as pydantic v2 models, one per concern.

Import-light on purpose (pydantic and yaml only): the CLI, the Prefect UI form and the tests load it
without pulling torch. A bad value fails at load with one line per problem naming the field path,
the value and what is allowed (see :func:`format_validation_error`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atkd_core.errors import ConfigError
from atkd_core.layout import RunLayout


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _when(field: str, values: tuple[str, ...], then: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema rule: where ``field`` holds one of ``values``, the section must match ``then``."""
    return {"if": {"properties": {field: {"enum": list(values)}}, "required": [field]}, "then": then}


def _cross_field_rules(*rules: dict[str, Any]) -> ConfigDict:
    """StrictModel's config with cross-field rules in the section's JSON schema.

    Prefect checks a deployment's parameters against that schema when a run is submitted (and its
    form shows the failures), but cannot run the model validators; these rules repeat the
    validators' checks that JSON Schema can state, so such mistakes are refused at submit rather than
    when the run starts. The validators stay the authority; tests hold the two in agreement.
    """
    return ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra={"allOf": list(rules)})


_NON_EMPTY_STRING: dict[str, Any] = {"type": "string", "minLength": 1}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

EMBEDDED_FAMILIES = ("uppercase", "reverse", "sort", "count", "add", "recall", "compose", "choose")


class EmbeddedSuiteConfig(StrictModel):
    """The deterministic synthetic instruction suite that the demo runs on (no network)."""

    seed: int = Field(0, ge=0, description="Seed of the generator; same seed, same bytes. Range: >= 0.")
    train_size: int = Field(2400, ge=8, le=1_000_000, description="Training examples. Range: 8..1e6.")
    validation_size: int = Field(240, ge=8, le=100_000, description="Validation examples. Range: 8..1e5.")
    test_size: int = Field(240, ge=8, le=100_000, description="Test examples. Range: 8..1e5.")
    families: list[Literal[EMBEDDED_FAMILIES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(EMBEDDED_FAMILIES),
        min_length=1,
        description=f"Task families to include, drawn in equal shares. Allowed: {', '.join(EMBEDDED_FAMILIES)}.",
    )


class FieldMap(StrictModel):
    """Which JSON fields hold the instruction, its optional context, the response and a category."""

    instruction: str = Field("instruction", min_length=1, description="Field with the instruction text.")
    context: str | None = Field("context", description="Field with optional context/input; null for none.")
    response: str = Field("response", min_length=1, description="Field with the reference response.")
    category: str | None = Field("category", description="Field with a category label; null for none.")


FIELD_PRESETS: dict[str, FieldMap] = {
    "dolly": FieldMap(instruction="instruction", context="context", response="response", category="category"),
    "alpaca": FieldMap(instruction="instruction", context="input", response="output", category=None),
}

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_CONTEXT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"


class DataConfig(StrictModel):
    """Where the instruction data comes from and how it becomes token ids and labels."""

    model_config = _cross_field_rules(
        _when(
            "source",
            ("files",),
            {"properties": {"train_files": {"minItems": 1}}, "required": ["train_files"]},
        ),
        _when("source", ("hub",), {"properties": {"hub_name": _NON_EMPTY_STRING}, "required": ["hub_name"]}),
        _when(
            "field_preset",
            ("custom",),
            {"properties": {"fields": {"type": "object"}}, "required": ["fields"]},
        ),
    )

    source: Literal["embedded", "files", "hub"] = Field(
        "embedded",
        description="embedded: the synthetic suite; files: local JSONL/JSON/Parquet/CSV; hub: a datasets name.",
    )
    embedded: EmbeddedSuiteConfig = Field(
        default_factory=EmbeddedSuiteConfig, description="The synthetic suite."
    )
    train_files: list[Path] = Field(default_factory=list, description="Training files (source=files).")
    validation_files: list[Path] = Field(default_factory=list, description="Validation files (source=files).")
    test_files: list[Path] = Field(default_factory=list, description="Test files (source=files).")
    hub_name: str | None = Field(None, description="A datasets name or local dataset script (source=hub).")
    field_preset: Literal["dolly", "alpaca", "custom"] = Field(
        "dolly",
        description="Field names: dolly (instruction/context/response), alpaca (instruction/input/output), custom.",
    )
    fields: FieldMap | None = Field(None, description="The field mapping when field_preset is custom.")
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt without context; must contain {instruction}."
    )
    context_template: str = Field(
        DEFAULT_CONTEXT_TEMPLATE, description="Prompt with context; must contain {instruction} and {context}."
    )
    max_length: int = Field(
        128, ge=16, le=32768, description="Tokens per example after truncation. Range: 16..32768."
    )
    holdout_fraction: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Share of train held out for a split given no files of its own. Range: (0, 0.5).",
    )
    holdout_seed: int = Field(0, ge=0, description="Seed of that hold-out. Range: >= 0.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A malformed or unusable row: fail naming file/line/field, or skip and count it."
    )
    on_overlong: Literal["truncate_prompt", "truncate", "skip", "error"] = Field(
        "truncate_prompt",
        description=(
            "An example longer than max_length. truncate_prompt: drop the middle of the prompt (its "
            "start, with the instruction, and its end, with the response marker, stay), down to "
            "min_prompt_tokens; a response that still does not fit with its EOS skips the row. "
            "truncate: the same, then cut the response (its EOS is then not trained). skip: skip every "
            "over-long row. error: fail naming the first one. Every case is counted in the manifest."
        ),
    )
    min_prompt_tokens: int = Field(
        16,
        ge=1,
        le=32767,
        description="The fewest prompt tokens truncation keeps. Range: 1..32767, below data.max_length.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError("data.train_files: must name at least one file when data.source is 'files'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name: must be set when data.source is 'hub'")
        if self.field_preset == "custom" and self.fields is None:
            raise ValueError("data.fields: must be set when data.field_preset is 'custom'")
        if self.min_prompt_tokens >= self.max_length:
            raise ValueError(
                f"data.min_prompt_tokens: {self.min_prompt_tokens} leaves no room for a response within "
                f"data.max_length={self.max_length}; allowed: 1..{self.max_length - 1}"
            )
        if "{instruction}" not in self.prompt_template:
            raise ValueError("data.prompt_template: must contain {instruction}")
        if "{instruction}" not in self.context_template or "{context}" not in self.context_template:
            raise ValueError("data.context_template: must contain {instruction} and {context}")
        return self

    def field_map(self) -> FieldMap:
        """The effective field mapping (the preset's, or the custom one)."""
        if self.field_preset != "custom":
            return FIELD_PRESETS[self.field_preset]
        # Validated at load; a config changed in code afterwards can still lack it.
        if self.fields is None:
            raise ConfigError("data.fields: must be set when data.field_preset is 'custom'")
        return self.fields


class TokenizerConfig(StrictModel):
    """The tokenizer: trained locally on the data (embedded default) or loaded from a model/directory."""

    model_config = _cross_field_rules(
        _when("source", ("path",), {"properties": {"path": _NON_EMPTY_STRING}, "required": ["path"]}),
    )

    source: Literal["train", "teacher", "path"] = Field(
        "train", description="train: BPE trained on the training split; teacher: the teacher's; path: `path`."
    )
    path: str | None = Field(None, description="Tokenizer directory or hub id when source is 'path'.")
    vocab_size: int = Field(
        2048, ge=300, le=262_144, description="BPE vocabulary size when trained. Range: 300..262144."
    )
    pad_to: int | None = Field(
        None,
        ge=300,
        le=262_144,
        description="Pad a trained tokenizer with unused tokens up to this size: the memory shape of a real "
        "vocabulary (e.g. Pythia's 50304) on the embedded data. Range: 300..262144, >= vocab_size, or null.",
    )

    @model_validator(mode="after")
    def _check_path(self) -> TokenizerConfig:
        if self.source == "path" and not self.path:
            raise ValueError("tokenizer.path: must be set when tokenizer.source is 'path'")
        if self.pad_to is not None and (self.source != "train" or self.pad_to < self.vocab_size):
            raise ValueError(
                f"tokenizer.pad_to: {self.pad_to} needs tokenizer.source 'train' and at least tokenizer.vocab_size "
                f"({self.vocab_size})"
            )
        return self


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ModelConfig(StrictModel):
    """A model given by a built-in preset (random init, no download) or a hub id / local directory."""

    preset: str | None = Field(
        None, description="Built-in architecture preset, e.g. neox-small (see atkd_core.models)."
    )
    path: str | None = Field(None, description="Hub id or local directory loaded with from_pretrained.")
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the model's repository."
    )
    init_seed: int = Field(0, ge=0, description="Seed of the random initialisation of a preset. Range: >= 0.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("exactly one of preset and path must be set")
        if self.preset is not None:
            from atkd_core.models.presets import PRESETS  # light: a dict of sizes

            if self.preset not in PRESETS:
                raise ValueError(f"preset {self.preset!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
        return self


# --------------------------------------------------------------------------------------------
# Training, loss, scoring
# --------------------------------------------------------------------------------------------


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule."""

    name: Literal["adamw_torch", "adamw_deepspeed"] = Field(
        "adamw_torch",
        description="adamw_torch: torch AdamW as DeepSpeed's client optimizer (no op compilation); "
        "adamw_deepspeed: DeepSpeed's own AdamW (FusedAdam on GPU, CPU-Adam on CPU or when offloaded; "
        "compiled on first use).",
    )
    lr: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate. Range: (0, 1].")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay. Range: [0, 1].")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    warmup_ratio: float = Field(
        0.03, ge=0, le=0.5, description="Fraction of steps with linear warm-up. Range: [0, 0.5]."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    grad_clip: float = Field(1.0, ge=0, description="Global grad-norm clip; 0 disables. Range: >= 0.")

    @model_validator(mode="after")
    def _check_betas(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: {list(self.betas)} must each be in [0, 1)")
        return self


class TrainingConfig(StrictModel):
    """How a model is trained: DeepSpeed ZeRO, precision, batch, schedule, checkpoints, seed."""

    model_config = _cross_field_rules(
        _when("precision", ("fp16",), {"properties": {"device": {"not": {"const": "cpu"}}}}),
    )

    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage. Range: 0..3.")
    offload_optimizer: bool = Field(False, description="Offload optimizer state to CPU (ZeRO 1-3).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPU. fp16 is refused on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    num_processes: int = Field(1, ge=1, le=4096, description="Processes (ranks) per node. Range: 1..4096.")
    num_nodes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Machines in the job, num_processes each. Above 1, each node is started on its own "
        "(a Kubernetes indexed Job, a Slurm step) with NODE_RANK (or JOB_COMPLETION_INDEX / SLURM_NODEID) "
        "and MASTER_ADDR (MASTER_PORT, default 29500) set; or from one node over ssh with hostfile. "
        "Range: 1..4096.",
    )
    hostfile: Path | None = Field(
        None,
        description="DeepSpeed hostfile ('host slots=N' lines, num_nodes of them) to start every node from "
        "this one over ssh; null: each node is started on its own (see num_nodes).",
    )
    batch_size: int = Field(
        16, ge=1, le=1_000_000, description="Global batch in sequences per optimizer step."
    )
    micro_batch_size: int = Field(8, ge=1, le=100_000, description="Sequences per forward pass per process.")
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split. Range: (0, 1000].")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between checkpoints. Range: >= 1.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept. Range: 1..100.")
    eval_every: int = Field(100, ge=1, description="Optimizer steps between validation losses. Range: >= 1.")
    seed: int = Field(0, ge=0, description="Seed of data order, dropout and init. Range: >= 0.")

    resume: Literal["auto", "never", "require"] = Field(
        "auto",
        description="auto: resume from the newest intact checkpoint, else start clean; never: always start "
        "clean; require: fail unless a checkpoint can be resumed.",
    )

    @model_validator(mode="after")
    def _check_precision(self) -> TrainingConfig:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError(
                "precision: 'fp16' is not supported by DeepSpeed on CPU; use fp32 (or bf16, ~5-30x slower)"
            )
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> TrainingConfig:
        per_step = self.micro_batch_size * self.world_size
        if self.batch_size % per_step != 0:
            raise ValueError(
                f"batch_size: {self.batch_size} must be a multiple of micro_batch_size x num_processes x "
                f"num_nodes = {self.micro_batch_size} x {self.num_processes} x {self.num_nodes} = {per_step}"
            )
        return self

    @property
    def world_size(self) -> int:
        """Processes in the whole job: num_processes on each of num_nodes machines."""
        return self.num_processes * self.num_nodes

    @property
    def grad_accumulation_steps(self) -> int:
        """Micro-batches accumulated per optimizer step on each process."""
        return self.batch_size // (self.micro_batch_size * self.world_size)


class FinetuneConfig(StrictModel):
    """Supervised fine-tuning of the teacher on the training split (the paper distils fine-tuned teachers)."""

    enabled: bool = Field(True, description="Fine-tune the teacher before scoring it.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Its training settings.")


DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


class LossConfig(StrictModel):
    """The distillation objective (docs/architecture.md, "The method")."""

    model_config = _cross_field_rules(
        _when(
            "split_scope",
            ("threshold",),
            {
                "properties": {"unc_threshold": {"type": "number"}, "hard_fraction": {"type": "number"}},
                "required": ["unc_threshold"],
            },
        ),
    )

    objective: Literal["sft", "kd", "atkd"] = Field(
        "atkd", description="sft: cross-entropy; kd: a divergence; atkd."
    )
    divergence: Literal[DIVERGENCES] = Field(  # type: ignore[valid-type]
        "forward_kl",
        description=f"Token-level divergence for objective kd. Allowed: {', '.join(DIVERGENCES)}.",
    )
    setting: Literal["forward", "reverse"] = Field(
        "forward", description="ATKD over KL(teacher||student) (forward) or KL(student||teacher) (reverse)."
    )
    hard_fraction: float | Literal["auto"] = Field(
        0.5,
        description="ATKD k: share of tokens (highest teacher UNC) that are hard. auto: a fixed UNC "
        "threshold at the valley of the teacher's UNC histogram over the training split (Otsu's rule, "
        "from the scoring cache), the same for every batch. Range: (0, 1) or auto.",
    )
    lam: float = Field(
        0.2, ge=0, le=1, description="ATKD lambda: weight of the easy-token loss. Range: [0, 1]."
    )
    split_scope: Literal["batch", "sequence", "threshold"] = Field(
        "batch",
        description="Where the easy/hard split is taken: the micro-batch, each row, or a fixed UNC threshold.",
    )
    unc_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="UNC at or above which a token is hard (split_scope=threshold). Range: [0, 1].",
    )
    temperature: float = Field(
        1.0, gt=0, le=100, description="Softmax temperature on both sides. Range: (0, 100]."
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD beta (GKD). Range: [0, 1].")
    skew_alpha: float = Field(0.1, ge=0, le=1, description="Skew KL alpha (DistiLLM). Range: [0, 1].")
    ce_weight: float = Field(
        0.0, ge=0, le=1, description="Weight of cross-entropy mixed into KD/ATKD. Range: [0, 1]."
    )
    chunk_size: int | Literal["auto"] | None = Field(
        "auto",
        description="Tokens per chunk of vocabulary-sized work; auto: sized by memory, 4M logits a chunk on "
        "plain logits (128 tokens at V=32000), 32M with a fused output layer (256 tokens at V=128000), the "
        "fastest measured on CPU; null for unchunked. Range: >= 1, auto or null.",
    )
    fused_linear: bool = Field(
        True,
        description="Apply the student's (and an online teacher's) output layer inside the loss, chunk by "
        "chunk, so the [tokens, vocabulary] logits are never built; false: plain logits (the same values).",
    )

    @field_validator("hard_fraction", mode="before")
    @classmethod
    def _check_hard_fraction(cls, value: Any) -> Any:
        # One message for both forms (a union would report one line per member).
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number in (0, 1) or auto") from None
        if isinstance(value, bool) or not 0 < number < 1:
            raise ValueError("must be a number in (0, 1) or auto")
        return number

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _check_chunk_size(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("must be a number of tokens >= 1, auto or null")
        return value

    @model_validator(mode="after")
    def _check_threshold(self) -> LossConfig:
        if self.hard_fraction == "auto" and self.split_scope == "threshold":
            raise ValueError(
                "loss.hard_fraction: auto chooses the UNC threshold itself; it cannot be combined with "
                "loss.split_scope 'threshold' (drop one of them)"
            )
        if self.split_scope == "threshold" and self.unc_threshold is None:
            raise ValueError("loss.unc_threshold: must be set when loss.split_scope is 'threshold'")
        return self


class ScoringConfig(StrictModel):
    """The offline teacher cache (one teacher pass over the training split)."""

    top_k: int = Field(
        64, ge=1, le=4096, description="Teacher top-K token ids and log-probs kept per token. Range: 1..4096."
    )
    storage_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of cached log-probs."
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per teacher forward. Range: 1..4096.")
    shard_size: int = Field(1024, ge=1, description="Examples per shard. Range: >= 1.")


class DistillConfig(StrictModel):
    """Training the student against the teacher."""

    model_config = _cross_field_rules(
        _when(
            "data_source",
            ("student_generated", "on_policy"),
            {
                "properties": {"teacher_source": {"const": "online"}, "sft_warmup_epochs": {"maximum": 0}},
                "required": ["teacher_source"],
            },
        ),
    )

    teacher_source: Literal["offline", "online"] = Field(
        "offline",
        description="offline: the scoring cache, no teacher in memory; online: teacher forward in the loop.",
    )
    data_source: Literal["ground_truth", "teacher_generated", "student_generated", "on_policy"] = Field(
        "ground_truth",
        description="Supervised KD / SeqKD / ImitKD / GKD-style mixing (generated ones need online).",
    )
    generation_max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Longest teacher response for teacher_generated data. Range: 1..4096."
    )
    generation_temperature: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Sampling temperature of teacher_generated data; 0 is greedy. Range: [0, 10].",
    )
    on_policy_ratio: float = Field(
        0.5, ge=0, le=1, description="Share of student-generated batches (on_policy). Range: [0, 1]."
    )
    sft_warmup_epochs: float = Field(
        0.0,
        ge=0,
        le=100,
        description=(
            "Epochs of plain cross-entropy on the training responses before the distillation loss "
            "takes over, added to training's budget (the same for every objective): a stand-in for "
            "the pretrained student the paper starts from. Range: [0, 100]."
        ),
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Its training settings.")

    @model_validator(mode="after")
    def _generated_needs_online(self) -> DistillConfig:
        if self.data_source in ("student_generated", "on_policy") and self.teacher_source != "online":
            raise ValueError(
                f"teacher_source: 'offline' cannot serve data_source {self.data_source!r}; set teacher_source: online"
            )
        if self.sft_warmup_epochs > 0 and self.data_source in ("student_generated", "on_policy"):
            raise ValueError(
                f"sft_warmup_epochs: {self.sft_warmup_epochs} needs fixed responses; data_source "
                f"{self.data_source!r} generates them during training (use ground_truth or teacher_generated)"
            )
        return self


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
        trained_vocabulary = self.tokenizer.pad_to or self.tokenizer.vocab_size
        if self.tokenizer.source == "train" and self.scoring.top_k > trained_vocabulary:
            raise ValueError(
                f"scoring.top_k: {self.scoring.top_k} is over the trained tokenizer's vocabulary "
                f"(tokenizer.{'pad_to' if self.tokenizer.pad_to else 'vocab_size'} = {trained_vocabulary}); "
                f"set it to at most {trained_vocabulary}"
            )
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


# --------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# --------------------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.lam=0.5")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: VALUE is not valid YAML ({problem}); quote it, e.g. {key}='\"...\"'"
            ) from None
        set_field(raw, key, value, f"--set {item!r}")
    return raw


def set_field(raw: dict[str, Any], dotted_key: str, value: Any, what: str) -> None:
    """Set ``a.b.c`` in a raw config dict, creating sections; ``what`` names the change in errors."""
    parts = [p for p in dotted_key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{what}: empty key")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate.

    Raises ConfigError with one line per problem; never a traceback for user error.
    """
    raw = read_yaml_mapping(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides or []), str(path) if path else "config")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError when it is missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not loaded:
        # All defaults would write to runs/demo under whatever directory the command ran in.
        raise ConfigError(
            f"{path}: the config is empty (all defaults would write to runs/demo under the current "
            "directory); give at least workdir (atkd config schema lists every field)"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def validate_config(raw: dict[str, Any], source: str) -> PipelineConfig:
    """A PipelineConfig from a raw mapping; ConfigError (one line per problem, named by ``source``)."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: ``<source>: <field.path> = <value>: <problem>; allowed: <range>``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        allowed = _allowed_for(err["loc"])
        if err["type"] == "extra_forbidden":
            line = f"{source}: {loc}: unknown field"
        elif err["type"] == "missing":
            line = f"{source}: {loc}: required field is missing"
        elif err["type"] == "value_error" and isinstance(value, dict):
            # A cross-field check: its message already names the field it is about.
            line = f"{source}: {(loc + ': ') if loc else ''}{message}"
        else:
            line = f"{source}: {loc} = {_short(value)}: {message}"
        if allowed and "allowed" not in line:
            line += f"; allowed: {allowed}"
        lines.append(line)
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_for(loc: tuple[Any, ...]) -> str | None:
    """Describe a field's allowed values from its annotation and constraints, walking ``loc``."""
    model: Any = PipelineConfig
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _inner_model(field.annotation)
    if field is None:
        return None
    bounds = []
    for meta in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if isinstance(meta, annotated_types.BaseMetadata) and bound is not None:
                bounds.append(f"{symbol} {bound}")
    if bounds:
        return " and ".join(bounds)
    mixed_union = get_origin(field.annotation) is not Literal and any(
        get_origin(arg) is not Literal and arg is not type(None) for arg in get_args(field.annotation)
    )
    if mixed_union and field.description and "Range: " in field.description:
        # e.g. a number or "auto": the literal alone would read as the only choice.
        return field.description.rsplit("Range: ", 1)[1].rstrip(".")
    choices = _literal_choices(field.annotation)
    if choices:
        return ", ".join(repr(c) for c in choices)
    return None


def _inner_model(annotation: Any) -> Any:
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def config_to_yaml(config: PipelineConfig) -> str:
    """The resolved config as YAML (paths as strings), loadable again by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
