"""Objectives whose target moves during training: TAID and AdaKD, and the state they carry.

**TAID** (Shing et al., ICLR 2025, arXiv 2501.16937). The student learns from an intermediate
distribution ``p_t = softmax((1 - t) * log q' + t * log p)``, q' the student's own distribution
with no gradient, p the teacher's, by forward KL(p_t || q). ``t`` rises from ``t_start`` to
``t_end`` over training: after each optimizer step, with J the step's loss,
``delta = (J_prev - J) / J_prev``, ``m = beta * m + (1 - beta) * delta`` and
``t = min(t_end, max(t_linear, t + alpha * sigmoid(m) * (1 - t)))``, ``t_linear`` the straight line
from t_start to t_end over the steps. Against a top-K record the interpolation is taken over the
buckets (the top-K and the tail), as every divergence here is; it equals the dense one at K = V.

Choices the paper leaves open, taken from its released code or said here:

- the interpolation is of log-probabilities; the released code interpolates logits, which is the
  same distribution (softmax removes each row's constant);
- J is the KL, as the paper defines the objective; the released code monitors the cross-entropy
  ``-sum p_t log q`` (the KL plus the entropy of p_t), which changes the relative change it feeds
  to the momentum;
- t moves once per optimizer step, from the loss averaged over its micro-batches and ranks (so
  every rank holds the same t), and only in training; the released code also moves it on each
  validation batch;
- the first step only records J (no change yet), as the released code does.

**AdaKD** (Xie et al., AAAI 2026, arXiv 2510.11615). Two parts:

- *Loss-driven adaptive token focusing* (LATF): only the share ``ratio`` of each micro-batch's
  tokens that the student finds hardest is distilled, hardness scored per token by the Hellinger
  distance between student and teacher (the rule of the paper's released training script). The
  ratio starts at 1; after each step an exponential moving average of the distillation loss is
  compared with its value when the ratio last changed: a rise by more than ``tolerance`` of it
  widens the focus (ratio x (1 + step), at most 1), a fall by more than that narrows it (ratio x
  (1 - step), at least ``min_ratio``). The comparison starts after ``start`` of the steps.
- *Inverse difficulty temperature scaling* (IDTS): each selected token's temperature is the base
  temperature times ``exp(-c * tanh(log(s / median)))``, s its score and the median over the
  selected tokens: hard tokens sharpened, easy ones softened. Each token's divergence is weighted by
  its temperature factor squared, and the loss is their mean over the selected tokens (the
  released code's), a micro-batch mean as ATKD's batch split is.

Choices left open: the divergence applied to the selected tokens is ``loss.divergence`` (the
released script uses reverse KL); the score is computed at the base temperature with no gradient,
in a first pass over the student's logits (a fused output layer is multiplied out twice); against a
top-K record, scores and tempering are over the buckets, and the teacher's buckets are tempered as
they are recorded (exact at K = V; the tail's tempered mass is otherwise approximated by tempering
its sum); a median of zero (student equal to teacher on every selected token) leaves every factor
at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atkd_core.losses.divergences import DIVERGENCE_TERMS, DivergenceFn, mean_weights, token_terms
from atkd_core.losses.engine import Terms, combine, weighted_token_sum
from atkd_core.losses.inputs import (
    LinearHead,
    SparseTeacher,
    Teacher,
    dense_rows,
    flatten_inputs,
    teacher_rows,
)
from atkd_core.losses.kernels import picked_and_rest, scaled_logits
from atkd_core.losses.logprobs import full_logprobs, kl_from_logprobs, sparse_buckets


def taid_kl(log_p: Tensor, log_q: Tensor, t: Tensor) -> Tensor:
    """KL(p_t || q) per row with ``log p_t = log_softmax((1 - t) * log q' + t * log p)``, q' = q
    without gradient. [n, B] x 2 and a 0-d ``t`` -> [n]."""
    log_target = torch.log_softmax((1.0 - t) * log_q.detach() + t * log_p, -1)
    return kl_from_logprobs(log_target, log_q)


def taid_terms(
    flat_teacher: Teacher,
    flat_targets: Tensor,
    t: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_tokens: float | None = None,
    cross_entropy: Terms | None = None,
) -> Terms:
    """TAID's KL as one column weighted 1 / ``num_tokens`` (default: the valid tokens) on valid
    tokens, ``cross_entropy`` appended. ``t``: the interpolation weight as a 0-d float32 tensor (a
    tensor, so a compiled chunk is not recompiled each time t moves)."""

    def terms_of(log_p: Tensor, log_q: Tensor) -> Tensor:
        return taid_kl(log_p, log_q, t)

    return token_terms(
        terms_of,
        flat_teacher,
        flat_targets,
        mean_weights(flat_targets, num_tokens, ignore_index),
        temperature=temperature,
        cross_entropy=cross_entropy,
    )


def taid_loss(
    student_logits: Tensor | LinearHead,
    teacher: Teacher,
    targets: Tensor,
    t: float,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Mean TAID KL over valid tokens at interpolation weight ``t`` in [0, 1]; shapes as
    divergences.divergence_loss. Returns a float32 scalar."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    terms = taid_terms(
        flat_teacher,
        flat_targets,
        torch.tensor(t, dtype=torch.float32),
        temperature=temperature,
        ignore_index=ignore_index,
        num_tokens=num_tokens,
    )
    loss, _ = weighted_token_sum(student, *terms, chunk_size)
    return loss


@dataclass
class TAIDSchedule:
    """TAID's interpolation weight and what its update remembers (see the module docstring)."""

    t_start: float
    t_end: float
    alpha: float
    beta: float
    t: float = math.nan
    previous_loss: float | None = None
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if math.isnan(self.t):
            self.t = self.t_start

    def update(self, loss: float, progress: float) -> None:
        """Move t after a step whose loss was ``loss``, ``progress`` in [0, 1] of training done."""
        if self.previous_loss is None:
            self.previous_loss = loss
            return
        relative_change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        step = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        linear = self.t_start + (self.t_end - self.t_start) * min(max(progress, 0.0), 1.0)
        self.t = min(self.t_end, max(linear, self.t + step))
        self.previous_loss = loss

    @property
    def logged(self) -> dict[str, float]:
        """What a step's metrics record of the schedule."""
        return {"taid_t": self.t}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the schedule where it was."""
        return {"t": self.t, "previous_loss": self.previous_loss, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s values."""
        self.t, self.previous_loss, self.momentum = state["t"], state["previous_loss"], state["momentum"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@torch.no_grad()
def hellinger_scores(
    flat_student: Tensor | LinearHead, flat_teacher: Teacher, temperature: float, chunk_size: int | None
) -> Tensor:
    """The Hellinger distance between student and teacher per token, ``sqrt(sum (sqrt p - sqrt q)^2
    / 2)`` in [0, 1]: [N] float32, no gradient, over the vocabulary or the top-K buckets."""
    rows = flat_student.shape[0]
    step = chunk_size or max(rows, 1)
    scores = []
    for start in range(0, rows, step):
        end = min(start + step, rows)
        log_p, log_q = full_logprobs(
            dense_rows(flat_student, start, end).float(), teacher_rows(flat_teacher, start, end), temperature
        )
        scores.append(((0.5 * log_p).exp() - (0.5 * log_q).exp()).square().sum(-1).mul(0.5).sqrt())
    return torch.cat(scores) if scores else torch.zeros(0)


def focus_tokens(
    scores: Tensor, valid: Tensor, ratio: float, temperature_scale: float
) -> tuple[Tensor, Tensor]:
    """(selected [N] bool, temperature factors [N] float32) for AdaKD: the ``max(1, floor(ratio *
    valid tokens))`` valid tokens with the highest ``scores`` [N], and for each
    ``exp(-temperature_scale * tanh(log(score / median)))``, the median over the selected (1 on the
    others, and everywhere when that median is 0)."""
    factors = torch.ones_like(scores, dtype=torch.float32)
    selected = torch.zeros_like(valid)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return selected, factors
    num_selected = max(1, int(num_valid * ratio))
    ranked = torch.where(valid, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    chosen = ranked.topk(num_selected).indices
    selected[chosen] = True
    median = scores[chosen].float().median()
    if float(median) > 0:
        relative = (scores[chosen].float() / median).clamp(min=1e-8)
        factors[chosen] = torch.exp(-temperature_scale * torch.tanh(torch.log(relative)))
    return selected, factors


def tempered_logprobs(
    student: Tensor, teacher: Tensor | SparseTeacher, temperature: float, factors: Tensor
) -> tuple[Tensor, Tensor]:
    """(log p, log q) [n, B] as full_logprobs at a temperature of ``temperature * factors`` per row
    (factors [n]); a sparse record, already at ``temperature``, has its buckets tempered by the
    factors."""
    per_row = factors.float()[:, None]
    if isinstance(teacher, Tensor):
        log_p = torch.log_softmax(scaled_logits(teacher, temperature) / per_row, -1)
        return log_p, torch.log_softmax(student.float() / (temperature * per_row), -1)
    log_p = torch.log_softmax(sparse_buckets(teacher, student.shape[-1]) / per_row, -1)
    topk, tail = picked_and_rest(student.float() / per_row, teacher.topk_ids.long(), temperature)
    buckets = torch.cat([topk, tail[:, None]], -1)
    return log_p, buckets - buckets.logsumexp(-1, keepdim=True)


@dataclass(frozen=True)
class AdaKDSelection:
    """Which tokens a micro-batch distils and how: ``selected`` [N] bool, ``factors`` [N] the
    temperature factor of each (1 elsewhere)."""

    selected: Tensor
    factors: Tensor


def adakd_terms(
    divergence: DivergenceFn,
    flat_teacher: Teacher,
    selection: AdaKDSelection,
    *,
    temperature: float = 1.0,
    cross_entropy: Terms | None = None,
) -> Terms:
    """AdaKD's column: ``divergence`` at each selected token's temperature, weighted by its factor
    squared over the number selected; ``cross_entropy`` appended as its own column."""
    count = max(int(selection.selected.sum()), 1)
    weights = (selection.selected.float() * selection.factors.square() / count)[:, None]
    factors = selection.factors

    def fn(start: int, end: int, chunk: Tensor) -> Tensor:
        log_p, log_q = tempered_logprobs(
            chunk, teacher_rows(flat_teacher, start, end), temperature, factors[start:end]
        )
        return divergence(log_p, log_q)[:, None]

    distill = Terms(weights, fn)
    return distill if cross_entropy is None else combine(distill, cross_entropy)


def adakd_loss(
    student_logits: Tensor | LinearHead,
    teacher: Teacher,
    targets: Tensor,
    *,
    divergence: str = "reverse_kl",
    ratio: float = 1.0,
    temperature_scale: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    **params: float,
) -> tuple[Tensor, AdaKDSelection]:
    """AdaKD on one micro-batch: (loss, the selection); shapes as divergences.divergence_loss,
    ``params`` the divergence's own. The loss is a float32 scalar."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    scores = hellinger_scores(student, flat_teacher, temperature, chunk_size)
    selection = AdaKDSelection(*focus_tokens(scores, flat_targets != ignore_index, ratio, temperature_scale))
    terms = adakd_terms(divergence_fn(divergence, params), flat_teacher, selection, temperature=temperature)
    loss, _ = weighted_token_sum(student, *terms, chunk_size)
    return loss, selection


def divergence_fn(name: str, params: dict[str, float]) -> DivergenceFn:
    """The per-row divergence ``name`` of DIVERGENCE_TERMS with its ``params`` bound:
    (log p, log q) [n, B] x 2 -> [n]."""
    if name not in DIVERGENCE_TERMS:
        raise ValueError(f"divergence {name!r} is unknown; allowed: {', '.join(DIVERGENCE_TERMS)}")
    terms_of = DIVERGENCE_TERMS[name]

    def divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        return terms_of(log_p, log_q, **params)

    return divergence


@dataclass
class FocusRatio:
    """AdaKD's share of tokens distilled and the loss average that moves it (LATF; see the module
    docstring)."""

    step: float
    tolerance: float
    decay: float
    min_ratio: float
    start: float
    ratio: float = 1.0
    average: float | None = None
    reference: float | None = None

    def update(self, loss: float, progress: float) -> None:
        """Fold a step's distillation loss into the average; move the ratio when it has risen or
        fallen by more than ``tolerance`` of the reference. ``progress``: share of training done."""
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        if self.reference is None:
            if progress > self.start:
                self.reference = self.average
            return
        change = self.reference - self.average
        margin = self.reference * self.tolerance
        if change < -margin:
            self.ratio = min(self.ratio * (1.0 + self.step), 1.0)
            self.reference = self.average
        elif change > margin:
            self.ratio = max(self.ratio * (1.0 - self.step), self.min_ratio)
            self.reference = self.average

    @property
    def logged(self) -> dict[str, float]:
        """What a step's metrics record of the focus."""
        return {"adakd_ratio": self.ratio}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the ratio where it was."""
        return {"ratio": self.ratio, "average": self.average, "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s values."""
        self.ratio, self.average, self.reference = state["ratio"], state["average"], state["reference"]
