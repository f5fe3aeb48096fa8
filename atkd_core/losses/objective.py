"""The loss a training step calls, built once from ``LossConfig``: where the config stops.

``build_objective(loss)`` turns the objective's name, divergence, k, lambda, temperature and
chunking into one callable; the training loop hands it the student (logits, or a ``LinearHead``:
hidden states and the output layer, fused with the loss), the teacher when the objective needs
one, the targets and the step's denominators, and gets the loss back. The loop therefore knows
nothing about ATKD or any divergence, and a new objective is a new class here. See
docs/architecture.md, "From a batch to the loss".

Each objective is one pass over the student's logits: its teacher terms and the cross-entropy (the
``ce_weight`` term, and the ``ce`` every step logs) are columns of the same chunked reduction, so
a fused head is multiplied out once per step whatever is logged.

Normalisation: every loss is a sum over tokens divided by step-wide counts (``StepCounts``), so
the sum of the micro-batch losses of an optimizer step does not depend on how the step is split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor
from torch.nn import functional

from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.losses.adaptive import (
    AdaKDSelection,
    FocusRatio,
    TAIDSchedule,
    adakd_terms,
    divergence_fn,
    focus_tokens,
    hellinger_scores,
    taid_terms,
)
from atkd_core.losses.atkd import ATKDParams, atkd_terms
from atkd_core.losses.cross_tokenizer import (
    CrossTeacher,
    SpanBatch,
    span_atkd_loss,
    span_atkd_terms,
    span_hybrid,
    span_uld,
)
from atkd_core.losses.divergences import divergence_terms
from atkd_core.losses.engine import Terms, cross_entropy_terms, weighted_token_sum
from atkd_core.losses.inputs import LinearHead, Teacher, flatten_inputs, flatten_student, label_rows
from atkd_core.losses.uncertainty import hard_token_mask

if TYPE_CHECKING:
    from atkd_core.config import LossConfig

# Logits per chunk when the chunk size is "auto". Plain logits: 16 MiB of float32, the size that
# ran fastest on CPU at every vocabulary measured (128 tokens at V = 32k, 4096 at V = 1k). A fused
# head multiplies each chunk out of the hidden states, and matmuls of a few dozen rows waste the
# BLAS: 128 MiB (256 tokens at V = 128k) ran 2.1x faster than 32 tokens for SFT, 1.6x for ATKD,
# at the same peak (benchmarks/memory_bench.py), still far below the model's own memory.
AUTO_CHUNK_LOGITS = 1 << 22
AUTO_FUSED_CHUNK_LOGITS = 1 << 25

Student = Tensor | LinearHead


def chunk_tokens(
    chunk_size: int | Literal["auto"] | None, vocab_size: int, fused: bool = False
) -> int | None:
    """Tokens per chunk: as configured, or for "auto" the most that keep one block of logits within
    its budget (AUTO_FUSED_CHUNK_LOGITS for a fused head, else AUTO_CHUNK_LOGITS; at least 1);
    None stays None (unchunked)."""
    if chunk_size == "auto":
        return max(1, (AUTO_FUSED_CHUNK_LOGITS if fused else AUTO_CHUNK_LOGITS) // vocab_size)
    return chunk_size


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


def _no_diagnostics(_values: Tensor) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class TeacherTerms:
    """An objective's loss against the teacher before the reduction.

    terms: the weighted per-token columns, the cross-entropy column last. diagnostics: named values
    to log, from the step's per-token terms ``values`` [N, M] the reduction returns.
    """

    terms: Terms
    diagnostics: Callable[[Tensor], dict[str, float]] = _no_diagnostics


class Objective(ABC):
    """A training loss: ``objective(student, teacher, targets, counts) -> ObjectiveOutput``.

    needs_teacher: whether the caller must pass a teacher (dense logits, a LinearHead or a
        SparseTeacher).
    hard_threshold: when set, tokens whose teacher UNC is at or above it are hard, and the caller
        passes the step's easy and hard counts in ``StepCounts`` (a split independent of batching).
    monitored: set by objectives that adapt across steps (TAID, AdaKD): the caller averages that
        diagnostic over each optimizer step, calls ``end_step`` with it, and checkpoints
        ``state_dict``.
    """

    needs_teacher: bool = False
    hard_threshold: float | None = None
    # The diagnostic an adaptive objective follows from step to step (end_step gets it averaged over
    # the step's micro-batches and ranks); None for an objective with no state.
    monitored: str | None = None
    # Whether the terms read which sequence each token is in (ATKD's per-sequence split): the rows
    # without a target are then kept, in their [B, T] layout.
    needs_sequences: bool = False

    def __init__(
        self, chunk_size: int | Literal["auto"] | None, ce_weight: float, compiled: bool = False
    ) -> None:
        """compiled: each chunk's math compiled (engine.chunk_loss_fn), the same values as eager."""
        self.chunk_size, self.ce_weight, self.compiled = chunk_size, ce_weight, compiled

    def __call__(
        self, student: Student, teacher: Teacher | CrossTeacher | None, targets: Tensor, counts: StepCounts
    ) -> ObjectiveOutput:
        """student: logits [B, T, V] or a LinearHead over hidden [B, T, H]; teacher the same shape, a
        SparseTeacher, or None when not needed; targets [B, T]."""
        if isinstance(teacher, CrossTeacher):
            raise ValueError(
                f"{type(self).__name__} compares tokens; a teacher with its own tokenizer needs CrossTokenizer"
            )
        chunk = chunk_tokens(self.chunk_size, student.shape[-1], fused=isinstance(student, LinearHead))
        # Always the last column: the cross-entropy is logged for every objective, whatever its weight.
        teacher_terms = None
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"{type(self).__name__} needs a teacher")
            flat_student, flat_teacher, flat_targets = flatten_inputs(student, teacher, targets)
            if not self.needs_sequences:
                # Only rows with a target carry loss: a fused head makes no logits for the others.
                flat_student, cut_teacher, flat_targets = label_rows(flat_student, flat_teacher, flat_targets)
                assert cut_teacher is not None, "a teacher stays a teacher"
                teacher, flat_teacher, targets = cut_teacher, cut_teacher, flat_targets
            ce = cross_entropy_terms(flat_targets, counts.tokens, self.ce_weight)
            teacher_terms = self.teacher_terms(
                teacher, flat_teacher, targets, counts, chunk, ce, flat_student
            )
        else:
            flat_student, flat_targets = flatten_student(student, targets)
            flat_student, _, flat_targets = label_rows(flat_student, None, flat_targets)
            ce = cross_entropy_terms(flat_targets, counts.tokens, self.ce_weight)
        terms = ce if teacher_terms is None else teacher_terms.terms
        loss, values = weighted_token_sum(
            flat_student, terms.weights.to(flat_student.device), terms.fn, chunk, compiled=self.compiled
        )
        valid = (flat_targets != IGNORE_INDEX).to(values.dtype)
        cross_entropy = float((values[:, -1] * valid).sum()) / counts.tokens
        diagnostics = {} if teacher_terms is None else teacher_terms.diagnostics(values)
        return ObjectiveOutput(loss, cross_entropy, diagnostics)

    def teacher_terms(
        self,
        teacher: Teacher,
        flat_teacher: Teacher,
        targets: Tensor,
        counts: StepCounts,
        chunk: int | None,
        ce: Terms,
        flat_student: Student,
    ) -> TeacherTerms | None:
        """The terms against the teacher with ``ce`` (the cross-entropy column) last; None for
        objectives without a teacher.

        ``chunk``: tokens per chunk of vocabulary-sized work (e.g. a dense teacher's UNC).
        ``flat_student``: the student's [N, V] logits or head, for objectives whose weights depend
        on it (read without gradient)."""
        return None

    def end_step(self, value: float, progress: float) -> dict[str, float]:
        """Adapt after an optimizer step: ``value`` is the step's ``monitored`` diagnostic (the same
        on every rank), ``progress`` the share of this objective's steps done. Returns the state
        to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps (empty for an objective that does not adapt)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s values; ValueError for state this objective does not hold."""
        if state:
            raise ValueError(f"{type(self).__name__} holds no state, got {sorted(state)}")

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the loss is (for model cards and logs)."""


class CrossEntropy(Objective):
    """Plain cross-entropy on the targets: teacher fine-tuning, SFT, and the SFT warm-up."""

    def __init__(self, chunk_size: int | Literal["auto"] | None = "auto", compiled: bool = False) -> None:
        super().__init__(chunk_size, ce_weight=1.0, compiled=compiled)

    def describe(self) -> str:
        """See Objective.describe."""
        return "supervised fine-tuning (cross-entropy)"


class Divergence(Objective):
    """One token-level divergence (forward / reverse KL, JSD, TVD, skew KL) over every valid token,
    plus ``ce_weight`` x cross-entropy."""

    needs_teacher = True

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        temperature: float,
        chunk_size: int | Literal["auto"] | None,
        ce_weight: float,
        compiled: bool = False,
    ) -> None:
        super().__init__(chunk_size, ce_weight, compiled)
        self.name, self.params, self.temperature = name, params, temperature

    def teacher_terms(
        self,
        teacher: Teacher,
        flat_teacher: Teacher,
        targets: Tensor,
        counts: StepCounts,
        chunk: int | None,
        ce: Terms,
        flat_student: Student,
    ) -> TeacherTerms:
        """The divergence over the step's token count, then the cross-entropy."""
        terms = divergence_terms(
            self.name,
            flat_teacher,
            targets.reshape(-1),
            temperature=self.temperature,
            num_tokens=counts.tokens,
            cross_entropy=ce,
            params=self.params,
        )
        return TeacherTerms(terms)

    def describe(self) -> str:
        """See Objective.describe."""
        params = "".join(f", {key}={value}" for key, value in self.params.items())
        return f"kd ({self.name}{params}, T={self.temperature}, ce_weight={self.ce_weight})"


