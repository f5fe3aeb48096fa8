"""Properties of the losses: identities, endpoints, extremes, chunking, micro-batching, sparse limits."""

from __future__ import annotations

import math

import pytest
import torch

from atkd_core.losses import (
    DIVERGENCE_TERMS,
    atkd_loss,
    decompose_kl,
    divergence_loss,
    divergence_per_token,
    forward_kl,
    generalized_jsd,
    hard_token_mask,
    reverse_kl,
    teacher_uncertainty,
)
from tests.atkd_core.losses.test_parity import make_inputs, sparse_teacher

ALL_LOSSES = [*DIVERGENCE_TERMS, "atkd_forward", "atkd_reverse"]


def run_loss(name, student, teacher, targets, **kwargs):
    if name.startswith("atkd_"):
        return atkd_loss(student, teacher, targets, setting=name.removeprefix("atkd_"), **kwargs).loss
    return divergence_loss(name, student, teacher, targets, **kwargs)


@pytest.mark.parametrize("setting", ["forward", "reverse"])
def test_kl_identity(setting):
    student, teacher, targets = make_inputs((4, 9), torch.float32, "some", seed=5, scale=4.0)
    parts = decompose_kl(student, teacher, targets, setting=setting)
    kl = divergence_per_token(f"{setting}_kl", student, teacher, targets)
    torch.testing.assert_close(kl, parts.tkd + parts.rest_mass * parts.dkd, atol=1e-5, rtol=1e-5)
    if setting == "forward":
        torch.testing.assert_close(parts.rest_mass, parts.unc)
    # UNC is the teacher's in both settings.
    torch.testing.assert_close(parts.unc, teacher_uncertainty(teacher, targets))


