"""Published instruction datasets, in their authors' formats, to the product's instruction files."""

from __future__ import annotations

import json

import pytest

from atkd_core.config import FIELD_PRESETS
from atkd_core.data.converters import convert_eval_set, split_dolly
from atkd_core.data.records import read_rows
from atkd_core.errors import DataError
from flows.cli import main


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _dolly(path, n):
    return _jsonl(
        path,
        [
            {
                "instruction": f"Question {i}?",
                "context": "" if i % 3 else f"Passage {i}.",
                "response": f"Answer {i}.",
                "category": "open_qa" if i % 2 else "closed_qa",
            }
            for i in range(n)
        ],
    )


def test_dolly_is_split_like_the_paper_and_the_files_read_as_the_config_names_them(tmp_path):
    source = _dolly(tmp_path / "databricks-dolly-15k.jsonl", 1_200)
    counts = split_dolly(source, tmp_path / "dolly")
    assert counts == {"test": 500, "validation": 500, "train": 200}
    seen = []
    for split in ("train", "validation", "test"):
        rows, skipped = read_rows(tmp_path / "dolly" / f"{split}.jsonl", FIELD_PRESETS["dolly"])
        assert len(rows) == counts[split] and not skipped
        seen += [row["instruction"] for row in rows]
    assert sorted(seen) == sorted(f"Question {i}?" for i in range(1_200))  # disjoint and complete
    again = tmp_path / "again"
    split_dolly(source, again)
    assert (again / "test.jsonl").read_text() == (tmp_path / "dolly" / "test.jsonl").read_text()
    assert (
        "Passage"
        in (tmp_path / "dolly" / "train.jsonl").read_text() + (tmp_path / "dolly" / "test.jsonl").read_text()
    )


def test_dolly_too_small_to_hold_out_the_paper_split_says_so(tmp_path):
    with pytest.raises(DataError, match="cannot hold out 500 validation and 500 test rows"):
        split_dolly(_dolly(tmp_path / "small.jsonl", 900), tmp_path / "out")


def test_self_instruct_gives_one_row_per_instance(tmp_path):
    source = _jsonl(
        tmp_path / "user_oriented_instructions.jsonl",
        [
            {
                "id": "user_oriented_task_0",
                "motivation_app": "Grammarly",
                "instruction": "Fix the grammar.",
                "instances": [
                    {"input": "He go home.", "output": "He goes home."},
                    {"input": "They was late.", "output": "They were late."},
                ],
            },
            {
                "id": "user_oriented_task_1",
                "motivation_app": "Gmail",
                "instruction": "Write a greeting.",
                "instances": [{"input": "", "output": "Hello!"}],
            },
        ],
    )
    out = tmp_path / "self_instruct.jsonl"
    assert convert_eval_set("self-instruct", source, out) == 3
    rows, _ = read_rows(out, FIELD_PRESETS["dolly"])
    assert rows[1] == {
        "instruction": "Fix the grammar.",
        "context": "They was late.",
        "response": "They were late.",
        "category": "Grammarly",
    }
    assert rows[2]["context"] == ""


@pytest.mark.parametrize(
    ("kind", "question", "id_field"),
    [
        (
            "vicuna",
            {"question_id": 1, "text": "How do I sleep better?", "category": "generic"},
            "question_id",
        ),
        ("koala", {"id": "koala_1", "prompt": "How do I sleep better?"}, "id"),
        (
            "wizardlm",
            {"idx": 1, "Skill": "Health", "Difficulty": 3, "Instruction": "How do I sleep better?"},
            "idx",
        ),
    ],
)
def test_question_sets_take_their_references_from_an_answers_file(tmp_path, kind, question, id_field):
    source = _jsonl(tmp_path / f"{kind}.jsonl", [question])
    out = tmp_path / f"{kind}-out.jsonl"
    with pytest.raises(
        DataError, match=rf"{kind}.jsonl:1: {kind} {id_field} .* no reference answer.*pass answers"
    ):
        convert_eval_set(kind, source, out)
    answers = _jsonl(tmp_path / "answers.jsonl", [{id_field: question[id_field], "text": "Keep a schedule."}])
    assert convert_eval_set(kind, source, out, answers) == 1
    (row,) = read_rows(out, FIELD_PRESETS["dolly"])[0]
    assert (row["instruction"], row["response"]) == ("How do I sleep better?", "Keep a schedule.")


def test_a_malformed_line_is_named_by_file_and_line(tmp_path):
    source = tmp_path / "question.jsonl"
    source.write_text('{"question_id": 1, "text": "Hi"}\n{not json\n')
    with pytest.raises(DataError, match=r"question.jsonl:2: malformed JSON"):
        convert_eval_set("vicuna", source, tmp_path / "out.jsonl", source)


def test_the_cli_writes_the_files_pythia_dolly_names(tmp_path, capsys, monkeypatch):
    source = _dolly(tmp_path / "databricks-dolly-15k.jsonl", 1_100)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "dolly", str(source)]) == 0
    assert "train" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data" / "dolly").iterdir()) == [
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    assert main(["data", "eval-set", "koala", str(source), "--out", str(tmp_path / "k.jsonl")]) == 1
    assert "no reference answer" in capsys.readouterr().err
