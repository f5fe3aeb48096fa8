"""Teacher inputs (dense logits or the sparse cached record) turned into float32 log-probabilities.

Every loss works on two aligned log-probability tables ``[n, B]``: over the vocabulary (``B = V``,
dense teacher) or over the teacher's top-K tokens plus one "tail" bucket holding the rest of the
mass (``B = K + 1``, sparse teacher). Grouping tokens into buckets is a coarse-graining, so by the
data-processing inequality every f-divergence here (KL both ways, JSD, TVD, skew KL) computed on
the buckets is a lower bound of the dense value, equal to it when the top-K covers the vocabulary.

Masked entries are filled with a large finite negative number rather than ``-inf`` so that
log-sum-exp over an all-masked row (an empty tail) stays finite and its gradient is not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

MASK_LOGIT = -1e30
_LOG_HALF = math.log(0.5)
_LOG_FLOAT32_EPS = math.log(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher as teacher scoring caches it, per token (already at the loss temperature).

    target_logprob: [N] log p_g of the ground-truth next token.
    topk_ids: [N, K] integer ids of the teacher's K most likely tokens (distinct per row).
    topk_logprobs: [N, K] their log-probabilities.
    log_tail_mass: [N] log of the probability outside the top-K; derived from ``topk_logprobs``
        when None (less exact when the top-K holds almost all the mass).
    unc: [N] UNC = 1 - p_g as scoring computed it (exact even where p_g rounds to 1); derived from
        ``target_logprob`` when None. Given, the ATKD split and the step's cached group counts read
        the same values, so a token at the threshold cannot fall on both sides.
    """

    target_logprob: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor
    log_tail_mass: Tensor | None = None
    unc: Tensor | None = None

    def reshape_flat(self) -> SparseTeacher:
        """The same record with every leading dimension flattened to N."""
        k = self.topk_ids.shape[-1]
        return SparseTeacher(
            target_logprob=self.target_logprob.reshape(-1),
            topk_ids=self.topk_ids.reshape(-1, k),
            topk_logprobs=self.topk_logprobs.reshape(-1, k),
            log_tail_mass=None if self.log_tail_mass is None else self.log_tail_mass.reshape(-1),
            unc=None if self.unc is None else self.unc.reshape(-1),
        )

    def rows(self, start: int, end: int) -> SparseTeacher:
        """Rows ``start:end`` of a flat record."""
        return SparseTeacher(
            target_logprob=self.target_logprob[start:end],
            topk_ids=self.topk_ids[start:end],
            topk_logprobs=self.topk_logprobs[start:end],
            log_tail_mass=None if self.log_tail_mass is None else self.log_tail_mass[start:end],
            unc=None if self.unc is None else self.unc[start:end],
        )

    @property
    def num_tokens(self) -> int:
        """N, the number of token positions."""
        return self.target_logprob.numel()


@dataclass(frozen=True)
class LinearHead:
    """Logits not built yet: ``hidden @ weight[:vocab_size].T (+ bias[:vocab_size])``, made one block
    of rows at a time by the losses, so the ``[N, V]`` logits never exist at once.

    hidden: [..., H] final hidden states (the output layer's input). weight: [V', H] the output
    layer's weight, V' >= vocab_size (rows past the tokenizer's vocabulary are padding, not tokens).
    bias: [V'] or None. The matmul runs in the inputs' dtype, the loss math in float32, as with a
    model's own logits.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: [..., vocab_size]."""
        return torch.Size((*self.hidden.shape[:-1], self.vocab_size))

    @property
    def device(self) -> torch.device:
        """The hidden states' device."""
        return self.hidden.device

    def reshape_flat(self) -> LinearHead:
        """The same head over hidden states flattened to [N, H]."""
        return LinearHead(
            self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias, self.vocab_size
        )

    def rows(self, start: int, end: int) -> LinearHead:
        """Rows ``start:end`` of a flat head."""
        return LinearHead(self.hidden[start:end], self.weight, self.bias, self.vocab_size)

    def logits(self, start: int, end: int) -> Tensor:
        """Logits of the flat rows ``start:end``: [n, vocab_size] in the inputs' dtype."""
        bias = None if self.bias is None else self.bias[: self.vocab_size]
        return torch.nn.functional.linear(self.hidden[start:end], self.weight[: self.vocab_size], bias)


Teacher = Tensor | SparseTeacher | LinearHead


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); MASK_LOGIT where it is -inf."""
    x = x.clamp(max=0.0)
    near_zero = x > _LOG_HALF
    # Each branch is evaluated where it is accurate; the other's input is replaced so no NaN appears.
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b).clamp(min=MASK_LOGIT)


def single_backward(ctx: Any, message: str) -> None:
    """Raise RuntimeError(``message``) on a second backward through ``ctx``: the autograd functions
    that hand over (or write the gradient into) a buffer they saved can run backward only once."""
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(message)
    ctx.backward_done = True


class _PickedAndRest(torch.autograd.Function):
    """A sparse teacher reads the student only through a few columns and the mass of all others.

    Forward: ``picked`` [n, J] = the columns ``index`` [n, J] of logits / T, and ``lse_rest`` [n] =
    logsumexp of logits / T over every other column (its own maximum, so a rest far below the row's
    largest logit does not underflow). Backward builds the [n, V] gradient in one exp pass: the
    rest's softmax times its incoming gradient, the picked columns' gradients scattered in. Composed
    from autograd ops (log-softmax, gathers, a masked logsumexp) the same values cost several more
    vocabulary-sized passes forward and a zero-filled [n, V] buffer per gather backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, temperature: float):
        scaled = (logits.float() / temperature).clamp_(min=MASK_LOGIT)
        picked = scaled.gather(-1, index)
        lse_rest = scaled.scatter_(-1, index, MASK_LOGIT).logsumexp(-1)
        ctx.save_for_backward(logits, index, lse_rest)
        ctx.temperature = temperature
        return picked, lse_rest

    @staticmethod
    def backward(ctx, grad_picked: Tensor, grad_rest: Tensor):
        logits, index, lse_rest = ctx.saved_tensors
        temperature = ctx.temperature
        scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
        # d/dz of lse_rest is the rest's softmax, of z / T it is 1 / T: one pass, one [n, V] buffer.
        grad = (scaled - lse_rest[:, None]).exp_().mul_((grad_rest / temperature)[:, None])
        # Overwritten, not multiplied away: with every column picked the rest is empty and the exp
        # above is inf there. scatter_add_ then sums repeated columns, as a gather's adjoint must.
        grad.scatter_(-1, index, 0.0).scatter_add_(-1, index, grad_picked.float() / temperature)
        return grad.to(logits.dtype), None, None


def picked_and_rest(logits: Tensor, index: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(logits[index] / T [n, J], logsumexp of logits / T outside ``index`` [n]) from logits [n, V]
    and int64 ``index`` [n, J] (repeats allowed). An empty rest gives about MASK_LOGIT."""
    return _PickedAndRest.apply(logits, index, temperature)


def _sparse_tail(teacher: SparseTeacher, vocab_size: int) -> Tensor:
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


def _sparse_buckets(teacher: SparseTeacher, vocab_size: int) -> Tensor:
    """The sparse teacher's log-probabilities over its top-K and the tail: [n, K + 1] float32."""
    return torch.cat([teacher.topk_logprobs.float(), _sparse_tail(teacher, vocab_size)[:, None]], -1)


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """A fresh float32 copy of logits / T with -inf raised to MASK_LOGIT (vocabulary masks)."""
    return (logits.float() / temperature).clamp_(min=MASK_LOGIT)


def _student_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / T) [n, V] float32 in one fresh buffer (the input is never written)."""
    if logits.dtype == torch.float32 and temperature == 1.0:
        return torch.log_softmax(logits, -1)
    scaled = logits.to(torch.float32, copy=True).div_(temperature)
    return torch.log_softmax(scaled, -1, out=scaled)


def teacher_logprobs(teacher: Tensor, temperature: float) -> Tensor:
    """log_softmax(teacher / T) [n, V] float32 with masked (-inf) entries finite, in one fresh buffer."""
    scaled = scaled_logits(teacher, temperature)
    # In place on the copy we own: a second [n, V] buffer costs more than the pass (page faults on CPU).
    return torch.log_softmax(scaled, -1, out=scaled)


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
    log_p = _sparse_buckets(teacher, student.shape[-1])
    topk, tail = picked_and_rest(student, teacher.topk_ids.long(), temperature)
    buckets = torch.cat([topk, tail[:, None]], -1)
    return log_p, buckets - buckets.logsumexp(-1, keepdim=True)


class _DenseKL(torch.autograd.Function):
    """KL between a dense teacher and the student per row, and the student's log q at the targets.

    Forward: three [n, V] buffers (log q, log p, then p or q); the KL's elementwise product is taken
    in place in log p's buffer. Backward writes the gradient into a saved buffer in place: its
    closed form is ``(q - p) / T`` (forward) or ``q * (log q - log p - KL) / T`` (reverse) per unit
    of the KL's incoming gradient, plus ``(onehot(g) - q) / T`` per unit of log q_g's. Autograd
    over log-softmax and the product would allocate two more [n, V] buffers forward and two
    backward, and on a large vocabulary those allocations are most of the time.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor, target: Tensor, temperature: float, reverse: bool):
        log_q = _student_logprobs(logits, temperature)
        log_p = teacher_logprobs(teacher, temperature)
        log_q_target = log_q.gather(-1, target[:, None]).squeeze(-1)
        if reverse:
            p_or_log_ratio = log_p.neg_().add_(log_q)
            kl = log_q.exp().mul_(p_or_log_ratio).sum(-1)
        else:
            p_or_log_ratio = log_p.exp()
            kl = log_p.sub_(log_q).mul_(p_or_log_ratio).sum(-1)
        ctx.save_for_backward(log_q, p_or_log_ratio, kl, target)
        ctx.temperature, ctx.reverse, ctx.dtype = temperature, reverse, logits.dtype
        return kl, log_q_target

    @staticmethod
    def backward(ctx, grad_kl: Tensor, grad_target: Tensor):
        single_backward(ctx, "dense_kl supports one backward pass (its saved buffers become the gradient)")
        scale_kl = (grad_kl.float() / ctx.temperature)[:, None]
        scale_target = (grad_target.float() / ctx.temperature)[:, None]
        log_q, p_or_log_ratio, kl, target = ctx.saved_tensors
        if ctx.reverse:
            grad = p_or_log_ratio.sub_(kl[:, None]).mul_(scale_kl).sub_(scale_target).mul_(log_q.exp_())
        else:
            grad = log_q.exp_().mul_(scale_kl - scale_target).addcmul_(p_or_log_ratio, scale_kl, value=-1.0)
        grad.scatter_add_(-1, target[:, None], scale_target)
        return grad.to(ctx.dtype), None, None, None, None


