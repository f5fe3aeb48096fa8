"""A user's data reaches the prompt exactly as written, in every input format, or is refused."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atkd_core.config import DataConfig
from atkd_core.data.converters import convert_eval_set
from atkd_core.data.encoding import format_prompt
from atkd_core.data.prepare import prepare_data
from atkd_core.data.records import read_hub_split, read_rows
from atkd_core.errors import DataError
from tests.atkd_core.data.test_prepare import _files_config

FIELDS = DataConfig().field_map()

# Cells a type-guessing reader changes: leading zeros, zero itself, numbers with a significant
# trailing zero, exponents, booleans, blanks around text, a comma and a newline inside a cell.
TRICKY = [
    {"instruction": "Code?", "context": "00000", "response": "0", "category": "codes"},
    {"instruction": "Code?", "context": "00007", "response": "3.10", "category": "codes"},
    {"instruction": "Code?", "context": "00014", "response": "1e5", "category": "codes"},
    {"instruction": "Flag?", "context": "true", "response": "false", "category": "0"},
    {"instruction": "Pad, then\nstop.", "context": "  x  ", "response": " -0 ", "category": ""},
    {"instruction": "Big?", "context": "", "response": "12345678901234567890", "category": "1.0"},
]


# Columns a type-guessing CSV reader converts whole: codes become numbers (00000 then counts as
# empty), answers become floats, flags become booleans.
CODES = [
    {"instruction": f"Code {i}?", "context": f"{7 * i:05d}", "response": answer, "category": flag}
    for i, (answer, flag) in enumerate([("0", "true"), ("3.10", "false"), ("42", "true"), ("1e5", "false")])
]


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("source", [TRICKY, CODES], ids=["mixed", "typed-columns"])
def test_csv_cells_reach_the_rows_exactly_as_written(tmp_path, source):
    path = tmp_path / "codes.csv"
    _write_csv(path, source)
    rows, skipped = read_rows(path, FIELDS)
    assert skipped == [] and rows == source


def test_csv_codes_with_leading_zeros_are_prepared_unchanged(tmp_path):
    path = tmp_path / "train.csv"
    rows = [dict(row, instruction=f"{row['instruction']} {i}") for i, row in enumerate(CODES * 6)]
    _write_csv(path, rows)
    config = _files_config(tmp_path, path)
    prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    prepared = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (tmp_path / "prepared" / "raw" / f"{split}.jsonl").read_text().splitlines()
    ]
    assert sorted(prepared, key=lambda r: r["instruction"]) == sorted(rows, key=lambda r: r["instruction"])
    # The 00000 row keeps its input section: zero is a code, not an empty context.
    zero = next(r for r in prepared if r["context"] == "00000")
    assert "00000" in format_prompt(config.data, zero["instruction"], zero["context"])


def test_csv_with_a_byte_order_mark_and_crlf_lines(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeffinstruction,context,response\r\nSay.,007,"a\r\nb"\r\n'.encode())
    rows, _ = read_rows(path, FIELDS)
    assert rows == [{"instruction": "Say.", "context": "007", "response": "a\r\nb", "category": ""}]


def test_csv_row_with_the_wrong_number_of_cells_names_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('instruction,response\n"Say\nhi.",hi\nAdd 1, 2.,3\n')
    with pytest.raises(DataError, match=r"bad.csv:4: 3 cells, but the header line has 2"):
        read_rows(path, FIELDS)


JSON_LITERALS = [
    # (JSON source of the value, the text it must become)
    ("0", "0"),
    ("3.10", "3.10"),
    ("1E5", "1E5"),
    ("-0", "-0"),
    ("true", "true"),
    ("false", "false"),
    ("12345678901234567890", "12345678901234567890"),
    ("NaN", "NaN"),
    ('"00007"', "00007"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_scalars_keep_their_source_text(tmp_path, suffix):
    objects = [
        f'{{"instruction": "Q {i}", "context": {source}, "response": {source}, "category": {source}}}'
        for i, (source, _) in enumerate(JSON_LITERALS)
    ]
    path = tmp_path / f"data{suffix}"
    path.write_text("\n".join(objects) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(objects) + "]")
    rows, _ = read_rows(path, FIELDS)
    assert [(r["context"], r["response"], r["category"]) for r in rows] == [
        (text, text, text) for _, text in JSON_LITERALS
    ]


def test_json_null_is_absent_and_a_list_is_refused_with_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"instruction": "Q", "context": null, "response": "a"}\n'
        '{"instruction": "Q", "context": ["x"], "response": "a"}\n'
    )
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'context' holds list \['x'\], not text"):
        read_rows(path, FIELDS)
    rows, skipped = read_rows(path, FIELDS, on_bad_rows="skip")
    assert rows[0]["context"] == "" and len(skipped) == 1


def test_parquet_text_is_kept_and_a_number_column_is_refused_with_row_and_type(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(TRICKY), path)
    rows, _ = read_rows(path, FIELDS)
    assert rows == TRICKY
    pq.write_table(pa.Table.from_pylist([{"instruction": "Add.", "context": "1 2", "response": 3}]), path)
    with pytest.raises(DataError, match=r"data.parquet:row 1: field 'response' holds int 3, not text"):
        read_rows(path, FIELDS)


def test_a_dataset_directory_with_a_number_column_is_refused(tmp_path):
    directory = tmp_path / "local_dataset"
    directory.mkdir()
    (directory / "train.jsonl").write_text('{"instruction": "Add.", "context": 7, "response": "8"}\n')
    with pytest.raises(DataError, match=r"row 1: field 'context' holds int 7, not text"):
        read_hub_split(str(directory), "train", FIELDS, "error")


def test_evaluation_sets_keep_numeric_inputs_as_written(tmp_path):
    source = tmp_path / "user_oriented_instructions.jsonl"
    source.write_text(
        '{"instruction": "Next?", "instances": [{"input": 0, "output": 1.50}], "motivation_app": "math"}\n'
    )
    convert_eval_set("self-instruct", source, tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {
        "instruction": "Next?",
        "context": "0",
        "response": "1.50",
        "category": "math",
    }
