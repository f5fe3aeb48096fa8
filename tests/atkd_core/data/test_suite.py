"""The embedded suite: deterministic, every family present, answers exact."""

from __future__ import annotations

import json

from atkd_core.config import EmbeddedSuiteConfig
from atkd_core.data.suite import FACTS, FAMILIES, generate_split, write_suite


def _bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    config = EmbeddedSuiteConfig(seed=7, train_size=80, validation_size=16, test_size=16)
    write_suite(config, tmp_path / "a")
    write_suite(config, tmp_path / "b")
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")


def test_different_seed_different_rows(tmp_path):
    write_suite(EmbeddedSuiteConfig(seed=1, train_size=40), tmp_path / "a")
    write_suite(EmbeddedSuiteConfig(seed=2, train_size=40), tmp_path / "b")
    assert _bytes(tmp_path / "a")["train.jsonl"] != _bytes(tmp_path / "b")["train.jsonl"]


def test_splits_differ_and_sizes_match(tmp_path):
    config = EmbeddedSuiteConfig(train_size=48, validation_size=16, test_size=24)
    paths = write_suite(config, tmp_path)
    counts = {split: len(path.read_text().splitlines()) for split, path in paths.items()}
    assert counts == {"train": 48, "validation": 16, "test": 24}
    assert (
        paths["validation"].read_text() != paths["test"].read_text()[: len(paths["validation"].read_text())]
    )


def test_every_family_in_equal_shares_with_dolly_fields():
    rows = list(generate_split(EmbeddedSuiteConfig(train_size=len(FAMILIES) * 5), "train"))
    categories = [r["category"] for r in rows]
    assert {c: categories.count(c) for c in FAMILIES} == dict.fromkeys(FAMILIES, 5)
    for row in rows:
        assert set(row) == {"instruction", "context", "response", "category"}
        assert row["instruction"] and row["response"]
        json.dumps(row)


def test_answers_are_exact():
    rows = list(generate_split(EmbeddedSuiteConfig(train_size=400), "train"))
    for row in rows:
        family, context, response = row["category"], row["context"], row["response"]
        if family == "add":
            a, b = row["instruction"].removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(response) == int(a) + int(b)
        elif family == "sort":
            assert response.split() == sorted(context.split(), key=int)
        elif family == "reverse":
            assert response.split() == context.split()[::-1]
        elif family == "uppercase":
            assert response == context.upper()
        elif family == "compose":
            assert response.split() == [c.upper() for c in context.split()[::-1]]
        elif family == "count":
            letter = row["instruction"].split("letter ")[1].split(" ")[0]
            assert int(response) == context.split().count(letter)
        elif family == "recall":
            name = row["instruction"].split("the ")[1].split(" ")[0].rstrip("?")
            assert response in FACTS[name].values()


def test_choose_family_has_many_right_answers():
    rows = [
        r for r in generate_split(EmbeddedSuiteConfig(train_size=800), "train") if r["category"] == "choose"
    ]
    by_instruction: dict[str, set[str]] = {}
    for row in rows:
        by_instruction.setdefault(row["instruction"], set()).add(row["response"])
    assert max(len(answers) for answers in by_instruction.values()) >= 5
