"""The teacher's uncertainty and the easy / hard grouping of tokens it decides.

``UNC = 1 - p_g``, the teacher's probability of not predicting the ground truth. The
``hard_fraction`` k of valid tokens with the highest UNC are hard, the rest easy, counted per batch,
per sequence, or against a fixed threshold (``split_scope``); for a whole dataset the threshold is
the (1 - k) quantile of its UNC, or Otsu's valley of its histogram when k is ``auto``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from atkd_core.losses.inputs import LinearHead, SparseTeacher, Teacher, dense_rows
from atkd_core.losses.logprobs import non_target_logprobs

UNC_CHUNK = 256
SplitScope = Literal["batch", "sequence", "threshold"]


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
        _, _, log_rest = non_target_logprobs(
            dense_rows(flat, start, end), flat_targets[start:end], temperature
        )
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


# Resolution of the UNC quantiles a cache's manifest and its difficulty report record: counts in 2^20 equal bins over [0, 1] (8 MiB)
# instead of every token's UNC in memory (4 GB for a billion-token cache, 8 GB more to sort).
QUANTILE_BINS = 2**20


class UncStatistics:
    """The UNC statistics of a cache, accumulated shard by shard in constant memory: token count,
    mean, a fine histogram for the quantiles (each within 1 / QUANTILE_BINS of the exact one),
    and the UNC_BINS histogram the automatic split reads (losses.unc_histogram's, summed)."""

    def __init__(self) -> None:
        self.tokens = 0
        self._sum = 0.0
        self._counts = torch.zeros(QUANTILE_BINS, dtype=torch.int64)
        self.histogram = [0] * UNC_BINS

    def add(self, unc: Tensor) -> None:
        """Count one shard's UNC values ([n], in [0, 1])."""
        values = unc.detach().double().flatten()
        self.tokens += values.numel()
        self._sum += float(values.sum())
        bins = (values.clamp(0, 1) * QUANTILE_BINS).long().clamp(max=QUANTILE_BINS - 1)
        self._counts += torch.bincount(bins, minlength=QUANTILE_BINS)
        self.histogram = [a + b for a, b in zip(self.histogram, unc_histogram(values, UNC_BINS), strict=True)]

    def mean(self) -> float:
        """The mean UNC (NaN for an empty cache)."""
        return self._sum / self.tokens if self.tokens else float("nan")

    def quantile(self, q: float) -> float:
        """The ``q`` quantile as torch.quantile defines it (linear between the order statistics
        around ``q`` x (n - 1)), each order statistic taken as its fine bin's centre: within
        1 / QUANTILE_BINS of the exact value. NaN for an empty cache."""
        if not self.tokens:
            return float("nan")
        position = q * (self.tokens - 1)
        below = min(int(position), self.tokens - 1)
        above = min(below + 1, self.tokens - 1)
        cumulative = self._counts.cumsum(0)
        # The bin of the element of sorted index r: the first whose cumulative count exceeds r.
        low, high = (
            (int(torch.searchsorted(cumulative, rank, right=True)) + 0.5) / QUANTILE_BINS
            for rank in (below, above)
        )
        return low + (position - below) * (high - low)

    def share_at_or_above(self, threshold: float) -> float:
        """The share of the tokens with UNC >= ``threshold``, counting the fine bin that holds the
        threshold as at or above it (exact but for that bin's tokens). NaN for an empty cache or a
        NaN threshold (a histogram without a valley has no split)."""
        if not self.tokens or math.isnan(threshold):
            return float("nan")
        first = min(max(int(threshold * QUANTILE_BINS), 0), QUANTILE_BINS)
        return float(self._counts[first:].sum()) / self.tokens

    def fine_histogram(self) -> tuple[Tensor, Tensor]:
        """(bin centres [QUANTILE_BINS], counts [QUANTILE_BINS]) of the fine histogram, to plot."""
        centres = (torch.arange(QUANTILE_BINS, dtype=torch.float64) + 0.5) / QUANTILE_BINS
        return centres, self._counts.clone()


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


def dataset_threshold(unc: Tensor, hard_fraction: float | str, unc_epsilon: float | None = None) -> float:
    """The UNC at or above which a token of ``unc`` ([n], a whole split) is hard: the quantile at
    1 - k for a numeric k, Otsu's threshold for ``auto``, ``unc_epsilon`` for ``epsilon``; NaN
    when ``unc`` is empty."""
    if unc.numel() == 0:
        return float("nan")
    if hard_fraction == "epsilon":
        return epsilon_threshold(unc_epsilon)
    if hard_fraction == "auto":
        return otsu_threshold(unc_histogram(unc))[0]
    return float(torch.quantile(unc.double(), 1 - float(hard_fraction)))


def epsilon_threshold(unc_epsilon: float | None) -> float:
    """The threshold of ``hard_fraction: epsilon``: ``unc_epsilon`` itself, which must be given."""
    if unc_epsilon is None:
        raise ValueError("hard_fraction epsilon needs unc_epsilon, the UNC below which a token is easy")
    return unc_epsilon


def histogram_share_at_or_above(counts: list[int], threshold: float) -> float:
    """The share of a UNC histogram's tokens (``counts`` in equal bins over [0, 1]) at or above
    ``threshold``, counting the bin that holds it in proportion to the part of it above: exact when
    the threshold is a bin edge. NaN for an empty histogram."""
    total = sum(counts)
    if not total:
        return float("nan")
    position = min(max(threshold, 0.0), 1.0) * len(counts)
    first = min(int(position), len(counts))
    inside = counts[first] * (first + 1 - position) if first < len(counts) else 0.0
    return (inside + sum(counts[first + 1 :])) / total


def _top_fraction(unc: Tensor, valid: Tensor, hard_fraction: float) -> tuple[Tensor, float]:
    values = unc[valid]
    count = values.numel()
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 does not become 4 hard tokens.
    num_hard = min(count, math.ceil(round(hard_fraction * count, 9)))
    if count == 0 or num_hard == 0:
        return torch.zeros_like(valid), float("nan") if count == 0 else float("inf")
    threshold = torch.kthvalue(values, count - num_hard + 1).values
    return valid & (unc >= threshold), float(threshold)
