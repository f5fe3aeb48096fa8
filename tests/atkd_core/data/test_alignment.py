"""Aligning two tokenizations of one text: spans where both sides end on the same character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from atkd_core.data.alignment import (
    AlignedSpan,
    aligned_spans,
    label_offsets,
    response_spans,
    shared_vocabulary,
)
from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.data.encoding import encode_example, format_prompt
from atkd_core.data.suite import generate_split
from atkd_core.data.tokenizer import train_tokenizer
from atkd_core.errors import UserError
from tests.conftest import tiny_config


def _offsets(pieces: list[str]) -> list[tuple[int, int]]:
    offsets, position = [], 0
    for piece in pieces:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    return offsets


def _cuts(ends: list[int]) -> list[tuple[int, int]]:
    return list(zip([0, *ends[:-1]], ends, strict=True))


def test_spans_close_where_both_sides_end_on_the_same_character():
    # "the cats sat": teacher [the][ cats][ sat], student [the][ c][ats][ s][at]
    spans = aligned_spans(_offsets(["the", " cats", " sat"]), _offsets(["the", " c", "ats", " s", "at"]))
    assert spans == [
        AlignedSpan(0, 1, 0, 1, 0, 3),
        AlignedSpan(1, 2, 1, 3, 3, 8),
        AlignedSpan(2, 3, 3, 5, 8, 12),
    ]
    assert [span.matched for span in spans] == [True, False, False]


def test_crossing_boundaries_make_one_span():
    # teacher [ab][cd][ef], student [a][bc][def]: no boundary in common before the end.
    assert aligned_spans(_cuts([2, 4, 6]), _cuts([1, 3, 6])) == [AlignedSpan(0, 3, 0, 3, 0, 6)]


def test_special_tokens_are_boundaries_of_their_own():
    # [BOS][ab][cd][EOS] against [BOS][ab][c][d][EOS]: BOS and EOS match each other.
    teacher = [(0, 0), (0, 2), (2, 4), (4, 4)]
    student = [(0, 0), (0, 2), (2, 3), (3, 4), (4, 4)]
    assert aligned_spans(teacher, student) == [
        AlignedSpan(0, 1, 0, 1, 0, 0),
        AlignedSpan(1, 2, 1, 2, 0, 2),
        AlignedSpan(2, 3, 2, 4, 2, 4),
        AlignedSpan(3, 4, 4, 5, 4, 4),
    ]
    # An EOS on the teacher's side only joins the last span; a BOS on one side only, the first.
    assert aligned_spans(teacher, student[1:4]) == [
        AlignedSpan(0, 2, 0, 1, 0, 2),
        AlignedSpan(2, 4, 1, 3, 2, 4),
    ]


def test_pieces_of_one_character_close_no_span_before_its_last():
    # "é!" : the teacher splits é into two byte pieces (both carry é's offsets), the student not.
    teacher, student = [(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)]
    assert aligned_spans(teacher, student) == [AlignedSpan(0, 2, 0, 1, 0, 1), AlignedSpan(2, 3, 1, 2, 1, 2)]


def test_every_token_is_in_exactly_one_span_in_order():
    """On random segmentations of one text: the spans tile both sequences, and each span's text
    ends where a token of each side ends."""
    generator = random.Random(0)
    for _ in range(200):
        length = generator.randint(1, 40)
        cuts = [
            sorted(generator.sample(range(1, length), generator.randint(0, length - 1))) + [length]
            for _ in range(2)
        ]
        teacher, student = cuts
        spans = aligned_spans(_cuts(teacher), _cuts(student))
        assert spans[0].teacher_start == spans[0].student_start == spans[0].text_start == 0
        for before, after in zip(spans, spans[1:], strict=False):
            assert (after.teacher_start, after.student_start, after.text_start) == (
                before.teacher_end,
                before.student_end,
                before.text_end,
            )
        assert (spans[-1].teacher_end, spans[-1].student_end, spans[-1].text_end) == (
            len(teacher),
            len(student),
            length,
        )
        for span in spans:
            assert teacher[span.teacher_end - 1] == student[span.student_end - 1] == span.text_end
        # A boundary both sides share always closes a span.
        assert {span.text_end for span in spans} == set(teacher) & set(student)


def test_two_texts_or_decreasing_offsets_are_refused_saying_why():
    with pytest.raises(UserError, match="end at character 5 and the student's at 6"):
        aligned_spans(_cuts([2, 5]), _cuts([6]))
    with pytest.raises(UserError, match=r"student token 1 has offsets \(0, 1\) after a token ending at 3"):
        aligned_spans(_cuts([3]), [(0, 3), (0, 1), (1, 3)])


def _bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def test_real_tokenizers_of_two_sizes_align_through_their_offsets():
    texts = [
        f"the {w} of {n} sat on the {w}s, {n} times over" for w in ("cat", "dog", "owl") for n in range(30)
    ]
    big, small = _bpe(texts, 500), _bpe(texts, 275)
    text = "the owl of 7 sat on the cats, 12 times over"
    teacher, student = big.encode(text), small.encode(text)
    spans = aligned_spans(teacher.offsets, student.offsets)
    for span in spans:
        piece = text[span.text_start : span.text_end]
        assert "".join(teacher.tokens[span.teacher_start : span.teacher_end]).replace("Ġ", " ") == piece
        assert "".join(student.tokens[span.student_start : span.student_end]).replace("Ġ", " ") == piece
    assert 0 < sum(span.matched for span in spans) < len(student.tokens)
    pairs = shared_vocabulary(big.get_vocab(), small.get_vocab())
    assert all(big.id_to_token(t) == small.id_to_token(s) for t, s in pairs)
    assert len(pairs) == len(set(big.get_vocab()) & set(small.get_vocab()))


@pytest.fixture(scope="module")
def suite_pair():
    """The embedded suite's training rows, prompts, and two tokenizers trained on them: a teacher's
    of up to 1024 tokens and a student's of 300, so that many words split differently (on 64 rows
    a BPE stops merging near 512 tokens, where the two would split almost every response alike)."""
    config = tiny_config(Path("unused"))
    rows = list(generate_split(config.data.embedded, "train"))
    prompts = [format_prompt(config.data, row["instruction"], row["context"]) for row in rows]
    texts = [prompt + row["response"] for prompt, row in zip(prompts, rows, strict=True)]
    return config, rows, prompts, train_tokenizer(texts, 1024), train_tokenizer(texts, 300)


def test_label_offsets_cover_the_response_tokens_exactly(suite_pair):
    config, rows, prompts, teacher, _ = suite_pair
    for prompt, row in list(zip(prompts, rows, strict=True))[:50]:
        encoded = encode_example(prompt, row["response"], teacher, config.data.max_length)
        label_ids = [t for t in encoded.labels if t != IGNORE_INDEX]
        offsets = label_offsets(prompt, row["response"], label_ids, teacher)
        text = prompt + row["response"]
        assert len(offsets) == len(label_ids)
        assert offsets[-1] == (len(text), len(text)), "the EOS sits at the end and covers nothing"
        covered = text[offsets[0][0] : offsets[-1][1]]
        assert teacher.decode(label_ids[:-1]) == covered
        assert covered.endswith(row["response"])
    with pytest.raises(UserError, match="made with another tokenizer"):
        label_offsets(prompts[0], rows[0]["response"], [teacher.eos_token_id, 5], teacher)


def test_the_suite_under_two_tokenizers_aligns_with_many_unmatched_spans(suite_pair):
    config, rows, prompts, teacher, student = suite_pair
    student_tokens = matched = 0
    for prompt, row in zip(prompts, rows, strict=True):
        text = prompt + row["response"]
        sides = []
        for tokenizer in (teacher, student):
            encoded = encode_example(prompt, row["response"], tokenizer, config.data.max_length)
            label_ids = [t for t in encoded.labels if t != IGNORE_INDEX]
            sides.append(label_offsets(prompt, row["response"], label_ids, tokenizer))
        spans = response_spans(*sides)
        origin = min(sides[0][0][0], sides[1][0][0])
        for span in spans[1:]:
            # After the first span (where the two sides' first tokens may start apart), each span's
            # tokens on both sides spell exactly the span's text.
            piece = text[origin + span.text_start : origin + span.text_end]
            for offsets, start, end in (
                (sides[0], span.teacher_start, span.teacher_end),
                (sides[1], span.student_start, span.student_end),
            ):
                assert text[offsets[start][0] : offsets[end - 1][1]] == piece
        assert spans[-1].matched, "both EOS tokens: one matched span"
        student_tokens += len(sides[1])
        matched += sum(span.matched for span in spans)
    share = matched / student_tokens
    assert 0.3 < share < 0.8, f"share of student tokens in matched spans: {share:.2f}"


def test_a_response_cut_short_on_one_side_aligns_over_the_text_both_cover():
    teacher = [(0, 3), (3, 7), (7, 12), (12, 12)]  # the whole response and its EOS
    student = [(0, 2), (2, 3), (3, 7), (7, 9)]  # cut inside the last word, no EOS
    spans = response_spans(teacher, student)
    assert [(s.teacher_start, s.teacher_end, s.student_start, s.student_end) for s in spans] == [
        (0, 1, 0, 2),
        (1, 2, 2, 3),
    ]
    assert response_spans(teacher, []) == []
