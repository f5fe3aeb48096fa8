"""The teacher (dense logits or the sparse cached record) and the student as float32 log-probabilities.

Every loss works on two aligned log-probability tables ``[n, B]``: over the vocabulary (``B = V``,
dense teacher) or over the teacher's top-K tokens plus one "tail" bucket holding the rest of the
mass (``B = K + 1``, sparse teacher). Grouping tokens into buckets is a coarse-graining, so by the
data-processing inequality every f-divergence here (KL both ways, JSD, TVD, skew KL) computed on
the buckets is a lower bound of the dense value, equal to it when the top-K covers the vocabulary.

Masked entries hold MASK_LOGIT (see kernels.py), never ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atkd_core.losses.inputs import SparseTeacher
from atkd_core.losses.kernels import MASK_LOGIT, masked_log_softmax, picked_and_rest, teacher_logprobs

_LOG_HALF = math.log(0.5)
_LOG_FLOAT32_EPS = math.log(torch.finfo(torch.float32).eps)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); MASK_LOGIT where it is -inf."""
    x = x.clamp(max=0.0)
    near_zero = x > _LOG_HALF
    # Each branch is evaluated where it is accurate; the other's input is replaced so no NaN appears.
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b).clamp(min=MASK_LOGIT)


def sparse_tail(teacher: SparseTeacher, vocab_size: int) -> Tensor:
    """log of the teacher's mass outside its top-K: [n]. Exactly empty (MASK_LOGIT) when K = V,
    whatever rounding left in the record, because the student's tail is then exactly empty too."""
    if teacher.topk_ids.shape[-1] >= vocab_size:
        return torch.full_like(teacher.target_logprob, MASK_LOGIT, dtype=torch.float32)
    tail = teacher.log_tail_mass
    if tail is None:
        # 1 - sum(top-K) cannot be resolved below float32 resolution; flooring it there keeps the
        # reverse divergences finite where rounding would otherwise leave the teacher no tail.
        tail = log1mexp(teacher.topk_logprobs.float().logsumexp(-1)).clamp(min=_LOG_FLOAT32_EPS)
    return tail.float().clamp(min=MASK_LOGIT)


def sparse_buckets(teacher: SparseTeacher, vocab_size: int) -> Tensor:
    """The sparse teacher's log-probabilities over its top-K and the tail: [n, K + 1] float32."""
    return torch.cat([teacher.topk_logprobs.float(), sparse_tail(teacher, vocab_size)[:, None]], -1)


def full_logprobs(
    student: Tensor, teacher: Tensor | SparseTeacher, temperature: float
) -> tuple[Tensor, Tensor]:
    """(log p teacher, log q student) over the vocabulary or the top-K + tail buckets.

    student: [n, V] float32 logits (finite). teacher: [n, V] logits or a SparseTeacher of n rows.
    Returns two [n, B] float32 tables.
    """
    if isinstance(teacher, Tensor):
        return teacher_logprobs(teacher, temperature), torch.log_softmax(
            student if temperature == 1.0 else student / temperature, -1
        )
    log_p = sparse_buckets(teacher, student.shape[-1])
    topk, tail = picked_and_rest(student, teacher.topk_ids.long(), temperature)
    buckets = torch.cat([topk, tail[:, None]], -1)
    return log_p, buckets - buckets.logsumexp(-1, keepdim=True)


def full_logprobs_with_target(
    student: Tensor, teacher: Tensor | SparseTeacher, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """full_logprobs and the student's log q_g [n] at the targets [n] (valid ids), from the same
    pass over the student's logits: the cross-entropy without a second vocabulary-sized pass."""
    if isinstance(teacher, Tensor):
        log_p, log_q = full_logprobs(student, teacher, temperature)
        return log_p, log_q, log_q.gather(-1, target[:, None].long()).squeeze(-1)
    ids = teacher.topk_ids.long()
    log_p = sparse_buckets(teacher, student.shape[-1])
    picked, rest = picked_and_rest(student, torch.cat([ids, target[:, None].long()], -1), temperature)
    topk, target_logit = picked[:, :-1], picked[:, -1]
    # The target belongs to the tail bucket unless the teacher's top-K holds it.
    tail = torch.where((ids == target[:, None]).any(-1), rest, torch.logaddexp(rest, target_logit))
    buckets = torch.cat([topk, tail[:, None]], -1)
    lse = buckets.logsumexp(-1, keepdim=True)
    return log_p, buckets - lse, target_logit - lse.squeeze(-1)


@torch.no_grad()
def non_target_logprobs(logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_hat [n, V], log p_g [n], log(1 - p_g) [n]) from logits [n, V] at ``temperature``, no gradient.

    p_hat is a log-softmax over the logits with column g masked (never a division of
    probabilities), so log(1 - p_g) stays exact even when p_g rounds to 1. -inf logits (vocabulary
    masks) are raised to MASK_LOGIT.
    """
    log_hat, lse_rest, target_logit = masked_log_softmax(logits, target[:, None].long(), temperature)
    lse_all = torch.logaddexp(lse_rest, target_logit)
    return log_hat, target_logit - lse_all, lse_rest - lse_all


def kl_from_logprobs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j) over the last dim. [n, B], [n, B] -> [n].

    Entries with a_j = 0 add exactly 0 because every log-probability here is finite: masked
    entries hold MASK_LOGIT, not -inf (so 0 * finite, never 0 * inf).
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def binary_kl(log_a1: Tensor, log_a0: Tensor, log_b1: Tensor, log_b0: Tensor) -> Tensor:
    """KL([a1, a0] || [b1, b0]) from the log-probabilities of both outcomes. [n] x 4 -> [n]."""
    return kl_from_logprobs(torch.stack([log_a1, log_a0], -1), torch.stack([log_b1, log_b0], -1))
