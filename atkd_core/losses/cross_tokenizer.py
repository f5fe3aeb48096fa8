"""Losses between a teacher and a student that tokenize differently, compared span by span.

The two tokenizations of one response are cut into aligned spans (``data/alignment.py``): runs of
teacher tokens and of student tokens that spell the same text. Each side's prediction of a span is
its chain rule over the span's tokens: at the span's first token, the next-token distribution
``p(y | prefix)``, and for the span's text the product of its tokens' probabilities,
``P(span) = prod_j p(token_j | prefix, token_<j)``. As in GOLD (and DSKDv2), the *merged* vector of a
span is the first token's distribution scaled by the probability of the span's remaining tokens,
``q(y) = p(y | prefix) * P(span) / p(first token | prefix)``: exact for the span's own first token
(``q = P(span)``), a known approximation for the alternatives, whose continuations no model scored.

Three per-span distances, on these vectors:

- ``span_uld``: ULD (sorted L1, ``uld.py``) between the merged vectors; no vocabulary is shared.
- ``span_hybrid``: the same L1 distance, unsorted where the vocabularies share a token string
  (column t of the teacher against column map[t] of the student) and sorted over the tokens that are
  not shared. Identical vocabularies give the plain L1 distance, disjoint ones ULD. GOLD compares
  the shared part with a JSD and weights the two parts by the vocabulary overlap; one distance on
  one scale needs no weight.
- ``span_atkd``: ATKD's split with spans for tokens. The teacher's UNC of a span is
  ``1 - P_T(span)``; TKD is the binary KL between ``[P_T, 1 - P_T]`` and ``[P_S, 1 - P_S]`` (defined
  for every span); DKD is the KL between the two non-target distributions at the first token,
  restricted to the shared vocabulary and renormalised there, on matched spans (one token each
  side, the same string) only: elsewhere the two first tokens differ and their alternatives are
  not alternatives to the same text. Unmatched spans teach through TKD alone.

The teacher is dense logits or the scoring cache's top-K record (``SparseTeacher``). From the
record a teacher column outside its top-K is unknown: ranks past K are one bucket on each side (the
``tail``), as in ``uld.py``; the restriction to the shared vocabulary keeps the top-K entries that
map to a student token and the whole tail (its split between shared and unshared tokens is not
recorded). With K covering the teacher's vocabulary every sparse value equals the dense one.

Shapes: student logits [N, Vs] with targets [N]; teacher logits [M, Vt] with targets [M], or a
SparseTeacher of M rows (at the loss temperature already). ``SpanBatch`` says which rows form each
of the S spans. Math in float32; per-span values [S]; the teacher gets no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atkd_core.losses.decomposition import Setting, check_setting
from atkd_core.losses.inputs import SparseTeacher
from atkd_core.losses.kernels import MASK_LOGIT
from atkd_core.losses.logprobs import binary_kl, kl_from_logprobs, log1mexp
from atkd_core.losses.uld import sorted_l1, sorted_l1_with_tail

Teacher = Tensor | SparseTeacher


@dataclass(frozen=True)
class SpanBatch:
    """Which rows form each aligned span of a batch.

    student_span: [N] long, the span of each student row (-1: in no span, e.g. a prompt or pad row).
    teacher_span: [M] long, the same for teacher rows. student_first / teacher_first: [S] long, the
    row of each span's first token on each side. matched: [S] bool, one token on each side.
    """

    student_span: Tensor
    teacher_span: Tensor
    student_first: Tensor
    teacher_first: Tensor
    matched: Tensor

    @property
    def num_spans(self) -> int:
        """S."""
        return self.student_first.numel()

    @classmethod
    def from_examples(
        cls,
        span_ends: Sequence[tuple[Sequence[int], Sequence[int]]],
        student_starts: Sequence[int],
        teacher_starts: Sequence[int],
        num_student_rows: int,
        num_teacher_rows: int,
    ) -> SpanBatch:
        """Spans of every example, given as the teacher's and the student's token index where each
        span ends (``alignment.span_ends``: cumulative, counted from the example's first label
        row, at ``student_starts[e]`` / ``teacher_starts[e]`` in the flat rows). Spans with no token
        on one side (a special token only one tokenizer emits, alone) cannot be compared and are
        left out; their rows get -1."""
        student_span = torch.full((num_student_rows,), -1, dtype=torch.long)
        teacher_span = torch.full((num_teacher_rows,), -1, dtype=torch.long)
        student_first: list[int] = []
        teacher_first: list[int] = []
        matched: list[bool] = []
        for (teacher_ends, student_ends), student_start, teacher_start in zip(
            span_ends, student_starts, teacher_starts, strict=True
        ):
            teacher_begin = student_begin = 0
            for teacher_end, student_end in zip(teacher_ends, student_ends, strict=True):
                t0, t1 = teacher_start + teacher_begin, teacher_start + teacher_end
                s0, s1 = student_start + student_begin, student_start + student_end
                teacher_begin, student_begin = teacher_end, student_end
                if t1 == t0 or s1 == s0:
                    continue
                index = len(student_first)
                student_span[s0:s1] = index
                teacher_span[t0:t1] = index
                student_first.append(s0)
                teacher_first.append(t0)
                matched.append(t1 - t0 == 1 and s1 - s0 == 1)
        return cls(
            student_span=student_span,
            teacher_span=teacher_span,
            student_first=torch.tensor(student_first, dtype=torch.long),
            teacher_first=torch.tensor(teacher_first, dtype=torch.long),
            matched=torch.tensor(matched, dtype=torch.bool),
        )

    def to(self, device: torch.device | str) -> SpanBatch:
        """The same spans on ``device``."""
        return SpanBatch(
            *(
                t.to(device)
                for t in (
                    self.student_span,
                    self.teacher_span,
                    self.student_first,
                    self.teacher_first,
                    self.matched,
                )
            )
        )


def vocabulary_map(pairs: Sequence[tuple[int, int]], teacher_vocab_size: int) -> Tensor:
    """[Vt] long: the student id of each teacher id that spells a token the student has, -1 for the
    others. ``pairs`` is ``alignment.shared_vocabulary``'s (teacher id, student id) list."""
    mapping = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
    for teacher_id, student_id in pairs:
        if teacher_id < teacher_vocab_size:
            mapping[teacher_id] = student_id
    return mapping