def test_jsd_endpoints_are_the_kl_directions():
    student, teacher, targets = make_inputs((16,), torch.float32, "some", seed=6)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, targets, beta=0.0), forward_kl(student, teacher, targets)
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, targets, beta=1.0), reverse_kl(student, teacher, targets)
    )


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_zero_when_student_equals_teacher(name):
    student, _, targets = make_inputs((10,), torch.float32, "none", seed=7)
    loss = run_loss(name, student, student.detach().clone(), targets)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_extreme_logits_stay_finite(name, chunk_size):
    vocab = 7
    targets = torch.tensor([0, 1, 2, 3, -100, 5])
    teacher = torch.zeros(6, vocab)
    teacher[torch.arange(4), targets[:4]] = 1e4  # one-hot teachers: p_g = 1 exactly in float32
    teacher[4:] = torch.linspace(-1e4, 1e4, vocab)
    student = torch.linspace(-1e4, 1e4, vocab).repeat(6, 1).requires_grad_(True)
    loss = run_loss(name, student, teacher, targets, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # A one-hot teacher still has a well-defined non-target distribution from its logits.
    parts = decompose_kl(student, teacher, targets)
    assert torch.isfinite(parts.dkd).all() and torch.isfinite(parts.tkd).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_all_ignored_gives_zero_with_gradient(name, chunk_size, sparse):
    student, teacher, targets = make_inputs((10,), torch.float32, "all")
    if sparse:
        teacher = sparse_teacher(teacher, targets, 3)
    loss = run_loss(name, student, teacher, targets, chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(name, sparse, chunk_size):
    student, teacher, targets = make_inputs((50,), torch.float32, "some", seed=8)
    if sparse:
        teacher = sparse_teacher(teacher, targets, 4)
    whole = run_loss(name, student, teacher, targets)
    (whole_grad,) = torch.autograd.grad(whole, student)
    chunked = run_loss(name, student, teacher, targets, chunk_size=chunk_size)
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-7, rtol=1e-6)


def test_chunked_backward_scales_with_the_upstream_gradient():
    student, teacher, targets = make_inputs((20,), torch.float32, "some", seed=9)
    (plain,) = torch.autograd.grad(3.0 * forward_kl(student, teacher, targets), student)
    (chunked,) = torch.autograd.grad(3.0 * forward_kl(student, teacher, targets, chunk_size=6), student)
    torch.testing.assert_close(chunked, plain)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_atkd_micro_batches_accumulate_to_the_full_batch_gradient(chunk_size):
    student, teacher, targets = make_inputs((4, 8), torch.float32, "some", seed=10)
    threshold = 0.7
    kwargs = {"split_scope": "threshold", "unc_threshold": threshold, "lam": 0.2, "chunk_size": chunk_size}
    full = atkd_loss(student, teacher, targets, **kwargs)
    (full_grad,) = torch.autograd.grad(full.loss, student)

    # Global counts of the step, cheap from the teacher's UNC alone.
    unc = teacher_uncertainty(teacher, targets)
    valid = targets != -100
    hard = valid & (unc >= threshold)
    counts = (int((valid & ~hard).sum()), int(hard.sum()))
    assert counts == (full.num_easy, full.num_hard) and min(counts) > 0

    total = 0.0
    accumulated = torch.zeros_like(student)
    for rows in (slice(0, 2), slice(2, 4)):
        part = atkd_loss(student[rows], teacher[rows], targets[rows], num_tokens=counts, **kwargs)
        (grad,) = torch.autograd.grad(part.loss, student)
        accumulated += grad
        total += part.loss.item()
    torch.testing.assert_close(accumulated, full_grad, atol=1e-7, rtol=1e-6)
    assert math.isclose(total, full.loss.item(), rel_tol=1e-6)


@pytest.mark.parametrize("name", list(DIVERGENCE_TERMS))
def test_divergence_micro_batches_with_global_count(name):
    student, teacher, targets = make_inputs((4, 8), torch.float32, "some", seed=11)
    full = divergence_loss(name, student, teacher, targets)
    (full_grad,) = torch.autograd.grad(full, student)
    count = int((targets != -100).sum())
    accumulated = sum(
        torch.autograd.grad(
            divergence_loss(name, student[r], teacher[r], targets[r], num_tokens=count), student
        )[0]
        for r in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(accumulated, full_grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_sparse_lower_bounds_dense_and_converges_as_k_grows(name):
    vocab = 40
    gen = torch.Generator().manual_seed(12)
    student = torch.randn(30, vocab, generator=gen) * 2
    teacher = torch.randn(30, vocab, generator=gen) * 2
    targets = torch.randint(0, vocab, (30,), generator=gen)
    dense = float(run_loss(name, student, teacher, targets))
    values = [
        float(run_loss(name, student, sparse_teacher(teacher, targets, k), targets))
        for k in (1, 4, 16, 32, vocab)
    ]
    assert all(v <= dense + 1e-5 for v in values), (values, dense)
    assert all(a <= b + 1e-5 for a, b in zip(values, values[1:], strict=False)), values
    assert abs(values[-1] - dense) < 1e-5
    assert abs(values[-2] - dense) < abs(values[0] - dense)


def test_sparse_tail_derived_when_not_cached():
    student, teacher, targets = make_inputs((12,), torch.float32, "none", seed=13)
    exact = atkd_loss(student, sparse_teacher(teacher, targets, 4), targets).loss
    derived = atkd_loss(student, sparse_teacher(teacher, targets, 4, exact_tail=False), targets).loss
    torch.testing.assert_close(derived, exact, atol=1e-4, rtol=1e-4)


def test_batch_split_takes_the_top_fraction_and_ties_go_to_hard():
    unc = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.7])
    valid = torch.ones(6, dtype=torch.bool)
    hard, threshold = hard_token_mask(unc, valid, hard_fraction=0.5)
    assert hard.tolist() == [False, True, True, True, False, True] and threshold == 0.5
    hard, _ = hard_token_mask(unc, valid, hard_fraction=0.3)
    assert hard.tolist() == [False, True, False, False, False, True]
    valid[1] = False  # an ignored token is neither easy nor hard
    hard, _ = hard_token_mask(unc, valid, hard_fraction=0.5)
    assert not hard[1] and int(hard.sum()) == 3


def test_sequence_split_is_per_row():
    unc = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.6, 0.7, 0.8, 0.9]])
    valid = torch.ones_like(unc, dtype=torch.bool)
    hard, _ = hard_token_mask(unc, valid, hard_fraction=0.5, split_scope="sequence")
    assert hard.tolist() == [[False, False, True, True], [False, False, True, True]]
    hard, _ = hard_token_mask(unc, valid, hard_fraction=0.5, split_scope="batch")
    assert hard.tolist() == [[False] * 4, [True] * 4]


def test_atkd_diagnostics_describe_the_groups():
    student, teacher, targets = make_inputs((3, 10), torch.float32, "some", seed=14)
    out = atkd_loss(student, teacher, targets, lam=0.2)
    parts = decompose_kl(student, teacher, targets)
    easy = (targets != -100) & ~out.hard_mask
    torch.testing.assert_close(out.dkd_easy, parts.dkd[easy].mean())
    torch.testing.assert_close(out.tkd_hard, parts.tkd[out.hard_mask].mean())
    expected = 0.2 * out.dkd_easy + 0.8 * (out.tkd_hard + out.dkd_hard)
    torch.testing.assert_close(out.loss.detach(), expected)
    assert parts.unc[out.hard_mask].min() >= out.unc_threshold > parts.unc[easy].max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 1.5}, "lam must be in"),
        ({"hard_fraction": -0.1}, "hard_fraction must be in"),
        ({"setting": "sideways"}, "setting must be"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"split_scope": "threshold"}, "needs unc_threshold"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    student, teacher, targets = make_inputs((6,), torch.float32, "none")
    with pytest.raises(ValueError, match=message):
        atkd_loss(student, teacher, targets, **kwargs)


def test_shape_mismatch_is_named():
    student, teacher, targets = make_inputs((6,), torch.float32, "none")
    with pytest.raises(ValueError, match="targets shape"):
        forward_kl(student, teacher, targets[:5])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        forward_kl(student, teacher[:, :5], targets)
    with pytest.raises(ValueError, match="divergence 'kl' is unknown"):
        divergence_loss("kl", student, teacher, targets)


def test_chunked_loss_refuses_a_second_backward():
    student, teacher, targets = make_inputs((12,), torch.float32, "none")
    loss = forward_kl(student, teacher, targets, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_teacher_vocabulary_masked_with_minus_inf(name):
    student, teacher, targets = make_inputs((8,), torch.float32, "none", seed=15)
    targets = targets.clamp(max=8)
    masked = teacher.clone()
    masked[:, 9:] = float("-inf")  # e.g. padded vocabulary rows the teacher never predicts
    loss = run_loss(name, student, masked, targets, chunk_size=3)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    reference = run_loss(name, student, teacher.clone().index_fill_(1, torch.tensor([9, 10]), -1e30), targets)
    torch.testing.assert_close(loss, reference)


def test_alpha_beta_is_forward_kl_reverse_kl_and_hellinger_at_its_landmarks():
    from atkd_core.losses.divergences import alpha_beta_terms

    generator = torch.Generator().manual_seed(3)
    log_p = torch.log_softmax(torch.randn(5, 9, generator=generator, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(5, 9, generator=generator, dtype=torch.float64), -1)
    p, q = log_p.exp(), log_q.exp()
    forward = (p * (log_p - log_q)).sum(-1)
    reverse = (q * (log_q - log_p)).sum(-1)
    assert torch.allclose(alpha_beta_terms(log_p, log_q, 1.0, 0.0), forward)
    assert torch.allclose(alpha_beta_terms(log_p, log_q, 0.0, 1.0), reverse)
    assert torch.allclose(
        alpha_beta_terms(log_p, log_q, 0.5, 0.5), 2 * (p.sqrt() - q.sqrt()).square().sum(-1)
    )
    # Continuous in (alpha, beta): the limits are the general formula's values near them.
    assert torch.allclose(
        alpha_beta_terms(log_p, log_q, 0.7, 1e-6), alpha_beta_terms(log_p, log_q, 0.7, 0.0), atol=1e-5
    )
    assert torch.allclose(
        alpha_beta_terms(log_p, log_q, 1e-6, 0.4), alpha_beta_terms(log_p, log_q, 0.0, 0.4), atol=1e-5
    )
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        alpha_beta_terms(log_p, log_q, -0.5, 0.5)
