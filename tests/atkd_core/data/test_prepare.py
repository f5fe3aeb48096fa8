"""prepare_data: masked labels, truncation that keeps the response, manifests, atomic outputs."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from atkd_core.config import DataConfig
from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.data.encoding import encode_example, fit_prompt_fields, format_prompt, template_tail_tokens
from atkd_core.data.prepare import prepare_data
from atkd_core.data.records import read_rows
from atkd_core.errors import DataError
from atkd_core.manifest import read_manifest
from atkd_core.outputs import PreparedManifest
from tests.atkd_core.data.test_tokenizer import _tokenizer
from tests.conftest import tiny_config


def test_labels_mask_prompt_and_keep_response_and_eos():
    tokenizer = _tokenizer()
    prompt = format_prompt(DataConfig(), "Write these letters in reverse order.", "a b c")
    input_ids, labels, fit = encode_example(prompt, "c b a", tokenizer, max_length=64)
    assert fit == "whole"
    # The prompt's trailing newline is trained with the response (as the harness will score it).
    context_len = len(tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"])
    assert labels[:context_len] == [IGNORE_INDEX] * context_len
    assert labels[context_len:] == input_ids[context_len:]
    assert input_ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(input_ids[:context_len]) == prompt.rstrip()
    assert tokenizer.decode(input_ids[context_len:-1]) == "\nc b a"
    assert tokenizer.decode(input_ids[:-1]) == prompt + "c b a"


def test_truncation_drops_the_prompts_middle_keeping_the_question_and_the_response_marker():
    tokenizer = _tokenizer()
    data = DataConfig()
    prompt = format_prompt(data, "Sort these numbers.", "filler words here " * 30)
    tail = template_tail_tokens(data.context_template, tokenizer)
    encoded = encode_example(prompt, "1 2 3", tokenizer, max_length=40, keep_prompt_tail=tail)
    assert encoded.fit == "prompt_truncated" and len(encoded.input_ids) == 40
    kept = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept[:-1]) == "\n1 2 3" and kept[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(encoded.input_ids)
    assert "Sort these numbers." in text
    assert text.split("1 2 3")[0].endswith("### Response:\n")


def test_a_response_too_long_for_the_minimum_prompt_is_cut_and_says_so():
    tokenizer = _tokenizer()
    prompt = format_prompt(DataConfig(), "Count.", "")
    encoded = encode_example(prompt, "one two three " * 20, tokenizer, max_length=24, min_prompt_tokens=8)
    assert encoded.fit == "response_truncated" and len(encoded.input_ids) == 24
    assert encoded.labels[:8] == [IGNORE_INDEX] * 8 and IGNORE_INDEX not in encoded.labels[8:]
    assert encoded.input_ids[-1] != tokenizer.eos_token_id


QUESTION = "What is the capital of the country described above?"


@pytest.mark.parametrize("context_first", [False, True])
def test_a_long_context_is_cut_before_the_question_and_the_markers(context_first):
    """Alpaca-style input far over the limit: the context loses its end, the whole instruction and
    every template marker stay, even when the template puts the context before the instruction."""
    tokenizer = _tokenizer()
    data = DataConfig(
        context_template=(
            "### Input:\n{context}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
            if context_first
            else DataConfig().context_template
        )
    )
    row = {"instruction": QUESTION, "context": "The land of many rivers. " * 60, "response": "Paris"}
    fitted = fit_prompt_fields(data, row, tokenizer, max_length=96, min_prompt_tokens=16)
    assert fitted.context_cut and not fitted.instruction_cut
    encoded = encode_example(fitted.prompt, row["response"], tokenizer, 96, min_prompt_tokens=16)
    assert encoded.fit == "whole" and len(encoded.input_ids) <= 96
    text = tokenizer.decode(encoded.input_ids)
    assert QUESTION in text and "### Input:" in text and text.split("Paris")[0].endswith("### Response:\n")
    assert "The land of many rivers." in text  # the context's start survives
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_a_long_instruction_loses_its_middle_keeping_its_start_and_its_question():
    tokenizer = _tokenizer()
    instruction = "Read the following notes carefully. " + "Some background sentence. " * 60 + QUESTION
    row = {"instruction": instruction, "context": "", "response": "Paris"}
    fitted = fit_prompt_fields(DataConfig(), row, tokenizer, max_length=96, min_prompt_tokens=16)
    assert fitted.instruction_cut and not fitted.context_cut
    assert fitted.prompt.startswith("### Instruction:\nRead the following notes")
    assert fitted.prompt.endswith(QUESTION[-20:] + "\n\n### Response:\n")
    encoded = encode_example(fitted.prompt, "Paris", tokenizer, 96, min_prompt_tokens=16)
    assert len(encoded.input_ids) <= 96 and encoded.labels[-1] == tokenizer.eos_token_id


def _overlong_rows_config(tmp_path, policy):
    rows = [
        {"instruction": "Short.", "response": "ok"},
        {"instruction": "Long context.", "context": "word " * 80, "response": "fine"},
        {"instruction": "Long answer.", "response": "word " * 80},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_config(
        tmp_path / "work",
        data={
            "source": "files",
            "train_files": [str(path)],
            "validation_files": [str(path)],
            "test_files": [str(path)],
            "max_length": 48,
            "min_prompt_tokens": 16,
            "on_overlong": policy,
        },
    )


@pytest.mark.parametrize(
    ("policy", "rows", "overlong"),
    [
        (
            "truncate_prompt",
            2,
            {"prompt_truncated": 1, "context_cut": 1, "response_truncated": 0, "skipped": 1},
        ),
        ("truncate", 3, {"prompt_truncated": 1, "context_cut": 1, "response_truncated": 1, "skipped": 0}),
        ("skip", 1, {"prompt_truncated": 0, "context_cut": 0, "response_truncated": 0, "skipped": 2}),
    ],
)
def test_overlong_rows_follow_the_policy_and_are_counted_and_logged(tmp_path, policy, rows, overlong):
    lines: list[str] = []
    manifest, _ = prepare_data(
        _overlong_rows_config(tmp_path, policy), tmp_path / "prepared", log=lines.append
    )
    assert manifest.counts["train"].rows == rows
    assert manifest.counts["train"].overlong == {"instruction_cut": 0, **overlong}
    assert any(f"(data.on_overlong={policy})" in line for line in lines)
    dataset = load_from_disk(str(tmp_path / "prepared" / "dataset"))["train"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "prepared" / "tokenizer")
    for row in dataset:
        assert len(row["input_ids"]) <= 48
        # Only a row the policy allowed to cut (truncate) may end without its EOS.
        assert row["labels"][-1] == tokenizer.eos_token_id or policy == "truncate"


def test_overlong_rows_fail_with_one_line_under_error(tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:2: \d+ tokens with its EOS, over data.max_length=48"):
        prepare_data(_overlong_rows_config(tmp_path, "error"), tmp_path / "prepared", log=lambda _: None)


def test_min_prompt_tokens_must_leave_room_for_a_response():
    with pytest.raises(ValueError, match="data.min_prompt_tokens: 64 leaves no room"):
        DataConfig(max_length=64, min_prompt_tokens=64)


def test_context_template_used_only_with_context():
    data = DataConfig()
    assert "### Input:" in format_prompt(data, "Do it.", "x y")
    assert "### Input:" not in format_prompt(data, "Do it.", "")


def test_prepare_writes_dataset_tokenizer_and_manifest(tmp_path):
    config = tiny_config(tmp_path)
    manifest, reused = prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    assert not reused
    dataset = load_from_disk(str(tmp_path / "prepared" / "dataset"))
    assert {s: len(dataset[s]) for s in dataset} == {"train": 64, "validation": 16, "test": 16}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "prepared" / "tokenizer")
    for row in dataset["train"]:
        assert len(row["input_ids"]) == len(row["labels"]) <= config.data.max_length
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert row["labels"][0] == IGNORE_INDEX
    assert manifest.counts["train"].rows == 64
    assert read_manifest(tmp_path / "prepared", PreparedManifest) == manifest


def test_prepare_is_reused_when_inputs_match_and_redone_when_they_change(tmp_path):
    config = tiny_config(tmp_path)
    first, _ = prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    again, reused = prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    assert reused and again == first
    changed = config.model_copy(update={"data": config.data.model_copy(update={"max_length": 32})})
    _, reused = prepare_data(changed, tmp_path / "prepared", log=lambda _: None)
    assert not reused


def test_prepared_data_made_by_older_code_is_redone(tmp_path, monkeypatch):
    """Code that writes prepared data differently (e.g. how it truncates or pads) raises
    PREPARED_FORMAT, and an output from before is then not reused."""
    import atkd_core.data.prepare as prepare

    config = tiny_config(tmp_path)
    prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    monkeypatch.setattr(prepare, "PREPARED_FORMAT", prepare.PREPARED_FORMAT + 1)
    _, reused = prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    assert not reused


def test_failed_prepare_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    before = read_manifest(tmp_path / "prepared")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("atkd_core.data.prepare.train_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(config, tmp_path / "prepared", force=True, log=lambda _: None)
    assert read_manifest(tmp_path / "prepared") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []


def test_user_jsonl_errors_name_file_line_and_field(tmp_path):
    fields = DataConfig().field_map()
    good = {"instruction": "Say hi.", "context": "", "response": "hi"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: malformed JSON"):
        read_rows(path, fields)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'response' is missing"):
        read_rows(path, fields)
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_rows(path, fields)


def test_alpaca_fields(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add.", "input": "1 2", "output": "3"}) + "\n")
    rows, skipped = read_rows(path, DataConfig(field_preset="alpaca").field_map())
    assert skipped == []
    assert rows == [{"instruction": "Add.", "context": "1 2", "response": "3", "category": ""}]


def _write_dolly(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _files_config(tmp_path, train, **data):
    return tiny_config(
        tmp_path,
        data={"source": "files", "train_files": [str(train)], "max_length": 48, **data},
        tokenizer={"vocab_size": 300},
    )


def _dolly_rows(count):
    return [
        {"instruction": f"Echo {i}.", "context": "", "response": f"{i}", "category": "echo"}
        for i in range(count)
    ]


def test_user_files_with_holdout_splits_and_skipped_rows(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = _dolly_rows(60)
    train.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "{broken\n" + json.dumps({"instruction": "x"}) + "\n"
    )
    with pytest.raises(DataError, match="train.jsonl:61: malformed JSON"):
        prepare_data(_files_config(tmp_path, train), tmp_path / "out", log=lambda _: None)
    logged = []
    manifest, _ = prepare_data(
        _files_config(tmp_path, train, on_bad_rows="skip"), tmp_path / "out", log=logged.append
    )
    assert manifest.skipped_rows == 2 and any("train.jsonl:62: field 'response'" in m for m in logged)
    counts = {split: c.rows for split, c in manifest.counts.items()}
    assert counts == {"train": 54, "validation": 3, "test": 3}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_csv_parquet_and_json_files(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say.", "input": "", "output": "hi"},
    ]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        pcsv.write_csv(pa.Table.from_pylist(rows), path)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))
    read, _ = read_rows(path, DataConfig(field_preset="alpaca").field_map())
    assert [r["response"] for r in read] == ["3", "hi"] and read[0]["context"] == "1 2"


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path, data={"source": "hub", "hub_name": "databricks/databricks-dolly-15k"})
    with pytest.raises(DataError, match="cannot be loaded .*where the hub cannot be reached"):
        prepare_data(config, tmp_path / "out", log=lambda _: None)


def test_tokenizer_preflight_names_the_first_mismatching_tokens(tmp_path):
    from atkd_core.config import ModelConfig
    from atkd_core.data.preflight import TokenizerMismatch, preflight
    from atkd_core.data.tokenizer import train_tokenizer
    from atkd_core.models.build import build_model, save_model

    ours = _tokenizer()
    theirs = train_tokenizer(["completely different text zzz qqq"] * 50, 300)
    save_model(build_model(ModelConfig(preset="neox-tiny"), theirs), theirs, tmp_path / "other")
    save_model(build_model(ModelConfig(preset="neox-tiny"), ours), ours, tmp_path / "same")
    lines = preflight(
        ours,
        {"teacher": ModelConfig(path=str(tmp_path / "same")), "student": ModelConfig(preset="neox-tiny")},
    )
    assert "shares the tokenizer" in lines[0]
    with pytest.raises(TokenizerMismatch, match=r"student: its tokenizer (has|differs).*"):
        preflight(ours, {"student": ModelConfig(path=str(tmp_path / "other"))})
    with pytest.raises(
        TokenizerMismatch, match=r"student: .*tokenizer: \{source: path, path: <the student>\}"
    ):
        preflight(ours, {"student": ModelConfig(path=str(tmp_path / "other"))})
    # A teacher of another vocabulary is a choice: its own tokenizer (across tokenizers) or one for both.
    with pytest.raises(TokenizerMismatch, match=r"teacher: .*distil across tokenizers .*teacher.tokenizer"):
        preflight(ours, {"teacher": ModelConfig(path=str(tmp_path / "other"))})
