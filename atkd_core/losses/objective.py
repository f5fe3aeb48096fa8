"""The loss a training step calls, built once from ``LossConfig``: where the config stops.

``build_objective(loss)`` turns the objective's name, divergence, k, lambda, temperature and
chunking into one callable; the training loop hands it the student's logits, the teacher (when the
objective needs one), the targets and the step's denominators, and gets the loss back. The loop
therefore knows nothing about ATKD or any divergence, and a new objective is a new class here.
See docs/architecture.md, "From a batch to the loss".

Normalisation: every loss is a sum over tokens divided by step-wide counts (``StepCounts``), so
the sum of the micro-batch losses of an optimizer step does not depend on how the step is split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from atkd_core.losses.atkd import atkd_loss
from atkd_core.losses.distributions import Teacher
from atkd_core.losses.divergences import divergence_loss

if TYPE_CHECKING:
    from atkd_core.config import LossConfig


@dataclass(frozen=True)
class StepCounts:
    """Denominators of one micro-batch's loss, from the whole optimizer step.

    tokens: valid target tokens of the step. easy / hard: the step's easy and hard tokens when the
    objective splits by a fixed UNC threshold (``Objective.hard_threshold``), else None.
    All are already divided by anything the trainer multiplies back (e.g. micro-batches per step).
    """

    tokens: float
    easy: float | None = None
    hard: float | None = None


@dataclass(frozen=True)
class ObjectiveOutput:
    """loss: float32 scalar with a gradient. cross_entropy: the (detached) cross-entropy of the
    same tokens over the same denominator, logged for every objective. diagnostics: named values
    the objective reports (ATKD: its TKD / DKD terms per group and the group sizes)."""

    loss: Tensor
    cross_entropy: float
    diagnostics: dict[str, float] = field(default_factory=dict)


def summed_cross_entropy(student_logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy summed over the valid tokens, in float32.

    student_logits [..., V] (any float dtype), targets [...] with ``ignore_index`` where not counted.
    """
    vocab = student_logits.shape[-1]
    return F.cross_entropy(
        student_logits.float().reshape(-1, vocab),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


class Objective(ABC):
    """A training loss: ``objective(student_logits, teacher, targets, counts) -> ObjectiveOutput``.

    needs_teacher: whether the caller must pass a teacher (dense logits or a SparseTeacher).
    hard_threshold: when set, tokens whose teacher UNC is at or above it are hard, and the caller
        passes the step's easy and hard counts in ``StepCounts`` (a split independent of batching).
    """

    needs_teacher: bool = False
    hard_threshold: float | None = None

    @abstractmethod
    def __call__(
        self, student_logits: Tensor, teacher: Teacher | None, targets: Tensor, counts: StepCounts
    ) -> ObjectiveOutput:
        """student_logits [B, T, V]; teacher the same shape, a SparseTeacher or None; targets [B, T]."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the loss is (for model cards and logs)."""


class CrossEntropy(Objective):
    """Plain cross-entropy on the targets: teacher fine-tuning, SFT, and the SFT warm-up."""

    def __call__(
        self, student_logits: Tensor, teacher: Teacher | None, targets: Tensor, counts: StepCounts
    ) -> ObjectiveOutput:
        """student_logits [B, T, V]; targets [B, T]; the teacher is ignored."""
        ce = summed_cross_entropy(student_logits, targets) / counts.tokens
        return ObjectiveOutput(ce, ce.item())

    def describe(self) -> str:
        """See Objective.describe."""
        return "supervised fine-tuning (cross-entropy)"


class _Distillation(Objective):
    """A teacher-matching term plus ``ce_weight`` x cross-entropy."""

    needs_teacher = True

    def __init__(self, ce_weight: float) -> None:
        self.ce_weight = ce_weight

    def __call__(
        self, student_logits: Tensor, teacher: Teacher | None, targets: Tensor, counts: StepCounts
    ) -> ObjectiveOutput:
        """student_logits [B, T, V]; teacher the same shape or a SparseTeacher; targets [B, T]."""
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        # Always computed: the cross-entropy is logged for every objective, whatever ce_weight is.
        ce = summed_cross_entropy(student_logits, targets) / counts.tokens
        matching, diagnostics = self.teacher_term(student_logits, teacher, targets, counts)
        return ObjectiveOutput(matching + self.ce_weight * ce, ce.item(), diagnostics)

    @abstractmethod
    def teacher_term(
        self, student_logits: Tensor, teacher: Teacher, targets: Tensor, counts: StepCounts
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss against the teacher and its diagnostics."""


class Divergence(_Distillation):
    """One token-level divergence (forward / reverse KL, JSD, TVD, skew KL) over every valid token."""

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        temperature: float,
        chunk_size: int | None,
        ce_weight: float,
    ) -> None:
        super().__init__(ce_weight)
        self.name, self.params, self.temperature, self.chunk_size = name, params, temperature, chunk_size

    def teacher_term(
        self, student_logits: Tensor, teacher: Teacher, targets: Tensor, counts: StepCounts
    ) -> tuple[Tensor, dict[str, float]]:
        """The divergence summed over valid tokens / the step's token count; no diagnostics."""
        loss = divergence_loss(
            self.name,
            student_logits,
            teacher,
            targets,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            num_tokens=counts.tokens,
            **self.params,
        )
        return loss, {}

    def describe(self) -> str:
        """See Objective.describe."""
        params = "".join(f", {key}={value}" for key, value in self.params.items())
        return f"kd ({self.name}{params}, T={self.temperature}, ce_weight={self.ce_weight})"


class ATKD(_Distillation):
    """ATKD: DKD on easy tokens, TKD + DKD on hard ones, ``lam`` weighting the easy group."""

    def __init__(self, loss: LossConfig) -> None:
        super().__init__(loss.ce_weight)
        self.config = loss
        self.hard_threshold = loss.unc_threshold if loss.split_scope == "threshold" else None

    def teacher_term(
        self, student_logits: Tensor, teacher: Teacher, targets: Tensor, counts: StepCounts
    ) -> tuple[Tensor, dict[str, float]]:
        """The ATKD loss and its per-group TKD / DKD means and sizes.

        With step-wide group counts (a fixed threshold and a caller that counted the step's groups)
        each group is normalised by the step's count; otherwise by this micro-batch's, a mean that
        DeepSpeed's averaging over micro-batches and ranks turns into their mean (the paper's split).
        """
        loss = self.config
        step_counts = None if counts.easy is None or counts.hard is None else (counts.easy, counts.hard)
        out = atkd_loss(
            student_logits,
            teacher,
            targets,
            hard_fraction=loss.hard_fraction,
            lam=loss.lam,
            setting=loss.setting,
            temperature=loss.temperature,
            split_scope=loss.split_scope,
            unc_threshold=loss.unc_threshold,
            chunk_size=loss.chunk_size,
            num_tokens=step_counts,
        )
        diagnostics = {
            "tkd_easy": float(out.tkd_easy),
            "dkd_easy": float(out.dkd_easy),
            "tkd_hard": float(out.tkd_hard),
            "dkd_hard": float(out.dkd_hard),
            "num_easy": out.num_easy,
            "num_hard": out.num_hard,
        }
        return out.loss, diagnostics

    def describe(self) -> str:
        """See Objective.describe."""
        loss = self.config
        return (
            f"atkd ({loss.setting} setting, k={loss.hard_fraction}, lambda={loss.lam}, "
            f"split {loss.split_scope}, T={loss.temperature}, ce_weight={loss.ce_weight})"
        )


def build_objective(loss: LossConfig) -> Objective:
    """The training loss of ``loss.objective``: sft, kd (with ``loss.divergence``) or atkd."""
    if loss.objective == "sft":
        return CrossEntropy()
    if loss.objective == "kd":
        params = {
            "generalized_jsd": {"beta": loss.jsd_beta},
            "skew_forward_kl": {"alpha": loss.skew_alpha},
            "skew_reverse_kl": {"alpha": loss.skew_alpha},
        }.get(loss.divergence, {})
        return Divergence(loss.divergence, params, loss.temperature, loss.chunk_size, loss.ce_weight)
    return ATKD(loss)
