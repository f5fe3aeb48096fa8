"""The reduction every loss shares: per-token terms, weighted, summed; optionally chunked over tokens.

A loss here is ``sum_i sum_m weights[i, m] * terms(i)[m]`` where ``terms`` maps one chunk of
student logits to ``[n, M]`` per-token terms (a divergence is M=1; ATKD is M=2: TKD and DKD).
Weights carry masking and normalisation (``1 / count``), so the caller decides the denominator
(local or global count) and the result does not depend on how tokens are split into chunks.

Chunked, the gradient with respect to the student logits is computed chunk by chunk inside the
forward pass and kept (one ``[N, V]`` buffer, the size of the gradient autograd would produce
anyway); vocabulary-sized temporaries then never exceed one ``[chunk, V]`` block. Its backward
scales that buffer in place and hands it over, so the graph supports one backward pass.

Fused with the output layer (the student given as a ``LinearHead``), each chunk's logits are made
from the hidden states, and their gradient is folded at once into the gradients of the hidden
states ``[N, H]``, the weight ``[V', H]`` and the bias: no ``[N, V]`` tensor exists at all, only
one ``[chunk, V]`` block at a time (the idea of Liger-Kernel's fused-linear losses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from atkd_core.losses.inputs import LinearHead
from atkd_core.losses.kernels import picked_and_rest, single_backward

# terms_fn(start, end, student_chunk_fp32 [n, V]) -> per-token terms [n, M]
TermsFn = Callable[[int, int, Tensor], Tensor]
# pieces_fn(start, end, student_chunk_fp32 [n, V], needs_target) -> (terms [n, M], log q_g [n]);
# log q_g may be None when ``needs_target`` is False.
PiecesFn = Callable[[int, int, Tensor, bool], tuple[Tensor, Tensor | None]]


class Terms(NamedTuple):
    """A loss before the reduction: ``weights`` [N, M] (masking and normalisation, no gradient) and
    ``fn`` giving the matching per-token terms of a chunk of rows."""

    weights: Tensor
    fn: TermsFn


def combine(*parts: Terms) -> Terms:
    """Several losses over the same tokens as one: their columns side by side, computed in one pass
    over the student's logits (e.g. a distillation loss and the cross-entropy)."""

    def fn(start: int, end: int, chunk: Tensor) -> Tensor:
        return torch.cat([part.fn(start, end, chunk) for part in parts], -1)

    return Terms(torch.cat([part.weights for part in parts], -1), fn)


def cross_entropy_terms(
    targets: Tensor, num_tokens: float, weight: float = 1.0, ignore_index: int = -100
) -> Terms:
    """Cross-entropy on the targets (temperature 1), as one column weighted ``weight / num_tokens``
    on valid tokens. targets: [N] flat, ``ignore_index`` where not counted."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))

    def fn(start: int, end: int, chunk: Tensor) -> Tensor:
        target_logit, lse_rest = picked_and_rest(chunk, safe[start:end, None], 1.0)
        return torch.logaddexp(lse_rest[:, None], target_logit) - target_logit

    # num_tokens may be a step's count over its micro-batches, below 1: only zero needs replacing.
    denominator = float(num_tokens) if num_tokens > 0 else 1.0
    return Terms((valid.float() * (weight / denominator))[:, None], fn)


def with_cross_entropy(
    weights: Tensor, pieces: PiecesFn, cross_entropy: Terms | None, temperature: float
) -> Terms:
    """A teacher loss (``weights`` [N, M] over the terms ``pieces`` gives) with ``cross_entropy``
    (cross_entropy_terms over the same targets) appended as a last column, or alone when None.

    At temperature 1 the student's log q_g that ``pieces`` already computed is the cross-entropy,
    saving a second pass over the vocabulary per chunk; at any other temperature it is not, and
    the cross-entropy column computes its own."""

    def teacher_only(start: int, end: int, chunk: Tensor) -> Tensor:
        return pieces(start, end, chunk, False)[0]

    if cross_entropy is None:
        return Terms(weights, teacher_only)
    if temperature != 1.0:
        return combine(Terms(weights, teacher_only), cross_entropy)

    def with_target(start: int, end: int, chunk: Tensor) -> Tensor:
        values, log_q_target = pieces(start, end, chunk, True)
        assert log_q_target is not None, "pieces must return log q_g when asked"
        return torch.cat([values, -log_q_target[:, None]], -1)

    return Terms(torch.cat([weights, cross_entropy.weights], -1), with_target)


ChunkLossFn = Callable[[TermsFn, int, int, Tensor, Tensor], tuple[Tensor, Tensor]]


def chunk_loss(
    terms_fn: TermsFn, start: int, end: int, logits: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """One chunk's loss and terms: ``((terms * weights).sum(), terms)`` with ``terms`` [n, M] =
    ``terms_fn(start, end, logits)``; logits [n, V] float32, weights [n, M].

    The one definition of a chunk's math: eager, or compiled by ``chunk_loss_fn(compiled=True)``.
    """
    terms = terms_fn(start, end, logits)
    return (terms * weights).sum(), terms


def chunk_loss_fn(compiled: bool) -> ChunkLossFn:
    """``chunk_loss``, or the same function compiled with ``torch.compile`` (inductor: Triton
    kernels on CUDA, C++ on CPU), which fuses the float32 passes over each ``[n, V]`` block and
    differentiates them with a compiled backward.

    One compiled function serves every call: torch.compile caches by code object and guards on the
    tensors' shapes and the terms' constants (temperature, setting), so a new micro-batch's
    ``terms_fn`` reuses the graph; the first new shape compiles once more with dynamic sizes.
    """
    return _compiled_chunk_loss() if compiled else chunk_loss


@functools.cache
def _compiled_chunk_loss() -> ChunkLossFn:
    return torch.compile(chunk_loss)


def weighted_token_sum(
    student_logits: Tensor | LinearHead,
    weights: Tensor,
    terms_fn: TermsFn,
    chunk_size: int | None,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return (loss, terms): ``loss = (terms * weights).sum()`` and the detached ``terms`` [N, M].

    student_logits: [N, V] (any float dtype; math runs in float32), or a flat LinearHead (hidden
        [N, H]) whose logits are made chunk by chunk, fused with the loss.
    weights: [N, M] float32, no gradient.
    chunk_size: tokens per chunk, or None for one plain autograd graph over all tokens (a fused
        head then makes all N rows in one block).
    compiled: each chunk's math through ``chunk_loss_fn(True)`` (the same function, compiled).
    """
    loss_fn = chunk_loss_fn(compiled)
    if isinstance(student_logits, LinearHead):
        head = student_logits
        return _FusedLinearWeightedSum.apply(
            head.hidden,
            head.weight,
            head.bias,
            weights,
            terms_fn,
            chunk_size or head.hidden.shape[0],
            head.vocab_size,
            loss_fn,
        )
    if chunk_size is None or chunk_size >= student_logits.shape[0]:
        loss, terms = loss_fn(terms_fn, 0, student_logits.shape[0], student_logits.float(), weights)
        return loss, terms.detach()
    return _ChunkedWeightedSum.apply(student_logits, weights, terms_fn, chunk_size, loss_fn)


