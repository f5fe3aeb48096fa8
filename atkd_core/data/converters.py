"""Published instruction datasets -> the product's instruction files (JSONL in Dolly fields).

``split_dolly`` turns the ``databricks-dolly-15k`` JSONL a user downloads into the train /
validation / test files ``configs/pythia-dolly.yaml`` names, with the split the paper uses
(MiniLLM's, which ATKD follows: 500 validation and 500 test examples held out at random, the rest
for training). ``convert_eval_set`` turns the paper's other evaluation sets, in the formats their
authors publish, into files for ``eval.instruction_files``:

- ``self-instruct``: ``user_oriented_instructions.jsonl``, one object per instruction with
  ``instances`` [{``input``, ``output``}]; one row per instance.
- ``vicuna``: ``question.jsonl`` ({``question_id``, ``text``, ``category``}).
- ``koala``: ``koala_test_set.jsonl`` ({``id``, ``prompt``}).
- ``wizardlm``: ``WizardLM_testset.jsonl`` ({``idx``, ``Skill``, ``Difficulty``, ``Instruction``}).

Vicuna, Koala and WizardLM publish questions without reference answers, and ROUGE-L needs one:
``answers`` is a JSONL of references keyed by the set's id field (``question_id``, ``id`` or
``idx``) with the text in ``text``, ``response``, ``output`` or ``answer`` (e.g. the reference
model answers the paper's evaluation used).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from atkd_core.config import FIELD_PRESETS
from atkd_core.data.records import file_records, json_object, read_rows, text_field
from atkd_core.errors import DataError

PAPER_HELD_OUT = 500
EvalSet = Literal["self-instruct", "vicuna", "koala", "wizardlm"]
EVAL_SETS: tuple[EvalSet, ...] = ("self-instruct", "vicuna", "koala", "wizardlm")
# Per set: the id field, the instruction field and the category field of the published format.
_FORMATS: dict[str, tuple[str, str, str | None]] = {
    "vicuna": ("question_id", "text", "category"),
    "koala": ("id", "prompt", None),
    "wizardlm": ("idx", "Instruction", "Skill"),
}
_ANSWER_FIELDS = ("text", "response", "output", "answer")


def _write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    with staging.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    staging.replace(path)


def split_dolly(
    source: Path,
    out_dir: Path,
    *,
    seed: int = 42,
    validation: int = PAPER_HELD_OUT,
    test: int = PAPER_HELD_OUT,
) -> dict[str, int]:
    """Write ``out_dir``/{train,validation,test}.jsonl from the Dolly JSONL ``source``: a seeded
    shuffle, ``test`` then ``validation`` rows held out, the rest train. Returns rows per split."""
    rows, _ = read_rows(source, FIELD_PRESETS["dolly"])
    if len(rows) <= validation + test:
        raise DataError(
            f"{source}: {len(rows)} rows cannot hold out {validation} validation and {test} test rows "
            "and leave any to train on; is it the whole databricks-dolly-15k file?"
        )
    random.Random(seed).shuffle(rows)
    splits = {
        "test": rows[:test],
        "validation": rows[test : test + validation],
        "train": rows[test + validation :],
    }
    for name, split_rows in splits.items():
        _write_jsonl(split_rows, out_dir / f"{name}.jsonl")
    return {name: len(split_rows) for name, split_rows in splits.items()}


def _objects(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for every record of a JSONL / JSON file."""
    return [(where, json_object(record, where)) for where, record in file_records(path)]


def _answers(path: Path, id_field: str) -> dict[str, str]:
    """Reference answers by id (see the module docstring for the accepted fields)."""
    answers = {}
    for where, record in _objects(path):
        if id_field not in record:
            raise DataError(f"{where}: field {id_field!r} is missing (the id the answers are matched on)")
        text = next((record[f] for f in _ANSWER_FIELDS if isinstance(record.get(f), str)), None)
        if text is None:
            raise DataError(f"{where}: no answer text (one of the fields {', '.join(_ANSWER_FIELDS)})")
        answers[str(record[id_field])] = text
    return answers


def convert_eval_set(kind: EvalSet, source: Path, out: Path, answers: Path | None = None) -> int:
    """Write the evaluation set ``source`` (published format ``kind``) to ``out`` as Dolly-field
    JSONL; return the number of rows. Raises DataError naming the file, line and field."""
    rows: list[dict[str, str]] = []
    if kind == "self-instruct":
        for where, record in _objects(source):
            instruction = text_field(record, "instruction", where, required=True)
            instances = record.get("instances")
            if not isinstance(instances, list) or not instances:
                raise DataError(f"{where}: field 'instances' is missing or empty")
            for number, instance in enumerate(instances, start=1):
                at = f"{where}: instance {number}"
                if not isinstance(instance, dict):
                    raise DataError(f"{at}: expected an object with 'input' and 'output'")
                rows.append(
                    {
                        "instruction": instruction,
                        "context": text_field(instance, "input", at, required=False),
                        "response": text_field(instance, "output", at, required=True),
                        "category": text_field(record, "motivation_app", where, required=False),
                    }
                )
    elif kind in _FORMATS:
        id_field, instruction_field, category_field = _FORMATS[kind]
        references = _answers(answers, id_field) if answers is not None else {}
        for where, record in _objects(source):
            key = str(record.get(id_field))
            if key not in references:
                hint = (
                    "pass answers: a JSONL of reference answers" if answers is None else f"{answers} has none"
                )
                raise DataError(
                    f"{where}: {kind} {id_field} {key} has no reference answer, which ROUGE-L needs; "
                    f"{hint} (fields {id_field!r} and one of {', '.join(_ANSWER_FIELDS)})"
                )
            rows.append(
                {
                    "instruction": text_field(record, instruction_field, where, required=True),
                    "context": "",
                    "response": references[key],
                    "category": text_field(record, category_field, where, required=False)
                    if category_field
                    else "",
                }
            )
    else:
        raise DataError(f"evaluation set {kind!r} is unknown; allowed: {', '.join(EVAL_SETS)}")
    _write_jsonl(rows, out)
    return len(rows)
