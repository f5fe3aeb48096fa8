"""Stage ``prepare_data``: instruction rows -> prompt template -> token ids with masked labels.

Output directory layout::

    raw/{train,validation,test}.jsonl   the rows as read (the embedded suite is generated here)
    tokenizer/                          Hugging Face tokenizer used for every model of the run
    dataset/                            datasets.DatasetDict (input_ids, labels, category, id)
    teacher/                            only for a teacher with its own tokenizer (teacher.tokenizer):
                                        its tokenizer/, dataset/ and manifest.json, the same rows
                                        in its tokens (and dataset/ above holds the aligned spans)
    manifest.json
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from atkd_core.config import FieldMap, PipelineConfig, TokenizerConfig
from atkd_core.data.alignment import label_offsets, response_spans, span_ends
from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.data.encoding import (
    Encoded,
    FittedPrompt,
    encode_example,
    fit_prompt_fields,
    format_prompt,
    template_tail_tokens,
)
from atkd_core.data.preflight import preflight
from atkd_core.data.records import Located, read_hub_split, read_located_rows
from atkd_core.data.suite import SPLITS, write_suite
from atkd_core.data.tokenizer import load_tokenizer, pad_vocabulary, padding_note, train_tokenizer
from atkd_core.errors import ConfigError, DataError
from atkd_core.manifest import fingerprint, run_stage, sha256_file, write_manifest
from atkd_core.outputs import PreparedManifest


def _holdout(rows: list[Located], fraction: float, seed: int) -> tuple[list[Located], list[Located]]:
    """Deterministically move ``fraction`` of ``rows`` (at least one) out: (kept, held out)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(rows) * fraction))
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _load_split_rows(config: PipelineConfig, raw_dir: Path) -> tuple[dict[str, list[Located]], list[str]]:
    """Rows per split with where each was read, and the bad rows skipped. Missing validation/test
    splits are held out of train."""
    data = config.data
    skipped: list[str] = []
    if data.source == "embedded":
        paths = write_suite(data.embedded, raw_dir)
        return {split: read_located_rows(path, FieldMap())[0] for split, path in paths.items()}, skipped
    rows: dict[str, list[Located]] = {}
    if data.source == "files":
        split_files = {
            "train": data.train_files,
            "validation": data.validation_files,
            "test": data.test_files,
        }
        for split, files in split_files.items():
            rows[split] = []
            for path in files:
                file_rows, file_skipped = read_located_rows(Path(path), data.field_map(), data.on_bad_rows)
                rows[split].extend(file_rows)
                skipped.extend(file_skipped)
    else:
        if data.hub_name is None:  # validated at load; a config changed in code can still lack it
            raise ConfigError("data.hub_name: must be set when data.source is 'hub'")
        for split in SPLITS:
            try:
                rows[split], split_skipped = read_hub_split(
                    data.hub_name, split, data.field_map(), data.on_bad_rows
                )
                skipped.extend(split_skipped)
            except DataError:
                if split == "train":
                    raise
                rows[split] = []
    for offset, split in enumerate(("validation", "test")):
        if not rows[split]:
            rows["train"], rows[split] = _holdout(
                rows["train"], data.holdout_fraction, data.holdout_seed + offset
            )
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with (raw_dir / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for _, row in split_rows)
    return rows, skipped


def _build_tokenizer(
    config: PipelineConfig, train_rows: list[dict[str, str]], spec: TokenizerConfig
) -> PreTrainedTokenizerBase:
    """The tokenizer ``spec`` describes: trained on the training rows, a path's, or the teacher's."""
    if spec.source == "train":
        texts = (
            format_prompt(config.data, r["instruction"], r["context"]) + r["response"] for r in train_rows
        )
        trained = train_tokenizer(texts, spec.vocab_size)
        return trained if spec.pad_to is None else pad_vocabulary(trained, spec.pad_to)
    path = spec.path if spec.source == "path" else config.teacher.path
    if path is None:
        raise DataError("tokenizer.source 'teacher' needs teacher.path (a preset teacher has no tokenizer)")
    return load_tokenizer(path, trust_remote_code=config.teacher.trust_remote_code)


