"""ULD against a float64 reference written from its definition: value and gradient."""

from __future__ import annotations

import pytest
import torch

from atkd_core.losses import SparseTeacher
from atkd_core.losses.uld import uld_terms


def _reference(
    student_logits: torch.Tensor, teacher_probs: list[list[float]], tail: list[float] | None
) -> torch.Tensor:
    """Per token, in float64: the student's probabilities sorted by hand; the sum over ranks of
    |p_(i) - q_(i)| with the shorter vector padded with zeros; with a ``tail``, the teacher's
    vector is its top-K and every student rank from K on is summed into one bucket against it."""
    q = torch.softmax(student_logits.double(), dim=-1)
    values = []
    for row, p in enumerate(teacher_probs):
        q_sorted = sorted(q[row].unbind(), key=lambda x: -x.item())
        p_sorted = sorted(p, reverse=True)
        if tail is None:
            width = max(len(q_sorted), len(p_sorted))
            q_padded = q_sorted + [torch.zeros((), dtype=torch.float64)] * (width - len(q_sorted))
            p_padded = p_sorted + [0.0] * (width - len(p_sorted))
            values.append(sum(abs(a - b) for a, b in zip(p_padded, q_padded, strict=True)))
        else:
            k = len(p_sorted)
            head = sum(abs(p_sorted[i] - (q_sorted[i] if i < len(q_sorted) else 0.0)) for i in range(k))
            values.append(head + abs(tail[row] - sum(q_sorted[k:], torch.zeros((), dtype=torch.float64))))
    return torch.stack(values)


@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), [(50, 50), (40, 70), (70, 40)])
def test_dense_uld_matches_the_definition_across_vocabulary_sizes(student_vocab, teacher_vocab):
    generator = torch.Generator().manual_seed(student_vocab + teacher_vocab)
    student = (torch.randn(6, student_vocab, generator=generator) * 2).requires_grad_(True)
    teacher = torch.randn(6, teacher_vocab, generator=generator) * 3
    got = uld_terms(student, teacher)
    reference_student = student.detach().double().requires_grad_(True)
    expected = _reference(reference_student, torch.softmax(teacher.double(), -1).tolist(), None)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    weights = torch.rand(6, generator=generator)
    (got * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(student.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6)


def test_sparse_uld_matches_the_definition_and_bounds_the_dense_one_from_below():
    generator = torch.Generator().manual_seed(3)
    vocab, k = 60, 8
    student = (torch.randn(5, vocab, generator=generator) * 2).requires_grad_(True)
    teacher_logits = torch.randn(5, vocab, generator=generator) * 3
    log_p = torch.log_softmax(teacher_logits, -1)
    top = log_p.topk(k, dim=-1)
    log_tail = torch.log1p(-top.values.exp().sum(-1))
    sparse = SparseTeacher(log_p[:, 0], top.indices, top.values, log_tail)
    got = uld_terms(student, sparse)
    reference_student = student.detach().double().requires_grad_(True)
    expected = _reference(
        reference_student, top.values.double().exp().tolist(), log_tail.double().exp().tolist()
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(student.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6)
    dense = uld_terms(student.detach(), teacher_logits)
    assert (got.detach() <= dense + 1e-6).all() and (got.detach() < dense).any()


def test_sparse_uld_with_every_token_in_the_top_k_is_the_dense_one():
    generator = torch.Generator().manual_seed(4)
    student, teacher_logits = torch.randn(4, 30, generator=generator), torch.randn(4, 30, generator=generator)
    log_p = torch.log_softmax(teacher_logits, -1)
    whole = SparseTeacher(log_p[:, 0], torch.arange(30).expand(4, 30), log_p, torch.full((4,), -torch.inf))
    torch.testing.assert_close(
        uld_terms(student, whole), uld_terms(student, teacher_logits), rtol=1e-5, atol=1e-6
    )


def test_uld_is_zero_between_a_distribution_and_any_relabelling_of_it():
    """No vocabulary is shared: a teacher whose tokens are the student's, permuted, costs nothing."""
    student = torch.randn(3, 25, generator=torch.Generator().manual_seed(5))
    permuted = student[:, torch.randperm(25, generator=torch.Generator().manual_seed(6))]
    torch.testing.assert_close(uld_terms(student, permuted), torch.zeros(3), atol=1e-6, rtol=0)
