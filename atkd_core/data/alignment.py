"""Aligning two tokenizations of one text, for distillation across tokenizers.

A teacher and a student that tokenize differently still read the same characters. Two token
sequences over the same text align at every character where a token ends on both sides: between
two such characters lies one *span*, a run of teacher tokens and a run of student tokens that
spell the same text (the longest common segmentation). A span of one token on each side is
*matched*: there the two models predict the same piece of text from the same prefix, and their
next-token distributions can be compared over the tokens both vocabularies spell the same way
(``shared_vocabulary``). A longer span can still be compared as a whole: the probability of its
text is the product of its tokens' probabilities (chain rule).

Tokens are given by their character offsets in the text (a tokenizer's offset mapping,
``(start, end)`` per token). A token ends at a boundary where its end is a character position the
next token does not also end at: byte-level tokenizers split a multi-byte character into pieces
that all carry the character's offsets, and only the last piece finishes it. Tokens that cover
no character (``start == end``: BOS, EOS, other special tokens) are boundaries of their own,
ordered after the text token that ends where they sit: an EOS on both sides is a matched span
after the last word's; an EOS on one side only joins the last span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from atkd_core.errors import UserError


@dataclass(frozen=True)
class AlignedSpan:
    """Teacher tokens [teacher_start, teacher_end) and student tokens [student_start, student_end)
    that spell the same characters [text_start, text_end)."""

    teacher_start: int
    teacher_end: int
    student_start: int
    student_end: int
    text_start: int
    text_end: int

    @property
    def matched(self) -> bool:
        """One token on each side: the same text predicted as one token by both."""
        return self.teacher_end - self.teacher_start == 1 and self.student_end - self.student_start == 1


Boundary = tuple[int, int]  # (character, rank among the zero-width tokens at it; 0 for a text token)


def _boundaries(offsets: Sequence[tuple[int, int]], side: str) -> list[Boundary | None]:
    """Each token's boundary, or None for a piece of a character that the next token finishes."""
    boundaries: list[Boundary | None] = []
    zero_width_rank: dict[int, int] = {}
    previous_end = 0
    for index, (start, end) in enumerate(offsets):
        if end < previous_end or start > end:
            raise UserError(
                f"{side} token {index} has offsets ({start}, {end}) after a token ending at {previous_end}: "
                "offsets must be in order, each start at or before its end (a tokenizer's offset mapping)"
            )
        previous_end = end
        if start == end:
            zero_width_rank[end] = zero_width_rank.get(end, 0) + 1
            boundaries.append((end, zero_width_rank[end]))
            continue
        following = offsets[index + 1] if index + 1 < len(offsets) else None
        continued = following is not None and following[1] == end and following[0] < following[1]
        boundaries.append(None if continued else (end, 0))
    return boundaries


def aligned_spans(
    teacher_offsets: Sequence[tuple[int, int]], student_offsets: Sequence[tuple[int, int]]
) -> list[AlignedSpan]:
    """The spans of two tokenizations of one text, in order, covering every token of both.

    ``teacher_offsets`` [Nt, 2], ``student_offsets`` [Ns, 2]: each token's (start, end) in the
    text, in order. Both must end at the same character (the same text); a UserError says where
    they differ. Tokens after the last boundary both share join the last span.
    """
    teacher, student = _boundaries(teacher_offsets, "teacher"), _boundaries(student_offsets, "student")
    teacher_last = teacher_offsets[-1][1] if teacher_offsets else 0
    student_last = student_offsets[-1][1] if student_offsets else 0
    if teacher_last != student_last:
        raise UserError(
            f"the teacher's tokens end at character {teacher_last} and the student's at {student_last}: "
            "two tokenizations of different texts cannot be aligned"
        )
    spans: list[AlignedSpan] = []
    t = s = t_start = s_start = text_start = 0
    while t < len(teacher) and s < len(student):
        at_teacher, at_student = teacher[t], student[s]
        if at_teacher is None or (at_student is not None and at_teacher < at_student):
            t += 1
        elif at_student is None or at_student < at_teacher:
            s += 1
        else:
            t, s = t + 1, s + 1
            spans.append(AlignedSpan(t_start, t, s_start, s, text_start, at_teacher[0]))
            t_start, s_start, text_start = t, s, at_teacher[0]
    if t_start < len(teacher) or s_start < len(student):
        if spans:
            last = spans.pop()
            t_start, s_start, text_start = last.teacher_start, last.student_start, last.text_start
        spans.append(AlignedSpan(t_start, len(teacher), s_start, len(student), text_start, teacher_last))
    return spans


