"""Fused-linear losses (hidden states and output layer in, no [N, V] logits): parity of value and
of the gradients of the hidden states, the weight and the bias with the float64 reference, and
with the unfused objective on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch

from atkd_core.config import LossConfig
from atkd_core.losses import LinearHead, SparseTeacher, atkd_loss, divergence_loss
from atkd_core.losses.objective import StepCounts, build_objective
from tests.atkd_core.losses.reference import reference_atkd, reference_divergence
from tests.atkd_core.losses.test_parity import DIVERGENCE_CASES, sparse_teacher

V, PADDED, H = 11, 13, 6


def make_head(shape, dtype, bias, ignore="some", seed=0):
    """A LinearHead with leaf hidden / weight / bias (a vocabulary padded to PADDED rows), dense
    teacher logits and targets."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=gen)).to(dtype).requires_grad_(True)
    weight = (torch.randn(PADDED, H, generator=gen) * 0.8).to(dtype).requires_grad_(True)
    bias_t = (torch.randn(PADDED, generator=gen) * 0.5).to(dtype).requires_grad_(True) if bias else None
    teacher = torch.randn(*shape, V, generator=gen) * 3.0
    targets = torch.randint(0, V, shape, generator=gen)
    if ignore == "some":
        targets.view(-1)[::3] = -100
    return LinearHead(hidden, weight, bias_t, V), teacher.to(dtype), targets


def leaves(head):
    return [t for t in (head.hidden, head.weight, head.bias) if t is not None]


def reference_grads(head, loss_of_logits):
    """Value and gradients (hidden, weight, bias) of ``loss_of_logits`` on float64 logits."""
    copies = [t.detach().double().requires_grad_(True) for t in leaves(head)]
    hidden, weight = copies[0], copies[1]
    bias = copies[2][:V] if len(copies) == 3 else None
    logits = torch.nn.functional.linear(hidden, weight[:V], bias)
    value = loss_of_logits(logits)
    return value.detach(), torch.autograd.grad(value, copies)