class ATKD(Objective):
    """ATKD: DKD on easy tokens, TKD + DKD on hard ones, ``lam`` weighting the easy group; plus
    ``ce_weight`` x cross-entropy."""

    needs_teacher = True

    def __init__(self, loss: LossConfig, compiled: bool = False) -> None:
        super().__init__(loss.chunk_size, loss.ce_weight, compiled)
        self.config = loss
        self.params = ATKDParams(
            hard_fraction=float(loss.hard_fraction),
            lam=loss.lam,
            setting=loss.setting,
            temperature=loss.temperature,
            split_scope=loss.split_scope,
            unc_threshold=loss.unc_threshold,
        )
        self.hard_threshold = loss.unc_threshold if loss.split_scope == "threshold" else None
        self.needs_sequences = loss.split_scope == "sequence"

    def teacher_terms(
        self,
        teacher: Teacher,
        flat_teacher: Teacher,
        targets: Tensor,
        counts: StepCounts,
        chunk: int | None,
        ce: Terms,
        flat_student: Student,
    ) -> TeacherTerms:
        """The ATKD terms, the cross-entropy, and per-group TKD / DKD means and sizes to log.

        With step-wide group counts (a fixed threshold and a caller that counted the step's groups)
        each group is normalised by the step's count; otherwise by this micro-batch's, a mean that
        DeepSpeed's averaging over micro-batches and ranks turns into their mean (the paper's split).
        """
        step_counts = None if counts.easy is None or counts.hard is None else (counts.easy, counts.hard)
        terms, groups = atkd_terms(teacher, flat_teacher, targets, self.params, chunk, step_counts, ce)

        def diagnostics(values: Tensor) -> dict[str, float]:
            means = {name: float(mean) for name, mean in groups.means(values).items()}
            return {**means, "num_easy": int(groups.easy.sum()), "num_hard": int(groups.hard.sum())}

        return TeacherTerms(terms, diagnostics)

    def describe(self) -> str:
        """See Objective.describe."""
        loss = self.config
        return (
            f"atkd ({loss.setting} setting, k={loss.hard_fraction}, lambda={loss.lam}, "
            f"split {loss.split_scope}, T={loss.temperature}, ce_weight={loss.ce_weight})"
        )


