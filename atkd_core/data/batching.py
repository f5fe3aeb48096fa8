"""Padding prepared examples into batches and aligning targets with next-token logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


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


def shift_targets(labels: Tensor) -> Tensor:
    """Targets aligned with ``logits[:, :-1]``: the label of the next position. [B, T] -> [B, T-1]."""
    return labels[:, 1:]


def next_token_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """``logits[:, :-1]`` restricted to the tokenizer's vocabulary.

    Models often pad their embedding matrix past the tokenizer (e.g. Qwen, Pythia); the padded
    columns are not tokens and must not take probability mass. [B, T, V'] -> [B, T-1, vocab_size].
    """
    return logits[:, :-1, :vocab_size]
