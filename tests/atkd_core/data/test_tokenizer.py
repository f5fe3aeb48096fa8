"""The locally trained tokenizer: round trip, distinct specials, loadable through transformers."""

from __future__ import annotations

from transformers import AutoTokenizer

from atkd_core.config import EmbeddedSuiteConfig
from atkd_core.data.suite import generate_split
from atkd_core.data.tokenizer import load_tokenizer, train_tokenizer


def _tokenizer():
    rows = generate_split(EmbeddedSuiteConfig(train_size=200), "train")
    return train_tokenizer((r["instruction"] + "\n" + r["context"] + "\n" + r["response"] for r in rows), 400)


def test_round_trip_and_specials(tmp_path):
    tokenizer = _tokenizer()
    text = "### Instruction:\nWhat is 478 + 356?\n\n### Response:\n834"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    assert len(tokenizer) <= 400


def test_digits_are_single_tokens():
    tokenizer = _tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert pieces == list("12345")


def test_unseen_text_still_encodes():
    tokenizer = _tokenizer()
    text = "Ünïcode ✓ never seen"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path):
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.pad_token == tokenizer.pad_token and loaded.eos_token == tokenizer.eos_token
    assert load_tokenizer(tmp_path).pad_token_id != load_tokenizer(tmp_path).eos_token_id
