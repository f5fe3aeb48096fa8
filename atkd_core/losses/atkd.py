"""ATKD: KL's target / diversity decomposition and the adaptive easy / hard objective.

Spec (docs/architecture.md, "The method"). Per valid token with ground truth g, teacher p, student q:

* ``KL(p || q) = TKD + (1 - p_g) * DKD`` with ``TKD = KL(b_p || b_q)`` over the binary
  distributions ``[p_g, 1 - p_g]`` and ``DKD = KL(p_hat || q_hat)`` over the non-target
  distributions (a log-softmax over the logits with column g masked, never a division of
  probabilities). The reverse setting decomposes ``KL(q || p)`` the same way with the roles
  swapped: ``KL(q || p) = KL(b_q || b_p) + (1 - q_g) * KL(q_hat || p_hat)``.
* The teacher's uncertainty ``UNC = 1 - p_g`` splits tokens: the ``hard_fraction`` k of valid tokens
  with the highest UNC are hard, the rest easy (in both settings the teacher's UNC decides).
* Easy tokens get DKD only, hard tokens TKD + DKD; no UNC coefficient.
  ``loss = lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)``; an empty group adds 0.

Which combinations are exact: with a dense teacher every setting is exact. With a sparse teacher
(top-K + tail), TKD and UNC are exact (from the target log-prob and tail mass) and DKD is computed
over the top-K + tail buckets, a lower bound that is exact when the top-K covers the vocabulary.
Other base divergences (JSD, TVD, skew KL) have no TKD/DKD identity; the paper wraps methods by
the KL direction they optimise, so ATKD over them means the ``forward`` or ``reverse`` setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from atkd_core.losses.distributions import (
    LinearHead,
    SparseTeacher,
    Teacher,
    binary_kl,
    dense_split_kl,
    kl_from_logprobs,
    non_target_split,
    target_split,
)
from atkd_core.losses.divergences import dense_rows, flatten_inputs, teacher_rows
from atkd_core.losses.engine import Terms, combine, weighted_token_sum

UNC_CHUNK = 256
Setting = Literal["forward", "reverse"]
SplitScope = Literal["batch", "sequence", "threshold"]


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


def _pieces(
    chunk: Tensor,
    teacher: Tensor | SparseTeacher,
    target: Tensor,
    setting: Setting,
    temperature: float,
    with_cross_entropy: bool = False,
) -> Tensor:
    """[n, V] student logits -> [n, 2] per-token (TKD, DKD) in ``setting``, or [n, 3] with the
    cross-entropy -log q_g appended (read from the split; only meaningful at temperature 1)."""
    split = _split(chunk, teacher, target, setting, temperature)
    columns = [split.tkd, split.dkd, -split.log_q_target] if with_cross_entropy else [split.tkd, split.dkd]
    return torch.stack(columns, -1)


class _SettingSplit(NamedTuple):
    """Per-token [n] pieces of one setting's decomposition (see KLDecomposition)."""

    tkd: Tensor
    dkd: Tensor
    log_p_rest: Tensor
    log_q_target: Tensor
    log_q_rest: Tensor


def _split(
    student: Tensor, teacher: Tensor | SparseTeacher, target: Tensor, setting: Setting, temperature: float
) -> _SettingSplit:
    """TKD and DKD in ``setting`` from student logits [n, V], dense teacher logits [n, V] or a sparse
    teacher of n rows, and valid targets [n], with the log-masses they came from."""
    reverse = setting == "reverse"
    if isinstance(teacher, Tensor):
        dense = dense_split_kl(student, teacher.detach(), target, temperature, reverse)
        p_target, p_rest, q_target, q_rest, dkd = dense
    else:
        split = target_split(student, teacher, target, temperature)
        p_target, p_rest, q_target, q_rest = (
            split.log_p_target,
            split.log_p_rest,
            split.log_q_target,
            split.log_q_rest,
        )
        dkd = (
            kl_from_logprobs(split.log_q_hat, split.log_p_hat)
            if reverse
            else kl_from_logprobs(split.log_p_hat, split.log_q_hat)
        )
    tkd = (
        binary_kl(q_target, q_rest, p_target, p_rest)
        if reverse
        else binary_kl(p_target, p_rest, q_target, q_rest)
    )
    return _SettingSplit(tkd, dkd, p_rest, q_target, q_rest)