class StepState(Protocol):
    """What an adaptive objective carries from step to step (adaptive.TAIDSchedule, FocusRatio)."""

    def update(self, loss: float, progress: float) -> None:
        """Fold in a step's monitored loss; ``progress``: share of the steps done."""

    @property
    def logged(self) -> dict[str, float]:
        """The state a step's metrics record."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s values."""


def _first_column_total(terms: Terms) -> Callable[[Tensor], float]:
    """The loss's first column summed with its weights, from the step's per-token values [N, M]."""

    def total(values: Tensor) -> float:
        return float((values[:, 0] * terms.weights[:, 0].to(values.device)).sum())

    return total


class AdaptiveObjective(Objective):
    """An objective whose ``state`` moves after each optimizer step (``end_step``), from the
    ``monitored`` diagnostic, and is checkpointed."""

    state: StepState

    def end_step(self, value: float, progress: float) -> dict[str, float]:
        """Move the state after a step whose monitored value was ``value``."""
        self.state.update(value, progress)
        return self.state.logged

    def state_dict(self) -> dict[str, Any]:
        """See Objective.state_dict."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See Objective.load_state_dict."""
        self.state.load_state_dict(state)


class TAID(AdaptiveObjective):
    """TAID (losses/adaptive.py): forward KL to an interpolation of the student's own (detached)
    and the teacher's distribution whose weight t rises over training; plus ``ce_weight`` x
    cross-entropy."""

    needs_teacher = True
    monitored = "taid_kl"
    state: TAIDSchedule

    def __init__(self, loss: LossConfig, compiled: bool = False) -> None:
        super().__init__(loss.chunk_size, loss.ce_weight, compiled)
        self.temperature = loss.temperature
        settings = loss.taid
        self.state = TAIDSchedule(settings.t_start, settings.t_end, settings.alpha, settings.beta)

    def teacher_terms(
        self,
        teacher: Teacher,
        flat_teacher: Teacher,
        targets: Tensor,
        counts: StepCounts,
        chunk: int | None,
        ce: Terms,
        flat_student: Student,
    ) -> TeacherTerms:
        """The KL to the interpolated target over the step's token count, then the cross-entropy."""
        t = torch.tensor(self.state.t, dtype=torch.float32, device=targets.device)
        terms = taid_terms(
            flat_teacher,
            targets.reshape(-1),
            t,
            temperature=self.temperature,
            num_tokens=counts.tokens,
            cross_entropy=ce,
        )
        kl = _first_column_total(terms)
        return TeacherTerms(terms, lambda values: {"taid_kl": kl(values)})

    def describe(self) -> str:
        """See Objective.describe."""
        schedule = self.state
        return (
            f"taid (t {schedule.t_start} -> {schedule.t_end}, alpha={schedule.alpha}, beta={schedule.beta}, "
            f"T={self.temperature}, ce_weight={self.ce_weight})"
        )


