"""Span losses across tokenizers against float64 references written from their definitions:
value and gradient, dense teacher and top-K record."""

from __future__ import annotations

import math

import pytest
import torch

from atkd_core.config import LossConfig
from atkd_core.data.alignment import AlignedSpan, span_ends
from atkd_core.losses import LinearHead, SparseTeacher
from atkd_core.losses.cross_tokenizer import (
    CrossTeacher,
    SpanBatch,
    span_atkd_loss,
    span_atkd_terms,
    span_hybrid,
    span_uld,
    vocabulary_map,
)
from atkd_core.losses.objective import StepCounts, build_objective
from atkd_core.losses.uncertainty import hard_token_mask

TEACHER_VOCAB, STUDENT_VOCAB = 13, 11
# Teacher id -> student id for the token strings both vocabularies hold.
SHARED = [(0, 3), (2, 0), (3, 1), (5, 7), (6, 2), (8, 9), (11, 5)]
SIZES = [[(1, 1), (2, 1), (1, 2), (1, 1), (3, 2)], [(1, 1), (1, 3), (2, 2), (1, 1)]]


def make_case(seed: int):
    """Two examples of aligned spans (teacher tokens, student tokens) with one prompt row before
    each, random logits, and targets; a matched span's two tokens spell the same string."""
    generator = torch.Generator().manual_seed(seed)
    spans, student_starts, teacher_starts = [], [], []
    student_rows = teacher_rows = 0
    for sizes in SIZES:
        student_rows += 1  # a prompt row, in no span
        teacher_rows += 1
        student_starts.append(student_rows)
        teacher_starts.append(teacher_rows)
        example, t, s = [], 0, 0
        for teacher_count, student_count in sizes:
            example.append(AlignedSpan(t, t + teacher_count, s, s + student_count, 0, 0))
            t, s = t + teacher_count, s + student_count
        spans.append(example)
        student_rows += s
        teacher_rows += t
    student_targets = torch.randint(0, STUDENT_VOCAB, (student_rows,), generator=generator)
    teacher_targets = torch.randint(0, TEACHER_VOCAB, (teacher_rows,), generator=generator)
    for example, student_start, teacher_start in zip(spans, student_starts, teacher_starts, strict=True):
        for number, span in enumerate(example):
            if span.matched:
                teacher_id, student_id = SHARED[number % len(SHARED)]
                teacher_targets[teacher_start + span.teacher_start] = teacher_id
                student_targets[student_start + span.student_start] = student_id
    batch = SpanBatch.from_examples(
        [span_ends(example) for example in spans], student_starts, teacher_starts, student_rows, teacher_rows
    )
    student = (torch.randn(student_rows, STUDENT_VOCAB, generator=generator) * 2).requires_grad_(True)
    teacher = torch.randn(teacher_rows, TEACHER_VOCAB, generator=generator) * 2.5
    return batch, spans, student_starts, teacher_starts, student, student_targets, teacher, teacher_targets


def record(teacher_logits: torch.Tensor, teacher_targets: torch.Tensor, k: int) -> SparseTeacher:
    """The top-K record scoring would write for dense logits."""
    logprobs = torch.log_softmax(teacher_logits.double(), -1)
    top = logprobs.topk(k, -1)
    return SparseTeacher(
        target_logprob=logprobs.gather(-1, teacher_targets[:, None]).squeeze(-1).float(),
        topk_ids=top.indices,
        topk_logprobs=top.values.float(),
        log_tail_mass=torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-12)).float(),
    )


