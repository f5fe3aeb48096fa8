"""One instruction row as model input: the prompt template filled, encoded with masked labels, and
an over-long row shortened field by field (the context's middle first, then the instruction's)."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Literal, NamedTuple

from transformers import PreTrainedTokenizerBase

from atkd_core.config import DataConfig
from atkd_core.data.batching import IGNORE_INDEX


def format_prompt(data: DataConfig, instruction: str, context: str | None) -> str:
    """The prompt for one example: the context template when there is context, else the plain one."""
    if context:
        return data.context_template.format(instruction=instruction, context=context)
    return data.prompt_template.format(instruction=instruction)


class Encoded(NamedTuple):
    """One tokenised example and how it was made to fit ``max_length``."""

    input_ids: list[int]
    labels: list[int]
    fit: Literal["whole", "prompt_truncated", "response_truncated"]


def encode_example(
    prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    min_prompt_tokens: int = 1,
    keep_prompt_tail: int = 0,
) -> Encoded:
    """Token ids and labels for one example: IGNORE_INDEX on the prompt, kept on the response + EOS.

    The prompt's trailing whitespace (the newline after "### Response:") is trained as the start of
    the response, and the split is made as lm-evaluation-harness makes it (context tokens, then the
    rest of the whole text's tokens), so the harness scores exactly the tokens trained here.

    Too long, the prompt loses its middle: its first tokens (the instruction) and its last
    ``keep_prompt_tail`` (the template's response marker) stay, never fewer than
    ``min_prompt_tokens`` in all. Only a response whose tokens and EOS do not fit beside that many
    prompt tokens is cut, keeping its beginning and losing its EOS (``fit`` says which happened; the
    caller's policy decides whether such a row is kept).
    """
    context = prompt.rstrip()
    prompt_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    response_ids = whole_ids[len(prompt_ids) :] + [tokenizer.eos_token_id]
    fit: Literal["whole", "prompt_truncated", "response_truncated"] = "whole"
    if len(prompt_ids) + len(response_ids) > max_length:
        floor = min(len(prompt_ids), min_prompt_tokens)
        if len(response_ids) <= max_length - floor:
            prompt_ids = _drop_middle(prompt_ids, max_length - len(response_ids), keep_prompt_tail)
            fit = "prompt_truncated"
        else:
            prompt_ids = _drop_middle(prompt_ids, floor, keep_prompt_tail)
            response_ids = response_ids[: max_length - len(prompt_ids)]
            fit = "response_truncated"
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Encoded(prompt_ids + response_ids, labels, fit)


class FittedPrompt(NamedTuple):
    """A row's prompt after field-aware shortening, and which fields lost text."""

    prompt: str
    context_cut: bool
    instruction_cut: bool


def _longest_fitting(length: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [0, length] with ``fits(n)``, assuming fits is monotone; None if not even 0."""
    if not fits(0):
        return None
    low, high = 0, length
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _head_and_tail(text: str, keep: int) -> str:
    """``text`` down to ``keep`` characters: its start and its end, the middle dropped."""
    if keep >= len(text):
        return text
    head = (keep + 1) // 2
    return text[:head] + text[len(text) - (keep - head) :]


def fit_prompt_fields(
    data: DataConfig,
    row: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    min_prompt_tokens: int,
) -> FittedPrompt:
    """The row's prompt, shortened field by field until prompt, response and EOS fit ``max_length``.

    The context (Alpaca's ``input``, Dolly's ``context``) goes first, keeping its start; only when
    none of it is left does the instruction lose its middle (its start and its end, usually the
    question, stay). The template's own text (headers, the response marker) is never cut, nor is
    the response: a response that does not fit beside ``min_prompt_tokens`` prompt tokens gets the
    prompt back unchanged, for encode_example to cut the response as the policy says.
    """
    instruction, context, response = row["instruction"], row["context"], row["response"]
    prompt = format_prompt(data, instruction, context)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_tokens = tokens(prompt.rstrip())
    budget = max_length - (tokens(prompt + response) - prompt_tokens + 1)  # the response and its EOS
    if prompt_tokens <= budget or budget < min(min_prompt_tokens, prompt_tokens):
        return FittedPrompt(prompt, False, False)
    if context:
        kept = _longest_fitting(
            len(context), lambda n: tokens(format_prompt(data, instruction, context[:n]).rstrip()) <= budget
        )
        if kept:
            return FittedPrompt(format_prompt(data, instruction, context[:kept]), True, False)
    kept = _longest_fitting(
        len(instruction),
        lambda n: tokens(format_prompt(data, _head_and_tail(instruction, n), "").rstrip()) <= budget,
    )
    if kept is None:  # the template alone is over budget: encode_example cuts tokens instead
        return FittedPrompt(format_prompt(data, instruction, ""), bool(context), False)
    return FittedPrompt(format_prompt(data, _head_and_tail(instruction, kept), ""), bool(context), True)


def _drop_middle(ids: list[int], budget: int, keep_tail: int) -> list[int]:
    """``ids`` cut to ``budget`` tokens: the last ``keep_tail`` (at most the budget) and the first rest."""
    if len(ids) <= budget:
        return ids
    tail = min(keep_tail, budget)
    return ids[: budget - tail] + ids[len(ids) - tail :]


def template_tail_tokens(template: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of the template's text after its last field (e.g. "### Response:"), which truncation keeps."""
    literal, field, _, _ = list(string.Formatter().parse(template))[-1]
    suffix = literal if field is None else ""
    return len(tokenizer(suffix.rstrip(), add_special_tokens=False)["input_ids"])
