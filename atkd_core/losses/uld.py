"""Universal Logit Distillation (ULD; Boizard et al. 2024): a loss that needs no shared vocabulary.

ULD compares the teacher's and the student's next-token distributions as sorted probability
vectors: the Wasserstein-1 distance between two distributions whose supports are each sorted by
probability and laid on the same line, with unit cost between neighbouring ranks, which for two
vectors sorted in the same (descending) order is ``sum_i |p_(i) - q_(i)|``, the shorter one padded
with zeros. No token of one vocabulary is ever compared with a token of the other, so any teacher
can teach any student: the baseline every cross-tokenizer method is measured against.

From the scoring cache the teacher is its top-K and a tail mass, not the whole vector. Its ranks
beyond K are unknown, so ranks K and beyond are compared as one bucket on each side:
``sum_{i<K} |p_(i) - q_(i)| + |tail_p - sum_{i>=K} q_(i)|``. By the triangle inequality that is at
most the full distance, and equal to it when K covers the teacher's support; the paper has the
whole teacher and does not need the choice.

Shapes: student logits [N, Vs]; teacher logits [N, Vt] (any Vt) or a SparseTeacher of N rows
(already at the loss temperature, as the cache stores it). Math in float32. Per-token values [N];
the teacher gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from atkd_core.losses.inputs import SparseTeacher


def _pad_columns(values: Tensor, width: int) -> Tensor:
    """``values`` [N, w] with zero columns appended up to ``width`` (w <= width)."""
    return functional.pad(values, (0, width - values.shape[-1]))


def uld_terms(student_logits: Tensor, teacher: SparseTeacher | Tensor, temperature: float = 1.0) -> Tensor:
    """ULD per token: the W1 distance between sorted teacher and student probabilities.

    student_logits [N, Vs]; teacher [N, Vt] logits (divided by ``temperature`` like the student's)
    or a SparseTeacher [N] (top-K and tail, at the temperature already). Returns [N] float32.
    """
    student = torch.softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, Tensor):
        with torch.no_grad():
            teacher_probs = torch.softmax(teacher.float() / temperature, dim=-1)
        width = max(student.shape[-1], teacher_probs.shape[-1])
        teacher_sorted = _pad_columns(teacher_probs.sort(dim=-1, descending=True).values, width)
        student_sorted = _pad_columns(student.sort(dim=-1, descending=True).values, width)
        return (teacher_sorted - student_sorted).abs().sum(-1)
    k = teacher.topk_logprobs.shape[-1]
    with torch.no_grad():
        teacher_top = teacher.topk_logprobs.float().exp().sort(dim=-1, descending=True).values
        tail = (
            teacher.log_tail_mass.float().exp()
            if teacher.log_tail_mass is not None
            else (1 - teacher_top.sum(-1)).clamp(min=0)
        )
    student_top = _pad_columns(student.topk(min(k, student.shape[-1]), dim=-1).values, k)
    student_rest = (1 - student_top.sum(-1)).clamp(min=0)
    return (teacher_top - student_top).abs().sum(-1) + (tail - student_rest).abs()
