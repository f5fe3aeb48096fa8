"""What a training stage is asked to do (``TrainJob``) and what it holds while it runs (``TrainState``).

A job travels to the ranks the DeepSpeed launcher starts as one JSON file (``TrainJob.save`` /
``TrainJob.load``), so every rank reads exactly the job the caller built. See
docs/architecture.md, "Training".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from atkd_core.auto_split import resolve_split
from atkd_core.config import PipelineConfig, TrainingConfig
from atkd_core.errors import CacheError
from atkd_core.losses.objective import CrossEntropy, Objective, build_objective
from atkd_core.manifest import content_identity, fingerprint, read_manifest
from atkd_core.outputs import CacheManifest
from atkd_core.storage import Location, as_location

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from atkd_core.training.batches import BatchPlan, Example
    from atkd_core.training.heads import OutputLayer
    from atkd_core.training.teacher import TeacherSource

MetricsFn = Callable[[dict[str, float], int], None]
Stage = Literal["finetune", "distill"]
PATH_FIELDS = ("prepared_dir", "init_dir", "output_dir", "checkpoint_dir", "cache_dir", "teacher_dir")


@dataclass
class TrainJob:
    """What one training stage reads and writes.

    stage: ``finetune`` (teacher SFT) or ``distill`` (student). init_dir: the model to start from.
    cache_dir: the teacher cache (offline distillation; a directory or a URL). teacher_dir: the teacher (online).
    output_dir: the final Hugging Face model; checkpoint_dir: DeepSpeed checkpoints (resume).
    """

    stage: Stage
    config: PipelineConfig
    prepared_dir: Path
    init_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    cache_dir: Location | None = None
    teacher_dir: Path | None = None

    @property
    def training(self) -> TrainingConfig:
        """The stage's training settings."""
        return self.config.finetune.training if self.stage == "finetune" else self.config.distill.training

    @property
    def objective(self) -> str:
        """sft for fine-tuning, else the configured loss objective."""
        return "sft" if self.stage == "finetune" else self.config.loss.objective

    @property
    def pack_capacity(self) -> int | None:
        """Tokens per packed row (data.max_length) when this stage packs its batches, else None:
        distillation split per sequence (loss.split_scope: sequence) or across tokenizers needs one
        example per row."""
        per_row_split = self.stage == "distill" and self.config.loss.split_scope == "sequence"
        # Aligned spans join each student row to its example's teacher rows: one example per row.
        one_example_a_row = per_row_split or (self.stage == "distill" and self.config.cross_tokenizer)
        return self.config.data.max_length if self.training.packing and not one_example_a_row else None

    def build_objective(self, compiled: bool = False) -> Objective:
        """The loss this stage trains on (cross-entropy for fine-tuning); ``compiled``: its chunks'
        math compiled (devices.compiles_loss of loss.compile)."""
        loss = self.config.loss
        if self.stage == "finetune":
            return CrossEntropy(loss.chunk_size, compiled)
        return build_objective(loss, compiled, cross_tokenizer=self.config.cross_tokenizer)

    def fingerprint(self) -> str:
        """What the trained model depends on: its settings and the contents of its inputs."""
        sections = ["finetune"] if self.stage == "finetune" else ["loss", "distill"]
        inputs = [self.prepared_dir, self.init_dir, self.cache_dir, self.teacher_dir]
        return fingerprint(
            {
                "stage": self.stage,
                "config": self.config.section_hash(*sections),
                "inputs": [None if p is None else content_identity(p) for p in inputs],
            }
        )

    def warmup_fingerprint(self) -> str:
        """What the state at the end of the SFT warm-up (distill.sft_warmup_epochs) depends on: this
        fingerprint less the objective. The warm-up trains cross-entropy alone, so distillations
        that differ only in their loss (or teacher) pass through the same model, optimizer, schedule
        and RNG at its end, and one of them can train it for all (checkpoint.shared_warmup_dir)."""
        loss = self.config.loss
        return fingerprint(
            {
                "stage": "distill sft warm-up",
                # distill: the warm-up's length, the optimizer, schedule and total steps, the seed.
                "config": self.config.section_hash("distill", "student"),
                # What the cross-entropy's arithmetic and the batches' shape depend on.
                "cross_entropy": [loss.chunk_size, loss.fused_linear, loss.compile, self.pack_capacity],
                "inputs": [content_identity(self.prepared_dir), content_identity(self.init_dir)],
            }
        )

    def save(self, path: Path) -> None:
        """Write the job as JSON (the resolved config and the paths) for launched ranks to load."""
        payload = {
            "stage": self.stage,
            "config": self.config.model_dump(mode="json"),
            **{
                name: None if getattr(self, name) is None else str(getattr(self, name))
                for name in PATH_FIELDS
            },
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        """The job ``save`` wrote; the config is validated again."""
        payload = json.loads(path.read_text())

        def optional(name: str) -> Path | None:
            return None if payload[name] is None else Path(payload[name])

        return cls(
            stage=payload["stage"],
            config=PipelineConfig.model_validate(payload["config"]),
            prepared_dir=Path(payload["prepared_dir"]),
            init_dir=Path(payload["init_dir"]),
            output_dir=Path(payload["output_dir"]),
            checkpoint_dir=Path(payload["checkpoint_dir"]),
            cache_dir=None if payload["cache_dir"] is None else as_location(payload["cache_dir"]),
            teacher_dir=optional("teacher_dir"),
        )


def finetune_job(config: PipelineConfig, prepared_dir: Path, teacher_init: Path) -> TrainJob:
    """The teacher fine-tuning stage in the run's standard layout under ``workdir``."""
    return TrainJob(
        stage="finetune",
        config=config,
        prepared_dir=prepared_dir,
        init_dir=teacher_init,
        output_dir=config.layout.teacher,
        checkpoint_dir=config.layout.checkpoints("finetune"),
    )


def distill_job(
    config: PipelineConfig, prepared_dir: Path, student_init: Path, cache_dir: Location, teacher_dir: Path
) -> TrainJob:
    """The distillation stage in the run's standard layout; the cache offline, the teacher online.

    ``loss.hard_fraction: auto`` or ``epsilon`` is resolved here, offline and online alike, from the
    cache's UNC histogram (the scoring pass over the training split): the job trains with, and is
    fingerprinted by, the concrete threshold.
    """
    if config.loss.hard_fraction in ("auto", "epsilon"):
        manifest = read_manifest(cache_dir, CacheManifest)
        if manifest is None:
            raise CacheError(
                f"{cache_dir}: no teacher cache, which loss.hard_fraction {config.loss.hard_fraction} is derived from"
            )
        config = config.model_copy(update={"loss": resolve_split(config.loss, manifest)})
    offline = config.distill.teacher_source == "offline"
    return TrainJob(
        stage="distill",
        config=config,
        prepared_dir=prepared_dir,
        init_dir=student_init,
        output_dir=config.layout.student,
        checkpoint_dir=config.layout.checkpoints("distill"),
        cache_dir=cache_dir if offline else None,
        teacher_dir=None if offline else teacher_dir,
    )


@dataclass
class TrainState:
    """Everything the loop carries between setup, train, save and cleanup.

    plan: which examples each step and rank trains on. objective: the loss after the warm-up;
    warmup_objective: the loss of the first ``warmup_steps`` steps (cross-entropy).
    teacher: where the teacher's distribution comes from (None when the objective needs none).
    output_layer: the student's output layer when the loss applies it (loss.fused_linear), else None.
    """

    engine: DeepSpeedEngine
    tokenizer: PreTrainedTokenizerBase
    plan: BatchPlan
    validation: list[Example]
    objective: Objective
    warmup_objective: Objective
    rank: int
    world_size: int
    total_steps: int
    # Leading steps trained on cross-entropy alone (distill.sft_warmup_epochs), inside total_steps.
    warmup_steps: int
    teacher: TeacherSource | None = None
    output_layer: OutputLayer | None = None
    # Tokens per packed row (TrainJob.pack_capacity), or None: batches are right-padded.
    pack_capacity: int | None = None
    start_step: int = 0
    # The warm-up's steps came from a shared warm-up (checkpoint.shared_warmup_dir), not this run.
    warmup_reused: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """The engine's device."""
        return self.engine.device


def auto_split_line(config: PipelineConfig, job: TrainJob) -> str | None:
    """One log line with what ``loss.hard_fraction: auto`` or ``epsilon`` resolved to for ``job``,
    or None."""
    if config.loss.hard_fraction not in ("auto", "epsilon"):
        return None
    loss = job.config.loss
    rule = (
        "Otsu's threshold on the cache's UNC histogram"
        if config.loss.hard_fraction == "auto"
        else "loss.unc_epsilon: only the teacher's near-certain tokens are easy"
    )
    share = float(loss.hard_fraction)
    line = (
        f"loss.hard_fraction {config.loss.hard_fraction}: hard if teacher UNC >= {loss.unc_threshold:.3f} "
        f"({rule}), {share:.1%} of the training tokens"
    )
    if share in (0.0, 1.0):
        line += (
            f"; the {'hard' if share == 0.0 else 'easy'} group is empty, so ATKD trains on one group alone"
        )
    return line