class Reference:
    """The definitions, span by span, in float64 Python."""

    def __init__(
        self, spans, student_starts, teacher_starts, student, student_targets, teacher, teacher_targets
    ):
        self.q = torch.softmax(student.double(), -1)
        self.p = torch.softmax(teacher.double(), -1)
        self.spans = []
        for example, s0, t0 in zip(spans, student_starts, teacher_starts, strict=True):
            for span in example:
                s_rows = list(range(s0 + span.student_start, s0 + span.student_end))
                t_rows = list(range(t0 + span.teacher_start, t0 + span.teacher_end))
                self.spans.append((s_rows, t_rows, span.matched))
        self.student_targets, self.teacher_targets = student_targets, teacher_targets

    def side(self, probs, rows, targets):
        """(first row's distribution, P(span), merged vector)."""
        whole = math.prod(probs[r, targets[r]] for r in rows)
        first = probs[rows[0]]
        return first, whole, first * (whole / first[targets[rows[0]]])

    def student(self, s_rows):
        return self.side(self.q, s_rows, self.student_targets)

    def teacher(self, t_rows):
        return self.side(self.p, t_rows, self.teacher_targets)

    @staticmethod
    def sorted_l1(a, b):
        a = sorted(a, key=lambda x: -float(torch.as_tensor(x).detach()))
        b = sorted(b, key=lambda x: -float(torch.as_tensor(x).detach()))
        width = max(len(a), len(b))
        a = a + [0.0] * (width - len(a))
        b = b + [0.0] * (width - len(b))
        return sum(abs(x - y) for x, y in zip(a, b, strict=True))

    @staticmethod
    def sorted_l1_tail(student, teacher_top, teacher_tail):
        s = sorted(student, key=lambda x: -float(torch.as_tensor(x).detach()))
        k = len(teacher_top)
        t = sorted(teacher_top, key=lambda x: -float(torch.as_tensor(x).detach()))
        head = sum(abs(t[i] - (s[i] if i < len(s) else 0.0)) for i in range(k))
        return head + abs(teacher_tail - sum(s[k:], torch.zeros((), dtype=torch.float64)))

    def uld(self, k=None):
        values = []
        for s_rows, t_rows, _ in self.spans:
            _, _, q_merged = self.student(s_rows)
            p_first, p_whole, p_merged = self.teacher(t_rows)
            if k is None:
                values.append(self.sorted_l1(list(q_merged.unbind()), p_merged.tolist()))
            else:
                scale = p_whole / p_first[self.teacher_targets[t_rows[0]]]
                top = sorted(p_first.tolist(), reverse=True)[:k]
                values.append(
                    self.sorted_l1_tail(
                        list(q_merged.unbind()), [x * scale for x in top], (1 - sum(top)) * scale
                    )
                )
        return torch.stack(values)

    def hybrid(self, k=None):
        shared = dict(SHARED)
        values = []
        for s_rows, t_rows, _ in self.spans:
            _, _, q_merged = self.student(s_rows)
            p_first, p_whole, p_merged = self.teacher(t_rows)
            if k is None:
                direct = sum(abs(p_merged[t] - q_merged[s]) for t, s in SHARED)
                teacher_alone = [p_merged[t].item() for t in range(TEACHER_VOCAB) if t not in shared]
                student_alone = [q_merged[s] for s in range(STUDENT_VOCAB) if s not in shared.values()]
                values.append(direct + self.sorted_l1(student_alone, teacher_alone))
                continue
            scale = p_whole / p_first[self.teacher_targets[t_rows[0]]]
            top_ids = sorted(range(TEACHER_VOCAB), key=lambda t: -p_first[t].item())[:k]
            mapped = [t for t in top_ids if t in shared]
            direct = sum(abs(p_first[t] * scale - q_merged[shared[t]]) for t in mapped)
            taken = {shared[t] for t in mapped}
            student_rest = [q_merged[s] for s in range(STUDENT_VOCAB) if s not in taken]
            teacher_rest = [p_first[t].item() * scale if t not in shared else 0.0 for t in top_ids]
            tail = (1 - sum(p_first[t].item() for t in top_ids)) * scale
            values.append(direct + self.sorted_l1_tail(student_rest, teacher_rest, tail))
        return torch.stack(values)

    def atkd(self, k=None, reverse=False):
        shared = dict(SHARED)
        unc, tkd, dkd = [], [], []
        for s_rows, t_rows, matched in self.spans:
            q_first, q_whole, _ = self.student(s_rows)
            p_first, p_whole, _ = self.teacher(t_rows)
            a, b = (q_whole, p_whole) if reverse else (p_whole, q_whole)
            unc.append(1 - p_whole)
            tkd.append(a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b)))
            if not matched:
                dkd.append(torch.zeros((), dtype=torch.float64))
                continue
            t_target = int(self.teacher_targets[t_rows[0]])
            s_target = int(self.student_targets[s_rows[0]])
            if k is None:
                pairs = [(t, s) for t, s in SHARED if t != t_target and s != s_target]
                p_hat = torch.stack([p_first[t] for t, _ in pairs])
                q_hat = torch.stack([q_first[s] for _, s in pairs])
            else:
                top_ids = sorted(range(TEACHER_VOCAB), key=lambda t: -p_first[t].item())[:k]
                pairs = [
                    (t, shared[t]) for t in top_ids if t in shared and t != t_target and shared[t] != s_target
                ]
                tail = 1 - sum(p_first[t] for t in top_ids)
                if t_target not in top_ids:
                    tail = tail - p_first[t_target]
                taken = {s for _, s in pairs} | {s_target}
                elsewhere = sum(
                    (q_first[s] for s in shared.values() if s not in taken),
                    torch.zeros((), dtype=torch.float64),
                )
                others = [s for s in shared.values() if s not in taken]
                bucket = [tail] if others else []  # no shared token outside the top-K: no shared tail
                p_hat = torch.stack([p_first[t] for t, _ in pairs] + bucket)
                q_hat = torch.stack([q_first[s] for _, s in pairs] + ([elsewhere] if others else []))
            p_hat, q_hat = p_hat / p_hat.sum(), q_hat / q_hat.sum()
            a, b = (q_hat, p_hat) if reverse else (p_hat, q_hat)
            dkd.append((a * torch.log(a / b)).sum())
        return torch.stack(unc), torch.stack(tkd), torch.stack(dkd)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6) -> bool:
    """Values equal within ``atol`` and a float32 relative error, compared in float64 without their
    graphs."""
    return torch.allclose(got.detach().double(), want.detach().double(), atol=atol, rtol=1e-5)


