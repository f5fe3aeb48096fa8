"""What a loss is given: the student and the teacher, as tensors, sparse records or output layers.

The student is logits ``[N, V]`` / ``[B, T, V]`` or a :class:`LinearHead` (hidden states and the
output layer, its logits made chunk by chunk). The teacher is the same (dense) or a
:class:`SparseTeacher` (the top-K record teacher scoring caches). Targets ``[N]`` / ``[B, T]`` are
aligned with the logits (the caller shifts). Every loss flattens its inputs here first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    def rows_at(self, index: Tensor) -> SparseTeacher:
        """The rows ``index`` [S] (long) of a flat record, in that order."""
        return SparseTeacher(
            target_logprob=self.target_logprob[index],
            topk_ids=self.topk_ids[index],
            topk_logprobs=self.topk_logprobs[index],
            log_tail_mass=None if self.log_tail_mass is None else self.log_tail_mass[index],
            unc=None if self.unc is None else self.unc[index],
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

    def rows_at(self, index: Tensor) -> LinearHead:
        """The rows ``index`` [S] (long) of a flat head, in that order (the gradient flows back to
        those rows of the hidden states)."""
        return LinearHead(self.hidden.index_select(0, index), self.weight, self.bias, self.vocab_size)

    def logits(self, start: int, end: int) -> Tensor:
        """Logits of the flat rows ``start:end``: [n, vocab_size] in the inputs' dtype."""
        bias = None if self.bias is None else self.bias[: self.vocab_size]
        return torch.nn.functional.linear(self.hidden[start:end], self.weight[: self.vocab_size], bias)


Teacher = Tensor | SparseTeacher | LinearHead


def flatten_student(
    student_logits: Tensor | LinearHead, targets: Tensor
) -> tuple[Tensor | LinearHead, Tensor]:
    """Check shapes and flatten to ``[N, V]`` (or a head of N rows) and ``[N]``; ValueError on mismatch."""
    if len(student_logits.shape) < 2:
        raise ValueError(
            f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal student_logits shape without the vocabulary "
            f"dim {tuple(student_logits.shape[:-1])}"
        )
    if student_logits.shape[-1] < 2:
        raise ValueError(f"the vocabulary must have at least 2 entries, got {student_logits.shape[-1]}")
    if isinstance(student_logits, LinearHead):
        return student_logits.reshape_flat(), targets.reshape(-1)
    return student_logits.reshape(-1, student_logits.shape[-1]), targets.reshape(-1)


def flatten_inputs(
    student_logits: Tensor | LinearHead, teacher: Teacher, targets: Tensor
) -> tuple[Tensor | LinearHead, Teacher, Tensor]:
    """Check shapes and flatten to ``[N, V]`` (or a head of N rows), teacher of N rows, ``[N]``;
    raise ValueError on mismatch."""
    flat_student, flat_targets = flatten_student(student_logits, targets)
    if isinstance(teacher, SparseTeacher):
        if teacher.target_logprob.shape != targets.shape or teacher.topk_ids.shape[:-1] != targets.shape:
            raise ValueError(
                f"sparse teacher shapes (target_logprob {tuple(teacher.target_logprob.shape)}, topk_ids "
                f"{tuple(teacher.topk_ids.shape)}) must match targets {tuple(targets.shape)}"
            )
        flat_teacher: Teacher = teacher.reshape_flat()
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher.shape)} must equal student_logits shape {tuple(student_logits.shape)}"
            )
        flat_teacher = (
            teacher.reshape_flat()
            if isinstance(teacher, LinearHead)
            else teacher.detach().reshape(-1, teacher.shape[-1])
        )
    return flat_student, flat_teacher, flat_targets


def label_rows(
    flat_student: Tensor | LinearHead,
    flat_teacher: Teacher | None,
    flat_targets: Tensor,
    ignore_index: int = -100,
) -> tuple[Tensor | LinearHead, Teacher | None, Tensor]:
    """A fused head's flat student, its teacher and targets cut to the rows with a target: prompt
    and padding rows carry no loss, and a head need not make their logits (on instruction data
    most rows are prompt). Plain logits, and inputs with no target at all, are returned as they
    are: cutting [N, V] logits would copy them."""
    if not isinstance(flat_student, LinearHead):
        return flat_student, flat_teacher, flat_targets
    index = (flat_targets != ignore_index).nonzero().squeeze(-1)
    if index.numel() in (0, flat_targets.numel()):
        return flat_student, flat_teacher, flat_targets
    teacher: Teacher | None
    if flat_teacher is None or isinstance(flat_teacher, (SparseTeacher, LinearHead)):
        teacher = None if flat_teacher is None else flat_teacher.rows_at(index)
    else:
        teacher = flat_teacher.index_select(0, index)
    return flat_student.rows_at(index), teacher, flat_targets.index_select(0, index)


def teacher_rows(teacher: Teacher, start: int, end: int) -> SparseTeacher | Tensor:
    """Rows ``start:end`` of a flat teacher: a sparse record, or dense logits (a head's made now)."""
    return teacher.rows(start, end) if isinstance(teacher, SparseTeacher) else dense_rows(teacher, start, end)


def dense_rows(logits: Tensor | LinearHead, start: int, end: int) -> Tensor:
    """Rows ``start:end`` of flat logits, a head's made now without gradient (a teacher's, or a
    student's for a per-token analysis)."""
    if isinstance(logits, LinearHead):
        with torch.no_grad():
            return logits.logits(start, end)
    return logits[start:end]