def shared_token_pairs(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> list[tuple[int, int]]:
    """(teacher id, student id) for the tokens both tokenizers spell alike (``shared_vocabulary``),
    and for the special tokens of the same role (EOS, BOS, pad, unknown) whatever their strings:
    an end of text is the same event in both vocabularies."""
    pairs = dict(shared_vocabulary(teacher.get_vocab(), student.get_vocab()))
    taken = set(pairs.values())
    for role in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        teacher_id, student_id = getattr(teacher, role), getattr(student, role)
        if (
            teacher_id is not None
            and student_id is not None
            and teacher_id not in pairs
            and student_id not in taken
        ):
            pairs[teacher_id] = student_id
            taken.add(student_id)
    return sorted(pairs.items())


def span_ends(spans: Sequence[AlignedSpan]) -> tuple[list[int], list[int]]:
    """Where each span ends on the teacher's side and on the student's, as token indices: the
    compact form prepared data stores (each span starts where the previous one ends)."""
    return [span.teacher_end for span in spans], [span.student_end for span in spans]


def shared_vocabulary(
    teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int]
) -> list[tuple[int, int]]:
    """(teacher id, student id) for every token string both vocabularies hold, by teacher id.

    The vocabularies map each token's string, as the tokenizer stores it (``get_vocab()``), to
    its id. Two byte-level BPE vocabularies store the same bytes the same way, so equal strings
    are equal text; vocabularies of different kinds (byte-level against SentencePiece's ``▁``)
    share fewer strings than they share text, which shows up as a low share here.
    """
    return sorted(
        (teacher_id, student_vocab[token])
        for token, teacher_id in teacher_vocab.items()
        if token in student_vocab
    )


def label_offsets(
    prompt: str, response: str, label_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[int, int]]:
    """The character offsets, in ``prompt + response``, of an example's label tokens ``label_ids``
    (the response's tokens and EOS, as ``encoding.encode_example`` made them, possibly cut short).

    The labels are the tokens of the whole text after those of the prompt without its trailing
    whitespace; the EOS covers no character and sits at the text's end. A tokenizer with no offset
    mapping (a slow tokenizer) or ids that the whole text does not reproduce are refused.
    """
    if not tokenizer.is_fast:
        raise UserError(
            f"{type(tokenizer).__name__} gives no character offsets; aligning two tokenizations needs a "
            "fast tokenizer (save it with tokenizers installed, or load it with use_fast=True)"
        )
    context_length = len(tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"])
    whole = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    ids = whole["input_ids"][context_length:] + [tokenizer.eos_token_id]
    offsets = [tuple(pair) for pair in whole["offset_mapping"][context_length:]]
    offsets.append((len(prompt + response), len(prompt + response)))
    if list(label_ids) != ids[: len(label_ids)]:
        raise UserError(
            "the example's label ids are not the tokens its prompt and response encode to; "
            "the prepared data was made with another tokenizer"
        )
    return [(int(start), int(end)) for start, end in offsets[: len(label_ids)]]


def response_spans(
    teacher_offsets: Sequence[tuple[int, int]], student_offsets: Sequence[tuple[int, int]]
) -> list[AlignedSpan]:
    """``aligned_spans`` of two label token runs over one text, each cut to the text both cover:
    where one side was cut short (an over-long example), the other side's tokens past the last
    character both reach are left out of every span. Offsets are shifted so the spans' text
    positions count from the earlier first token."""
    if not teacher_offsets or not student_offsets:
        return []
    teacher, student = list(teacher_offsets), list(student_offsets)
    # Cutting one side at the other's end can end it earlier still (a token across that end goes),
    # so cut until both end on the same character.
    while teacher and student and teacher[-1][1] != student[-1][1]:
        common_end = min(teacher[-1][1], student[-1][1])
        teacher = [pair for pair in teacher if pair[1] <= common_end]
        student = [pair for pair in student if pair[1] <= common_end]
    if not teacher or not student:
        return []
    origin = min(teacher[0][0], student[0][0])
    return aligned_spans(
        [(start - origin, end - origin) for start, end in teacher],
        [(start - origin, end - origin) for start, end in student],
    )
