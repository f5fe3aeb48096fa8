"""Parity of every loss with the float64 reference: value and gradient, dense and sparse teacher."""

from __future__ import annotations

import pytest
import torch

from atkd_core.losses import DIVERGENCE_TERMS, SparseTeacher, atkd_loss, divergence_loss
from tests.atkd_core.losses.reference import kl, probs, reference_atkd, reference_divergence

V = 11


def make_inputs(shape, dtype, ignore, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, V, generator=gen) * scale).to(dtype).requires_grad_(True)
    teacher = (torch.randn(*shape, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, shape, generator=gen)
    flat = targets.view(-1)
    if ignore == "some":
        flat[::3] = -100
    elif ignore == "prefix":
        flat[: flat.numel() // 2] = -100
    elif ignore == "all":
        flat[:] = -100
    return student, teacher, targets


def reference_grad(fn, student):
    leaf = student.detach().double().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if grad is None else grad


def tolerances(dtype):
    # bf16 inputs: the reference sees the same rounded values, only our float32 math differs,
    # but the returned gradient is rounded to bf16.
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


PARAMS = {
    "generalized_jsd": [{"beta": 0.0}, {"beta": 0.3}, {"beta": 1.0}],
    "skew_forward_kl": [{"alpha": 0.1}, {"alpha": 0.0}],
    "skew_reverse_kl": [{"alpha": 0.1}, {"alpha": 0.5}],
    # ABKD: interior points, both KL endpoints, a beta = 0 limit, and the log-ratio case at the origin.
    "alpha_beta": [
        {"alpha": 0.2, "beta": 0.7},
        {"alpha": 1.5, "beta": 0.5},
        {"alpha": 1.0, "beta": 0.0},
        {"alpha": 0.0, "beta": 1.0},
        {"alpha": 0.5, "beta": 0.0},
        {"alpha": 0.0, "beta": 0.0},
    ],
}
DIVERGENCE_CASES = [(name, p) for name in DIVERGENCE_TERMS for p in PARAMS.get(name, [{}])]


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES)
@pytest.mark.parametrize("shape", [(12,), (2, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ignore", ["none", "some"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_divergence_matches_reference(name, params, shape, dtype, temperature, ignore, chunk_size):
    student, teacher, targets = make_inputs(shape, dtype, ignore)
    loss = divergence_loss(
        name, student, teacher, targets, temperature=temperature, chunk_size=chunk_size, **params
    )
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = reference_grad(
        lambda s: reference_divergence(name, s, teacher.double(), targets, temperature, **params), student
    )
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))


@pytest.mark.parametrize("setting", ["forward", "reverse"])
@pytest.mark.parametrize("hard_fraction", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ignore", ["none", "some", "prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_atkd_matches_reference(setting, hard_fraction, lam, temperature, ignore, dtype, chunk_size):
    student, teacher, targets = make_inputs((2, 7), dtype, ignore, seed=1)
    out = atkd_loss(
        student,
        teacher,
        targets,
        hard_fraction=hard_fraction,
        lam=lam,
        setting=setting,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    (grad,) = torch.autograd.grad(out.loss, student)
    ref_counts = {}

    def reference(s):
        value, ref_counts["easy"], ref_counts["hard"] = reference_atkd(
            s, teacher.double(), targets, hard_fraction, lam, setting, temperature
        )
        return value

    ref, ref_grad = reference_grad(reference, student)
    assert (out.num_easy, out.num_hard) == (ref_counts["easy"], ref_counts["hard"])
    torch.testing.assert_close(out.loss.double(), ref, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))


@pytest.mark.parametrize("split_scope", ["sequence", "threshold"])
@pytest.mark.parametrize("setting", ["forward", "reverse"])
def test_atkd_split_scopes_match_reference(split_scope, setting):
    student, teacher, targets = make_inputs((3, 6), torch.float32, "some", seed=2)
    kwargs = {
        "hard_fraction": 0.5,
        "lam": 0.2,
        "setting": setting,
        "split_scope": split_scope,
        "unc_threshold": 0.6,
    }
    out = atkd_loss(student, teacher, targets, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, student)
    ref, ref_grad = reference_grad(
        lambda s: reference_atkd(s, teacher.double(), targets, **kwargs)[0], student
    )
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


def sparse_teacher(teacher_logits, targets, k, exact_tail=True):
    """The record teacher scoring caches, computed here from full logits [N, V]."""
    log_p = torch.log_softmax(teacher_logits.double(), -1)
    topk = log_p.topk(k, -1)
    tail = teacher_logits.double().scatter(-1, topk.indices, float("-inf")).logsumexp(
        -1
    ) - teacher_logits.double().logsumexp(-1)
    return SparseTeacher(
        target_logprob=log_p.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1).float(),
        topk_ids=topk.indices.int(),
        topk_logprobs=topk.values.float(),
        log_tail_mass=tail.float() if exact_tail else None,
    )


@pytest.mark.parametrize("k", [1, 3, 8, V])
@pytest.mark.parametrize("setting", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_atkd_matches_bucketed_reference(k, setting, chunk_size, temperature):
    student, teacher, targets = make_inputs((12,), torch.float32, "some", seed=3)
    # The cache holds the teacher at the loss temperature.
    sparse = sparse_teacher(teacher / temperature, targets, k)
    out = atkd_loss(student, sparse, targets, setting=setting, chunk_size=chunk_size, temperature=temperature)
    (grad,) = torch.autograd.grad(out.loss, student)
    topk = [[row.tolist() for row in sparse.topk_ids]]
    ref, ref_grad = reference_grad(
        lambda s: reference_atkd(
            s, teacher.double(), targets, setting=setting, topk=topk, temperature=temperature
        )[0],
        student,
    )
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES)
@pytest.mark.parametrize("k", [2, 6, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_divergence_matches_bucketed_reference(name, params, k, temperature):
    student, teacher, targets = make_inputs((10,), torch.float32, "some", seed=4)
    sparse = sparse_teacher(teacher / temperature, targets, k)
    loss = divergence_loss(name, student, sparse, targets, temperature=temperature, **params)
    (grad,) = torch.autograd.grad(loss, student)
    ids = sparse.topk_ids.tolist()

    def reference(s):
        from tests.atkd_core.losses.reference import token_divergence

        values = [
            token_divergence(name, s[i], teacher[i].double(), temperature, topk=ids[i], **params)
            for i in range(targets.numel())
            if targets[i] != -100
        ]
        return torch.stack(values).mean()

    ref, ref_grad = reference_grad(reference, student)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "atkd"])
def test_sparse_student_tail_far_below_its_top_logit_is_exact(objective):
    # A confident student: its tail sits 150 nats under its best logit, where exp() relative to the
    # row's maximum underflows in float32; the tail's log-mass must still be exact.
    student, teacher, targets = make_inputs((8,), torch.float32, "none", seed=6)
    student = student.detach().clone()
    student[:, :3] += 150.0
    student.requires_grad_(True)
    sparse = sparse_teacher(teacher, targets, 3)
    topk = [row.tolist() for row in sparse.topk_ids]
    if objective == "atkd":
        loss = atkd_loss(student, sparse, targets).loss
        ref, ref_grad = reference_grad(
            lambda s: reference_atkd(s, teacher.double(), targets, topk=[topk])[0], student
        )
    else:
        from tests.atkd_core.losses.reference import token_divergence

        loss = divergence_loss(objective, student, sparse, targets)
        ref, ref_grad = reference_grad(
            lambda s: torch.stack(
                [token_divergence(objective, s[i], teacher[i].double(), 1.0, topk=topk[i]) for i in range(8)]
            ).mean(),
            student,
        )
    (grad,) = torch.autograd.grad(loss, student)
    assert float(ref) > 1.0  # the tail term is large: a floored tail would change it visibly
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["kd", "atkd"])
@pytest.mark.parametrize("teacher_kind", ["dense", "sparse K=3", "sparse K=V"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_objective_cross_entropy_column_matches_reference(objective, teacher_kind, temperature):
    """The cross-entropy the objectives read from the divergence's own pass (temperature 1) or
    compute apart: loss = teacher loss + ce_weight x CE, in value and gradient, and the logged CE."""
    from atkd_core.config import LossConfig
    from atkd_core.losses.objective import StepCounts, build_objective

    student, teacher, targets = make_inputs((14,), torch.float32, "some", seed=8)
    if teacher_kind != "dense":
        k = 3 if teacher_kind == "sparse K=3" else V
        teacher = sparse_teacher(teacher / temperature, targets, k)
        # Targets both inside and outside the top-K, so both placements of the target are covered.
        inside = (teacher.topk_ids == targets.clamp(min=0)[:, None]).any(-1) & (targets != -100)
        assert k == V or (bool(inside.any()) and bool((~inside & (targets != -100)).any()))
    valid = int((targets != -100).sum())
    config = LossConfig(
        objective=objective, hard_fraction=0.5, lam=0.3, temperature=temperature, ce_weight=0.5
    )
    out = build_objective(config)(student, teacher, targets, StepCounts(float(valid)))
    (grad,) = torch.autograd.grad(out.loss, student)

    def expected(s):
        if objective == "kd":
            teacher_loss = divergence_loss("forward_kl", s, teacher, targets, temperature=temperature)
        else:
            teacher_loss = atkd_loss(
                s, teacher, targets, hard_fraction=0.5, lam=0.3, temperature=temperature
            ).loss
        ce = torch.nn.functional.cross_entropy(s.double(), targets, ignore_index=-100)
        return teacher_loss.double() + 0.5 * ce, ce

    reference, reference_ce = expected(student.detach().requires_grad_(True))
    leaf = student.detach().clone().requires_grad_(True)
    (reference_grad_,) = torch.autograd.grad(expected(leaf)[0], leaf)
    torch.testing.assert_close(out.loss.double(), reference.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, reference_grad_.float(), atol=1e-5, rtol=1e-4)
    assert out.cross_entropy == pytest.approx(float(reference_ce), rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_kernels_and_their_target_logprob_match_reference(kind, dtype, temperature):
    """dense_kl's and dense_tvd's hand-written backwards, both outputs weighted, against autograd in
    float64; their inputs are left untouched and, except in reverse KL (where the student's mass
    there makes the divergence infinite), a masked (-inf) teacher column is handled."""
    from functools import partial

    from atkd_core.losses.kernels import dense_kl, dense_tvd

    kernel = {
        "forward_kl": partial(dense_kl, reverse=False),
        "reverse_kl": partial(dense_kl, reverse=True),
        "tvd": dense_tvd,
    }[kind]
    student, teacher, targets = make_inputs((9,), dtype, "none", seed=21)
    teacher = teacher.clone()
    if kind != "reverse_kl":
        teacher[:, 0] = float("-inf")
    student_before, teacher_before = student.detach().clone(), teacher.clone()
    gen = torch.Generator().manual_seed(22)
    value_weights, target_weights = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    divergence, log_q_target = kernel(student, teacher, targets, temperature)
    total = (divergence * value_weights).sum() + (log_q_target * target_weights).sum()
    (grad,) = torch.autograd.grad(total, student)

    def reference(s):
        value = s.new_zeros(())
        for i in range(9):
            p, q = probs(teacher[i].double(), temperature), probs(s[i], temperature)
            if kind == "tvd":
                token = 0.5 * (p - q).abs().sum()
            else:
                token = kl(q, p) if kind == "reverse_kl" else kl(p, q)
            value = (
                value
                + value_weights[i].double() * token
                + target_weights[i].double() * torch.log(q[targets[i]])
            )
        return value

    ref, ref_grad = reference_grad(reference, student)
    torch.testing.assert_close(total.double(), ref, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
    assert torch.equal(student.detach(), student_before) and torch.equal(teacher, teacher_before)
    value, _ = kernel(student, teacher, targets, temperature)
    value.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        value.sum().backward()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_target_rest_matches_reference(reverse, dtype, temperature):
    """target_rest's dense kernel: its hand-written backward, every student output weighted, against autograd in
    float64 (target and rest log-masses, the non-target KL); its inputs are left untouched."""
    from atkd_core.losses.decomposition import target_rest

    student, teacher, targets = make_inputs((9,), dtype, "none", seed=23)
    # A near-certain token (q_g close to 1, the rest's mass tiny) among ordinary ones.
    student = student.detach().clone()
    student[0, targets[0]] += 12.0
    student.requires_grad_(True)
    student_before, teacher_before = student.detach().clone(), teacher.clone()
    gen = torch.Generator().manual_seed(24)
    weights = torch.randn(3, 9, generator=gen)
    split = target_rest(student, teacher, targets, temperature, reverse)
    total = (torch.stack([split.log_q_target, split.log_q_rest, split.dkd]) * weights).sum()
    (grad,) = torch.autograd.grad(total, student)

    def reference(s):
        value = s.new_zeros(())
        for i in range(9):
            p, q = probs(teacher[i].double(), temperature), probs(s[i], temperature)
            g = int(targets[i])
            rest = [j for j in range(V) if j != g]
            p_hat, q_hat = p[rest] / p[rest].sum(), q[rest] / q[rest].sum()
            dkd = kl(q_hat, p_hat) if reverse else kl(p_hat, q_hat)
            pieces = torch.stack([torch.log(q[g]), torch.log(q[rest].sum()), dkd])
            value = value + (pieces * weights[:, i].double()).sum()
        return value

    ref, ref_grad = reference_grad(reference, student)
    torch.testing.assert_close(total.double(), ref, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))
    p = torch.softmax(teacher.double() / temperature, -1)
    p_target = p.gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(split.log_p_target.double(), p_target.log(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(split.log_p_rest.double(), (1 - p_target).log(), atol=1e-5, rtol=1e-4)
    assert grad.dtype == dtype and not split.log_p_target.requires_grad
    assert torch.equal(student.detach(), student_before) and torch.equal(teacher, teacher_before)
    again = target_rest(student, teacher, targets, temperature, reverse).dkd.sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        again.backward()


def test_the_kd_objective_passes_abkd_alpha_and_beta_to_the_divergence():
    from atkd_core.config import LossConfig
    from atkd_core.losses.objective import StepCounts, build_objective

    student, teacher, targets = make_inputs((2, 6), torch.float32, "some")
    valid = float((targets != -100).sum())
    config = LossConfig(
        objective="kd", divergence="alpha_beta", abkd_alpha=1.5, abkd_beta=0.5, chunk_size=None
    )
    got = float(build_objective(config)(student, teacher, targets, StepCounts(valid)).loss.detach())
    want = float(divergence_loss("alpha_beta", student, teacher, targets, alpha=1.5, beta=0.5).detach())
    other = float(divergence_loss("alpha_beta", student, teacher, targets, alpha=0.5, beta=0.5).detach())
    assert got == pytest.approx(want, rel=1e-6) and want != pytest.approx(other, rel=1e-3)
    assert "alpha=1.5, beta=0.5" in build_objective(config).describe()