def _span_sum(values: Tensor, span: Tensor, num_spans: int) -> Tensor:
    """[S]: the sum of ``values`` [R] over the rows of each span (rows with span -1 left out)."""
    inside = span >= 0
    return torch.zeros(num_spans, dtype=values.dtype, device=values.device).index_add_(
        0, span[inside], values[inside]
    )


@dataclass(frozen=True)
class _Side:
    """One side's view of the spans: log P(span) [S], log p(first token) [S], and the first token's
    distribution: log-probabilities [S, V] (dense) or the top-K record rows (sparse)."""

    span_logprob: Tensor
    first_logprob: Tensor
    first_logprobs: Tensor | None
    first_sparse: SparseTeacher | None
    first_target: Tensor

    @property
    def continuation_logprob(self) -> Tensor:
        """[S] log of the probability of the span's tokens after its first."""
        return self.span_logprob - self.first_logprob


def _dense_side(logits: Tensor, targets: Tensor, span: Tensor, first: Tensor, temperature: float) -> _Side:
    """Dense logits [R, V] and targets [R] (any value where span is -1) seen span by span."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    at_target = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _Side(
        span_logprob=_span_sum(at_target, span, first.numel()),
        first_logprob=at_target[first],
        first_logprobs=logprobs[first],
        first_sparse=None,
        first_target=targets[first],
    )


def _teacher_side(teacher: Teacher, targets: Tensor, spans: SpanBatch, temperature: float) -> _Side:
    """The teacher seen span by span, without gradient; ``targets`` [M] are its token ids."""
    with torch.no_grad():
        if isinstance(teacher, Tensor):
            return _dense_side(teacher, targets, spans.teacher_span, spans.teacher_first, temperature)
        target_logprob = teacher.target_logprob.float()
        first = spans.teacher_first
        return _Side(
            span_logprob=_span_sum(target_logprob, spans.teacher_span, spans.num_spans),
            first_logprob=target_logprob[first],
            first_logprobs=None,
            first_sparse=teacher.rows_at(first),
            first_target=targets[first],
        )


def _tail_mass(record: SparseTeacher) -> Tensor:
    """[S] the probability outside each row's top-K."""
    if record.log_tail_mass is not None:
        return record.log_tail_mass.float().exp()
    return (1 - record.topk_logprobs.float().exp().sum(-1)).clamp(min=0)