def tolerances(dtype):
    return {"atol": 2e-5, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def check(head, loss, ref_value, ref_grads, dtype):
    grads = torch.autograd.grad(loss, leaves(head))
    torch.testing.assert_close(loss.double(), ref_value, **tolerances(dtype))
    for grad, ref, leaf in zip(grads, ref_grads, leaves(head), strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad.double(), ref, **tolerances(dtype))
    # Padding rows are not tokens: no gradient reaches them.
    assert bool((grads[1][V:] == 0).all())


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_divergence_matches_reference(name, params, dtype, bias, chunk_size):
    head, teacher, targets = make_head((2, 5), dtype, bias)
    loss = divergence_loss(name, head, teacher, targets, temperature=2.0, chunk_size=chunk_size, **params)
    ref, ref_grads = reference_grads(
        head, lambda logits: reference_divergence(name, logits, teacher.double(), targets, 2.0, **params)
    )
    check(head, loss, ref, ref_grads, dtype)


@pytest.mark.parametrize("setting", ["forward", "reverse"])
@pytest.mark.parametrize("split_scope", ["batch", "sequence", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_kind", ["dense", "sparse", "head"])
def test_fused_atkd_matches_reference(setting, split_scope, dtype, teacher_kind):
    head, teacher, targets = make_head((3, 6), dtype, bias=True, seed=1)
    kwargs = {
        "hard_fraction": 0.5,
        "lam": 0.2,
        "setting": setting,
        "split_scope": split_scope,
        "unc_threshold": 0.6,
    }
    given = teacher
    if teacher_kind == "sparse":
        given = sparse_teacher(teacher.float().reshape(-1, V), targets.reshape(-1), V)
        given = SparseTeacher(
            given.target_logprob.reshape(targets.shape),
            given.topk_ids.reshape(*targets.shape, V),
            given.topk_logprobs.reshape(*targets.shape, V),
            given.log_tail_mass.reshape(targets.shape),
        )
    elif teacher_kind == "head":
        # The online teacher fused too: its logits made per chunk from its own hidden states.
        gen = torch.Generator().manual_seed(7)
        t_hidden = torch.randn(*targets.shape, H, generator=gen).to(dtype)
        t_weight = (torch.randn(V, H, generator=gen) * 1.5).to(dtype)
        given = LinearHead(t_hidden, t_weight, None, V)
        teacher = torch.nn.functional.linear(t_hidden, t_weight)
    out = atkd_loss(head, given, targets, chunk_size=4, **kwargs)
    ref, ref_grads = reference_grads(
        head, lambda logits: reference_atkd(logits, teacher.double(), targets, **kwargs)[0]
    )
    check(head, out.loss, ref, ref_grads, dtype)


@pytest.mark.parametrize(
    "loss",
    [
        {"objective": "sft"},
        {"objective": "kd", "divergence": "reverse_kl", "ce_weight": 0.3},
        {"objective": "kd", "divergence": "generalized_jsd"},
        {
            "objective": "kd",
            "divergence": "alpha_beta",
            "abkd_alpha": 0.2,
            "abkd_beta": 0.7,
            "ce_weight": 0.5,
        },
        {"objective": "atkd", "setting": "forward"},
        {"objective": "atkd", "setting": "forward", "split_scope": "sequence"},
        {
            "objective": "atkd",
            "setting": "reverse",
            "ce_weight": 0.5,
            "split_scope": "threshold",
            "unc_threshold": 0.5,
        },
        {"objective": "taid", "ce_weight": 0.5},
        {"objective": "adakd", "divergence": "reverse_kl"},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_objective_equals_the_unfused_one(loss, dtype):
    """The training step's objective on a head and on the logits that head makes: same loss, same
    logged cross-entropy and diagnostics, same gradients."""
    config = LossConfig.model_validate({**loss, "chunk_size": 4})
    objective = build_objective(config)
    head, teacher, targets = make_head((2, 7), dtype, bias=True, seed=2)
    counts = (
        StepCounts(tokens=9.0, easy=4.0, hard=5.0) if config.split_scope == "threshold" else StepCounts(9.0)
    )
    fused = objective(head, teacher, targets, counts)
    fused_grads = torch.autograd.grad(fused.loss, leaves(head))

    copies = [t.detach().clone().requires_grad_(True) for t in leaves(head)]
    logits = torch.nn.functional.linear(copies[0], copies[1][:V], copies[2][:V])
    plain = objective(logits, teacher, targets, counts)
    plain_grads = torch.autograd.grad(plain.loss, copies)

    tolerance = tolerances(dtype)
    torch.testing.assert_close(fused.loss, plain.loss, **tolerance)
    assert fused.cross_entropy == pytest.approx(
        plain.cross_entropy, rel=tolerance["rtol"], abs=tolerance["atol"]
    )
    assert fused.diagnostics.keys() == plain.diagnostics.keys()
    for key, value in fused.diagnostics.items():
        assert value == pytest.approx(plain.diagnostics[key], rel=tolerance["rtol"], abs=tolerance["atol"]), (
            key
        )
    for grad, ref in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(grad.float(), ref.float(), **tolerance)


@pytest.mark.parametrize(
    "loss",
    [
        {"objective": "sft"},
        {"objective": "kd"},
        {"objective": "atkd", "ce_weight": 0.5},
        {"objective": "taid"},
        {"objective": "adakd"},
    ],
)
def test_a_fused_head_makes_no_logits_for_rows_without_a_target(loss):
    """Prompt and padding rows carry no loss, and the fused objectives never multiply them out: NaN
    hidden states there leave the loss and every gradient finite, and the gradient of those rows
    zero. (Weighting them by zero instead would give NaN: NaN x 0 is NaN.)"""
    objective = build_objective(LossConfig.model_validate({**loss, "chunk_size": 4}))
    head, teacher, targets = make_head((2, 7), torch.float32, bias=False, seed=3)
    hidden = head.hidden.detach().clone()
    ignored = targets == -100
    hidden[ignored] = float("nan")
    hidden.requires_grad_(True)
    out = objective(
        LinearHead(hidden, head.weight, None, V), teacher, targets, StepCounts(float((~ignored).sum()))
    )
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, [hidden, head.weight])
    assert torch.isfinite(out.loss) and math.isfinite(out.cross_entropy)
    assert torch.isfinite(grad_weight).all() and torch.isfinite(grad_hidden).all()
    assert grad_hidden[ignored].abs().max() == 0 and grad_hidden[~ignored].abs().max() > 0


def test_objective_cross_entropy_is_the_logged_mean_and_its_weight_is_honoured():
    head, teacher, targets = make_head((12,), torch.float32, bias=False, seed=3)
    valid = int((targets != -100).sum())
    logits = torch.nn.functional.linear(head.hidden.detach().double(), head.weight.detach().double()[:V])
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / valid
    sft = build_objective(LossConfig(objective="sft"))(head, None, targets, StepCounts(float(valid)))
    assert sft.cross_entropy == pytest.approx(float(expected), rel=1e-5)
    assert float(sft.loss) == pytest.approx(float(expected), rel=1e-5)
    kd = build_objective(LossConfig(objective="kd", ce_weight=0.0))
    without = kd(head, teacher, targets, StepCounts(float(valid)))
    with_ce = build_objective(LossConfig(objective="kd", ce_weight=0.5))(
        head, teacher, targets, StepCounts(float(valid))
    )
    assert without.cross_entropy == pytest.approx(with_ce.cross_entropy)
    assert float(with_ce.loss) == pytest.approx(float(without.loss) + 0.5 * without.cross_entropy, rel=1e-5)


def test_no_block_larger_than_a_chunk_of_logits_is_allocated():
    """With 8-token chunks over 4096 tokens, the largest allocation is a chunk's logits (or the
    weight-sized gradient), never [N, V]."""
    n, vocab, hidden_size = 4096, 512, 32
    head = LinearHead(
        torch.randn(n, hidden_size, requires_grad=True),
        torch.randn(vocab, hidden_size, requires_grad=True),
        None,
        vocab,
    )
    targets = torch.randint(0, vocab, (n,))
    teacher = SparseTeacher(
        target_logprob=torch.full((n,), -1.0),
        topk_ids=torch.arange(4).repeat(n, 1).int(),
        topk_logprobs=torch.full((n, 4), -2.0),
        log_tail_mass=torch.full((n,), -0.5),
    )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = atkd_loss(head, teacher, targets, chunk_size=8).loss
        loss.backward()
    largest = max((event.cpu_memory_usage for event in prof.events()), default=0)
    full_logits = n * vocab * 4
    assert largest < full_logits / 8, (largest, full_logits)
