"""KL's target / diversity decomposition, the identity ATKD is built on.

Per valid token with ground truth g, teacher p, student q:
``KL(p || q) = TKD + (1 - p_g) * DKD`` with ``TKD = KL(b_p || b_q)`` over the binary
distributions ``[p_g, 1 - p_g]`` and ``DKD = KL(p_hat || q_hat)`` over the non-target
distributions (a log-softmax over the logits with column g masked, never a division of
probabilities). The reverse setting decomposes ``KL(q || p)`` the same way with the roles
swapped: ``KL(q || p) = KL(b_q || b_p) + (1 - q_g) * KL(q_hat || p_hat)``.

With a dense teacher every piece is exact. With a sparse teacher (top-K + tail), TKD and the
teacher's UNC = 1 - p_g are exact (from the target log-prob and tail mass) and DKD is computed over
the top-K + tail buckets, a lower bound that is exact when the top-K covers the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from atkd_core.losses.inputs import SparseTeacher, Teacher, dense_rows, flatten_inputs, teacher_rows
from atkd_core.losses.kernels import MASK_LOGIT, dense_target_rest_kl, picked_and_rest
from atkd_core.losses.logprobs import binary_kl, kl_from_logprobs, log1mexp, sparse_tail

Setting = Literal["forward", "reverse"]


class TargetRest(NamedTuple):
    """One setting's decomposition pieces for n tokens, each [n] float32.

    log_p_target, log_p_rest: log p_g and log(1 - p_g) of the teacher (no gradient).
    log_q_target, log_q_rest: the same for the student.
    dkd: the non-target KL, KL(p_hat || q_hat), or KL(q_hat || p_hat) in the reverse setting.
    """

    log_p_target: Tensor
    log_p_rest: Tensor
    log_q_target: Tensor
    log_q_rest: Tensor
    dkd: Tensor

    def tkd(self, setting: Setting) -> Tensor:
        """TKD [n]: the binary KL over (target, rest), KL(b_p || b_q), or KL(b_q || b_p) when reverse."""
        if setting == "reverse":
            return binary_kl(self.log_q_target, self.log_q_rest, self.log_p_target, self.log_p_rest)
        return binary_kl(self.log_p_target, self.log_p_rest, self.log_q_target, self.log_q_rest)


def target_rest(
    student: Tensor, teacher: Tensor | SparseTeacher, target: Tensor, temperature: float, reverse: bool
) -> TargetRest:
    """TargetRest from student logits [n, V] (any float dtype), dense teacher logits [n, V] or a
    sparse teacher of n rows, and valid target ids [n] at temperature T (the reverse setting's DKD
    when ``reverse``)."""
    if isinstance(teacher, Tensor):
        return TargetRest(*dense_target_rest_kl(student, teacher.detach(), target, temperature, reverse))
    return _sparse_target_rest(student, teacher, target, temperature, reverse)


def _sparse_target_rest(
    student: Tensor, teacher: SparseTeacher, target: Tensor, temperature: float, reverse: bool
) -> TargetRest:
    """TargetRest over the sparse teacher's top-K + tail buckets, the non-target distributions
    being [n, K + 1] over the buckets with the target's entry masked.

    student: [n, V] float32 logits (finite); teacher: a SparseTeacher of n rows;
    target: [n] ground-truth ids (valid, i.e. already free of ignore_index).
    """
    ids = teacher.topk_ids.long()
    is_target = ids == target[:, None]
    target_in_topk = is_target.any(-1)
    log_p_target = teacher.target_logprob.float()
    tail = sparse_tail(teacher, student.shape[-1])
    # Mass outside the top-K that is not the target: the whole tail, or the tail less p_g; exactly
    # empty when the top-K and the target cover the vocabulary (the student's is empty then too).
    tail_rest = torch.where(target_in_topk, tail, tail + log1mexp((log_p_target - tail).clamp(max=0.0)))
    covers_vocab = ids.shape[-1] + (~target_in_topk).long() >= student.shape[-1]
    tail_rest = tail_rest.masked_fill(covers_vocab, MASK_LOGIT).clamp(min=MASK_LOGIT)
    topk_rest = teacher.topk_logprobs.float().masked_fill(is_target, MASK_LOGIT)
    p_buckets = torch.cat([topk_rest, tail_rest[:, None]], -1)
    log_p_rest = p_buckets.logsumexp(-1)

    # The student through its top-K and target columns and the mass outside both: the target is
    # picked last, so a repeat of it inside the top-K is masked out of the non-target buckets.
    picked, q_tail = picked_and_rest(student, torch.cat([ids, target[:, None].long()], -1), temperature)
    q_topk, q_target = picked[:, :-1].masked_fill(is_target, MASK_LOGIT), picked[:, -1]
    q_rest_buckets = torch.cat([q_topk, q_tail[:, None]], -1)
    lse_rest = q_rest_buckets.logsumexp(-1)
    lse_all = torch.logaddexp(lse_rest, q_target)
    log_p_hat = p_buckets - log_p_rest[:, None]
    log_q_hat = q_rest_buckets - lse_rest[:, None]
    return TargetRest(
        log_p_target=log_p_target,
        log_p_rest=log_p_rest,
        log_q_target=q_target - lse_all,
        log_q_rest=lse_rest - lse_all,
        dkd=kl_from_logprobs(log_q_hat, log_p_hat) if reverse else kl_from_logprobs(log_p_hat, log_q_hat),
    )


@dataclass(frozen=True)
class KLDecomposition:
    """Per-token pieces of KL, each shaped like ``targets`` (zero where ignored), float32.

    tkd: target-oriented KD, the binary KL. dkd: diversity-oriented KD, the non-target KL.
    unc: the teacher's uncertainty 1 - p_g (decides easy / hard in both settings).
    rest_mass: the coefficient of DKD in the identity ``kl = tkd + rest_mass * dkd``: the teacher's
        non-target mass (= unc) in the forward setting, the student's in the reverse setting.
    """

    tkd: Tensor
    dkd: Tensor
    unc: Tensor
    rest_mass: Tensor


def check_setting(setting: str) -> None:
    """Raise ValueError unless ``setting`` is forward or reverse."""
    if setting not in ("forward", "reverse"):
        raise ValueError(f"setting must be 'forward' or 'reverse', got {setting!r}")


def decompose_kl(
    student_logits: Tensor,
    teacher: Teacher,
    targets: Tensor,
    *,
    setting: Setting = "forward",
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> KLDecomposition:
    """Per-token TKD, DKD, teacher UNC and the DKD coefficient (see KLDecomposition).

    student_logits [N, V] or [B, T, V]; teacher the same (dense) or a SparseTeacher; targets [N] / [B, T].
    """
    check_setting(setting)
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    valid = flat_targets != ignore_index
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    rows = flat_targets.shape[0]
    pieces = target_rest(
        dense_rows(student, 0, rows).float(),
        teacher_rows(flat_teacher, 0, rows),
        safe_targets,
        temperature,
        reverse=setting == "reverse",
    )
    tkd = pieces.tkd(setting)
    rest = pieces.log_p_rest.exp() if setting == "forward" else pieces.log_q_rest.exp()
    zero = torch.zeros_like(tkd)

    def shaped(values: Tensor) -> Tensor:
        return torch.where(valid, values, zero).reshape(targets.shape)

    return KLDecomposition(
        tkd=shaped(tkd),
        dkd=shaped(pieces.dkd),
        unc=shaped(pieces.log_p_rest.exp()),
        rest_mass=shaped(rest),
    )
