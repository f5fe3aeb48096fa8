"""loss.compile: each chunk's math through torch.compile (inductor's CPU backend here, Triton on
CUDA) gives the eager values and gradients, and the float64 reference's, for every kind of
objective, teacher and student input."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from atkd_core.config import LossConfig
from atkd_core.devices import compiles_loss
from atkd_core.losses.inputs import LinearHead
from atkd_core.losses.objective import CrossEntropy, StepCounts, build_objective
from tests.atkd_core.losses.reference import reference_adakd, reference_atkd, reference_taid, token_divergence
from tests.atkd_core.losses.test_parity import V, make_inputs, sparse_teacher

HIDDEN = 6

CASES = {
    "sft, chunked logits": ({"objective": "sft", "chunk_size": 4}, "none", "logits"),
    "kd forward_kl, sparse K=3, fused": ({"objective": "kd", "chunk_size": 5}, "sparse 3", "fused"),
    "kd generalized_jsd, dense, chunked": (
        {"objective": "kd", "divergence": "generalized_jsd", "jsd_beta": 0.3, "chunk_size": 4},
        "dense",
        "logits",
    ),
    "kd tvd, dense, unchunked, T=2": (
        {"objective": "kd", "divergence": "tvd", "temperature": 2.0, "chunk_size": None},
        "dense",
        "logits",
    ),
    "atkd forward, sparse K=V, fused, ce 0.5, T=2": (
        {"objective": "atkd", "temperature": 2.0, "ce_weight": 0.5, "chunk_size": 5},
        f"sparse {V}",
        "fused",
    ),
    "atkd reverse, dense, fused, ce 0.5": (
        {"objective": "atkd", "setting": "reverse", "ce_weight": 0.5, "chunk_size": 4},
        "dense",
        "fused",
    ),
    "taid, sparse K=3, fused, ce 0.5": (
        {"objective": "taid", "ce_weight": 0.5, "chunk_size": 5},
        "sparse 3",
        "fused",
    ),
    "adakd reverse_kl, dense, chunked, T=2": (
        {"objective": "adakd", "divergence": "reverse_kl", "temperature": 2.0, "chunk_size": 4},
        "dense",
        "logits",
    ),
}


def _run(settings, teacher_kind, student_kind, compiled):
    """(loss, gradient of the student input, logits [N, V], teacher, targets, valid count)."""
    logits, teacher_logits, targets = make_inputs((14,), torch.float32, "some", seed=5)
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(14, HIDDEN, generator=generator).requires_grad_(True)
    weight = torch.randn(V, HIDDEN, generator=generator)
    if student_kind == "fused":
        student, leaf, logits = LinearHead(hidden, weight, None, V), hidden, (hidden @ weight.t()).detach()
    else:
        student, leaf = logits, logits
    temperature = settings.get("temperature", 1.0)
    teacher = None
    if teacher_kind == "dense":
        teacher = teacher_logits
    elif teacher_kind.startswith("sparse"):
        teacher = sparse_teacher(teacher_logits / temperature, targets, int(teacher_kind.split()[1]))
    config = LossConfig(hard_fraction=0.5, lam=0.3, **settings)
    objective = (
        CrossEntropy(config.chunk_size, compiled)
        if config.objective == "sft"
        else build_objective(config, compiled)
    )
    valid = float((targets != -100).sum())
    out = objective(student, teacher, targets, StepCounts(valid))
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.loss.detach(), grad, logits.detach(), teacher_logits, targets, valid


def _reference(settings, teacher_kind, logits, teacher_logits, targets):
    """The float64 loss from the definitions, as a function of the student's logits."""
    temperature = settings.get("temperature", 1.0)
    topk = None
    if teacher_kind.startswith("sparse"):
        k = int(teacher_kind.split()[1])
        ids = torch.log_softmax(teacher_logits.double() / temperature, -1).topk(k, -1).indices
        topk = [[row.tolist() for row in ids]]

    def loss(s):
        ce = torch.nn.functional.cross_entropy(s, targets, ignore_index=-100)
        if settings["objective"] == "sft":
            return ce
        weight = settings.get("ce_weight", 0.0)
        if settings["objective"] == "kd":
            name = settings.get("divergence", "forward_kl")
            params = {"beta": settings["jsd_beta"]} if "jsd_beta" in settings else {}
            values = [
                token_divergence(
                    name,
                    s[i],
                    teacher_logits[i].double(),
                    temperature,
                    topk=None if topk is None else topk[0][i],
                    **params,
                )
                for i in range(targets.numel())
                if targets[i] != -100
            ]
            teacher_loss = torch.stack(values).mean()
        elif settings["objective"] == "taid":
            rows = None if topk is None else topk[0]
            teacher_loss = reference_taid(s, teacher_logits.double(), targets, 0.4, temperature, topk=rows)
        elif settings["objective"] == "adakd":
            # The first step's share is every token; the default temperature scale.
            teacher_loss = reference_adakd(
                s, teacher_logits.double(), targets, settings["divergence"], 1.0, 0.5, temperature
            )[0]
        else:
            teacher_loss = reference_atkd(
                s,
                teacher_logits.double(),
                targets,
                0.5,
                0.3,
                settings.get("setting", "forward"),
                temperature,
                topk=topk,
            )[0]
        return teacher_loss + weight * ce

    leaf = logits.double().requires_grad_(True)
    value = loss(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_chunks_give_the_eager_and_the_reference_values_and_gradients(case):
    settings, teacher_kind, student_kind = CASES[case]
    torch._dynamo.reset()
    counters.clear()
    loss, grad, logits, teacher_logits, targets, _ = _run(settings, teacher_kind, student_kind, compiled=True)
    # Something was compiled: a silent fall-back to eager would make the comparison vacuous.
    assert counters["stats"]["unique_graphs"] >= 1
    eager_loss, eager_grad, *_ = _run(settings, teacher_kind, student_kind, compiled=False)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, eager_grad, atol=1e-6, rtol=1e-5)
    reference, reference_grad = _reference(settings, teacher_kind, logits, teacher_logits, targets)
    torch.testing.assert_close(loss.double(), reference, atol=1e-5, rtol=1e-4)
    if student_kind == "logits":
        torch.testing.assert_close(grad.double(), reference_grad, atol=1e-5, rtol=1e-4)


def test_compiling_is_on_where_asked_and_by_default_only_on_cuda_with_triton():
    assert compiles_loss("on", "cpu") and not compiles_loss("off", "cuda")
    assert not compiles_loss("auto", "cpu")
    import importlib.util

    assert compiles_loss("auto", "cuda") == (importlib.util.find_spec("triton") is not None)


@pytest.mark.slow
def test_compiled_taid_is_not_recompiled_when_t_moves():
    settings, _, _ = CASES["taid, sparse K=3, fused, ce 0.5"]
    logits, teacher_logits, targets = make_inputs((14,), torch.float32, "some", seed=5)
    teacher = sparse_teacher(teacher_logits, targets, 3)
    counts = StepCounts(float((targets != -100).sum()))
    compiled = build_objective(LossConfig(**settings), compiled=True)
    eager = build_objective(LossConfig(**settings), compiled=False)
    torch._dynamo.reset()
    counters.clear()
    compiled(logits, teacher, targets, counts)
    graphs = counters["stats"]["unique_graphs"]
    for objective in (compiled, eager):
        objective.state.t = 0.77
    moved = compiled(logits, teacher, targets, counts).loss
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(moved, eager(logits, teacher, targets, counts).loss, atol=1e-6, rtol=1e-5)
