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


def sorted_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """[N]: sum_i |student_(i) - teacher_(i)| over probabilities [N, Vs] and [N, Vt], each sorted
    descending, the narrower zero-padded."""
    width = max(student.shape[-1], teacher.shape[-1])
    student_sorted = functional.pad(
        student.sort(dim=-1, descending=True).values, (0, width - student.shape[-1])
    )
    teacher_sorted = functional.pad(
        teacher.sort(dim=-1, descending=True).values, (0, width - teacher.shape[-1])
    )
    return (student_sorted - teacher_sorted).abs().sum(-1)


def sorted_l1_with_tail(student: Tensor, teacher_top: Tensor, teacher_tail: Tensor) -> Tensor:
    """[N]: the sorted L1 between ``student`` [N, V] and a teacher known by K values [N, K] and the
    mass of the rest [N]: ranks K and beyond are one bucket on each side."""
    k = teacher_top.shape[-1]
    student_top = student.topk(min(k, student.shape[-1]), dim=-1).values
    student_top = functional.pad(student_top, (0, k - student_top.shape[-1]))
    teacher_sorted = teacher_top.sort(dim=-1, descending=True).values
    student_rest = (student.sum(-1) - student_top.sum(-1)).clamp(min=0)
    return (teacher_sorted - student_top).abs().sum(-1) + (teacher_tail - student_rest).abs()


def uld_terms(student_logits: Tensor, teacher: SparseTeacher | Tensor, temperature: float = 1.0) -> Tensor:
    """ULD per token: the W1 distance between sorted teacher and student probabilities.

    student_logits [N, Vs]; teacher [N, Vt] logits (divided by ``temperature`` like the student's)
    or a SparseTeacher [N] (top-K and tail, at the temperature already). Returns [N] float32.
    """
    student = torch.softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, Tensor):
        with torch.no_grad():
            teacher_probs = torch.softmax(teacher.float() / temperature, dim=-1)
        return sorted_l1(student, teacher_probs)
    with torch.no_grad():
        teacher_top = teacher.topk_logprobs.float().exp()
        tail = (
            teacher.log_tail_mass.float().exp()
            if teacher.log_tail_mass is not None
            else (1 - teacher_top.sum(-1)).clamp(min=0)
        )
    return sorted_l1_with_tail(student, teacher_top, tail)
