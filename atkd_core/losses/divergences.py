"""Token-level divergences between teacher p and student q (the baselines ATKD wraps).

Shapes: student logits ``[N, V]`` or ``[B, T, V]``; teacher the same shape (dense logits) or a
:class:`SparseTeacher`; targets ``[N]`` / ``[B, T]`` aligned with the logits (the caller shifts),
``ignore_index`` marking positions that do not count. Math in float32 whatever the input dtype.
Temperature divides both sides' logits (no T^2 factor; scale the loss yourself if you want it).
The teacher never receives a gradient.

Each ``<name>`` returns the sum over valid tokens divided by ``num_tokens`` (default: the number of
valid tokens here); pass the global count of valid tokens of an optimizer step to make the sum of
micro-batch losses independent of how the step is split. Each ``<name>_per_token`` returns the
per-token values, shape of ``targets``, zero at ignored positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from atkd_core.losses.engine import Terms, weighted_token_sum, with_cross_entropy
from atkd_core.losses.inputs import LinearHead, Teacher, dense_rows, flatten_inputs, teacher_rows
from atkd_core.losses.kernels import dense_kl, dense_tvd
from atkd_core.losses.logprobs import full_logprobs, full_logprobs_with_target, kl_from_logprobs

DivergenceFn = Callable[[Tensor, Tensor], Tensor]
DenseKernel = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def _log_or_neg_inf(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def _mixture(log_a: Tensor, weight_a: float, log_b: Tensor) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), in log space."""
    return torch.logaddexp(log_a + _log_or_neg_inf(weight_a), log_b + _log_or_neg_inf(1.0 - weight_a))


def forward_kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row (Supervised KD). [n, B] x 2 -> [n]."""
    return kl_from_logprobs(log_p, log_q)


def reverse_kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q || p) per row (Reverse KD, MiniLLM-style). [n, B] x 2 -> [n]."""
    return kl_from_logprobs(log_q, log_p)


def generalized_jsd_terms(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD as GKD / TRL define it. [n, B] x 2 -> [n].

    With m = beta * p + (1 - beta) * q: ``beta * KL(p || m) + (1 - beta) * KL(q || m)``. At the
    endpoints the mixture degenerates, so, as TRL does, beta=0 is forward KL(p || q) and beta=1 is
    reverse KL(q || p) (the interior value tends to these only after dividing by beta or 1 - beta).
    """
    if beta == 0.0:
        return kl_from_logprobs(log_p, log_q)
    if beta == 1.0:
        return kl_from_logprobs(log_q, log_p)
    log_m = _mixture(log_p, beta, log_q)
    return beta * kl_from_logprobs(log_p, log_m) + (1.0 - beta) * kl_from_logprobs(log_q, log_m)


def tvd_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance 0.5 * sum |p - q| per row. [n, B] x 2 -> [n]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skew_forward_kl_terms(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL as DistiLLM defines it: KL(p || alpha * p + (1 - alpha) * q). [n, B] x 2 -> [n]."""
    return kl_from_logprobs(log_p, _mixture(log_p, alpha, log_q))


def skew_reverse_kl_terms(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q || alpha * q + (1 - alpha) * p). [n, B] x 2 -> [n]."""
    return kl_from_logprobs(log_q, _mixture(log_q, alpha, log_p))


def alpha_beta_terms(log_p: Tensor, log_q: Tensor, alpha: float = 0.5, beta: float = 0.5) -> Tensor:
    """The alpha-beta divergence of ABKD (Wang et al., ICML 2025), Cichocki's AB-divergence
    D^(alpha, beta)(p || q) per row. [n, B] x 2 -> [n].

    ``-1 / (alpha beta) * sum(p^alpha q^beta - alpha / (alpha + beta) p^(alpha + beta)
    - beta / (alpha + beta) q^(alpha + beta))``, and its limits where a denominator vanishes:
    beta = 0 gives ``sum(p^a log(p^a / q^a) - p^a + q^a) / alpha^2`` (forward KL at alpha = 1),
    alpha = 0 the same with the roles swapped (reverse KL at beta = 1), and alpha = beta = 0
    ``0.5 * sum((log p - log q)^2)``. Alpha moves mass towards the teacher's large probabilities
    (hardness concentration), beta spreads it (confidence concentration), in the paper's terms.

    Choices the paper leaves open: its released code divides the alpha = 0 and beta = 0 cases by
    beta (alpha) rather than beta^2 (alpha^2); the two agree at the KL endpoints the paper reports,
    and the squares are what make the function continuous in (alpha, beta), so they are used here.
    Only alpha, beta >= 0 are offered (the family's negative values, which the paper does not use
    for language models, would raise masked or zero probabilities to infinite powers).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if alpha == 0.0 and beta == 0.0:
        return 0.5 * (log_p - log_q).square().sum(-1)
    if beta == 0.0:
        p_a, q_a = (alpha * log_p).exp(), (alpha * log_q).exp()
        return (p_a * alpha * (log_p - log_q) - p_a + q_a).sum(-1) / alpha**2
    if alpha == 0.0:
        p_b, q_b = (beta * log_p).exp(), (beta * log_q).exp()
        return (q_b * beta * (log_q - log_p) - q_b + p_b).sum(-1) / beta**2
    total = alpha + beta
    cross = (alpha * log_p + beta * log_q).exp()
    own = alpha / total * (total * log_p).exp() + beta / total * (total * log_q).exp()
    return -(cross - own).sum(-1) / (alpha * beta)


DIVERGENCE_TERMS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_terms,
    "reverse_kl": reverse_kl_terms,
    "generalized_jsd": generalized_jsd_terms,
    "tvd": tvd_terms,
    "skew_forward_kl": skew_forward_kl_terms,
    "skew_reverse_kl": skew_reverse_kl_terms,
    "alpha_beta": alpha_beta_terms,
}