class _ChunkedWeightedSum(torch.autograd.Function):
    """Forward computes each chunk's loss and its gradient at once; backward only scales them."""

    @staticmethod
    def forward(
        ctx, student_logits: Tensor, weights: Tensor, terms_fn: TermsFn, chunk_size: int, loss_fn: ChunkLossFn
    ):
        num_tokens = student_logits.shape[0]
        grad_logits = torch.zeros_like(student_logits) if student_logits.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        all_terms = []
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk_weights = weights[start:end]
            with torch.enable_grad():
                chunk = student_logits[start:end].detach().float().requires_grad_(grad_logits is not None)
                loss, terms = loss_fn(terms_fn, start, end, chunk, chunk_weights)
            if grad_logits is not None and bool(chunk_weights.any()):
                (chunk_grad,) = torch.autograd.grad(loss, chunk)
                grad_logits[start:end] = chunk_grad.to(grad_logits.dtype)
            total += loss.detach()
            all_terms.append(terms.detach())
        ctx.save_for_backward(grad_logits if grad_logits is not None else torch.empty(0))
        terms = torch.cat(all_terms)
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_terms: Tensor):
        single_backward(
            ctx, "a chunked loss supports one backward pass; recompute it (or use chunk_size=None)"
        )
        (grad_logits,) = ctx.saved_tensors
        # Scaled in place: a second [N, V] buffer is exactly what chunking exists to avoid.
        return grad_logits.mul_(grad_total.to(grad_logits.dtype)), None, None, None, None


class _FusedLinearWeightedSum(torch.autograd.Function):
    """The output layer and the loss in one pass: per chunk, logits from the hidden states, the
    chunk's loss, and its gradient folded into the hidden states', weight's and bias's gradients
    (accumulated in float32); backward only scales them."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        weights: Tensor,
        terms_fn: TermsFn,
        chunk_size: int,
        vocab_size: int,
        loss_fn: ChunkLossFn,
    ):
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        rows = weight[:vocab_size].detach()
        row_bias = None if bias is None else bias[:vocab_size].detach()
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Float32 accumulators: summing many chunks' products in bf16 would lose the small ones.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if need_bias and bias is not None
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        all_terms = []
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            block = hidden[start:end].detach()
            chunk_weights = weights[start:end]
            with torch.enable_grad():
                logits = torch.nn.functional.linear(block, rows, row_bias).float().requires_grad_(True)
                loss, terms = loss_fn(terms_fn, start, end, logits, chunk_weights)
            if (need_hidden or need_weight or need_bias) and bool(chunk_weights.any()):
                (grad_logits,) = torch.autograd.grad(loss, logits)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_logits.to(rows.dtype) @ rows).to(grad_hidden.dtype)
                if grad_weight is not None:
                    if block.dtype == torch.float32:
                        grad_weight[:vocab_size].addmm_(grad_logits.t(), block)
                    else:
                        # The chunk's product in the inputs' dtype, as the unfused output layer's
                        # backward computes it (a float32 matmul runs at a fraction of a GPU's
                        # bf16 rate; docs/gpu-log.md has the measurement); the sum over
                        # chunks stays in float32.
                        grad_weight[:vocab_size].add_(grad_logits.to(block.dtype).t() @ block)
                if grad_bias is not None:
                    grad_bias[:vocab_size] += grad_logits.sum(0)
            total += loss.detach()
            all_terms.append(terms.detach())
        ctx.save_for_backward(
            *(torch.empty(0) if grad is None else grad for grad in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        terms = torch.cat(all_terms)
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_terms: Tensor):
        single_backward(ctx, "a fused-linear loss supports one backward pass; recompute it")
        grads = [
            grad.mul_(grad_total.to(grad.dtype)).to(dtype) if present else None
            for grad, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes, strict=True)
        ]
        return grads[0], grads[1], grads[2], None, None, None, None, None