def _shared_columns(teacher_to_student: Tensor, teacher_vocab_size: int) -> tuple[Tensor, Tensor]:
    """([C], [C]) long: the teacher columns below ``teacher_vocab_size`` that spell a student
    token, and that token's student column, pair by pair."""
    vocab = min(teacher_to_student.numel(), teacher_vocab_size)
    shared_teacher = (teacher_to_student[:vocab] >= 0).nonzero().squeeze(-1)
    return shared_teacher, teacher_to_student[shared_teacher]


def _taken_columns(columns: Tensor, keep: Tensor, vocab_size: int) -> Tensor:
    """[S, V] bool: True at ``columns`` [S, K] where ``keep`` [S, K] holds (other entries, whatever
    column they name, mark nothing)."""
    counts = torch.zeros(columns.shape[0], vocab_size, dtype=torch.int32, device=columns.device)
    return counts.scatter_add_(-1, columns.clamp(min=0), keep.to(torch.int32)) > 0


def _merged_student(student: _Side) -> Tensor:
    """[S, Vs] the student's merged vectors (with gradient)."""
    assert student.first_logprobs is not None
    return (student.first_logprobs + student.continuation_logprob.unsqueeze(-1)).exp()


def span_uld(
    student_logits: Tensor,
    student_targets: Tensor,
    teacher: Teacher,
    teacher_targets: Tensor,
    spans: SpanBatch,
    temperature: float = 1.0,
) -> Tensor:
    """ULD per span [S]: the sorted L1 between the teacher's and the student's merged vectors."""
    student = _dense_side(
        student_logits, student_targets, spans.student_span, spans.student_first, temperature
    )
    teacher_side = _teacher_side(teacher, teacher_targets, spans, temperature)
    student_merged = _merged_student(student)
    scale = teacher_side.continuation_logprob.exp()
    if teacher_side.first_logprobs is not None:
        return sorted_l1(student_merged, teacher_side.first_logprobs.exp() * scale.unsqueeze(-1))
    record = teacher_side.first_sparse
    assert record is not None
    top = record.topk_logprobs.float().exp() * scale.unsqueeze(-1)
    return sorted_l1_with_tail(student_merged, top, _tail_mass(record) * scale)


