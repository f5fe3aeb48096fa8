"""Synthetic instruction rows whose lengths follow databricks-dolly-15k's, for the training bench.

Packing pays in proportion to the padding a batch carries, which depends on the spread of the
lengths, not on the words; so the bench trains on rows of filler words whose prompt and response
lengths are drawn from Dolly's. The numbers below are written here, not downloaded:

- the category counts are the dataset card's (15,011 rows); three categories come with a context
  passage (closed_qa, information_extraction, summarization: 29.8% of the rows);
- the length quantiles, in GPT-NeoX tokens (Pythia's tokenizer), are approximate: estimated from a
  read of about 90 rows spread over the public JSONL at ~1.3 tokens per word, not from a full
  tokenisation. They reproduce the shape that matters here: most responses short (median ~55
  tokens), a long tail (p99 ~550), and a minority of prompts with a passage of 100-1,000 tokens.

Each filler word of the lexicon becomes one token once the pipeline's tokenizer is trained on the
rows (``tokenizer.source: train``), so a row's token count follows the drawn word count closely;
the bench prints the mean padding share it measured, whatever the tokenizer did.

    .venv/bin/python benchmarks/dolly_shape.py rows.jsonl --rows 2000
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
from pathlib import Path

CATEGORIES = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}
WITH_CONTEXT = ("closed_qa", "information_extraction", "summarization")

# (quantile, tokens): piecewise linear between the points; 0 and 1 are the smallest and largest.
INSTRUCTION = [(0.0, 3), (0.1, 7), (0.25, 11), (0.5, 16), (0.75, 24), (0.9, 38), (0.99, 90), (1.0, 200)]
CONTEXT = [(0.0, 15), (0.1, 60), (0.25, 100), (0.5, 160), (0.75, 280), (0.9, 450), (0.99, 1100), (1.0, 2500)]
RESPONSE = [(0.0, 1), (0.1, 4), (0.25, 15), (0.5, 55), (0.75, 120), (0.9, 220), (0.99, 550), (1.0, 1800)]

LEXICON = [
    f"{consonant}{vowel}{ending}"
    for consonant in "bdfgklmnprstvz"
    for vowel in "aeiou"
    for ending in ("", "n", "r", "s", "t")
]


def draw(quantiles: list[tuple[float, int]], rng: random.Random) -> int:
    """One length from the piecewise-linear inverse CDF given by ``quantiles``."""
    u = rng.random()
    points = [q for q, _ in quantiles]
    i = min(max(bisect.bisect_right(points, u), 1), len(points) - 1)
    (q0, v0), (q1, v1) = quantiles[i - 1], quantiles[i]
    return max(1, round(v0 + (v1 - v0) * (u - q0) / (q1 - q0)))


def dolly_shaped_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` rows (instruction, context, response, category) with Dolly's length shape."""
    rng = random.Random(seed)
    names, weights = list(CATEGORIES), list(CATEGORIES.values())

    def text(tokens: int) -> str:
        return " ".join(rng.choice(LEXICON) for _ in range(tokens))

    rows = []
    for _ in range(count):
        category = rng.choices(names, weights)[0]
        rows.append(
            {
                "instruction": text(draw(INSTRUCTION, rng)),
                "context": text(draw(CONTEXT, rng)) if category in WITH_CONTEXT else "",
                "response": text(draw(RESPONSE, rng)),
                "category": category,
            }
        )
    return rows


def write_dolly_shaped(path: Path, count: int, seed: int = 0) -> Path:
    """Write ``dolly_shaped_rows`` as JSONL at ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in dolly_shaped_rows(count, seed)))
    return path


def main() -> None:
    """Write the rows and print their word-count quantiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = dolly_shaped_rows(args.rows, args.seed)
    write_dolly_shaped(args.path, args.rows, args.seed)
    for field in ("instruction", "context", "response"):
        lengths = sorted(len(row[field].split()) for row in rows if row[field])
        picks = {q: lengths[min(len(lengths) - 1, int(q * len(lengths)))] for q in (0.1, 0.5, 0.9, 0.99)}
        print(f"{field}: {len(lengths)} rows, words at p10/p50/p90/p99 = {list(picks.values())}")


if __name__ == "__main__":
    main()