# Where a teacher with its own tokenizer finds its prepared data (tokenizer/, dataset/, manifest):
# a prepared directory of its own inside the student's, which the teacher's stages read.
TEACHER_SUBDIRECTORY = "teacher"


def teacher_prepared_dir(config: PipelineConfig, prepared_dir: Path) -> Path:
    """The prepared data the teacher's stages read: its own (``TEACHER_SUBDIRECTORY``) when it has
    its own tokenizer, else the pipeline's."""
    return prepared_dir / TEACHER_SUBDIRECTORY if config.cross_tokenizer else prepared_dir


# Raised whenever this module starts writing different prepared data from the same inputs, so an
# output made by older code is redone rather than reused. 2: prompts shortened field by field, and
# a pad token borrowed (<unk> or EOS) instead of added. 3: every text field as the file spells it
# (CSV cells were type-guessed, JSON numbers converted).
PREPARED_FORMAT = 3


def prepare_inputs_fingerprint(config: PipelineConfig) -> str:
    """What the prepared data depends on: the data and tokenizer sections, the input files' bytes,
    and the format of what this code writes."""
    files = [Path(f) for f in config.data.train_files + config.data.validation_files + config.data.test_files]
    return fingerprint(
        {
            "format": PREPARED_FORMAT,
            "config": config.section_hash("data", "tokenizer"),
            "teacher_tokenizer": None
            if config.teacher.tokenizer is None
            else config.teacher.tokenizer.model_dump(mode="json"),
            "models": [config.teacher.path, config.student.path],
            "files": {str(f): sha256_file(f) for f in files if f.is_file()},
        }
    )