def gradient(values: torch.Tensor, student: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d(sum of weights * values)/d student logits."""
    (grad,) = torch.autograd.grad((values * weights.to(values.dtype)).sum(), student, retain_graph=True)
    return grad


def as_teacher(teacher, teacher_targets, k):
    return teacher if k is None else record(teacher, teacher_targets, k)


@pytest.mark.parametrize("k", [None, 4, TEACHER_VOCAB])
@pytest.mark.parametrize("seed", [0, 1])
def test_span_uld_and_hybrid_match_their_definitions(seed, k):
    batch, spans, s0, t0, student, s_targets, teacher, t_targets = make_case(seed)
    reference = Reference(spans, s0, t0, student, s_targets, teacher, t_targets)
    weights = torch.rand(batch.num_spans, generator=torch.Generator().manual_seed(seed))
    mapping = vocabulary_map(SHARED, TEACHER_VOCAB)
    got_uld = span_uld(student, s_targets, as_teacher(teacher, t_targets, k), t_targets, batch)
    got_hybrid = span_hybrid(student, s_targets, as_teacher(teacher, t_targets, k), t_targets, batch, mapping)
    want_uld, want_hybrid = reference.uld(k), reference.hybrid(k)
    assert got_uld.dtype == torch.float32
    assert close(got_uld, want_uld, 2e-6)
    assert close(got_hybrid, want_hybrid, 2e-6)
    for got, want in ((got_uld, want_uld), (got_hybrid, want_hybrid)):
        assert close(gradient(got, student, weights), gradient(want, student, weights))


@pytest.mark.parametrize("setting", ["forward", "reverse"])
@pytest.mark.parametrize("k", [None, 4, TEACHER_VOCAB])
@pytest.mark.parametrize("seed", [0, 1])
def test_span_atkd_terms_match_their_definitions(seed, k, setting):
    batch, spans, s0, t0, student, s_targets, teacher, t_targets = make_case(seed)
    reference = Reference(spans, s0, t0, student, s_targets, teacher, t_targets)
    weights = torch.rand(batch.num_spans, generator=torch.Generator().manual_seed(seed))
    terms = span_atkd_terms(
        student,
        s_targets,
        as_teacher(teacher, t_targets, k),
        t_targets,
        batch,
        vocabulary_map(SHARED, TEACHER_VOCAB),
        setting=setting,
    )
    unc, tkd, dkd = reference.atkd(k, reverse=setting == "reverse")
    assert close(terms.unc, unc, 1e-6)
    assert close(terms.tkd, tkd, 2e-6)
    assert close(terms.dkd, dkd, 2e-6)
    assert bool((terms.dkd[~terms.matched] == 0).all()) and int(terms.matched.sum()) == 4
    for got, want in ((terms.tkd, tkd), (terms.dkd, dkd)):
        assert close(gradient(got, student, weights), gradient(want, student, weights))


def test_the_full_record_gives_the_dense_values():
    batch, _, _, _, student, s_targets, teacher, t_targets = make_case(3)
    mapping = vocabulary_map(SHARED, TEACHER_VOCAB)
    full = record(teacher, t_targets, TEACHER_VOCAB)
    assert close(
        span_uld(student, s_targets, full, t_targets, batch),
        span_uld(student, s_targets, teacher, t_targets, batch),
    )
    assert close(
        span_hybrid(student, s_targets, full, t_targets, batch, mapping),
        span_hybrid(student, s_targets, teacher, t_targets, batch, mapping),
    )
    sparse = span_atkd_terms(student, s_targets, full, t_targets, batch, mapping)
    dense = span_atkd_terms(student, s_targets, teacher, t_targets, batch, mapping)
    assert close(sparse.dkd, dense.dkd) and close(sparse.tkd, dense.tkd)


def test_one_tokenizer_reduces_to_the_token_losses():
    """Teacher and student with one vocabulary and one tokenization: every span is one matched
    token, the hybrid is the plain L1 distance and span ATKD's TKD and DKD are token ATKD's."""
    generator = torch.Generator().manual_seed(7)
    rows, vocab = 9, 8
    student = torch.randn(rows, vocab, generator=generator).requires_grad_(True)
    teacher = torch.randn(rows, vocab, generator=generator)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    spans = [[AlignedSpan(i, i + 1, i, i + 1, i, i + 1) for i in range(rows)]]
    batch = SpanBatch.from_examples([span_ends(spans[0])], [0], [0], rows, rows)
    identity = vocabulary_map([(i, i) for i in range(vocab)], vocab)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    hybrid = span_hybrid(student, targets, teacher, targets, batch, identity)
    assert close(hybrid, (p - q).abs().sum(-1), 1e-6)
    terms = span_atkd_terms(student, targets, teacher, targets, batch, identity)
    kl = (p * (p.log() - q.log())).sum(-1)
    p_g = p.gather(-1, targets[:, None]).squeeze(-1)
    # KL = TKD + (1 - p_g) DKD, the identity token ATKD is built on.
    assert close(terms.tkd + (1 - p_g) * terms.dkd, kl, 1e-5)
    assert close(terms.unc, 1 - p_g, 1e-6)


def test_spans_with_no_token_on_one_side_are_left_out():
    spans = [[AlignedSpan(0, 1, 0, 1, 0, 3), AlignedSpan(1, 2, 1, 1, 3, 3), AlignedSpan(2, 4, 1, 2, 3, 7)]]
    batch = SpanBatch.from_examples([span_ends(spans[0])], [2], [1], 5, 6)
    assert batch.num_spans == 2
    assert batch.student_span.tolist() == [-1, -1, 0, 1, -1]
    assert batch.teacher_span.tolist() == [-1, 0, -1, 1, 1, -1]
    assert batch.student_first.tolist() == [2, 3] and batch.teacher_first.tolist() == [1, 3]
    assert batch.matched.tolist() == [True, False]


def test_span_atkd_loss_weighs_the_groups_as_token_atkd_does():
    batch, _, _, _, student, s_targets, teacher, t_targets = make_case(5)
    terms = span_atkd_terms(
        student, s_targets, teacher, t_targets, batch, vocabulary_map(SHARED, TEACHER_VOCAB)
    )
    hard = terms.unc >= terms.unc.median()
    loss = span_atkd_loss(terms, hard, lam=0.2)
    easy_mean = terms.dkd[~hard].mean()
    hard_mean = (terms.tkd + terms.dkd)[hard].mean()
    assert close(loss, 0.2 * easy_mean + 0.8 * hard_mean)
    no_hard = span_atkd_loss(terms, torch.zeros_like(hard), lam=0.2)
    assert close(no_hard, 0.2 * terms.dkd.mean())


def batch_case(seed: int, prompt_rows: int = 2):
    """A student batch [2, T, V] whose label rows start after ``prompt_rows`` ignored rows, with its
    CrossTeacher (dense teacher rows), from make_case's spans."""
    _, spans, _, _, _, _, teacher, t_targets = make_case(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    lengths = [span_ends(example)[1][-1] for example in spans]
    width = prompt_rows + max(lengths) + 1
    targets = torch.full((2, width), -100)
    for row, length in enumerate(lengths):
        targets[row, prompt_rows : prompt_rows + length] = torch.randint(
            0, STUDENT_VOCAB, (length,), generator=generator
        )
    teacher_starts = [1, 1 + 1 + span_ends(spans[0])[0][-1]]
    batch = SpanBatch.from_examples(
        [span_ends(example) for example in spans],
        [prompt_rows, width + prompt_rows],
        teacher_starts,
        2 * width,
        teacher.shape[0],
    )
    cross = CrossTeacher(teacher, t_targets, batch, vocabulary_map(SHARED, TEACHER_VOCAB))
    hidden = torch.randn(2, width, 6, generator=generator, requires_grad=True)
    weight = torch.randn(STUDENT_VOCAB + 3, 6, generator=generator)
    return hidden, weight, targets, cross


@pytest.mark.parametrize(("objective", "span_loss"), [("kd", "uld"), ("kd", "hybrid"), ("atkd", "hybrid")])
def test_the_objective_is_the_span_losses_over_the_label_rows(objective, span_loss):
    hidden, weight, targets, cross = batch_case(11)
    loss = LossConfig(objective=objective, span_loss=span_loss, ce_weight=0.5, hard_fraction=0.4)
    built = build_objective(loss, cross_tokenizer=True)
    tokens = float((targets != -100).sum())
    head = LinearHead(hidden, weight, None, STUDENT_VOCAB)
    fused = built(head, cross, targets, StepCounts(tokens=tokens))
    logits = hidden @ weight[:STUDENT_VOCAB].T
    plain = built(logits, cross, targets, StepCounts(tokens=tokens))
    assert close(fused.loss, plain.loss, 1e-5)
    assert close(torch.autograd.grad(fused.loss, hidden)[0], torch.autograd.grad(plain.loss, hidden)[0], 1e-5)

    rows = (targets.reshape(-1) != -100).nonzero().squeeze(-1)
    flat = logits.reshape(-1, STUDENT_VOCAB)[rows]
    flat_targets = targets.reshape(-1)[rows]
    position = {int(r): i for i, r in enumerate(rows)}
    spans = SpanBatch(
        student_span=cross.spans.student_span[rows],
        teacher_span=cross.spans.teacher_span,
        student_first=torch.tensor([position[int(r)] for r in cross.spans.student_first]),
        teacher_first=cross.spans.teacher_first,
        matched=cross.spans.matched,
    )
    ce = torch.nn.functional.cross_entropy(flat, flat_targets, reduction="sum") / tokens
    if objective == "atkd":
        terms = span_atkd_terms(
            flat, flat_targets, cross.rows, cross.targets, spans, cross.teacher_to_student
        )
        hard, _ = hard_token_mask(terms.unc, torch.ones_like(terms.unc, dtype=torch.bool), hard_fraction=0.4)
        want = span_atkd_loss(terms, hard, 0.2) + 0.5 * ce
    elif span_loss == "uld":
        want = span_uld(flat, flat_targets, cross.rows, cross.targets, spans).sum() / tokens + 0.5 * ce
    else:
        want = (
            span_hybrid(flat, flat_targets, cross.rows, cross.targets, spans, cross.teacher_to_student).sum()
            / tokens
            + 0.5 * ce
        )
    assert close(plain.loss, want, 1e-5)
    assert plain.cross_entropy == pytest.approx(float(ce.detach()), rel=1e-5)
    assert "across tokenizers" in built.describe()


def test_span_sums_do_not_depend_on_how_a_step_is_cut_into_micro_batches():
    hidden, weight, targets, cross = batch_case(12)
    built = build_objective(
        LossConfig(objective="kd", span_loss="hybrid", ce_weight=0.3), cross_tokenizer=True
    )
    tokens = float((targets != -100).sum())
    logits = hidden @ weight[:STUDENT_VOCAB].T
    whole = built(logits, cross, targets, StepCounts(tokens=tokens)).loss
    width = targets.shape[1]
    parts = []
    for row in range(2):
        keep = cross.spans.student_span.reshape(2, width)[row]
        first = cross.spans.student_first
        own = (first >= row * width) & (first < (row + 1) * width)
        renumber = torch.full((cross.spans.num_spans,), -1, dtype=torch.long)
        renumber[own] = torch.arange(int(own.sum()))
        spans = SpanBatch(
            student_span=torch.where(keep >= 0, renumber[keep.clamp(min=0)], -1),
            teacher_span=torch.where(
                cross.spans.teacher_span >= 0, renumber[cross.spans.teacher_span.clamp(min=0)], -1
            ),
            student_first=first[own] - row * width,
            teacher_first=cross.spans.teacher_first[own],
            matched=cross.spans.matched[own],
        )
        part = CrossTeacher(cross.rows, cross.targets, spans, cross.teacher_to_student)
        parts.append(
            built(logits[row : row + 1], part, targets[row : row + 1], StepCounts(tokens=tokens)).loss
        )
    assert close(parts[0] + parts[1], whole, 1e-5)