def dense_kl(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float, reverse: bool
) -> tuple[Tensor, Tensor]:
    """(KL [n], log q_g [n]) float32 from student logits [n, V] (any float dtype) and dense teacher
    logits [n, V] at temperature T: KL(p || q), or KL(q || p) when ``reverse``; ``target`` [n]
    valid int64 ids. The same values as full_logprobs + kl_from_logprobs at a fraction of the
    vocabulary-sized buffers; one backward pass."""
    return _DenseKL.apply(student, teacher, target, temperature, reverse)


class _DenseTVD(torch.autograd.Function):
    """Total variation ``0.5 * sum |q - p|`` per row against a dense teacher, and log q_g.

    Forward: two [n, V] buffers (q, then p turned into sign(q - p) in place). Backward, in place in
    the sign buffer: ``0.5 * q * (s - sum_j s_j q_j) / T`` per unit of the TVD's incoming gradient,
    plus ``(onehot(g) - q) / T`` per unit of log q_g's. Autograd over softmax, subtraction and
    abs would hold four buffers forward and three more backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor, target: Tensor, temperature: float):
        q = _student_logprobs(logits, temperature)
        log_q_target = q.gather(-1, target[:, None]).squeeze(-1)
        q.exp_()
        p = scaled_logits(teacher, temperature)
        sign = torch.softmax(p, -1, out=p).neg_().add_(q)
        tvd = 0.5 * torch.linalg.vector_norm(sign, 1, -1)
        ctx.save_for_backward(q, sign.sign_(), target)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return tvd, log_q_target

    @staticmethod
    def backward(ctx, grad_tvd: Tensor, grad_target: Tensor):
        single_backward(ctx, "dense_tvd supports one backward pass (its saved buffers become the gradient)")
        q, sign, target = ctx.saved_tensors
        scale_tvd = (0.5 * grad_tvd.float() / ctx.temperature)[:, None]
        scale_target = (grad_target.float() / ctx.temperature)[:, None]
        mean_sign = torch.linalg.vecdot(sign, q)[:, None]
        grad = sign.sub_(mean_sign).mul_(q).mul_(scale_tvd).addcmul_(q, scale_target, value=-1.0)
        grad.scatter_add_(-1, target[:, None], scale_target)
        return grad.to(ctx.dtype), None, None, None


def dense_tvd(student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TVD [n], log q_g [n]) float32 from student logits [n, V] (any float dtype) and dense teacher
    logits [n, V] at temperature T; ``target`` [n] valid int64 ids. One backward pass."""
    return _DenseTVD.apply(student, teacher, target, temperature)