class AdaKD(AdaptiveObjective):
    """AdaKD (losses/adaptive.py): ``loss.divergence`` on the micro-batch's hardest tokens only
    (the share moves with the loss, LATF), each at a temperature from its difficulty (IDTS); plus
    ``ce_weight`` x cross-entropy."""

    needs_teacher = True
    monitored = "adakd_loss"
    state: FocusRatio

    def __init__(self, loss: LossConfig, compiled: bool = False) -> None:
        super().__init__(loss.chunk_size, loss.ce_weight, compiled)
        self.loss_config = loss
        settings = loss.adakd
        self.divergence = divergence_fn(loss.divergence, divergence_params(loss))
        self.state = FocusRatio(
            step=settings.ratio_step,
            tolerance=settings.loss_tolerance,
            decay=settings.loss_average,
            min_ratio=settings.min_ratio,
            start=settings.start,
        )

    def teacher_terms(
        self,
        teacher: Teacher,
        flat_teacher: Teacher,
        targets: Tensor,
        counts: StepCounts,
        chunk: int | None,
        ce: Terms,
        flat_student: Student,
    ) -> TeacherTerms:
        """Score the tokens, keep the hardest share, temper each; the divergence's mean over them,
        then the cross-entropy."""
        temperature = self.loss_config.temperature
        scores = hellinger_scores(flat_student, flat_teacher, temperature, chunk)
        valid = targets.reshape(-1) != IGNORE_INDEX
        selected, factors = focus_tokens(
            scores, valid, self.state.ratio, self.loss_config.adakd.temperature_scale
        )
        terms = adakd_terms(
            self.divergence,
            flat_teacher,
            AdaKDSelection(selected, factors),
            temperature=temperature,
            cross_entropy=ce,
        )
        distill, share = _first_column_total(terms), float(selected.sum()) / max(int(valid.sum()), 1)
        return TeacherTerms(terms, lambda values: {"adakd_loss": distill(values), "adakd_selected": share})

    def describe(self) -> str:
        """See Objective.describe."""
        loss = self.loss_config
        return (
            f"adakd ({loss.divergence} on the hardest tokens by Hellinger distance, temperature scale "
            f"{loss.adakd.temperature_scale}, T={loss.temperature}, ce_weight={self.ce_weight})"
        )


