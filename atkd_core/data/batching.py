"""Examples into batches (right-padded, or packed without padding) and targets aligned with
next-token logits.

Packing puts several examples in one row, each with its own positions (0, 1, ...) and no 2-D
attention mask: the model then attends within each example only (transformers builds the
block-diagonal causal mask, or flash-attention's variable-length kernels, from the restarting
positions). The first label of every example is ignored, so the last token of one example never
learns to predict the first of the next; unpadded, that label is never a target anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Placement:
    """Where an example's tokens sit in a batch: row ``row``, columns ``[start, end)``."""

    row: int
    start: int
    end: int


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad ``input_ids`` / ``labels`` of prepared examples.

    Returns input_ids [B, T] (pad_token_id), attention_mask [B, T] (1 on real tokens),
    labels [B, T] (IGNORE_INDEX on prompt and padding).
    """
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padded_placements(examples: Sequence[Mapping[str, Any]]) -> list[Placement]:
    """Where ``collate`` puts each example: row i, from column 0."""
    return [Placement(row, 0, len(example["input_ids"])) for row, example in enumerate(examples)]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row: first-fit of the longest first into rows of ``capacity`` tokens
    (an example longer than ``capacity`` gets a row of its own). Deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def row_capacity(lengths: Sequence[int], limit: int, candidates: int = 8) -> int:
    """The row length, between the longest example and ``limit``, whose packing (``pack_rows``)
    holds the fewest tokens in all (rows x fullest row); the shortest such on ties, since
    attention's cost grows with the row. At the longest example it is never more than padding.

    ``candidates`` evenly spaced lengths are tried: packing is cheap next to a forward pass.
    """
    longest = max(lengths)
    if limit <= longest:
        return longest
    best, best_tokens = longest, None
    for step in range(candidates):
        capacity = longest + (limit - longest) * step // (candidates - 1)
        rows = pack_rows(lengths, capacity)
        tokens = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_tokens is None or tokens < best_tokens:
            best, best_tokens = capacity, tokens
    return best


def pack(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, capacity: int
) -> tuple[dict[str, Tensor], list[Placement]]:
    """Pack ``examples`` into rows of at most ``capacity`` tokens (``pack_rows``), without padding
    between them.

    Returns input_ids [R, W], position_ids [R, W] (restarting at 0 for every example; the unused
    end of a row counts on as one more sequence, which nothing attends to), labels [R, W]
    (IGNORE_INDEX on prompts, on each example's first token and on the unused end), and each
    example's placement, in the order of ``examples``. W is the fullest row's length.
    """
    lengths = [len(example["input_ids"]) for example in examples]
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    placements: dict[int, Placement] = {}
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + lengths[index]
            input_ids[row, start:end] = torch.as_tensor(examples[index]["input_ids"])
            labels[row, start + 1 : end] = torch.as_tensor(examples[index]["labels"][1:])
            position_ids[row, start:end] = torch.arange(lengths[index])
            placements[index] = Placement(row, start, end)
            start = end
        position_ids[row, start:] = torch.arange(width - start)
    tensors = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return tensors, [placements[index] for index in range(len(examples))]


def shift_targets(labels: Tensor) -> Tensor:
    """Targets aligned with ``logits[:, :-1]``: the label of the next position. [B, T] -> [B, T-1]."""
    return labels[:, 1:]


def target_columns(placement: Placement) -> slice:
    """The columns of the shifted targets that belong to the example at ``placement``: its labels
    after the first, one column to the left."""
    return slice(placement.start, placement.end - 1)


def next_token_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """``logits[:, :-1]`` restricted to the tokenizer's vocabulary.

    Models often pad their embedding matrix past the tokenizer (e.g. Qwen, Pythia); the padded
    columns are not tokens and must not take probability mass. [B, T, V'] -> [B, T-1, vocab_size].
    """
    return logits[:, :-1, :vocab_size]