def tokenize_splits(
    config: PipelineConfig,
    rows: dict[str, list[Located]],
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    log: Callable[[str], None],
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]] | None]:
    """Tokenise every split's rows into ``output_dir/dataset`` (a DatasetDict); return counts per
    split, and with ``teacher_tokenizer`` the teacher's counts.

    Over-long rows follow ``data.on_overlong`` (under ``error``, the first names where it was read); each split's counts say how many were shortened,
    cut or skipped, and a line is logged whenever one was.

    With ``teacher_tokenizer`` (a teacher with its own tokenizer), every kept row is also encoded
    with it, from the same prompt text, into ``output_dir/teacher/dataset``; a row over-long on
    either side follows the policy on both. The student's dataset then holds, per example, where
    each aligned span of the two label token runs ends (``span_teacher_ends``,
    ``span_student_ends``), and the teacher's counts the share of student label tokens in matched
    spans (``matched_share``).
    """
    data = config.data
    tails = {
        "plain": template_tail_tokens(data.prompt_template, tokenizer),
        "context": template_tail_tokens(data.context_template, tokenizer),
    }
    teacher_tails = (
        None
        if teacher_tokenizer is None
        else {
            "plain": template_tail_tokens(data.prompt_template, teacher_tokenizer),
            "context": template_tail_tokens(data.context_template, teacher_tokenizer),
        }
    )
    splits, counts = {}, {}
    teacher_splits, teacher_counts = {}, {}
    for split in SPLITS:
        columns: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "category": []}
        teacher_columns: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "category": []}
        if teacher_tokenizer is not None:
            columns.update(span_teacher_ends=[], span_student_ends=[])
        matched_tokens = 0
        overlong = {
            "prompt_truncated": 0,
            "context_cut": 0,
            "instruction_cut": 0,
            "response_truncated": 0,
            "skipped": 0,
        }
        for index, (where, row) in enumerate(rows[split]):
            prompt = format_prompt(data, row["instruction"], row["context"])
            encode = partial(
                encode_example,
                response=row["response"],
                tokenizer=tokenizer,
                max_length=data.max_length,
                min_prompt_tokens=data.min_prompt_tokens,
                keep_prompt_tail=tails["context" if row["context"] else "plain"],
            )
            encoded = encode(prompt)
            fitted = FittedPrompt(prompt, False, False)
            # Only an over-long row is shortened field by field, then encoded again.
            if encoded.fit != "whole" and data.on_overlong in ("truncate_prompt", "truncate"):
                fitted = fit_prompt_fields(data, row, tokenizer, data.max_length, data.min_prompt_tokens)
                if fitted.prompt != prompt:
                    prompt = fitted.prompt
                    encoded = encode(prompt)
            if encoded.fit != "whole" and data.on_overlong == "error":
                length = len(tokenizer(prompt + row["response"], add_special_tokens=False)["input_ids"]) + 1
                raise DataError(
                    f"{where}: {length} tokens with its EOS, over data.max_length="
                    f"{data.max_length}; raise data.max_length or set data.on_overlong to "
                    "truncate_prompt, truncate or skip"
                )
            if _dropped(encoded.fit, data.on_overlong):
                overlong["skipped"] += 1
                continue
            if teacher_tokenizer is not None and teacher_tails is not None:
                teacher_encoded = encode_example(
                    prompt,
                    row["response"],
                    teacher_tokenizer,
                    data.max_length,
                    min_prompt_tokens=data.min_prompt_tokens,
                    keep_prompt_tail=teacher_tails["context" if row["context"] else "plain"],
                )
                if teacher_encoded.fit != "whole" and data.on_overlong == "error":
                    raise DataError(
                        f"{where}: over data.max_length={data.max_length} in the teacher's tokens; raise "
                        "data.max_length or set data.on_overlong to truncate_prompt, truncate or skip"
                    )
                if _dropped(teacher_encoded.fit, data.on_overlong):
                    overlong["skipped"] += 1
                    continue
                spans = response_spans(
                    label_offsets(prompt, row["response"], _label_ids(teacher_encoded), teacher_tokenizer),
                    label_offsets(prompt, row["response"], _label_ids(encoded), tokenizer),
                )
                teacher_ends, student_ends = span_ends(spans)
                columns["span_teacher_ends"].append(teacher_ends)
                columns["span_student_ends"].append(student_ends)
                matched_tokens += sum(span.matched for span in spans)
                teacher_columns["id"].append(f"{split}-{index}")
                teacher_columns["input_ids"].append(teacher_encoded.input_ids)
                teacher_columns["labels"].append(teacher_encoded.labels)
                teacher_columns["category"].append(row["category"])
            if encoded.fit != "whole":
                overlong[encoded.fit] += 1
            if fitted.context_cut or fitted.instruction_cut:
                overlong["prompt_truncated"] += encoded.fit == "whole"
                overlong["context_cut"] += fitted.context_cut
                overlong["instruction_cut"] += fitted.instruction_cut
            columns["id"].append(f"{split}-{index}")
            columns["input_ids"].append(encoded.input_ids)
            columns["labels"].append(encoded.labels)
            columns["category"].append(row["category"])
        splits[split] = Dataset.from_dict(columns)
        label_tokens = sum(sum(t != IGNORE_INDEX for t in lab) for lab in columns["labels"])
        counts[split] = {
            "rows": len(columns["id"]),
            "tokens": sum(map(len, columns["input_ids"])),
            "label_tokens": label_tokens,
            "overlong": overlong,
        }
        log(f"prepare_data: {split}: {counts[split]['rows']} rows, {counts[split]['tokens']} tokens")
        if teacher_tokenizer is not None:
            teacher_splits[split] = Dataset.from_dict(teacher_columns)
            teacher_counts[split] = {
                "rows": len(teacher_columns["id"]),
                "tokens": sum(map(len, teacher_columns["input_ids"])),
                "label_tokens": sum(
                    sum(t != IGNORE_INDEX for t in labels) for labels in teacher_columns["labels"]
                ),
                "overlong": overlong,
                "matched_share": matched_tokens / label_tokens if label_tokens else None,
            }
            log(
                f"prepare_data: {split}: teacher {teacher_counts[split]['tokens']} tokens; "
                f"{teacher_counts[split]['label_tokens']} teacher and {label_tokens} student label tokens, "
                f"{matched_tokens / max(label_tokens, 1):.1%} of the student's in spans of one token each side"
            )
        if any(overlong.values()):
            log(
                f"prepare_data: {split}: over data.max_length={data.max_length} "
                f"(data.on_overlong={data.on_overlong}): {overlong['prompt_truncated']} prompts shortened "
                f"({overlong['context_cut']} contexts cut, {overlong['instruction_cut']} instructions' "
                "middles dropped), "
                f"{overlong['response_truncated']} responses cut (their EOS not trained), "
                f"{overlong['skipped']} rows skipped"
            )
    DatasetDict(splits).save_to_disk(str(output_dir / "dataset"))
    if teacher_tokenizer is None:
        return counts, None
    DatasetDict(teacher_splits).save_to_disk(str(output_dir / TEACHER_SUBDIRECTORY / "dataset"))
    return counts, teacher_counts


