"""The embedded synthetic instruction suite: deterministic, seeded, exact answers, graded difficulty.

Families range from answers with one plausible next token (upper-casing letters a model can see) to
answers with many (``choose``: "name an animal" has dozens of right answers, so a fine-tuned teacher
stays uncertain there). That spread is what makes ATKD's easy/hard split meaningful on this data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from atkd_core.config import EmbeddedSuiteConfig

Row = dict[str, str]

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# A fixed fact table, independent of the suite seed, so "recall" asks about the same world in every
# split and every seed: the model has to memorise it from the training split.
_FACT_SEED = 1234
_SYLLABLES = ["zor", "qua", "mel", "tiv", "bra", "nok", "sel", "vin", "dra", "pum", "kel", "fos"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
_PLACES = ["the river", "the forest", "the desert", "the mountain", "the lake", "the cave", "the valley"]
_FOODS = ["seeds", "fish", "berries", "leaves", "roots", "insects", "honey", "moss"]

_CHOICES = {
    "an animal": [
        "cat",
        "dog",
        "horse",
        "tiger",
        "lion",
        "sheep",
        "goat",
        "mouse",
        "eagle",
        "shark",
        "whale",
        "frog",
    ],
    "a fruit": [
        "apple",
        "pear",
        "plum",
        "grape",
        "lemon",
        "mango",
        "peach",
        "cherry",
        "melon",
        "kiwi",
        "lime",
    ],
    "a color": _COLORS,
    "a tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "file", "knife", "axe"],
}


def _fact_table() -> dict[str, dict[str, str]]:
    rng = random.Random(_FACT_SEED)
    names: set[str] = set()
    while len(names) < 24:
        names.add(rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES))
    return {
        name: {"color": rng.choice(_COLORS), "home": rng.choice(_PLACES), "food": rng.choice(_FOODS)}
        for name in sorted(names)
    }


FACTS = _fact_table()


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(low, high))]


def _uppercase(rng: random.Random) -> Row:
    letters = _letters(rng, 3, 6)
    return {
        "instruction": "Write these letters in upper case.",
        "context": " ".join(letters),
        "response": " ".join(c.upper() for c in letters),
    }


def _reverse(rng: random.Random) -> Row:
    letters = _letters(rng, 3, 6)
    return {
        "instruction": "Write these letters in reverse order.",
        "context": " ".join(letters),
        "response": " ".join(reversed(letters)),
    }


def _sort(rng: random.Random) -> Row:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "context": " ".join(map(str, numbers)),
        "response": " ".join(map(str, sorted(numbers))),
    }


def _count(rng: random.Random) -> Row:
    letters = [rng.choice("abcd") for _ in range(rng.randint(4, 9))]
    target = rng.choice(letters)
    return {
        "instruction": f"How many times does the letter {target} appear?",
        "context": " ".join(letters),
        "response": str(letters.count(target)),
    }


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {"instruction": f"What is {a} + {b}?", "context": "", "response": str(a + b)}


def _recall(rng: random.Random) -> Row:
    name = rng.choice(sorted(FACTS))
    attribute = rng.choice(["color", "home", "food"])
    question = {
        "color": f"What color is the {name}?",
        "home": f"Where does the {name} live?",
        "food": f"What does the {name} eat?",
    }[attribute]
    return {"instruction": question, "context": "", "response": FACTS[name][attribute]}


def _compose(rng: random.Random) -> Row:
    letters = _letters(rng, 3, 5)
    return {
        "instruction": "Write these letters in reverse order, then in upper case.",
        "context": " ".join(letters),
        "response": " ".join(c.upper() for c in reversed(letters)),
    }


def _choose(rng: random.Random) -> Row:
    kind = rng.choice(sorted(_CHOICES))
    count = rng.randint(1, 3)
    picks = rng.sample(_CHOICES[kind], count)
    what = kind if count == 1 else f"{count} different {kind.split(' ', 1)[1]}s"
    return {"instruction": f"Name {what}.", "context": "", "response": ", ".join(picks)}


FAMILIES: dict[str, Callable[[random.Random], Row]] = {
    "uppercase": _uppercase,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "add": _add,
    "recall": _recall,
    "compose": _compose,
    "choose": _choose,
}

SPLITS = ("train", "validation", "test")


def generate_split(config: EmbeddedSuiteConfig, split: str) -> Iterator[Row]:
    """Yield the rows of one split, Dolly fields (instruction, context, response, category).

    Families take turns so every split has equal shares; each split has its own derived seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
    size = {"train": config.train_size, "validation": config.validation_size, "test": config.test_size}[split]
    rng = random.Random(f"{config.seed}:{split}")
    for index in range(size):
        family = config.families[index % len(config.families)]
        row = FAMILIES[family](rng)
        yield {**row, "category": family}


def write_suite(config: EmbeddedSuiteConfig, directory: Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (same seed, same bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        path = directory / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in generate_split(config, split):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths
