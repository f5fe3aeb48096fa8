"""TAID and AdaKD against float64 references written from their definitions (value and gradient),
their landmarks, their state across steps, and the objectives that carry it."""

from __future__ import annotations

import math

import pytest
import torch

from atkd_core.losses import divergence_loss
from atkd_core.losses.adaptive import FocusRatio, TAIDSchedule, adakd_loss, focus_tokens, taid_loss
from atkd_core.losses.inputs import LinearHead
from tests.atkd_core.losses.reference import reference_adakd, reference_taid
from tests.atkd_core.losses.test_parity import V, make_inputs, reference_grad, sparse_teacher, tolerances


def _ids(sparse):
    return [row.tolist() for row in sparse.topk_ids]


@pytest.mark.parametrize("t", [0.0, 0.4, 0.85, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_taid_matches_reference(t, temperature, dtype, chunk_size):
    student, teacher, targets = make_inputs((12,), dtype, "some", seed=31)
    loss = taid_loss(student, teacher, targets, t, temperature=temperature, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = reference_grad(
        lambda s: reference_taid(s, teacher.double(), targets, t, temperature), student
    )
    torch.testing.assert_close(loss.double(), ref, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(dtype))


@pytest.mark.parametrize("k", [2, 5, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("t", [0.4, 0.9])
def test_sparse_taid_matches_bucketed_reference(k, temperature, t):
    student, teacher, targets = make_inputs((10,), torch.float32, "some", seed=32)
    sparse = sparse_teacher(teacher / temperature, targets, k)
    loss = taid_loss(student, sparse, targets, t, temperature=temperature, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = reference_grad(
        lambda s: reference_taid(s, teacher.double(), targets, t, temperature, topk=_ids(sparse)), student
    )
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


def test_taid_landmarks_teacher_at_one_and_nothing_to_learn_at_zero():
    student, teacher, targets = make_inputs((2, 6), torch.float32, "some", seed=33)
    at_one = taid_loss(student, teacher, targets, 1.0)
    kl = divergence_loss("forward_kl", student, teacher, targets)
    (grad_one,) = torch.autograd.grad(at_one, student)
    (grad_kl,) = torch.autograd.grad(kl, student)
    torch.testing.assert_close(at_one, kl)
    torch.testing.assert_close(grad_one, grad_kl)
    at_zero = taid_loss(student, teacher, targets, 0.0)
    (grad_zero,) = torch.autograd.grad(at_zero, student)
    assert float(at_zero.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(grad_zero.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="t must be in"):
        taid_loss(student, teacher, targets, 1.5)


def test_taid_schedule_follows_the_rule_and_resumes():
    schedule = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.2, beta=0.5)
    schedule.update(2.0, progress=0.01)
    assert schedule.t == 0.4 and schedule.previous_loss == 2.0  # the first step only records J
    schedule.update(1.0, progress=0.02)
    momentum = 0.5 * 0.0 + 0.5 * (2.0 - 1.0) / 2.0
    adaptive = 0.4 + 0.2 / (1 + math.exp(-momentum)) * (1 - 0.4)
    linear = 0.4 + 0.6 * 0.02
    assert schedule.momentum == pytest.approx(momentum)
    assert schedule.t == pytest.approx(max(adaptive, linear))
    # A rising loss slows the adaptive term, and the linear floor then takes over.
    saved = schedule.state_dict()
    schedule.update(50.0, progress=0.9)
    assert schedule.t == pytest.approx(0.4 + 0.6 * 0.9)
    schedule.update(0.1, progress=1.0)
    assert schedule.t == pytest.approx(1.0)
    resumed = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.2, beta=0.5)
    resumed.load_state_dict(saved)
    replay = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.2, beta=0.5)
    replay.update(2.0, 0.01)
    replay.update(1.0, 0.02)
    for step in (resumed, replay):
        step.update(0.7, 0.03)
    assert resumed.state_dict() == replay.state_dict()


def test_taid_t_never_passes_t_end_nor_falls():
    schedule = TAIDSchedule(t_start=0.1, t_end=0.8, alpha=1.0, beta=0.0)
    seen = [schedule.t]
    losses = [5.0, 1.0, 3.0, 0.2, 4.0, 0.01, 0.009, 9.0]
    for step, loss in enumerate(losses, 1):
        schedule.update(loss, step / len(losses))
        seen.append(schedule.t)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)) and max(seen) <= 0.8


ADAKD_CASES = [
    ("reverse_kl", {}, 1.0, 0.0),
    ("reverse_kl", {}, 0.5, 0.5),
    ("forward_kl", {}, 0.3, 1.0),
    ("generalized_jsd", {"beta": 0.3}, 0.6, 0.5),
    ("alpha_beta", {"alpha": 0.2, "beta": 0.7}, 0.5, 0.5),
]


@pytest.mark.parametrize(("name", "params", "ratio", "scale"), ADAKD_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_adakd_matches_reference(name, params, ratio, scale, temperature, chunk_size):
    student, teacher, targets = make_inputs((2, 7), torch.float32, "some", seed=34)
    loss, selection = adakd_loss(
        student,
        teacher,
        targets,
        divergence=name,
        ratio=ratio,
        temperature_scale=scale,
        temperature=temperature,
        chunk_size=chunk_size,
        **params,
    )
    (grad,) = torch.autograd.grad(loss, student)
    chosen = {}

    def reference(s):
        value, chosen["rows"] = reference_adakd(
            s.reshape(-1, V),
            teacher.double().reshape(-1, V),
            targets.reshape(-1),
            name,
            ratio,
            scale,
            temperature,
            **params,
        )
        return value

    ref, ref_grad = reference_grad(reference, student)
    assert selection.selected.nonzero().squeeze(-1).tolist() == chosen["rows"]
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [3, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_adakd_matches_bucketed_reference(k, temperature):
    student, teacher, targets = make_inputs((12,), torch.float32, "some", seed=35)
    sparse = sparse_teacher(teacher / temperature, targets, k)
    loss, _ = adakd_loss(
        student, sparse, targets, ratio=0.5, temperature_scale=0.5, temperature=temperature, chunk_size=5
    )
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = reference_grad(
        lambda s: reference_adakd(
            s, teacher.double(), targets, "reverse_kl", 0.5, 0.5, temperature, topk=_ids(sparse)
        )[0],
        student,
    )
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


def test_adakd_with_every_token_and_one_temperature_is_the_divergence():
    student, teacher, targets = make_inputs((3, 5), torch.float32, "some", seed=36)
    loss, selection = adakd_loss(
        student, teacher, targets, divergence="forward_kl", ratio=1.0, temperature_scale=0.0
    )
    assert bool((selection.selected == (targets.reshape(-1) != -100)).all())
    torch.testing.assert_close(loss, divergence_loss("forward_kl", student, teacher, targets))


def test_focus_sharpens_hard_tokens_and_softens_easy_ones():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    selected, factors = focus_tokens(scores, valid, ratio=0.6, temperature_scale=0.5)
    assert selected.tolist() == [False, True, True, False, True, False]  # floor(0.6 x 5) = 3 hardest
    assert float(factors[1]) < 1.0 == float(factors[4]) and float(factors[2]) > 1.0  # median 0.7
    assert factors[~selected].eq(1.0).all()
    same, ones = focus_tokens(torch.zeros(4), torch.ones(4, dtype=torch.bool), 1.0, 0.5)
    assert bool(same.all()) and bool(ones.eq(1.0).all())  # a zero median leaves every factor at 1


def test_focus_ratio_follows_the_loss_average():
    focus = FocusRatio(step=0.1, tolerance=0.05, decay=0.0, min_ratio=0.5, start=0.1)
    focus.update(1.0, progress=0.05)
    assert focus.reference is None and focus.ratio == 1.0  # before ``start`` nothing moves
    focus.update(1.0, progress=0.2)
    assert focus.reference == 1.0
    focus.update(0.9, progress=0.3)  # fell by 10 % > 5 %: narrow
    assert focus.ratio == pytest.approx(0.9) and focus.reference == 0.9
    focus.update(0.88, progress=0.4)  # within the tolerance: hold
    assert focus.ratio == pytest.approx(0.9)
    for _ in range(10):
        focus.update(focus.reference * 0.5, progress=0.5)
    assert focus.ratio == 0.5  # floored at min_ratio
    focus.update(focus.reference * 2, progress=0.6)  # rose: widen
    assert focus.ratio == pytest.approx(0.55)
    restored = FocusRatio(step=0.1, tolerance=0.05, decay=0.0, min_ratio=0.5, start=0.1)
    restored.load_state_dict(focus.state_dict())
    assert restored == focus


@pytest.mark.parametrize("objective", ["taid", "adakd"])
@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_fused_head_gives_the_plain_value_and_gradient(objective, teacher_kind):
    gen = torch.Generator().manual_seed(37)
    hidden = torch.randn(14, 6, generator=gen, requires_grad=True)
    weight = torch.randn(V, 6, generator=gen, requires_grad=True)
    teacher = torch.randn(14, V, generator=gen) * 2
    targets = torch.randint(0, V, (14,), generator=gen)
    targets[::4] = -100
    if teacher_kind == "sparse":
        teacher = sparse_teacher(teacher, targets, 4)

    def run(student, chunk_size):
        if objective == "taid":
            return taid_loss(student, teacher, targets, 0.6, chunk_size=chunk_size)
        return adakd_loss(student, teacher, targets, ratio=0.5, chunk_size=chunk_size)[0]

    fused = run(LinearHead(hidden, weight, None, V), 3)
    grads = torch.autograd.grad(fused, [hidden, weight])
    plain = run(hidden @ weight.t(), None)
    plain_grads = torch.autograd.grad(plain, [hidden, weight])
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["taid", "adakd"])
def test_objectives_add_cross_entropy_adapt_at_step_end_and_keep_their_state(objective):
    from atkd_core.config import LossConfig
    from atkd_core.losses.objective import StepCounts, build_objective

    student, teacher, targets = make_inputs((2, 6), torch.float32, "some", seed=38)
    valid = float((targets != -100).sum())
    # No averaging, so four steps of a falling loss are enough to move AdaKD's share.
    config = LossConfig(objective=objective, ce_weight=0.5, chunk_size=None, adakd={"loss_average": 0.0})
    built = build_objective(config)
    out = built(student, teacher, targets, StepCounts(valid))
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    if objective == "taid":
        distill = taid_loss(student, teacher, targets, config.taid.t_start)
    else:
        distill = adakd_loss(student, teacher, targets, divergence=config.divergence, ratio=1.0)[0]
    torch.testing.assert_close(out.loss, distill + 0.5 * ce)
    assert out.diagnostics[built.monitored] == pytest.approx(float(distill.detach()), rel=1e-5)
    for step, value in enumerate([3.0, 2.0, 1.0, 0.5], 1):
        logged = built.end_step(value, progress=step / 4)
    key = "taid_t" if objective == "taid" else "adakd_ratio"
    assert logged[key] == (built.state_dict()["t"] if objective == "taid" else built.state_dict()["ratio"])
    if objective == "taid":
        assert logged[key] == pytest.approx(1.0)  # the linear floor reaches t_end at the last step
    else:
        assert logged[key] < 1.0  # a falling loss narrowed the focus
    again = build_objective(config)
    again.load_state_dict(built.state_dict())
    assert again.state_dict() == built.state_dict()
    with pytest.raises(ValueError, match="holds no state"):
        build_objective(LossConfig(objective="kd")).load_state_dict(built.state_dict())
