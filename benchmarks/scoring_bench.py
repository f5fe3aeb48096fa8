"""Teacher-scoring throughput vs a bare teacher forward, and cache bytes per token per encoding.

Both runs push the same batches (random token ids, the second half of each row as response) through
the same GPT-NeoX teacher; scoring adds the per-token record (target log-prob, UNC, entropy, top-K,
tail mass) and writes safetensors shards in ``--encoding``, as ``score_teacher`` does. The same
records are then written in every encoding, and each one's shard bytes per scored token printed.

    .venv/bin/python benchmarks/scoring_bench.py                      # V=32000, K=64
    .venv/bin/python benchmarks/scoring_bench.py --hidden 1024 --layers 8     # a bigger teacher
    .venv/bin/python benchmarks/scoring_bench.py --vocab 128256 --top-k 128   # Llama 3's vocabulary
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.scoring import STORAGE_DTYPES, TopKCodec, score_batch
from atkd_core.scoring.writer import write_shard

# Every encoding a user can pick, as (name shown, encoding, storage dtype, log-prob bits).
ENCODINGS = (
    ("float, float32 log-probs", "float", "float32", 8),
    ("float, bfloat16 log-probs", "float", "bfloat16", 8),
    ("compact, 8-bit log-probs", "compact", "float32", 8),
    ("compact, 6-bit log-probs", "compact", "float32", 6),
    ("compact, 4-bit log-probs", "compact", "float32", 4),
)


def main() -> None:
    """Time both passes over the same batches and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="teacher width (heads = hidden / 64)")
    parser.add_argument("--layers", type=int, default=4, help="teacher depth")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each; the fastest is shown")
    parser.add_argument("--storage-dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES))
    parser.add_argument("--encoding", default="float", choices=["float", "compact"], help="for the timed run")
    parser.add_argument("--logprob-bits", type=int, default=8, help="for the timed run, with compact")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.length))
        labels = ids.clone()
        labels[:, : args.length // 2] = IGNORE_INDEX
        batches.append((ids, labels))

    def bare() -> None:
        with torch.no_grad():
            for ids, _ in batches:
                model(input_ids=ids).logits.sum()

    def write(
        directory: Path, records: list[dict[str, torch.Tensor]], codec: TopKCodec, first: int = 0
    ) -> int:
        """Write batch ``first + i``'s record as shard ``first + i``; all the directory's shard bytes."""
        for index, record in enumerate(records, first):
            counts = (batches[index][1][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
            write_shard(
                directory, index, [f"ex-{index}-{r}" for r in range(len(counts))], [record], counts, codec
            )
        return sum(p.stat().st_size for p in directory.glob("*.safetensors"))

    timed_codec = TopKCodec(args.encoding, args.top_k, args.vocab, args.storage_dtype, args.logprob_bits)  # type: ignore[arg-type]

    def scored(directory: Path) -> list[dict[str, torch.Tensor]]:
        directory.mkdir()
        records = []
        with torch.no_grad():
            for index, (ids, labels) in enumerate(batches):
                records.append(score_batch(model(input_ids=ids).logits, labels, args.vocab, args.top_k, 1.0))
                write(directory, records[-1:], timed_codec, first=index)
        return records

    bare()  # warm-up
    bare_seconds, scored_seconds = math.inf, math.inf
    with tempfile.TemporaryDirectory() as tmp:
        # Alternated and repeated, the fastest of each: a shared machine's noise only slows a pass.
        for repeat in range(args.repeats):
            start = time.perf_counter()
            bare()
            bare_seconds = min(bare_seconds, time.perf_counter() - start)
            start = time.perf_counter()
            records = scored(Path(tmp) / f"timed-{repeat}")
            scored_seconds = min(scored_seconds, time.perf_counter() - start)
        tokens = sum(len(record["targets"]) for record in records)
        encoded_bytes = {}
        for name, encoding, dtype, bits in ENCODINGS:
            directory = Path(tmp) / name.replace(" ", "_").replace(",", "")
            directory.mkdir()
            codec = TopKCodec(encoding, args.top_k, args.vocab, dtype, bits)  # type: ignore[arg-type]
            encoded_bytes[name] = write(directory, records, codec)
    dense_bytes = args.vocab * 2
    reference = encoded_bytes[ENCODINGS[1][0]]
    positions = args.batches * args.batch_size * args.length
    print(
        f"teacher GPT-NeoX h{args.hidden} L{args.layers}, V={args.vocab}, K={args.top_k}, {args.batches} batches x {args.batch_size} x "
        f"{args.length} tokens, best of {args.repeats}, timed with {args.encoding}, {torch.get_num_threads()} threads"
    )
    print("| measure | value | ratio |")
    print("|---|---|---|")
    print(f"| bare forward | {positions / bare_seconds:,.0f} positions/s | 1.00 |")
    print(
        f"| scoring (forward + record + shards) | {positions / scored_seconds:,.0f} positions/s | "
        f"{bare_seconds / scored_seconds:.2f} of bare |"
    )
    print()
    print(
        f"| cache encoding | bytes per scored token | vs float, bfloat16 | vs a dense bf16 row ({dense_bytes:,} B) |"
    )
    print("|---|---|---|---|")
    for name, size in encoded_bytes.items():
        print(
            f"| {name} | {size / tokens:,.0f} B | {size / reference:.2f} | {size / tokens / dense_bytes:.2%} |"
        )


if __name__ == "__main__":
    main()
