"""The reduction every loss shares: per-token terms, weighted, summed; optionally chunked over tokens.

A loss here is ``sum_i sum_m weights[i, m] * terms(i)[m]`` where ``terms`` maps one chunk of
student logits to ``[n, M]`` per-token terms (a divergence is M=1; ATKD is M=2: TKD and DKD).
Weights carry masking and normalisation (``1 / count``), so the caller decides the denominator
(local or global count) and the result does not depend on how tokens are split into chunks.

Chunked, the gradient with respect to the student logits is computed chunk by chunk inside the
forward pass and kept (one ``[N, V]`` buffer, the size of the gradient autograd would produce
anyway); vocabulary-sized temporaries then never exceed one ``[chunk, V]`` block. Its backward
scales that buffer in place and hands it over, so the graph supports one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# terms_fn(start, end, student_chunk_fp32 [n, V]) -> per-token terms [n, M]
TermsFn = Callable[[int, int, Tensor], Tensor]


def weighted_token_sum(
    student_logits: Tensor, weights: Tensor, terms_fn: TermsFn, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Return (loss, terms): ``loss = (terms * weights).sum()`` and the detached ``terms`` [N, M].

    student_logits: [N, V] (any float dtype; math runs in float32).
    weights: [N, M] float32, no gradient.
    chunk_size: tokens per chunk, or None for one plain autograd graph over all tokens.
    """
    if chunk_size is None or chunk_size >= student_logits.shape[0]:
        terms = terms_fn(0, student_logits.shape[0], student_logits.float())
        return (terms * weights).sum(), terms.detach()
    return _ChunkedWeightedSum.apply(student_logits, weights, terms_fn, chunk_size)


class _ChunkedWeightedSum(torch.autograd.Function):
    """Forward computes each chunk's loss and its gradient at once; backward only scales them."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, weights: Tensor, terms_fn: TermsFn, chunk_size: int):
        num_tokens = student_logits.shape[0]
        grad_logits = torch.zeros_like(student_logits) if student_logits.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        all_terms = []
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk_weights = weights[start:end]
            with torch.enable_grad():
                chunk = student_logits[start:end].detach().float().requires_grad_(grad_logits is not None)
                terms = terms_fn(start, end, chunk)
                chunk_loss = (terms * chunk_weights).sum()
            if grad_logits is not None and bool(chunk_weights.any()):
                (chunk_grad,) = torch.autograd.grad(chunk_loss, chunk)
                grad_logits[start:end] = chunk_grad.to(grad_logits.dtype)
            total += chunk_loss.detach()
            all_terms.append(terms.detach())
        ctx.save_for_backward(grad_logits if grad_logits is not None else torch.empty(0))
        terms = torch.cat(all_terms)
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_terms: Tensor):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError(
                "a chunked loss supports one backward pass; recompute it (or use chunk_size=None)"
            )
        ctx.backward_done = True
        (grad_logits,) = ctx.saved_tensors
        # Scaled in place: a second [N, V] buffer is exactly what chunking exists to avoid.
        return grad_logits.mul_(grad_total.to(grad_logits.dtype)), None, None, None
