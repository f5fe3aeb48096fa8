"""Stage ``prepare_data``: instruction rows -> prompt template -> token ids with masked labels.

Output directory layout::

    raw/{train,validation,test}.jsonl   the rows as read (the embedded suite is generated here)
    tokenizer/                          Hugging Face tokenizer used for every model of the run
    dataset/                            datasets.DatasetDict (input_ids, labels, category, id)
    manifest.json
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from atkd_core.config import DataConfig, FieldMap, PipelineConfig
from atkd_core.data.suite import SPLITS, write_suite
from atkd_core.data.tokenizer import load_tokenizer, train_tokenizer
from atkd_core.manifest import fingerprint, run_stage, sha256_file

IGNORE_INDEX = -100


class DataError(ValueError):
    """A problem with the user's data; the message names the file, line and field."""


def format_prompt(data: DataConfig, instruction: str, context: str | None) -> str:
    """The prompt for one example: the context template when there is context, else the plain one."""
    if context:
        return data.context_template.format(instruction=instruction, context=context)
    return data.prompt_template.format(instruction=instruction)


def read_rows(path: Path, fields: FieldMap) -> list[dict[str, str]]:
    """Read Dolly/Alpaca-style rows from JSONL (or a JSON list) into instruction/context/response/category."""
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json file must hold a list of objects")
        numbered = list(enumerate(records, start=1))
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: malformed JSON ({exc.msg})") from None
    return [_map_fields(record, fields, f"{path}:{number}") for number, record in numbered]


def _map_fields(record: Any, fields: FieldMap, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for required in (fields.instruction, fields.response):
        if not isinstance(record.get(required), str) or not record[required].strip():
            raise DataError(f"{where}: field {required!r} is missing or empty")
    return {
        "instruction": record[fields.instruction],
        "context": str(record.get(fields.context) or "") if fields.context else "",
        "response": record[fields.response],
        "category": str(record.get(fields.category) or "") if fields.category else "",
    }


def encode_example(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example: labels are IGNORE_INDEX on the prompt, kept on response + EOS.

    When too long, the prompt is truncated first, from its start, so the template's response marker
    right before the answer survives; a response longer than ``max_length - 1`` keeps its beginning.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    prompt_budget = max_length - len(response_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - prompt_budget) :]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels


def _load_split_rows(config: PipelineConfig, raw_dir: Path) -> dict[str, list[dict[str, str]]]:
    data = config.data
    if data.source == "embedded":
        paths = write_suite(data.embedded, raw_dir)
        dolly = FieldMap()
        return {split: read_rows(path, dolly) for split, path in paths.items()}
    if data.source == "files":
        split_files = {
            "train": data.train_files,
            "validation": data.validation_files,
            "test": data.test_files,
        }
        rows = {
            split: [row for f in files for row in read_rows(Path(f), data.field_map())]
            for split, files in split_files.items()
        }
        raw_dir.mkdir(parents=True, exist_ok=True)
        for split, split_rows in rows.items():
            with (raw_dir / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
        return rows
    raise DataError(f"data.source {data.source!r} is not supported by this version of prepare_data yet")


def _build_tokenizer(config: PipelineConfig, train_rows: list[dict[str, str]]) -> PreTrainedTokenizerBase:
    spec = config.tokenizer
    if spec.source == "train":
        texts = (
            format_prompt(config.data, r["instruction"], r["context"]) + r["response"] for r in train_rows
        )
        return train_tokenizer(texts, spec.vocab_size)
    path = spec.path if spec.source == "path" else config.teacher.path
    if path is None:
        raise DataError("tokenizer.source 'teacher' needs teacher.path (a preset teacher has no tokenizer)")
    return load_tokenizer(path, trust_remote_code=config.teacher.trust_remote_code)


def prepare_inputs_fingerprint(config: PipelineConfig) -> str:
    """What the prepared data depends on: the data and tokenizer sections and the input files' bytes."""
    files = [Path(f) for f in config.data.train_files + config.data.validation_files + config.data.test_files]
    return fingerprint(
        {
            "config": config.section_hash("data", "tokenizer"),
            "teacher_tokenizer": config.teacher.path if config.tokenizer.source == "teacher" else None,
            "files": {str(f): sha256_file(f) for f in files if f.is_file()},
        }
    )


def prepare_data(
    config: PipelineConfig, output_dir: Path, *, force: bool = False, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], bool]:
    """Run the prepare_data stage into ``output_dir``; return (manifest, reused)."""

    def build(staging: Path) -> dict[str, Any]:
        rows = _load_split_rows(config, staging / "raw")
        tokenizer = _build_tokenizer(config, rows["train"])
        tokenizer.save_pretrained(staging / "tokenizer")
        splits, counts = {}, {}
        for split in SPLITS:
            columns: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "category": []}
            for index, row in enumerate(rows[split]):
                prompt = format_prompt(config.data, row["instruction"], row["context"])
                input_ids, labels = encode_example(prompt, row["response"], tokenizer, config.data.max_length)
                columns["id"].append(f"{split}-{index}")
                columns["input_ids"].append(input_ids)
                columns["labels"].append(labels)
                columns["category"].append(row["category"])
            splits[split] = Dataset.from_dict(columns)
            counts[split] = {
                "rows": len(columns["id"]),
                "tokens": sum(map(len, columns["input_ids"])),
                "label_tokens": sum(sum(t != IGNORE_INDEX for t in lab) for lab in columns["labels"]),
            }
            log(f"prepare_data: {split}: {counts[split]['rows']} rows, {counts[split]['tokens']} tokens")
        DatasetDict(splits).save_to_disk(str(staging / "dataset"))
        return {
            "source": config.data.source,
            "counts": counts,
            "vocab_size": len(tokenizer),
            "tokenizer_sha256": fingerprint(tokenizer.get_vocab()),
            "config": config.model_dump(mode="json", include={"data", "tokenizer"}),
        }

    return run_stage(
        output_dir,
        stage="prepare_data",
        input_fingerprint=prepare_inputs_fingerprint(config),
        build=build,
        force=force,
    )