def _dropped(fit: str, on_overlong: str) -> bool:
    """Whether ``data.on_overlong`` drops an example that encoded as ``fit``: any over-long one
    under skip, one whose response was cut under truncate_prompt."""
    return (fit != "whole" and on_overlong == "skip") or (
        fit == "response_truncated" and on_overlong == "truncate_prompt"
    )


def _label_ids(encoded: Encoded) -> list[int]:
    """The label tokens of an encoded example (its response and EOS)."""
    return [token for token in encoded.labels if token != IGNORE_INDEX]


def prepare_data(
    config: PipelineConfig, output_dir: Path, *, force: bool = False, log: Callable[[str], None] = print
) -> tuple[PreparedManifest, bool]:
    """Run the prepare_data stage into ``output_dir``; return (manifest, reused)."""

    def build(staging: Path) -> dict[str, Any]:
        rows, skipped = _load_split_rows(config, staging / "raw")
        for problem in skipped:
            log(f"prepare_data: skipped {problem}")
        train_rows = [row for _, row in rows["train"]]
        tokenizer = _build_tokenizer(config, train_rows, config.tokenizer)
        if (note := padding_note(tokenizer)) is not None:
            log(f"prepare_data: tokenizer: {note}")
        teacher_tokenizer = (
            None
            if config.teacher.tokenizer is None
            else _build_tokenizer(config, train_rows, config.teacher.tokenizer)
        )
        # Each model against the tokenizer it reads: the teacher's own, when it has one.
        checks = (
            [(tokenizer, {"teacher": config.teacher, "student": config.student})]
            if teacher_tokenizer is None
            else [(tokenizer, {"student": config.student}), (teacher_tokenizer, {"teacher": config.teacher})]
        )
        for checked_tokenizer, models in checks:
            for line in preflight(checked_tokenizer, models):
                log(f"prepare_data: tokenizer preflight: {line}")
        tokenizer.save_pretrained(staging / "tokenizer")
        if teacher_tokenizer is not None:
            teacher_tokenizer.save_pretrained(staging / TEACHER_SUBDIRECTORY / "tokenizer")
        counts, teacher_counts = tokenize_splits(config, rows, tokenizer, staging, log, teacher_tokenizer)
        if teacher_tokenizer is not None and teacher_counts is not None:
            # The teacher's own prepared data, which its stages read as they read the student's.
            write_manifest(
                staging / TEACHER_SUBDIRECTORY,
                PreparedManifest,
                stage="prepare_data",
                input_fingerprint=prepare_inputs_fingerprint(config),
                source=config.data.source,
                counts=teacher_counts,
                vocab_size=len(teacher_tokenizer),
                tokenizer_sha256=fingerprint(teacher_tokenizer.get_vocab()),
                prompt_template=config.data.prompt_template,
                context_template=config.data.context_template,
                config=config.model_dump(mode="json", include={"data"}),
            )
        return {
            "source": config.data.source,
            "skipped_rows": len(skipped),
            "skipped_examples": skipped[:100],
            "prompt_template": config.data.prompt_template,
            "context_template": config.data.context_template,
            "counts": counts,
            "vocab_size": len(tokenizer),
            "tokenizer_sha256": fingerprint(tokenizer.get_vocab()),
            "config": config.model_dump(mode="json", include={"data", "tokenizer"}),
        }

    return run_stage(
        output_dir,
        PreparedManifest,
        stage="prepare_data",
        input_fingerprint=prepare_inputs_fingerprint(config),
        build=build,
        force=force,
    )