def span_hybrid(
    student_logits: Tensor,
    student_targets: Tensor,
    teacher: Teacher,
    teacher_targets: Tensor,
    spans: SpanBatch,
    teacher_to_student: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Per span [S]: the L1 distance between the merged vectors over the shared vocabulary (teacher
    column t against student column ``teacher_to_student[t]``) plus the sorted L1 over the tokens
    either side has alone. ``teacher_to_student`` [Vt] long, -1 where not shared."""
    student = _dense_side(
        student_logits, student_targets, spans.student_span, spans.student_first, temperature
    )
    teacher_side = _teacher_side(teacher, teacher_targets, spans, temperature)
    student_merged = _merged_student(student)
    scale = teacher_side.continuation_logprob.exp().unsqueeze(-1)
    mapping = teacher_to_student.to(student_merged.device)
    if teacher_side.first_logprobs is not None:
        teacher_merged = teacher_side.first_logprobs.exp() * scale
        shared_teacher, shared_student = _shared_columns(mapping, teacher_merged.shape[-1])
        direct = (teacher_merged[:, shared_teacher] - student_merged[:, shared_student]).abs().sum(-1)
        teacher_alone = torch.ones(teacher_merged.shape[-1], dtype=torch.bool, device=mapping.device)
        teacher_alone[shared_teacher] = False
        student_alone = torch.ones(student_merged.shape[-1], dtype=torch.bool, device=mapping.device)
        student_alone[shared_student] = False
        return direct + sorted_l1(student_merged[:, student_alone], teacher_merged[:, teacher_alone])
    record = teacher_side.first_sparse
    assert record is not None
    top = record.topk_logprobs.float().exp() * scale
    mapped = mapping[record.topk_ids.long()]
    is_shared = mapped >= 0
    student_at_mapped = student_merged.gather(-1, mapped.clamp(min=0)) * is_shared
    direct = ((top - student_at_mapped).abs() * is_shared).sum(-1)
    # The student's columns that no mapped top-K entry took, against the teacher's unmapped entries
    # (the mapped ones zeroed, which sort last) and its tail.
    taken = _taken_columns(mapped, is_shared, student_merged.shape[-1])
    student_rest = student_merged.masked_fill(taken, 0.0)
    teacher_rest = top.masked_fill(is_shared, 0.0)
    return direct + sorted_l1_with_tail(student_rest, teacher_rest, _tail_mass(record) * scale.squeeze(-1))


@dataclass(frozen=True)
class SpanATKDTerms:
    """ATKD's pieces per span, each [S] float32.

    unc: the teacher's UNC of the span, 1 - P_T(span) (no gradient). tkd: the binary KL over
    (span text, anything else). dkd: the non-target KL over the shared vocabulary at the first
    token; 0 on unmatched spans (``matched`` says which spans have one).
    """

    unc: Tensor
    tkd: Tensor
    dkd: Tensor
    matched: Tensor


def _shared_non_target(log_probs: Tensor, columns: Tensor, keep: Tensor) -> Tensor:
    """[S, C]: ``log_probs`` [S, V] at ``columns`` [C], renormalised over the entries ``keep``
    [S, C] marks; the others MASK_LOGIT."""
    picked = log_probs[:, columns].masked_fill(~keep, MASK_LOGIT)
    return picked - picked.logsumexp(-1, keepdim=True)


def span_atkd_terms(
    student_logits: Tensor,
    student_targets: Tensor,
    teacher: Teacher,
    teacher_targets: Tensor,
    spans: SpanBatch,
    teacher_to_student: Tensor,
    temperature: float = 1.0,
    setting: Setting = "forward",
) -> SpanATKDTerms:
    """UNC, TKD and DKD per span (see the module's docstring); ``setting`` swaps the KLs' roles as
    token ATKD's does. ``teacher_to_student`` [Vt] long, -1 where a teacher token is not shared."""
    check_setting(setting)
    student = _dense_side(
        student_logits, student_targets, spans.student_span, spans.student_first, temperature
    )
    teacher_side = _teacher_side(teacher, teacher_targets, spans, temperature)
    log_p, log_q = teacher_side.span_logprob, student.span_logprob
    log_p_rest, log_q_rest = log1mexp(log_p), log1mexp(log_q)
    reverse = setting == "reverse"
    tkd = (
        binary_kl(log_q, log_q_rest, log_p, log_p_rest)
        if reverse
        else binary_kl(log_p, log_p_rest, log_q, log_q_rest)
    )
    dkd = torch.zeros_like(tkd)
    matched = spans.matched.to(tkd.device)
    if bool(matched.any()):
        dkd = dkd.masked_scatter(
            matched, _matched_dkd(student, teacher_side, teacher_to_student, matched, reverse)
        )
    return SpanATKDTerms(unc=-torch.expm1(log_p), tkd=tkd, dkd=dkd, matched=matched)


def _matched_dkd(
    student: _Side, teacher: _Side, teacher_to_student: Tensor, matched: Tensor, reverse: bool
) -> Tensor:
    """DKD over the shared vocabulary at the first token of each matched span: [number matched]."""
    assert student.first_logprobs is not None
    log_q = student.first_logprobs[matched]
    student_target = student.first_target[matched]
    mapping = teacher_to_student.to(log_q.device)
    if teacher.first_logprobs is not None:
        log_p = teacher.first_logprobs[matched]
        teacher_target = teacher.first_target[matched]
        shared_teacher, shared_student = _shared_columns(mapping, log_p.shape[-1])
        keep = (shared_teacher != teacher_target[:, None]) & (shared_student != student_target[:, None])
        log_p_hat = _shared_non_target(log_p, shared_teacher, keep)
        log_q_hat = _shared_non_target(log_q, shared_student, keep)
        return kl_from_logprobs(log_q_hat, log_p_hat) if reverse else kl_from_logprobs(log_p_hat, log_q_hat)
    record = teacher.first_sparse
    assert record is not None
    rows = matched.nonzero().squeeze(-1)
    ids = record.topk_ids.long()[rows]
    teacher_target = teacher.first_target[rows]
    mapped = mapping[ids]
    keep = (mapped >= 0) & (ids != teacher_target[:, None]) & (mapped != student_target[:, None])
    top = record.topk_logprobs.float()[rows].masked_fill(~keep, MASK_LOGIT)
    # The tail, less the target when the top-K does not hold it, all taken as shared: the record
    # does not say how it splits between shared and unshared tokens.
    tail = torch.log(_tail_mass(record.rows_at(rows))).clamp(min=MASK_LOGIT)
    log_target = teacher.first_logprob[rows]
    target_in_top = (ids == teacher_target[:, None]).any(-1)
    tail_rest = torch.where(target_in_top, tail, tail + log1mexp((log_target - tail).clamp(max=0.0)))
    # The student at the same entries, and its shared non-target mass on every other column.
    shared_columns = torch.zeros(log_q.shape[-1], dtype=torch.bool, device=log_q.device)
    shared_columns[mapping[mapping >= 0]] = True
    elsewhere = shared_columns.expand_as(log_q) & ~_taken_columns(mapped, keep, log_q.shape[-1])
    elsewhere = elsewhere.scatter(-1, student_target[:, None], False)
    # No such column: every shared teacher token is in the top-K, so none of the tail is shared
    # (whatever rounding left in the record).
    tail_rest = tail_rest.masked_fill(~elsewhere.any(-1), MASK_LOGIT)
    p_buckets = torch.cat([top, tail_rest.clamp(min=MASK_LOGIT)[:, None]], -1)
    q_top = log_q.gather(-1, mapped.clamp(min=0)).masked_fill(~keep, MASK_LOGIT)
    q_elsewhere = log_q.masked_fill(~elsewhere, MASK_LOGIT).logsumexp(-1)
    q_buckets = torch.cat([q_top, q_elsewhere[:, None]], -1)
    log_p_hat = p_buckets - p_buckets.logsumexp(-1, keepdim=True)
    log_q_hat = q_buckets - q_buckets.logsumexp(-1, keepdim=True)
    return kl_from_logprobs(log_q_hat, log_p_hat) if reverse else kl_from_logprobs(log_p_hat, log_q_hat)


def span_atkd_loss(terms: SpanATKDTerms, hard: Tensor, lam: float) -> Tensor:
    """ATKD's combination over spans: ``lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)``,
    an empty group adding 0. ``hard`` [S] bool (``uncertainty.hard_token_mask`` on ``terms.unc``)."""
    easy = ~hard
    easy_mean = (terms.dkd * easy).sum() / easy.sum().clamp(min=1)
    hard_mean = ((terms.tkd + terms.dkd) * hard).sum() / hard.sum().clamp(min=1)
    return lam * easy_mean + (1 - lam) * hard_mean


@dataclass(frozen=True)
class CrossTeacher:
    """The teacher of a batch that another tokenizer cut, as a cross-tokenizer objective takes it.

    rows: the teacher at its own label tokens, dense logits [M, Vt] or a SparseTeacher of M rows.
    targets: [M] the teacher's token ids at those rows. spans: the batch's spans, whose student rows
    index the student's flattened [B * T] rows. teacher_to_student: [Vt] long (``vocabulary_map``).
    """

    rows: Tensor | SparseTeacher
    targets: Tensor
    spans: SpanBatch
    teacher_to_student: Tensor
