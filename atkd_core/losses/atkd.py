"""ATKD, the adaptive easy / hard objective (Zhong et al. 2024).

Per valid token (see decomposition.py for TKD and DKD, uncertainty.py for the grouping): easy
tokens get DKD only, hard tokens TKD + DKD; no UNC coefficient.
``loss = lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)``; an empty group adds 0.
In both settings the teacher's UNC decides which tokens are hard. Other base divergences (JSD,
TVD, skew KL) have no TKD / DKD identity; the paper wraps methods by the KL direction they
optimise, so ATKD over them means the ``forward`` or ``reverse`` setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atkd_core.losses.decomposition import Setting, check_setting, target_rest
from atkd_core.losses.engine import Terms, weighted_token_sum, with_cross_entropy
from atkd_core.losses.inputs import LinearHead, Teacher, flatten_inputs, teacher_rows
from atkd_core.losses.uncertainty import SplitScope, hard_token_mask, teacher_uncertainty


@dataclass(frozen=True)
class ATKDParams:
    """What defines ATKD's loss, checked once.

    hard_fraction: k in [0, 1], the share of valid tokens that are hard. lam: in [0, 1], the easy
    group's weight. setting: which KL direction is decomposed. temperature: > 0, dividing both
    sides' logits. split_scope / unc_threshold: how the groups are counted (see hard_token_mask).
    """

    hard_fraction: float = 0.5
    lam: float = 0.2
    setting: Setting = "forward"
    temperature: float = 1.0
    ignore_index: int = -100
    split_scope: SplitScope = "batch"
    unc_threshold: float | None = None

    def __post_init__(self) -> None:
        check_setting(self.setting)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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


@dataclass(frozen=True)
class TokenGroups:
    """Which flat tokens are easy and hard ([N] bool each) and the UNC threshold used."""

    easy: Tensor
    hard: Tensor
    unc_threshold: float

    def means(self, values: Tensor) -> dict[str, Tensor]:
        """Per-group means of the (TKD, DKD) columns of ``values`` [N, >= 2] (0 for an empty group):
        tkd_easy, dkd_easy, tkd_hard, dkd_hard."""

        def group_mean(column: int, mask: Tensor) -> Tensor:
            count = int(mask.sum())
            return values[mask, column].sum() / count if count else values.new_zeros(())

        return {
            "tkd_easy": group_mean(0, self.easy),
            "dkd_easy": group_mean(1, self.easy),
            "tkd_hard": group_mean(0, self.hard),
            "dkd_hard": group_mean(1, self.hard),
        }

    def output(self, loss: Tensor, values: Tensor, shape: torch.Size) -> ATKDOutput:
        """The ATKDOutput of ``loss``, its terms ``values`` [N, >= 2] and targets of ``shape``."""
        return ATKDOutput(
            loss=loss,
            **self.means(values),
            num_easy=int(self.easy.sum()),
            num_hard=int(self.hard.sum()),
            unc_threshold=self.unc_threshold,
            hard_mask=self.hard.reshape(shape),
        )


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
    """``lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)`` (see ATKDParams for the knobs).

    student_logits [N, V] or [B, T, V]; teacher the same shape (dense logits, no gradient) or a
    SparseTeacher; targets [N] / [B, T] aligned with the logits, ``ignore_index`` where not counted.
    The student (and a dense teacher) may be a LinearHead, its logits made chunk by chunk.
    num_tokens: (easy, hard) denominators to use instead of this call's counts, e.g. the counts
    of a whole optimizer step when it is split into micro-batches (with ``split_scope="threshold"``
    the split itself is then independent of the batching too).
    """
    params = ATKDParams(hard_fraction, lam, setting, temperature, ignore_index, split_scope, unc_threshold)
    student, flat_teacher, _ = flatten_inputs(student_logits, teacher, targets)
    terms, groups = atkd_terms(teacher, flat_teacher, targets, params, chunk_size, num_tokens)
    loss, values = weighted_token_sum(student, terms.weights.to(student.device), terms.fn, chunk_size)
    return groups.output(loss, values, targets.shape)


def _positive(denominator: float) -> float:
    """``denominator``, or 1 for an empty group (whose terms are all zero anyway)."""
    return float(denominator) if denominator > 0 else 1.0


def atkd_terms(
    teacher: Teacher,
    flat_teacher: Teacher,
    targets: Tensor,
    params: ATKDParams,
    chunk_size: int | None = None,
    num_tokens: tuple[float, float] | None = None,
    cross_entropy: Terms | None = None,
) -> tuple[Terms, TokenGroups]:
    """ATKD before the reduction, and its groups: column 0 weighs TKD (hard tokens), column 1 DKD
    (every valid token), each by lam or 1 - lam over its group's count. ``teacher`` and ``targets``
    as given to atkd_loss (the grouping reads their shape), ``flat_teacher`` flattened;
    ``cross_entropy`` is appended as the last column (see engine.with_cross_entropy)."""
    valid = targets != params.ignore_index
    unc = teacher_uncertainty(
        teacher,
        targets,
        temperature=params.temperature,
        ignore_index=params.ignore_index,
        chunk_size=chunk_size,
    )
    hard, threshold = hard_token_mask(
        unc,
        valid,
        hard_fraction=params.hard_fraction,
        split_scope=params.split_scope,
        unc_threshold=params.unc_threshold,
    )
    hard, valid = hard.reshape(-1), valid.reshape(-1)
    easy = valid & ~hard
    easy_denominator, hard_denominator = (
        num_tokens if num_tokens is not None else (int(easy.sum()), int(hard.sum()))
    )
    # A denominator is a count, or a step's count over its micro-batches (below 1 when the step has
    # fewer such tokens than micro-batches): only an empty group's zero needs replacing.
    easy_weight = params.lam / _positive(easy_denominator)
    hard_weight = (1.0 - params.lam) / _positive(hard_denominator)
    weights = torch.stack(
        [hard.float() * hard_weight, easy.float() * easy_weight + hard.float() * hard_weight], -1
    )
    flat_targets = targets.reshape(-1)
    safe_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    reverse = params.setting == "reverse"

    def pieces(start: int, end: int, chunk: Tensor, _needs_target: bool) -> tuple[Tensor, Tensor]:
        rest = target_rest(
            chunk,
            teacher_rows(flat_teacher, start, end),
            safe_targets[start:end],
            params.temperature,
            reverse,
        )
        return torch.stack([rest.tkd(params.setting), rest.dkd], -1), rest.log_q_target

    terms = with_cross_entropy(weights, pieces, cross_entropy, params.temperature)
    return terms, TokenGroups(easy=easy, hard=hard, unc_threshold=threshold)