class CrossTokenizer(Objective):
    """Distillation from a teacher that tokenizes differently, span by span
    (``losses/cross_tokenizer.py``): ULD or the hybrid distance for objective kd
    (``loss.span_loss``), ATKD's split over spans for atkd; plus ``ce_weight`` x cross-entropy.

    The teacher is a ``CrossTeacher``. The student's logits are made only at its label rows (from a
    LinearHead, one matmul of those rows: no [B, T, V] block). ULD, the hybrid and the
    cross-entropy are sums (over spans, over tokens) divided by the step's student tokens, so
    micro-batching leaves the step's gradient unchanged; ATKD's group means are the micro-batch's,
    as token ATKD's are under split_scope batch (DeepSpeed averages them over micro-batches).
    """

    needs_teacher = True

    def __init__(self, loss: LossConfig, compiled: bool = False) -> None:
        super().__init__(loss.chunk_size, loss.ce_weight, compiled)
        self.config = loss

    def __call__(
        self, student: Student, teacher: Teacher | CrossTeacher | None, targets: Tensor, counts: StepCounts
    ) -> ObjectiveOutput:
        """student: logits [B, T, V] or a LinearHead over [B, T, H]; teacher: a CrossTeacher whose
        spans index the flattened [B * T] rows; targets [B, T]."""
        if not isinstance(teacher, CrossTeacher):
            raise ValueError("a cross-tokenizer objective needs the teacher as a CrossTeacher")
        if self.config.objective == "atkd" and self.config.split_scope == "sequence":
            raise ValueError("ATKD over spans splits the micro-batch or at a threshold, not per sequence")
        flat_student, flat_targets = flatten_student(student, targets)
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
        if isinstance(flat_student, LinearHead):
            logits = LinearHead(
                flat_student.hidden[rows], flat_student.weight, flat_student.bias, flat_student.vocab_size
            ).logits(0, rows.numel())
        else:
            logits = flat_student[rows]
        row_targets = flat_targets[rows]
        spans = _spans_on_rows(teacher.spans, rows, flat_targets.numel())
        loss_config = self.config
        ce_sum = functional.cross_entropy(logits.float(), row_targets, reduction="sum")
        diagnostics: dict[str, float] = {"num_spans": float(spans.num_spans)}
        if spans.num_spans == 0:
            distill = logits.sum() * 0.0  # no span: the cross-entropy alone, still with a graph
        elif loss_config.objective == "atkd":
            terms = span_atkd_terms(
                logits,
                row_targets,
                teacher.rows,
                teacher.targets,
                spans,
                teacher.teacher_to_student,
                loss_config.temperature,
                loss_config.setting,
            )
            hard, _ = hard_token_mask(
                terms.unc,
                torch.ones_like(terms.unc, dtype=torch.bool),
                hard_fraction=float(loss_config.hard_fraction),
                split_scope="threshold" if loss_config.split_scope == "threshold" else "batch",
                unc_threshold=loss_config.unc_threshold,
            )
            distill = span_atkd_loss(terms, hard, loss_config.lam)
            diagnostics.update(
                num_hard=float(hard.sum()),
                num_matched=float(terms.matched.sum()),
                tkd=float(terms.tkd.detach().mean()),
                dkd=float(terms.dkd.detach().mean()),
            )
        else:
            distance = (
                span_uld
                if loss_config.span_loss == "uld"
                else partial(span_hybrid, teacher_to_student=teacher.teacher_to_student)
            )
            distill = (
                distance(
                    logits,
                    row_targets,
                    teacher.rows,
                    teacher.targets,
                    spans,
                    temperature=loss_config.temperature,
                ).sum()
                / counts.tokens
            )
        loss = distill + self.ce_weight * ce_sum / counts.tokens
        return ObjectiveOutput(loss, float(ce_sum.detach()) / counts.tokens, diagnostics)

    def describe(self) -> str:
        """See Objective.describe."""
        loss = self.config
        if loss.objective == "atkd":
            what = (
                f"atkd over aligned spans ({loss.setting} setting, k={loss.hard_fraction}, lambda={loss.lam})"
            )
        else:
            what = f"{loss.span_loss} over aligned spans"
        return f"{what} across tokenizers (T={loss.temperature}, ce_weight={loss.ce_weight})"