def divergence_loss(
    name: str,
    student_logits: Tensor | LinearHead,
    teacher: Teacher,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    num_tokens: int | float | None = None,
    **params: float,
) -> Tensor:
    """Divergence ``name`` summed over valid tokens and divided by ``num_tokens`` (default: their count).

    ``student_logits`` may be a LinearHead (hidden states and output layer), fused with the loss.
    Returns a float32 scalar; an input with no valid token gives 0 with a gradient path, never NaN.
    """
    if name not in DIVERGENCE_TERMS:
        raise ValueError(f"divergence {name!r} is unknown; allowed: {', '.join(DIVERGENCE_TERMS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    terms = divergence_terms(
        name,
        flat_teacher,
        flat_targets,
        temperature=temperature,
        ignore_index=ignore_index,
        num_tokens=num_tokens,
        params=params,
    )
    loss, _ = weighted_token_sum(student, *terms, chunk_size)
    return loss


def divergence_terms(
    name: str,
    flat_teacher: Teacher,
    flat_targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_tokens: int | float | None = None,
    cross_entropy: Terms | None = None,
    params: dict[str, float] | None = None,
) -> Terms:
    """Divergence ``name`` as one column weighted 1 / ``num_tokens`` on valid tokens (see
    divergence_loss); ``flat_teacher`` and ``flat_targets`` as flatten_inputs returns them.

    ``params``: the divergence's own (beta, alpha). ``cross_entropy`` is appended as the last
    column (see engine.with_cross_entropy)."""
    return token_terms(
        partial(DIVERGENCE_TERMS[name], **(params or {})),
        flat_teacher,
        flat_targets,
        mean_weights(flat_targets, num_tokens, ignore_index),
        temperature=temperature,
        cross_entropy=cross_entropy,
        dense_kernel=_dense_kernel(name, params or {}),
    )


def mean_weights(flat_targets: Tensor, num_tokens: int | float | None, ignore_index: int = -100) -> Tensor:
    """One column of weights [N, 1] that makes a token sum a mean: 1 / ``num_tokens`` (default: the
    valid tokens here) on valid tokens, 0 elsewhere."""
    valid = flat_targets != ignore_index
    denominator = float(valid.sum()) if num_tokens is None else float(num_tokens)
    return (valid.float() / max(denominator, 1.0))[:, None]