def full_logprobs_with_target(
    student: Tensor, teacher: Tensor | SparseTeacher, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """full_logprobs and the student's log q_g [n] at the targets [n] (valid ids), from the same
    pass over the student's logits: the cross-entropy without a second vocabulary-sized pass."""
    if isinstance(teacher, Tensor):
        log_p, log_q = full_logprobs(student, teacher, temperature)
        return log_p, log_q, log_q.gather(-1, target[:, None].long()).squeeze(-1)
    ids = teacher.topk_ids.long()
    log_p = _sparse_buckets(teacher, student.shape[-1])
    picked, rest = picked_and_rest(student, torch.cat([ids, target[:, None].long()], -1), temperature)
    topk, target_logit = picked[:, :-1], picked[:, -1]
    # The target belongs to the tail bucket unless the teacher's top-K holds it.
    tail = torch.where((ids == target[:, None]).any(-1), rest, torch.logaddexp(rest, target_logit))
    buckets = torch.cat([topk, tail[:, None]], -1)
    lse = buckets.logsumexp(-1, keepdim=True)
    return log_p, buckets - lse, target_logit - lse.squeeze(-1)


@dataclass(frozen=True)
class TargetSplit:
    """The pieces of KL's target / non-target decomposition for n tokens against a sparse teacher, float32.

    log_p_target, log_p_rest: [n] log p_g and log(1 - p_g) of the teacher.
    log_q_target, log_q_rest: [n] the same for the student.
    log_p_hat, log_q_hat: [n, K + 1] non-target distributions over the top-K + tail buckets (the
        target's entry masked).
    """

    log_p_target: Tensor
    log_p_rest: Tensor
    log_q_target: Tensor
    log_q_rest: Tensor
    log_p_hat: Tensor
    log_q_hat: Tensor


def _masked_log_softmax(logits: Tensor, index: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log-softmax of logits / T with column g masked [n, V] in a fresh buffer, logsumexp of the
    non-target columns [n], the target logit / T [n]), without gradient; index: [n, 1] int64."""
    scaled = scaled_logits(logits, temperature)
    target_logit = scaled.gather(-1, index).squeeze(-1)
    top, pivot = scaled.scatter_(-1, index, MASK_LOGIT).max(-1, keepdim=True)
    log_hat = torch.log_softmax(scaled, -1, out=scaled)
    # The normaliser read back at each row's largest logit: ``logit - log_softmax`` there is the
    # logsumexp with no more rounding than computing it anew.
    return log_hat, (top - log_hat.gather(-1, pivot)).squeeze(-1), target_logit


@torch.no_grad()
def non_target_split(logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_hat [n, V], log p_g [n], log(1 - p_g) [n]) from logits [n, V] at ``temperature``, no gradient.

    p_hat is a log-softmax over the logits with column g masked (never a division of
    probabilities), so log(1 - p_g) stays exact even when p_g rounds to 1. -inf logits (vocabulary
    masks) are raised to MASK_LOGIT.
    """
    log_hat, lse_rest, target_logit = _masked_log_softmax(logits, target[:, None].long(), temperature)
    lse_all = torch.logaddexp(lse_rest, target_logit)
    return log_hat, target_logit - lse_all, lse_rest - lse_all


class DenseSplit(NamedTuple):
    """KL's target / non-target pieces for n tokens against a dense teacher, each [n] float32.

    log_p_target, log_p_rest: log p_g and log(1 - p_g) of the teacher (no gradient).
    log_q_target, log_q_rest: the same for the student.
    dkd: KL(p_hat || q_hat) over the non-target distributions, or KL(q_hat || p_hat) when reverse.
    """

    log_p_target: Tensor
    log_p_rest: Tensor
    log_q_target: Tensor
    log_q_rest: Tensor
    dkd: Tensor


class _DenseSplitKL(torch.autograd.Function):
    """DenseSplit with a hand-written backward.

    Forward: three [n, V] buffers (the two masked log-softmaxes, then p_hat or q_hat). Backward
    writes the gradient into the saved log q_hat buffer in place. Per unit of incoming gradient,
    with q_k = q_hat_k (1 - q_g) off the target: d log q_g / dz = (onehot(g) - q) / T,
    d log(1 - q_g) / dz = (q_hat - q) / T, and DKD's is ``(q_hat - p_hat) / T`` (forward) or
    ``q_hat (log q_hat - log p_hat - DKD) / T`` (reverse) off the target, 0 on it. Composed from
    autograd ops the same pieces took several more vocabulary-sized buffers each way.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor, target: Tensor, temperature: float, reverse: bool):
        index = target[:, None].long()
        log_q_hat, q_lse_rest, q_target_logit = _masked_log_softmax(logits, index, temperature)
        log_p_hat, p_lse_rest, p_target_logit = _masked_log_softmax(teacher, index, temperature)
        q_lse_all = torch.logaddexp(q_lse_rest, q_target_logit)
        p_lse_all = torch.logaddexp(p_lse_rest, p_target_logit)
        log_q_target, log_q_rest = q_target_logit - q_lse_all, q_lse_rest - q_lse_all
        if reverse:
            p_hat_or_log_ratio = log_p_hat.neg_().add_(log_q_hat)
            dkd = log_q_hat.exp().mul_(p_hat_or_log_ratio).sum(-1)
        else:
            p_hat_or_log_ratio = log_p_hat.exp()
            dkd = log_p_hat.sub_(log_q_hat).mul_(p_hat_or_log_ratio).sum(-1)
        ctx.save_for_backward(log_q_hat, p_hat_or_log_ratio, dkd, log_q_target, log_q_rest, index)
        ctx.temperature, ctx.reverse, ctx.dtype = temperature, reverse, logits.dtype
        log_p_target, log_p_rest = p_target_logit - p_lse_all, p_lse_rest - p_lse_all
        ctx.mark_non_differentiable(log_p_target, log_p_rest)
        return log_p_target, log_p_rest, log_q_target, log_q_rest, dkd

    @staticmethod
    def backward(
        ctx, _grad_p_target, _grad_p_rest, grad_q_target: Tensor, grad_q_rest: Tensor, grad_dkd: Tensor
    ):
        single_backward(
            ctx, "dense_split_kl supports one backward pass (its saved buffers become the gradient)"
        )
        scale_target, scale_rest, scale_dkd = (
            grad.float() / ctx.temperature for grad in (grad_q_target, grad_q_rest, grad_dkd)
        )
        log_q_hat, p_hat_or_log_ratio, dkd, log_q_target, log_q_rest, index = ctx.saved_tensors
        q_target, q_rest = log_q_target.exp(), log_q_rest.exp()
        # The target / rest terms' coefficient of q_hat off the target (q = q_hat (1 - q_g) there).
        shared = scale_rest * q_target - scale_target * q_rest
        if ctx.reverse:
            grad = (
                p_hat_or_log_ratio.mul_(scale_dkd[:, None])
                .add_((shared - scale_dkd * dkd)[:, None])
                .mul_(log_q_hat.exp_())
            )
        else:
            grad = (
                log_q_hat.exp_()
                .mul_((shared + scale_dkd)[:, None])
                .addcmul_(p_hat_or_log_ratio, scale_dkd[:, None], value=-1.0)
            )
        grad.scatter_(-1, index, (scale_target * q_rest - scale_rest * q_target)[:, None])
        return grad.to(ctx.dtype), None, None, None, None


def dense_split_kl(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float, reverse: bool
) -> DenseSplit:
    """KL's target / non-target pieces (DenseSplit) from student logits [n, V] (any float dtype),
    dense teacher logits [n, V] and valid target ids [n] at temperature T; one backward pass."""
    return DenseSplit(*_DenseSplitKL.apply(student, teacher, target, temperature, reverse))


def target_split(student: Tensor, teacher: SparseTeacher, target: Tensor, temperature: float) -> TargetSplit:
    """Target / non-target pieces of both distributions over the sparse teacher's top-K + tail
    buckets (a dense teacher's are dense_split_kl's).

    student: [n, V] float32 logits (finite); teacher: a SparseTeacher of n rows;
    target: [n] ground-truth ids (valid, i.e. already free of ignore_index).
    """
    ids = teacher.topk_ids.long()
    is_target = ids == target[:, None]
    target_in_topk = is_target.any(-1)
    log_p_target = teacher.target_logprob.float()
    tail = _sparse_tail(teacher, student.shape[-1])
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
    return TargetSplit(
        log_p_target=log_p_target,
        log_p_rest=log_p_rest,
        log_q_target=q_target - lse_all,
        log_q_rest=lse_rest - lse_all,
        log_p_hat=p_buckets - log_p_rest[:, None],
        log_q_hat=q_rest_buckets - lse_rest[:, None],
    )


def kl_from_logprobs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j) over the last dim. [n, B], [n, B] -> [n].

    Entries with a_j = 0 add exactly 0 because every log-probability here is finite: masked
    entries hold MASK_LOGIT, not -inf (so 0 * finite, never 0 * inf).
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def binary_kl(log_a1: Tensor, log_a0: Tensor, log_b1: Tensor, log_b0: Tensor) -> Tensor:
    """KL([a1, a0] || [b1, b0]) from the log-probabilities of both outcomes. [n] x 4 -> [n]."""
    return kl_from_logprobs(torch.stack([log_a1, log_a0], -1), torch.stack([log_b1, log_b0], -1))
