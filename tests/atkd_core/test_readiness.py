"""The readiness table: each check finds what it should, and a problem is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

from atkd_core.config import ScoringConfig
from atkd_core.errors import UserError
from atkd_core.readiness import (
    Readiness,
    cache_bytes_per_token,
    check_cache_location,
    check_config,
    check_devices,
    count_rows,
)
from atkd_core.scoring import TeacherCache
from atkd_core.scoring.encoding import TopKCodec
from atkd_core.scoring.stage import upload_cache
from atkd_core.scoring.writer import score_batch, write_shard
from atkd_core.storage import RemoteDirectory
from tests.atkd_core.test_cache_storage import _write_cache
from tests.conftest import tiny_config

ROWS = [
    {"instruction": f"say {i}", "context": "", "response": f"{i} said", "category": "x"} for i in range(40)
]


def _tokenizer(directory: Path, vocab: int, words: list[str]) -> PreTrainedTokenizerFast:
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.train_from_iterator(
        words,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def _model(
    directory: Path, tokenizer: PreTrainedTokenizerFast, vocab_size: int, positions: int = 2048
) -> Path:
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=positions,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _files_config(tmp_path: Path, **sections):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    data = {"source": "files", "train_files": [str(train)], "field_preset": "dolly", "max_length": 32}
    return tiny_config(tmp_path / "work", **{"data": data, **sections})


def _rows(readiness: Readiness) -> dict[str, tuple[bool, str]]:
    return {check.subject: (check.ok, check.detail) for check in readiness.checks}


@pytest.mark.parametrize(
    ("vocab", "settings"),
    [
        (300, {"top_k": 8, "storage_dtype": "bfloat16"}),
        (300, {"top_k": 64, "storage_dtype": "float32"}),
        (300, {"top_k": 8, "encoding": "compact"}),
        (5000, {"top_k": 64, "encoding": "compact", "logprob_bits": 5}),
        (5000, {"top_k": 64, "encoding": "compact", "logprob_bits": 16}),
    ],
)
def test_the_cache_estimate_is_what_the_writer_writes(tmp_path, vocab, settings):
    scoring = ScoringConfig(**settings)
    logits = torch.randn(4, 50, vocab)
    labels = torch.randint(0, vocab, (4, 50))
    record = score_batch(logits, labels, vocab_size=vocab, top_k=scoring.top_k, temperature=1.0)
    tokens = record["targets"].numel()
    codec = TopKCodec(scoring.encoding, scoring.top_k, vocab, scoring.storage_dtype, scoring.logprob_bits)
    write_shard(tmp_path, 0, ["a"], [record], [tokens], codec)
    size = (tmp_path / "shard-00000.safetensors").stat().st_size
    estimate = tokens * cache_bytes_per_token(scoring, vocab)
    # The shard adds only its header (a line per tensor), the offsets and the encoding's name.
    assert estimate <= size <= estimate + 1536, (settings, size, estimate)


def test_rows_are_counted_without_parsing_records(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n')
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('a,b\n1,"two\nlines"\n3,4\n')
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": list(range(7))}), parquet)
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps([{"a": 1}] * 5))
    assert [count_rows(p) for p in (jsonl, csv_file, parquet, listed)] == [2, 2, 7, 5]
    with pytest.raises(UserError, match=r"missing.jsonl: file does not exist"):
        count_rows(tmp_path / "missing.jsonl")


def test_local_models_their_tokenizer_data_and_disk_make_a_clean_table(tmp_path):
    words = [f"{row['instruction']} {row['response']}" for row in ROWS]
    tokenizer = _tokenizer(tmp_path / "tok", 280, words)
    teacher = _model(tmp_path / "teacher", tokenizer, 320)
    config = _files_config(
        tmp_path,
        tokenizer={"source": "teacher"},
        teacher={"path": str(teacher)},
        student={"path": str(teacher)},
    )
    rows = _rows(check_config(config, needs=[]))
    assert all(ok for ok, _ in rows.values()), rows
    assert rows["teacher model"][1].startswith(f"local directory {teacher}; ~")
    assert (
        rows["tokenizer"][1]
        == f"{teacher}: {len(tokenizer)} tokens; fits teacher 320 (pads to 320), student 320 (pads to 320)"
    )
    assert rows["data train"][1] == "1 file, 40 rows"
    assert (
        "teacher cache at most " in rows["disk"][1] and "distill checkpoints and model ~" in rows["disk"][1]
    )


def test_each_problem_is_one_line_naming_what_to_change(tmp_path, monkeypatch):
    words = [f"{row['instruction']} {row['response']}" for row in ROWS]
    tokenizer = _tokenizer(tmp_path / "tok", 280, words)
    other = _tokenizer(tmp_path / "other", 280, [w.upper() for w in words])
    teacher = _model(tmp_path / "teacher", tokenizer, 200)  # fewer rows than the tokenizer's tokens
    student = _model(tmp_path / "student", other, 320)  # another vocabulary
    config = _files_config(
        tmp_path,
        tokenizer={"source": "teacher"},
        teacher={"path": str(teacher)},
        student={"path": str(student)},
        data={"source": "files", "train_files": [str(tmp_path / "nowhere.jsonl")], "field_preset": "dolly"},
    )
    problems = check_config(config, needs=[]).problems
    assert problems[0].startswith(
        f"tokenizer: teacher model has 200 output rows but the tokenizer ({teacher})"
    )
    assert problems[1] == f"data train: {tmp_path / 'nowhere.jsonl'}: file does not exist"
    assert len(problems) == 2 and all("\n" not in line for line in problems)

    fixed = _model(tmp_path / "teacher", tokenizer, 320)
    config = _files_config(
        tmp_path,
        tokenizer={"source": "teacher"},
        teacher={"path": str(fixed)},
        student={"path": str(student)},
    )
    assert (
        check_config(config, needs=[])
        .problems[0]
        .startswith("tokenizer: student: its tokenizer differs from the pipeline's")
    )


def test_too_few_gpus_and_too_little_disk_are_problems(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = tiny_config(
        tmp_path, distill={"training": {"device": "cuda", "num_processes": 4, "batch_size": 32}}
    )
    readiness = Readiness()
    check_devices(config, readiness)
    assert readiness.problems == [
        "devices distill: distill.training.num_processes is 4 but this machine has 2 CUDA devices; lower "
        "num_processes, or run on a machine with more GPUs"
    ]

    monkeypatch.setattr(
        "atkd_core.readiness.shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})()
    )
    disk = [
        line for line in check_config(tiny_config(tmp_path), needs=[]).problems if line.startswith("disk")
    ]
    assert len(disk) == 1 and "1.0 KB free at" in disk[0] and "point workdir at a larger disk" in disk[0]
    # A tokenizer still to be trained: the cache's ids index the size it is given.
    config = tiny_config(tmp_path)
    assert config.tokenizer.source == "train"
    per_token = cache_bytes_per_token(config.scoring, config.tokenizer.vocab_size)
    assert f"tokens x {per_token} B)" in disk[0]


def test_a_context_shorter_than_max_length_and_a_top_k_over_the_vocabulary_are_caught_early(tmp_path):
    words = [f"{row['instruction']} {row['response']}" for row in ROWS]
    tokenizer = _tokenizer(tmp_path / "tok", 280, words)
    short = _model(tmp_path / "short", tokenizer, 320, positions=16)
    config = _files_config(
        tmp_path,
        tokenizer={"source": "teacher"},
        teacher={"path": str(short)},
        student={"path": str(short)},
        scoring={"top_k": 400},
    )
    problems = check_config(config, needs=[]).problems
    assert problems == [
        f"teacher model: data.max_length: 32 is over the teacher's 16 positions (max_position_embeddings in "
        f"{short}'s config); set it to at most 16",
        f"student model: data.max_length: 32 is over the student's 16 positions (max_position_embeddings in "
        f"{short}'s config); set it to at most 16",
        f"tokenizer: scoring.top_k: 400 is over the tokenizer's vocabulary of {len(tokenizer)} tokens; set it to "
        f"at most {len(tokenizer)}",
    ]


def test_a_missing_teacher_is_one_problem_with_the_stages_own_words(tmp_path):
    config = _files_config(
        tmp_path, tokenizer={"source": "teacher"}, teacher={"path": str(tmp_path / "nowhere")}
    )
    assert check_config(config, needs=[]).problems == [
        f"teacher model: teacher.path: {str(tmp_path / 'nowhere')!r} does not exist (a directory saved with "
        "save_pretrained, or a hub id such as EleutherAI/pythia-160m, is expected)"
    ]


def test_the_cache_location_row_says_what_the_url_holds_or_why_it_cannot_be_reached(tmp_path, monkeypatch):
    def row(location: str) -> tuple[bool, str]:
        readiness = Readiness()
        check_cache_location(tiny_config(tmp_path / "work", scoring={"location": location}), readiness)
        return _rows(readiness)["cache location"]

    url = f"file://{tmp_path}/bucket/cache"
    assert row(url) == (True, f"{url}: reachable, empty; score_teacher uploads the cache there")
    _write_cache(tmp_path / "local", "compact")
    cache = TeacherCache(tmp_path / "local")
    upload_cache(tmp_path / "local", cache.manifest, url, log=lambda _: None)
    ok, detail = row(url)
    assert ok and detail.startswith(f"{url}: reachable, holds a cache of {cache.manifest.tokens:,} tokens")

    def refused(self) -> dict[str, int]:
        raise PermissionError("Access Denied\nmore")

    monkeypatch.setattr(RemoteDirectory, "sizes", refused)
    assert row(url) == (
        False,
        f"{url}: cannot be listed (PermissionError: Access Denied); check the store's credentials and "
        "endpoint (for S3: the AWS environment variables)",
    )
    assert row("gs://bucket/cache") == (
        False,
        "gs://bucket/cache: reading gs:// needs gcsfs (pip install gcsfs)",
    )


def test_a_teacher_with_its_own_tokenizer_is_not_held_to_the_students(tmp_path):
    words = [f"{row['instruction']} {row['response']}" for row in ROWS]
    teacher = _model(tmp_path / "teacher", _tokenizer(tmp_path / "tok", 280, words), 320)
    student = _model(
        tmp_path / "student", _tokenizer(tmp_path / "other", 280, [w.upper() for w in words]), 320
    )
    config = _files_config(
        tmp_path,
        tokenizer={"source": "path", "path": str(student)},
        teacher={"path": str(teacher), "tokenizer": {"source": "teacher"}},
        student={"path": str(student)},
    )
    readiness = check_config(config, needs=[])
    assert readiness.problems == []
    ok, line = _rows(readiness)["tokenizer"]
    assert ok and "the teacher reads its own (teacher.tokenizer)" in line and "student 320" in line