def _spans_on_rows(spans: SpanBatch, rows: Tensor, num_rows: int) -> SpanBatch:
    """``spans`` with its student rows renumbered to positions in ``rows`` (the kept flat rows);
    every span row must be kept."""
    position = torch.full((num_rows,), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    student_span = spans.student_span.to(rows.device)
    kept = torch.full((rows.numel(),), -1, dtype=torch.long, device=rows.device)
    inside = student_span >= 0
    if bool((position[inside] < 0).any()):
        raise ValueError("a span covers a student row whose target is ignored")
    kept[position[inside]] = student_span[inside]
    return SpanBatch(
        student_span=kept,
        teacher_span=spans.teacher_span,
        student_first=position[spans.student_first.to(rows.device)],
        teacher_first=spans.teacher_first,
        matched=spans.matched,
    )


def divergence_params(loss: LossConfig) -> dict[str, float]:
    """The parameters of ``loss.divergence`` from the config (beta, alpha; none for most)."""
    return {
        "generalized_jsd": {"beta": loss.jsd_beta},
        "skew_forward_kl": {"alpha": loss.skew_alpha},
        "skew_reverse_kl": {"alpha": loss.skew_alpha},
        "alpha_beta": {"alpha": loss.abkd_alpha, "beta": loss.abkd_beta},
    }.get(loss.divergence, {})


def build_objective(loss: LossConfig, compiled: bool = False, cross_tokenizer: bool = False) -> Objective:
    """The training loss of ``loss.objective``: sft, kd (with ``loss.divergence``), atkd, taid or
    adakd; ``compiled``: its chunks' math compiled (see Objective). ``cross_tokenizer``: the
    teacher has its own tokenizer, and kd / atkd compare aligned spans (CrossTokenizer)."""
    if loss.objective == "sft":
        return CrossEntropy(loss.chunk_size, compiled)
    if cross_tokenizer:
        if loss.objective in ("taid", "adakd"):
            raise ValueError(
                f"loss.objective {loss.objective} compares tokens; across tokenizers use kd or atkd"
            )
        if loss.hard_fraction in ("auto", "epsilon") and loss.objective == "atkd":
            raise ValueError(
                f"loss.hard_fraction {loss.hard_fraction} is not defined over spans; give k or a threshold"
            )
        return CrossTokenizer(loss, compiled)
    if loss.objective == "kd":
        return Divergence(
            loss.divergence,
            divergence_params(loss),
            loss.temperature,
            loss.chunk_size,
            loss.ce_weight,
            compiled,
        )
    if loss.objective == "taid":
        return TAID(loss, compiled)
    if loss.objective == "adakd":
        return AdaKD(loss, compiled)
    if loss.hard_fraction in ("auto", "epsilon"):
        raise ValueError(
            f"loss.hard_fraction {loss.hard_fraction} must be resolved from the teacher's UNC histogram first "
            "(atkd_core.auto_split.resolve_split; the distillation job does it)"
        )
    return ATKD(loss, compiled)
