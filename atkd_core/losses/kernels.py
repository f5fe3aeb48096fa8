"""Hand-written autograd kernels over a chunk of student logits, and the buffers they share.

Each kernel computes, for ``n`` tokens and a vocabulary of ``V``, what composed autograd ops would
compute with several more ``[n, V]`` buffers each way: on a large vocabulary those allocations are
most of a loss's time. Their backwards write the gradient into a buffer saved by the forward, so
each supports one backward pass (a second raises). The float64 parity tests check every kernel's
value and gradient against a naive reference.

Masked entries are filled with a large finite negative number (MASK_LOGIT) rather than ``-inf`` so
that log-sum-exp over an all-masked row (an empty tail) stays finite and its gradient is not NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MASK_LOGIT = -1e30


def single_backward(ctx: Any, message: str) -> None:
    """Raise RuntimeError(``message``) on a second backward through ``ctx``: the autograd functions
    that hand over (or write the gradient into) a buffer they saved can run backward only once."""
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(message)
    ctx.backward_done = True


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """A fresh float32 copy of logits / T with -inf raised to MASK_LOGIT (vocabulary masks)."""
    return (logits.float() / temperature).clamp_(min=MASK_LOGIT)


def student_logprobs(logits: Tensor, temperature: float) -> Tensor:
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


def masked_log_softmax(logits: Tensor, index: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log-softmax of logits / T with column g masked [n, V] in a fresh buffer, logsumexp of the
    non-target columns [n], the target logit / T [n]), without gradient; index: [n, 1] int64."""
    scaled = scaled_logits(logits, temperature)
    target_logit = scaled.gather(-1, index).squeeze(-1)
    top, pivot = scaled.scatter_(-1, index, MASK_LOGIT).max(-1, keepdim=True)
    log_hat = torch.log_softmax(scaled, -1, out=scaled)
    # The normaliser read back at each row's largest logit: ``logit - log_softmax`` there is the
    # logsumexp with no more rounding than computing it anew.
    return log_hat, (top - log_hat.gather(-1, pivot)).squeeze(-1), target_logit


def _kl_in_place(log_p: Tensor, log_q: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """(KL [n], the buffer its backward needs [n, B]) from log p and log q [n, B], taking over
    ``log_p``'s buffer: KL(p || q) with p saved, or KL(q || p) (``reverse``) with log q - log p saved."""
    if reverse:
        log_ratio = log_p.neg_().add_(log_q)
        return log_q.exp().mul_(log_ratio).sum(-1), log_ratio
    p = log_p.exp()
    return log_p.sub_(log_q).mul_(p).sum(-1), p


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
        log_q = student_logprobs(logits, temperature)
        log_p = teacher_logprobs(teacher, temperature)
        log_q_target = log_q.gather(-1, target[:, None]).squeeze(-1)
        kl, p_or_log_ratio = _kl_in_place(log_p, log_q, reverse)
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
        q = student_logprobs(logits, temperature)
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


class _DenseTargetRestKL(torch.autograd.Function):
    """dense_target_rest_kl's pieces with a hand-written backward.

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
        log_q_hat, q_lse_rest, q_target_logit = masked_log_softmax(logits, index, temperature)
        log_p_hat, p_lse_rest, p_target_logit = masked_log_softmax(teacher, index, temperature)
        q_lse_all = torch.logaddexp(q_lse_rest, q_target_logit)
        p_lse_all = torch.logaddexp(p_lse_rest, p_target_logit)
        log_q_target, log_q_rest = q_target_logit - q_lse_all, q_lse_rest - q_lse_all
        dkd, p_hat_or_log_ratio = _kl_in_place(log_p_hat, log_q_hat, reverse)
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
            ctx, "dense_target_rest_kl supports one backward pass (its saved buffers become the gradient)"
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


def dense_target_rest_kl(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float, reverse: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """KL's target / non-target pieces, each [n] float32, from student logits [n, V] (any float
    dtype), dense teacher logits [n, V] and valid target ids [n] at temperature T: log p_g,
    log(1 - p_g) (no gradient), log q_g, log(1 - q_g), and the non-target KL(p_hat || q_hat), or
    KL(q_hat || p_hat) when ``reverse``. One backward pass."""
    return _DenseTargetRestKL.apply(student, teacher, target, temperature, reverse)
