"""The pipeline with a teacher that has its own tokenizer: prepared twice, taught in its own tokens,
distilled over aligned spans, offline and online."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from atkd_core.data.batching import shift_targets
from atkd_core.data.prepare import prepare_data
from atkd_core.errors import UserError
from atkd_core.manifest import read_manifest
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.pipeline import LocalStages, pipeline_outputs
from atkd_core.training.batches import examples_of, to_batch
from atkd_core.training.main import run_training
from atkd_core.training.teacher import CrossTokenizerTeacher
from tests.conftest import tiny_config

TEACHER_TOKENIZER = {"source": "train", "vocab_size": 1024}


def cross_config(workdir: Path, **sections):
    """A tiny run whose teacher reads a 1024-token BPE and student a 300-token one; ``sections``
    replace the defaults' sections whole."""
    defaults = {
        "tokenizer": {"vocab_size": 300},
        "teacher": {"preset": "neox-tiny", "tokenizer": TEACHER_TOKENIZER},
        "scoring": {"top_k": 8},
        "finetune": {"training": {"max_steps": 2, "batch_size": 8}},
        "distill": {"training": {"max_steps": 3, "batch_size": 8}},
        "eval": {"limit": 2, "max_new_tokens": 4},
    }
    return tiny_config(workdir, **{**defaults, **sections})


def test_prepared_data_holds_both_tokenizations_and_their_spans(tmp_path):
    config = cross_config(tmp_path)
    manifest, _ = prepare_data(config, config.layout.prepared, log=lambda line: None)
    teacher_dir = config.layout.prepared / "teacher"
    teacher = read_manifest(teacher_dir, PreparedManifest)
    assert teacher is not None and teacher.vocab_size > manifest.vocab_size
    assert teacher.tokenizer_sha256 != manifest.tokenizer_sha256
    student_train = load_from_disk(str(config.layout.prepared / "dataset"))["train"]
    teacher_train = load_from_disk(str(teacher_dir / "dataset"))["train"]
    assert student_train["id"] == teacher_train["id"]
    for student_labels, teacher_labels, teacher_ends, student_ends in zip(
        student_train["labels"],
        teacher_train["labels"],
        student_train["span_teacher_ends"],
        student_train["span_student_ends"],
        strict=True,
    ):
        assert student_ends[-1] == sum(t != -100 for t in student_labels)
        assert teacher_ends[-1] == sum(t != -100 for t in teacher_labels)
    share = teacher.counts["train"].matched_share
    assert share is not None and 0 < share < 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "teacher_source"),
    [
        ({"objective": "atkd", "hard_fraction": 0.5}, "offline"),
        ({"objective": "kd", "span_loss": "uld"}, "online"),
    ],
)
def test_the_pipeline_distils_across_tokenizers(tmp_path, loss, teacher_source):
    config = cross_config(
        tmp_path,
        loss=loss,
        distill={"teacher_source": teacher_source, "training": {"max_steps": 3, "batch_size": 8}},
    )
    lines: list[str] = []
    stages = LocalStages(
        config, train=lambda job: run_training(job, lambda m, s: None, lines.append), log=lines.append
    )
    outputs = pipeline_outputs(config, stages)
    cache = read_manifest(outputs["score_teacher"], CacheManifest)
    teacher_prepared = read_manifest(Path(outputs["prepare_data"]) / "teacher", PreparedManifest)
    assert cache is not None and teacher_prepared is not None
    # Scored in the teacher's own tokens: its label tokens, not the student's.
    assert cache.tokens == teacher_prepared.counts["train"].label_tokens
    assert any(
        "teacher with its own tokenizer" in line and "compared over aligned spans" in line for line in lines
    )
    metrics = [
        json.loads(line)
        for line in (Path(outputs["distill_student"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == 3 and all(record["num_spans"] > 0 for record in metrics)
    evaluation = Path(outputs["evaluate"])
    assert (evaluation / "teacher.json").is_file() and (evaluation / "student.json").is_file()
    # The agreement analysis reads both models on one tokenization, which this pair does not share.
    assert not (evaluation / "difficulty.json").exists()
    assert any("no easy/hard agreement" in line for line in lines)


def test_what_spans_cannot_do_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="distill.data_source: 'teacher_generated' across tokenizers"):
        cross_config(tmp_path, distill={"data_source": "teacher_generated"})
    with pytest.raises(ValueError, match="loss.split_scope: 'sequence' across tokenizers"):
        cross_config(tmp_path, loss={"split_scope": "sequence"})
    for rule in ("auto", "epsilon"):
        with pytest.raises(ValueError, match=f"loss.hard_fraction: {rule} reads the teacher's token UNC"):
            cross_config(tmp_path, loss={"hard_fraction": rule})
    for objective in ("taid", "adakd"):
        with pytest.raises(
            ValueError, match=f"loss.objective: {objective} across tokenizers is not supported"
        ):
            cross_config(tmp_path, loss={"objective": objective})
    with pytest.raises(ValueError, match="student.tokenizer: the student reads the pipeline's tokenizer"):
        tiny_config(tmp_path, student={"preset": "neox-tiny", "tokenizer": {"vocab_size": 500}})
    with pytest.raises(
        ValueError,
        match=r"scoring.top_k: 2000 is over the trained tokenizer's vocabulary \(teacher.tokenizer",
    ):
        cross_config(tmp_path, scoring={"top_k": 2000})


def test_a_batch_is_joined_to_its_teacher_rows_span_by_span(tmp_path):
    """Each span's first student row predicts the student's first token of the span, and its first
    teacher row the teacher's, through padding and a prompt of another length on each side."""
    config = cross_config(tmp_path)
    prepare_data(config, config.layout.prepared, log=lambda line: None)
    student = examples_of(load_from_disk(str(config.layout.prepared / "dataset"))["train"])[:5]
    teacher = examples_of(load_from_disk(str(config.layout.prepared / "teacher" / "dataset"))["train"])
    columns = load_from_disk(str(config.layout.prepared / "dataset"))["train"]
    ends = {
        row["id"]: (row["span_teacher_ends"], row["span_student_ends"])
        for row in columns.select_columns(["id", "span_teacher_ends", "span_student_ends"])
    }
    by_id = {example["id"]: example for example in teacher}

    def rows(ids):
        labels = [[t for t in by_id[i]["labels"] if t != -100] for i in ids]
        targets = torch.tensor([t for example in labels for t in example])
        return torch.randn(len(targets), 1024), targets, [len(example) for example in labels]

    source = CrossTokenizerTeacher(rows, ends, torch.arange(1024))
    batch = to_batch(student, [e["id"] for e in student], 0, torch.device("cpu"))
    targets = shift_targets(batch["labels"])
    cross = source(batch, targets)
    flat = targets.reshape(-1)
    for span in range(cross.spans.num_spans):
        student_rows = (cross.spans.student_span == span).nonzero().squeeze(-1)
        teacher_rows = (cross.spans.teacher_span == span).nonzero().squeeze(-1)
        assert int(student_rows[0]) == int(cross.spans.student_first[span])
        assert bool((flat[student_rows] != -100).all())
        assert int(teacher_rows[0]) == int(cross.spans.teacher_first[span])
    # Each example's spans cover all its label rows on both sides.
    assert int((cross.spans.student_span >= 0).sum()) == int((flat != -100).sum())
    assert int((cross.spans.teacher_span >= 0).sum()) == cross.targets.numel()

    wrong = {**ends, student[0]["id"]: (ends[student[0]["id"]][0], [999])}
    with pytest.raises(UserError, match="its aligned spans reach past its label tokens"):
        CrossTokenizerTeacher(rows, wrong, torch.arange(1024))(batch, targets)


def test_a_row_over_long_in_the_teachers_tokens_alone_is_dropped_on_both_sides(tmp_path):
    """A teacher with the smaller vocabulary spends more tokens on the same text: under skip, a row
    that fits the student but not the teacher leaves both datasets."""
    data = {
        "embedded": {"train_size": 64, "validation_size": 16, "test_size": 16},
        "max_length": 40,
        "on_overlong": "skip",
    }
    alone = tiny_config(tmp_path / "alone", data=data, tokenizer={"vocab_size": 1024})
    crossed = cross_config(
        tmp_path / "crossed",
        data=data,
        tokenizer={"vocab_size": 1024},
        teacher={"preset": "neox-tiny", "tokenizer": {"source": "train", "vocab_size": 300}},
    )
    student_only, _ = prepare_data(alone, alone.layout.prepared, log=lambda line: None)
    both, _ = prepare_data(crossed, crossed.layout.prepared, log=lambda line: None)
    teacher = read_manifest(crossed.layout.prepared / "teacher", PreparedManifest)
    assert teacher is not None
    kept = both.counts["train"].rows
    assert kept == teacher.counts["train"].rows < student_only.counts["train"].rows
    assert both.counts["train"].overlong["skipped"] > student_only.counts["train"].overlong["skipped"]
