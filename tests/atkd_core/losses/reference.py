"""Naive float64 references written from the definitions (docs/architecture.md, "The method"), one token at a time.

Deliberately independent of atkd_core.losses: probabilities by softmax, non-target distributions by
dividing probabilities (fine in float64 at moderate logits), KL by its sum, the easy / hard split by
sorting. Torch float64 is used only so that autograd gives reference gradients.
"""

from __future__ import annotations

import math

import torch


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j log(a_j / b_j) over entries with a_j > 0."""
    total = a.new_zeros(())
    for a_j, b_j in zip(a, b, strict=True):
        if a_j > 0:
            total = total + a_j * torch.log(a_j / b_j)
    return total


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    e = torch.exp(z - z.max())
    return e / e.sum()


def buckets(p: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """p grouped into [p_ids..., rest] (the rest bucket is omitted when it holds no column)."""
    rest = [j for j in range(p.numel()) if j not in ids]
    parts = [p[j] for j in ids]
    if rest:
        parts.append(p[rest].sum())
    return torch.stack(parts)


def token_divergence(name, s_row, t_row, temperature, beta=0.5, alpha=0.1, topk=None) -> torch.Tensor:
    p, q = probs(t_row, temperature), probs(s_row, temperature)
    if topk is not None:
        p, q = buckets(p, topk), buckets(q, topk)
    return divergence_of(name, p, q, beta, alpha)


def divergence_of(name, p, q, beta=0.5, alpha=0.1) -> torch.Tensor:
    """Divergence ``name`` between the distributions p (teacher) and q (student)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "generalized_jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "alpha_beta":
        return alpha_beta(p, q, alpha, beta)
    raise ValueError(name)


def alpha_beta(p: torch.Tensor, q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Cichocki's AB-divergence, term by term, with its limits at alpha = 0, beta = 0 and both."""
    total = p.new_zeros(())
    for p_j, q_j in zip(p, q, strict=True):
        if alpha == 0 and beta == 0:
            total = total + 0.5 * (torch.log(p_j) - torch.log(q_j)) ** 2
        elif beta == 0:
            total = (
                total + (p_j**alpha * torch.log(p_j**alpha / q_j**alpha) - p_j**alpha + q_j**alpha) / alpha**2
            )
        elif alpha == 0:
            total = total + (q_j**beta * torch.log(q_j**beta / p_j**beta) - q_j**beta + p_j**beta) / beta**2
        else:
            s = alpha + beta
            term = p_j**alpha * q_j**beta - alpha / s * p_j**s - beta / s * q_j**s
            total = total - term / (alpha * beta)
    return total


def token_tkd_dkd(s_row, t_row, g, temperature, setting, topk=None):
    """(tkd, dkd, unc, rest coefficient) of one token, from the definitions."""
    p, q = probs(t_row, temperature), probs(s_row, temperature)
    p_g, q_g = p[g], q[g]
    b_p, b_q = torch.stack([p_g, 1 - p_g]), torch.stack([q_g, 1 - q_g])
    others = [j for j in range(p.numel()) if j != g]
    p_hat, q_hat = p[others] / (1 - p_g), q[others] / (1 - q_g)
    if topk is not None:
        kept = [others.index(j) for j in topk if j != g]
        p_hat, q_hat = buckets(p_hat, kept), buckets(q_hat, kept)
    if setting == "forward":
        return kl(b_p, b_q), kl(p_hat, q_hat), 1 - p_g, 1 - p_g
    return kl(b_q, b_p), kl(q_hat, p_hat), 1 - p_g, 1 - q_g


def reference_divergence(name, student, teacher, targets, temperature=1.0, ignore_index=-100, **params):
    """Mean over valid tokens. student/teacher [..., V], targets [...]."""
    s, t, g = (
        student.reshape(-1, student.shape[-1]),
        teacher.reshape(-1, teacher.shape[-1]),
        targets.reshape(-1),
    )
    values = [
        token_divergence(name, s[i], t[i], temperature, **params)
        for i in range(g.numel())
        if g[i] != ignore_index
    ]
    return torch.stack(values).sum() / len(values) if values else s.sum() * 0.0


def reference_atkd(
    student,
    teacher,
    targets,
    hard_fraction=0.5,
    lam=0.2,
    setting="forward",
    temperature=1.0,
    ignore_index=-100,
    split_scope="batch",
    unc_threshold=None,
    topk=None,
):
    """ATKD from the definitions: split by teacher UNC, DKD on easy, TKD + DKD on hard."""
    rows = student.shape[0] if split_scope == "sequence" and student.dim() == 3 else 1
    s = student.reshape(rows, -1, student.shape[-1])
    t = teacher.reshape(rows, -1, teacher.shape[-1])
    g = targets.reshape(rows, -1)
    easy_terms, hard_terms = [], []
    for r in range(rows):
        tokens = []
        for i in range(g.shape[1]):
            if g[r, i] == ignore_index:
                continue
            ids = None if topk is None else topk[r][i]
            tkd, dkd, unc, _ = token_tkd_dkd(s[r, i], t[r, i], int(g[r, i]), temperature, setting, ids)
            tokens.append((float(unc), tkd, dkd))
        if not tokens:
            continue
        if split_scope == "threshold":
            threshold = unc_threshold
        else:
            ranked = sorted((u for u, _, _ in tokens), reverse=True)
            num_hard = math.ceil(round(hard_fraction * len(tokens), 9))
            threshold = ranked[num_hard - 1] if num_hard > 0 else math.inf
        for unc, tkd, dkd in tokens:
            if unc >= threshold:
                hard_terms.append(tkd + dkd)
            else:
                easy_terms.append(dkd)
    zero = student.double().sum() * 0.0
    easy = torch.stack(easy_terms).mean() if easy_terms else zero
    hard = torch.stack(hard_terms).mean() if hard_terms else zero
    return lam * easy + (1 - lam) * hard, len(easy_terms), len(hard_terms)


def taid_token(s_row, t_row, t, temperature, topk=None) -> torch.Tensor:
    """TAID: KL(p_t || q), p_t proportional to q^(1 - t) p^t with q held fixed (no gradient)."""
    p, q = probs(t_row, temperature), probs(s_row, temperature)
    if topk is not None:
        p, q = buckets(p, topk), buckets(q, topk)
    mixed = q.detach() ** (1 - t) * p**t
    return kl(mixed / mixed.sum(), q)


def reference_taid(student, teacher, targets, t, temperature=1.0, topk=None, ignore_index=-100):
    """Mean TAID KL over valid tokens; student/teacher [N, V], topk: per-row id lists or None."""
    values = [
        taid_token(student[i], teacher[i], t, temperature, None if topk is None else topk[i])
        for i in range(targets.numel())
        if targets[i] != ignore_index
    ]
    return torch.stack(values).mean()


def hellinger(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.sqrt(0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum()))


def reference_adakd(
    student, teacher, targets, name, ratio, scale, temperature=1.0, topk=None, ignore_index=-100, **params
):
    """AdaKD from its definition: the share ``ratio`` of valid tokens farthest from the teacher
    (Hellinger, sorted), each at temperature T * exp(-scale * tanh(log(h / lower median))),
    divergence times the factor squared, mean over the selected. [N, V] rows."""
    rows = [i for i in range(targets.numel()) if targets[i] != ignore_index]

    def pair(i, factor):
        if topk is None:
            return probs(teacher[i], temperature * factor), probs(student[i], temperature * factor)
        # The record holds the teacher's buckets at T; they are tempered as recorded.
        recorded = buckets(probs(teacher[i], temperature), topk[i]) ** (1 / factor)
        return recorded / recorded.sum(), buckets(probs(student[i], temperature * factor), topk[i])

    scores = {i: hellinger(*[x.detach() for x in pair(i, 1.0)]) for i in rows}
    chosen = sorted(rows, key=lambda i: -scores[i])[: max(1, int(len(rows) * ratio))]
    median = sorted(scores[i] for i in chosen)[(len(chosen) - 1) // 2]
    total = student.new_zeros(())
    for i in chosen:
        factor = math.exp(-scale * math.tanh(math.log(scores[i] / median))) if median > 0 else 1.0
        p, q = pair(i, factor)
        total = total + factor**2 * divergence_of(name, p, q, **params)
    return total / len(chosen), sorted(chosen)
