"""A user's instruction files read as text, exactly as written.

Every value of a text field reaches the prompt as the file spells it: ``00007`` stays ``00007``,
``0`` is not empty, ``3.10`` keeps its zero and ``true`` is the word. CSV cells are text already and
are never type-guessed; JSON numbers, booleans and ``NaN`` keep their source text; a Parquet or
``datasets`` column of another type has no source text to keep, so such a value is refused with
its file, row, field and type instead of being converted behind the user's back.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from atkd_core.config import FieldMap
from atkd_core.errors import DataError


def _scalars_as_source_text(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose booleans are their source words (numbers arrive as text already)."""
    return {key: ("true" if value is True else "false" if value is False else value) for key, value in pairs}


def parse_json_text(text: str) -> Any:
    """``json.loads`` keeping every scalar's source text: ``007.50`` -> "007.50", ``true`` -> "true".

    ``null`` stays None (an absent value), objects and arrays stay objects and arrays.
    """
    return json.loads(
        text,
        parse_int=str,
        parse_float=str,
        parse_constant=str,
        object_pairs_hook=_scalars_as_source_text,
    )


def _decoded(path: Path, raw: bytes) -> str:
    """The file's text (a UTF-8 byte-order mark, as spreadsheet exports write it, dropped)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{bad_line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name}"
        ) from None


def _csv_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, row) for each CSV record, every cell the exact text between its delimiters."""
    # A long context can exceed the csv module's default cell limit (128 KiB); no cell is too long
    # for the prompt template, so the limit goes as high as this platform allows.
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        records = []
        while True:
            first_line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            if not cells:
                continue
            where = f"{path}:{first_line}"
            if len(cells) != len(header):
                raise DataError(
                    f"{where}: {len(cells)} cells, but the header line has {len(header)} "
                    f"({', '.join(header)}); quote cells that hold a comma"
                )
            records.append((where, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot be read as csv ({exc})") from None
    return records


def _parquet_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: cannot be read as parquet ({str(exc).splitlines()[0]})") from None
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def file_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a JSONL / JSON / Parquet / CSV file; location is ``file:line``
    (``file:row N`` for Parquet, ``file:item N`` for a JSON list).

    CSV, Parquet and JSON records are dicts; JSONL records are the line's text, for
    ``json_object`` to parse, so one bad line can be skipped while the others are kept.
    """
    if not path.is_file():
        raise DataError(f"{path}: file does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    text = _decoded(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if suffix == ".csv":
        return _csv_records(path, text)
    if suffix == ".json":
        try:
            records = parse_json_text(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json file must hold a list of objects")
        return [(f"{path}:item {i + 1}", record) for i, record in enumerate(records)]
    return [
        (f"{path}:{line_number}", line)
        for line_number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def json_object(record: Any, where: str) -> dict[str, Any]:
    """One record of ``file_records`` as a dict: a JSONL line parsed (scalars as their source
    text), any other kind checked; DataError naming ``where`` (``file:line``) otherwise."""
    if isinstance(record, str):
        try:
            record = parse_json_text(record)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def text_field(record: dict[str, Any], field: str, where: str, *, required: bool) -> str:
    """The text of ``record[field]`` exactly as stored; "" for an absent optional field.

    A required field that is absent or blank, or a value that is not text (a Parquet number, a JSON
    list), is a DataError naming ``where``, the field and the value's type: nothing is converted.
    """
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        shown = repr(value)
        raise DataError(
            f"{where}: field {field!r} holds {type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}, "
            "not text; store text fields as strings (e.g. cast the column to string)"
        )
    if required and (value is None or not value.strip()):
        raise DataError(f"{where}: field {field!r} is missing or empty")
    return value or ""


# A row and where it was read (``file:line``), for messages about it after splits are shuffled.
Located = tuple[str, dict[str, str]]


def read_located_rows(
    path: Path, fields: FieldMap, on_bad_rows: str = "error"
) -> tuple[list[Located], list[str]]:
    """Rows of a Dolly/Alpaca-style file mapped to instruction/context/response/category, each
    with its ``file:line``.

    Returns (rows, skipped) where ``skipped`` names each bad row (only with on_bad_rows='skip';
    with 'error' the first bad row raises DataError naming file, line and field).
    """
    rows, skipped = _mapped_rows(file_records(path), fields, on_bad_rows)
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return rows, skipped


def read_rows(
    path: Path, fields: FieldMap, on_bad_rows: str = "error"
) -> tuple[list[dict[str, str]], list[str]]:
    """``read_located_rows`` without the locations."""
    rows, skipped = read_located_rows(path, fields, on_bad_rows)
    return [row for _, row in rows], skipped


def _mapped_rows(
    records: Iterable[tuple[str, Any]], fields: FieldMap, on_bad_rows: str
) -> tuple[list[Located], list[str]]:
    """Each (``where``, record) mapped to the four fields; a bad one raises or is skipped by policy."""
    rows, skipped = [], []
    for where, record in records:
        try:
            rows.append((where, _map_fields(json_object(record, where), fields, where)))
        except DataError as exc:
            if on_bad_rows == "error":
                raise
            skipped.append(str(exc))
    return rows, skipped


def _map_fields(record: dict[str, Any], fields: FieldMap, where: str) -> dict[str, str]:
    return {
        "instruction": text_field(record, fields.instruction, where, required=True),
        "context": text_field(record, fields.context, where, required=False) if fields.context else "",
        "response": text_field(record, fields.response, where, required=True),
        "category": text_field(record, fields.category, where, required=False) if fields.category else "",
    }


def read_hub_split(
    name: str, split: str, fields: FieldMap, on_bad_rows: str
) -> tuple[list[Located], list[str]]:
    """Rows of one split of a ``datasets`` dataset (a local path or a hub name),
    each with its ``name[split]:row N``."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable" and "no such split"
        raise DataError(
            f"dataset {name!r} split {split!r} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "where the hub cannot be reached (or HF_DATASETS_OFFLINE=1 is set), download it where it can be "
            "and point data.train_files at local JSONL/Parquet, or pass a local dataset directory"
        ) from None
    records = ((f"{name}[{split}]:row {index + 1}", record) for index, record in enumerate(dataset))
    return _mapped_rows(records, fields, on_bad_rows)
