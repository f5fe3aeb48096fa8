"""SeqKD data: the teacher's greedy responses replace the training targets, nothing else changes."""

from __future__ import annotations

import json

import torch
from datasets import load_from_disk

from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.data.generate import generate_teacher_data
from atkd_core.data.prepare import prepare_data
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.models.build import load_model, materialize_model
from tests.conftest import tiny_config


def test_teacher_generated_data(tmp_path):
    config = tiny_config(
        tmp_path, distill={"data_source": "teacher_generated", "generation_max_new_tokens": 6}
    )
    prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    teacher = materialize_model(config.teacher, tmp_path / "prepared" / "tokenizer", tmp_path / "teacher")
    manifest, reused = generate_teacher_data(
        config, tmp_path / "prepared", teacher, tmp_path / "seqkd", log=lambda _: None
    )
    assert not reused and manifest.counts["train"].rows == 64
    original = [
        json.loads(line) for line in (tmp_path / "prepared" / "raw" / "train.jsonl").read_text().splitlines()
    ]
    generated = [
        json.loads(line) for line in (tmp_path / "seqkd" / "raw" / "train.jsonl").read_text().splitlines()
    ]
    assert [r["instruction"] for r in generated] == [r["instruction"] for r in original]
    for split in ("validation", "test"):
        assert (tmp_path / "seqkd" / "raw" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "prepared" / "raw" / f"{split}.jsonl"
        ).read_bytes()

    # Batched, left-padded generation equals generating each prompt alone.
    tokenizer = load_tokenizer(tmp_path / "prepared" / "tokenizer")
    model = load_model(teacher).eval()
    from atkd_core.data.encoding import format_prompt

    for row, made in list(zip(original, generated, strict=True))[:3]:
        ids = tokenizer(
            format_prompt(config.data, row["instruction"], row["context"]).rstrip(),
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert (
            made["response"]
            == tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )

    train = load_from_disk(str(tmp_path / "seqkd" / "dataset"))["train"]
    assert all(
        labels[-1] == tokenizer.eos_token_id and labels[0] == IGNORE_INDEX for labels in train["labels"]
    )
    _, reused = generate_teacher_data(
        config, tmp_path / "prepared", teacher, tmp_path / "seqkd", log=lambda _: None
    )
    assert reused