def token_terms(
    terms_of: DivergenceFn,
    flat_teacher: Teacher,
    flat_targets: Tensor,
    weights: Tensor,
    *,
    temperature: float,
    cross_entropy: Terms | None = None,
    dense_kernel: DenseKernel | None = None,
) -> Terms:
    """One per-token column ``terms_of(log p, log q)`` ([n, B] x 2 -> [n], over the vocabulary or
    the top-K buckets) weighted by ``weights`` [N, 1], with ``cross_entropy`` appended (see
    engine.with_cross_entropy). ``dense_kernel``: a hand-written kernel of the same value used
    against a dense teacher; ignored targets must carry zero weight."""
    safe_targets = torch.where(flat_targets >= 0, flat_targets, torch.zeros_like(flat_targets))

    def pieces(start: int, end: int, chunk: Tensor, needs_target: bool) -> tuple[Tensor, Tensor | None]:
        teacher = teacher_rows(flat_teacher, start, end)
        if dense_kernel is not None and isinstance(teacher, Tensor):
            value, log_q_target = dense_kernel(chunk, teacher, safe_targets[start:end], temperature)
            return value[:, None], log_q_target
        if needs_target:
            log_p, log_q, log_q_target = full_logprobs_with_target(
                chunk, teacher, safe_targets[start:end], temperature
            )
            return terms_of(log_p, log_q)[:, None], log_q_target
        return terms_of(*full_logprobs(chunk, teacher, temperature))[:, None], None

    return with_cross_entropy(weights, pieces, cross_entropy, temperature)


def _dense_kernel(name: str, params: dict[str, float]) -> DenseKernel | None:
    """The hand-written kernel of divergence ``name`` against a dense teacher, (value [n], log q_g
    [n]) from (student [n, V], teacher [n, V], targets [n], T); None where autograd does it."""
    beta = params.get("beta", 0.5)
    if name == "forward_kl" or (name == "generalized_jsd" and beta == 0.0):
        return partial(dense_kl, reverse=False)
    if name == "reverse_kl" or (name == "generalized_jsd" and beta == 1.0):
        return partial(dense_kl, reverse=True)
    return dense_tvd if name == "tvd" else None


def divergence_per_token(
    name: str,
    student_logits: Tensor,
    teacher: Teacher,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    **params: float,
) -> Tensor:
    """Per-token values of divergence ``name``, shape of ``targets``, zero where ignored."""
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    rows = flat_targets.shape[0]
    log_p, log_q = full_logprobs(
        dense_rows(student, 0, rows).float(), teacher_rows(flat_teacher, 0, rows), temperature
    )
    values = DIVERGENCE_TERMS[name](log_p, log_q, **params)
    return torch.where(flat_targets != ignore_index, values, torch.zeros_like(values)).reshape(targets.shape)


def forward_kl(student_logits: Tensor, teacher: Teacher, targets: Tensor, **kwargs) -> Tensor:
    """Mean forward KL(teacher || student) over valid tokens (Supervised KD). See divergence_loss."""
    return divergence_loss("forward_kl", student_logits, teacher, targets, **kwargs)


def reverse_kl(student_logits: Tensor, teacher: Teacher, targets: Tensor, **kwargs) -> Tensor:
    """Mean reverse KL(student || teacher) over valid tokens. See divergence_loss."""
    return divergence_loss("reverse_kl", student_logits, teacher, targets, **kwargs)


def generalized_jsd(
    student_logits: Tensor, teacher: Teacher, targets: Tensor, beta: float = 0.5, **kwargs
) -> Tensor:
    """Mean generalized JSD (GKD's beta; 0 = forward KL, 1 = reverse KL). See divergence_loss."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return divergence_loss("generalized_jsd", student_logits, teacher, targets, beta=beta, **kwargs)


def tvd(student_logits: Tensor, teacher: Teacher, targets: Tensor, **kwargs) -> Tensor:
    """Mean total variation distance over valid tokens. See divergence_loss."""
    return divergence_loss("tvd", student_logits, teacher, targets, **kwargs)


def skew_forward_kl(
    student_logits: Tensor, teacher: Teacher, targets: Tensor, alpha: float = 0.1, **kwargs
) -> Tensor:
    """Mean skew KL(p || alpha p + (1 - alpha) q) (DistiLLM). See divergence_loss."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return divergence_loss("skew_forward_kl", student_logits, teacher, targets, alpha=alpha, **kwargs)


def skew_reverse_kl(
    student_logits: Tensor, teacher: Teacher, targets: Tensor, alpha: float = 0.1, **kwargs
) -> Tensor:
    """Mean skew reverse KL(q || alpha q + (1 - alpha) p) (DistiLLM). See divergence_loss."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return divergence_loss("skew_reverse_kl", student_logits, teacher, targets, alpha=alpha, **kwargs)
