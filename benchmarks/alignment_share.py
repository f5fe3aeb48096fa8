"""How much of a response two tokenizers cut alike: the share of student tokens in matched spans.

Trains a byte-level BPE for each vocabulary size of a pair on the config's training rows (as
``tokenizer.source: train`` does), encodes every training example with both exactly as data
preparation does, aligns the two label token runs through their character offsets
(``data/alignment.py``) and prints, per pair and per task category, the share of the student's
label tokens that sit in a one-to-one span (the rest is where cross-tokenizer losses cannot
compare distributions token by token). A BPE stops merging when the corpus has nothing left to
merge, so the table prints the vocabulary each size really got.

    .venv/bin/python benchmarks/alignment_share.py --config configs/demo.yaml --pairs 1024:512 1024:300
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from atkd_core.config.loading import load_config
from atkd_core.data.alignment import label_offsets, response_spans
from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.data.encoding import encode_example, format_prompt
from atkd_core.data.suite import generate_split
from atkd_core.data.tokenizer import train_tokenizer


def main() -> None:
    """Parse the arguments and print one row per tokenizer pair."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument(
        "--pairs", nargs="+", default=["1024:512", "1024:300"], help="teacher:student vocabulary sizes"
    )
    args = parser.parse_args()
    config = load_config(args.config)
    if config.data.source != "embedded":
        parser.error("the bench reads the embedded suite; its config's data.source must be embedded")
    rows = list(generate_split(config.data.embedded, "train"))
    prompts = [format_prompt(config.data, row["instruction"], row["context"]) for row in rows]
    texts = [prompt + row["response"] for prompt, row in zip(prompts, rows, strict=True)]
    categories = sorted({row["category"] for row in rows})
    print(f"{len(rows)} training rows of {args.config}; share of student label tokens in matched spans")
    print(f"{'teacher':>8} {'student':>8} {'all':>6} " + " ".join(f"{c:>10}" for c in categories))
    for pair in args.pairs:
        teacher_size, student_size = (int(size) for size in pair.split(":"))
        teacher, student = train_tokenizer(texts, teacher_size), train_tokenizer(texts, student_size)
        tokens: Counter[str] = Counter()
        matched: Counter[str] = Counter()
        for prompt, row in zip(prompts, rows, strict=True):
            sides = []
            for tokenizer in (teacher, student):
                encoded = encode_example(prompt, row["response"], tokenizer, config.data.max_length)
                label_ids = [t for t in encoded.labels if t != IGNORE_INDEX]
                sides.append(label_offsets(prompt, row["response"], label_ids, tokenizer))
            matched[row["category"]] += sum(span.matched for span in response_spans(*sides))
            tokens[row["category"]] += len(sides[1])
        shares = " ".join(f"{matched[c] / tokens[c]:>10.3f}" for c in categories)
        overall = sum(matched.values()) / sum(tokens.values())
        print(f"{len(teacher):>8} {len(student):>8} {overall:>6.3f} {shares}")


if __name__ == "__main__":
    main()