def _check_setting(setting: str) -> None:
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
    _check_setting(setting)
    student, flat_teacher, flat_targets = flatten_inputs(student_logits, teacher, targets)
    valid = flat_targets != ignore_index
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    rows = flat_targets.shape[0]
    split = _split(
        dense_rows(student, 0, rows).float(),
        teacher_rows(flat_teacher, 0, rows),
        safe_targets,
        setting,
        temperature,
    )
    rest = split.log_p_rest.exp() if setting == "forward" else split.log_q_rest.exp()
    zero = torch.zeros_like(split.tkd)

    def shaped(values: Tensor) -> Tensor:
        return torch.where(valid, values, zero).reshape(targets.shape)

    return KLDecomposition(
        tkd=shaped(split.tkd),
        dkd=shaped(split.dkd),
        unc=shaped(split.log_p_rest.exp()),
        rest_mass=shaped(rest),
    )


@torch.no_grad()
def teacher_uncertainty(
    teacher: Teacher,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """The teacher's UNC = 1 - p_g per token, shape of ``targets``, zero where ignored. float32.

    Dense teacher [.., V] (or a LinearHead, its logits made per chunk): exp(logsumexp of the
    non-target logits - logsumexp of all), over chunks of ``chunk_size`` tokens (UNC_CHUNK when
    None: no gradient is involved, so chunking is free) so only one ``[chunk, V]`` block is live.
    Sparse teacher: its cached ``unc`` when present, else 1 - exp(target_logprob).
    """
    valid = targets != ignore_index
    if isinstance(teacher, SparseTeacher):
        if teacher.unc is not None:
            unc = teacher.unc.float()
        else:
            unc = -torch.expm1(teacher.target_logprob.float().clamp(max=0.0))
        return torch.where(valid, unc, torch.zeros_like(unc))
    flat = (
        teacher.reshape_flat() if isinstance(teacher, LinearHead) else teacher.reshape(-1, teacher.shape[-1])
    )
    flat_targets = torch.where(valid, targets, torch.zeros_like(targets)).reshape(-1)
    step = chunk_size or UNC_CHUNK
    parts = []
    for start in range(0, flat_targets.shape[0], step):
        end = min(start + step, flat_targets.shape[0])
        _, _, log_rest = non_target_split(dense_rows(flat, start, end), flat_targets[start:end], temperature)
        parts.append(log_rest.exp())
    unc = torch.cat(parts) if parts else torch.zeros(0, device=teacher.device)
    return torch.where(valid, unc.reshape(targets.shape), torch.zeros_like(unc.reshape(targets.shape)))


def hard_token_mask(
    unc: Tensor,
    valid: Tensor,
    *,
    hard_fraction: float = 0.5,
    split_scope: SplitScope = "batch",
    unc_threshold: float | None = None,
) -> tuple[Tensor, float]:
    """Which valid tokens are hard, and the UNC threshold used (NaN when no token is valid).

    unc, valid: shaped like the targets ([N] or [B, T]). ``batch``: the ceil(k * n) valid tokens
    with the highest UNC (ties at the threshold go to hard, so ``easy = UNC < threshold``).
    ``sequence``: the same within each row of a [B, T] input (the returned threshold is their mean).
    ``threshold``: ``UNC >= unc_threshold``, independent of how the data is batched.
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if split_scope == "threshold":
        if unc_threshold is None:
            raise ValueError("split_scope 'threshold' needs unc_threshold")
        return valid & (unc >= unc_threshold), float(unc_threshold)
    if split_scope == "sequence" and unc.dim() == 2:
        masks, thresholds = [], []
        for row_unc, row_valid in zip(unc, valid, strict=True):
            mask, threshold = _top_fraction(row_unc, row_valid, hard_fraction)
            masks.append(mask)
            if not math.isnan(threshold):
                thresholds.append(threshold)
        mean = sum(thresholds) / len(thresholds) if thresholds else float("nan")
        return torch.stack(masks), mean
    if split_scope not in ("batch", "sequence"):
        raise ValueError(f"split_scope must be batch, sequence or threshold, got {split_scope!r}")
    return _top_fraction(unc, valid, hard_fraction)


UNC_BINS = 200  # histogram bins over [0, 1]: 0.005 wide, finer than any threshold worth telling apart


def unc_histogram(unc: Tensor, bins: int = UNC_BINS) -> list[int]:
    """Counts of ``unc`` (any shape, values in [0, 1]) in ``bins`` equal bins over [0, 1]."""
    index = (unc.detach().double().flatten().clamp(0, 1) * bins).long().clamp(max=bins - 1)
    return torch.bincount(index, minlength=bins).tolist()


def otsu_threshold(counts: list[int]) -> tuple[float, float]:
    """The automatic easy/hard split of a UNC histogram over [0, 1]: (threshold, hard share).

    Otsu's rule: the bin edge that maximises the between-group variance w_e * w_h * (mu_e - mu_h)^2,
    i.e. the valley between the near-certain tokens (UNC near 0) and the uncertain ones; where
    several edges tie (empty bins between the groups), the middle one. Tokens with
    ``UNC >= threshold`` are hard. An empty histogram, or one whose tokens all share one bin, has no
    valley: (NaN, NaN).
    """
    bins = len(counts)
    total = float(sum(counts))
    if total == 0 or sum(1 for c in counts if c) < 2:
        return float("nan"), float("nan")
    centers = [(i + 0.5) / bins for i in range(bins)]
    grand = sum(c * x for c, x in zip(counts, centers, strict=True))
    best, first, last, easy_count, easy_sum = -1.0, 1, 1, 0.0, 0.0
    for edge in range(1, bins):
        easy_count += counts[edge - 1]
        easy_sum += counts[edge - 1] * centers[edge - 1]
        hard_count = total - easy_count
        if easy_count == 0 or hard_count == 0:
            continue
        between = easy_count * hard_count * (easy_sum / easy_count - (grand - easy_sum) / hard_count) ** 2
        if between > best * (1 + 1e-12):
            best, first, last = between, edge, edge
        elif between >= best * (1 - 1e-12):
            last = edge
    edge = (first + last) // 2
    return edge / bins, sum(counts[edge:]) / total


def dataset_threshold(unc: Tensor, hard_fraction: float | str) -> float:
    """The UNC at or above which a token of ``unc`` ([n], a whole split) is hard: the quantile at
    1 - k for a numeric k, Otsu's threshold for ``auto``; NaN when ``unc`` is empty."""
    if unc.numel() == 0:
        return float("nan")
    if hard_fraction == "auto":
        return otsu_threshold(unc_histogram(unc))[0]
    return float(torch.quantile(unc.double(), 1 - float(hard_fraction)))


def _top_fraction(unc: Tensor, valid: Tensor, hard_fraction: float) -> tuple[Tensor, float]:
    values = unc[valid]
    count = values.numel()
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 does not become 4 hard tokens.
    num_hard = min(count, math.ceil(round(hard_fraction * count, 9)))
    if count == 0 or num_hard == 0:
        return torch.zeros_like(valid), float("nan") if count == 0 else float("inf")
    threshold = torch.kthvalue(values, count - num_hard + 1).values
    return valid & (unc >= threshold), float(threshold)


@dataclass(frozen=True)
class ATKDOutput:
    """The ATKD loss and what it saw.

    loss: float32 scalar with a gradient. tkd_easy, dkd_easy, tkd_hard, dkd_hard: detached means
    over the group (0 when the group is empty). num_easy, num_hard: token counts here.
    unc_threshold: UNC at or above which a token was hard. hard_mask: shaped like the targets.
    """

    loss: Tensor
    tkd_easy: Tensor
    dkd_easy: Tensor
    tkd_hard: Tensor
    dkd_hard: Tensor
    num_easy: int
    num_hard: int
    unc_threshold: float
    hard_mask: Tensor


def atkd_loss(
    student_logits: Tensor | LinearHead,
    teacher: Teacher,
    targets: Tensor,
    *,
    hard_fraction: float = 0.5,
    lam: float = 0.2,
    setting: Setting = "forward",
    temperature: float = 1.0,
    ignore_index: int = -100,
    split_scope: SplitScope = "batch",
    unc_threshold: float | None = None,
    chunk_size: int | None = None,
    num_tokens: tuple[float, float] | None = None,
) -> ATKDOutput:
    """``lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)`` (ATKD, Zhong et al. 2024).

    student_logits [N, V] or [B, T, V]; teacher the same shape (dense logits, no gradient) or a
    SparseTeacher; targets [N] / [B, T] aligned with the logits, ``ignore_index`` where not counted.
    The student (and a dense teacher) may be a LinearHead, its logits made chunk by chunk.
    num_tokens: (easy, hard) denominators to use instead of this call's counts, e.g. the counts
    of a whole optimizer step when it is split into micro-batches (with ``split_scope="threshold"``
    the split itself is then independent of the batching too).
    """
    _check_setting(setting)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, flat_teacher, _ = flatten_inputs(student_logits, teacher, targets)
    terms, split = atkd_terms(
        teacher,
        flat_teacher,
        targets,
        hard_fraction=hard_fraction,
        lam=lam,
        setting=setting,
        temperature=temperature,
        ignore_index=ignore_index,
        split_scope=split_scope,
        unc_threshold=unc_threshold,
        chunk_size=chunk_size,
        num_tokens=num_tokens,
    )
    loss, values = weighted_token_sum(student, terms.weights.to(student.device), terms.fn, chunk_size)
    return split.output(loss, values, targets.shape)


@dataclass(frozen=True)
class ATKDSplit:
    """Which flat tokens are easy and hard ([N] bool each) and the UNC threshold used."""

    easy: Tensor
    hard: Tensor
    unc_threshold: float

    def output(self, loss: Tensor, values: Tensor, shape: torch.Size) -> ATKDOutput:
        """The ATKDOutput of ``loss`` with per-group means of the (TKD, DKD) columns of ``values`` [N, >= 2]."""

        def group_mean(column: int, mask: Tensor) -> Tensor:
            count = int(mask.sum())
            return values[mask, column].sum() / count if count else values.new_zeros(())

        return ATKDOutput(
            loss=loss,
            tkd_easy=group_mean(0, self.easy),
            dkd_easy=group_mean(1, self.easy),
            tkd_hard=group_mean(0, self.hard),
            dkd_hard=group_mean(1, self.hard),
            num_easy=int(self.easy.sum()),
            num_hard=int(self.hard.sum()),
            unc_threshold=self.unc_threshold,
            hard_mask=self.hard.reshape(shape),
        )


def _positive(denominator: float) -> float:
    """``denominator``, or 1 for an empty group (whose terms are all zero anyway)."""
    return float(denominator) if denominator > 0 else 1.0


def atkd_terms(
    teacher: Teacher,
    flat_teacher: Teacher,
    targets: Tensor,
    *,
    hard_fraction: float = 0.5,
    lam: float = 0.2,
    setting: Setting = "forward",
    temperature: float = 1.0,
    ignore_index: int = -100,
    split_scope: SplitScope = "batch",
    unc_threshold: float | None = None,
    chunk_size: int | None = None,
    num_tokens: tuple[float, float] | None = None,
    cross_entropy: Terms | None = None,
) -> tuple[Terms, ATKDSplit]:
    """ATKD before the reduction: column 0 weighs TKD (hard tokens), column 1 DKD (every valid
    token), each by lam or 1 - lam over its group's count; and the split. ``teacher`` and
    ``targets`` as given to atkd_loss (the split reads their shape), ``flat_teacher`` flattened.

    ``cross_entropy`` (cross_entropy_terms over the same targets) is appended as a last column; at
    temperature 1 its values come from the split's -log q_g, saving a second pass over the
    vocabulary per chunk."""
    valid = targets != ignore_index
    unc = teacher_uncertainty(
        teacher, targets, temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size
    )
    hard, threshold = hard_token_mask(
        unc, valid, hard_fraction=hard_fraction, split_scope=split_scope, unc_threshold=unc_threshold
    )
    hard, valid = hard.reshape(-1), valid.reshape(-1)
    easy = valid & ~hard
    easy_denominator, hard_denominator = (
        num_tokens if num_tokens is not None else (int(easy.sum()), int(hard.sum()))
    )
    # A denominator is a count, or a step's count over its micro-batches (below 1 when the step has
    # fewer such tokens than micro-batches): only an empty group's zero needs replacing.
    easy_weight = lam / _positive(easy_denominator)
    hard_weight = (1.0 - lam) / _positive(hard_denominator)
    weights = torch.stack(
        [hard.float() * hard_weight, easy.float() * easy_weight + hard.float() * hard_weight], -1
    )
    flat_targets = targets.reshape(-1)
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))

    shared_cross_entropy = cross_entropy is not None and temperature == 1.0

    def terms_fn(start: int, end: int, chunk: Tensor) -> Tensor:
        return _pieces(
            chunk,
            teacher_rows(flat_teacher, start, end),
            safe_targets[start:end],
            setting,
            temperature,
            with_cross_entropy=shared_cross_entropy,
        )

    terms = Terms(weights, terms_fn)
    if cross_entropy is not None:
        terms = (
            Terms(torch.cat([weights, cross_entropy.weights], -1), terms_fn)
            if shared_cross_entropy
            else combine(terms, cross_entropy)
        )
    return terms, ATKDSplit(easy=easy, hard=hard, unc_threshold=threshold)
