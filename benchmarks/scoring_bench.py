"""Teacher-scoring throughput vs a bare teacher forward, and cache bytes per token vs a dense bf16 row.

Both runs push the same batches (random token ids, the second half of each row as response) through
the same GPT-NeoX teacher; scoring adds the per-token record (target log-prob, UNC, entropy, top-K,
tail mass) and writes safetensors shards, as ``score_teacher`` does.

    .venv/bin/python benchmarks/scoring_bench.py                      # V=32000, K=64
    .venv/bin/python benchmarks/scoring_bench.py --hidden 1024 --layers 8     # a bigger teacher
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from atkd_core.data.batching import IGNORE_INDEX
from atkd_core.scoring import STORAGE_DTYPES, score_batch
from atkd_core.scoring.writer import write_shard


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
    parser.add_argument("--storage-dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES))
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

    def scored(directory: Path) -> int:
        tokens = 0
        with torch.no_grad():
            for index, (ids, labels) in enumerate(batches):
                record = score_batch(model(input_ids=ids).logits, labels, args.vocab, args.top_k, 1.0)
                counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()
                write_shard(
                    directory,
                    index,
                    [f"ex-{index}-{r}" for r in range(len(ids))],
                    [record],
                    counts,
                    STORAGE_DTYPES[args.storage_dtype],
                )
                tokens += int(sum(counts))
        return tokens

    bare()  # warm-up
    start = time.perf_counter()
    bare()
    bare_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokens = scored(Path(tmp))
        scored_seconds = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
    dense_bytes = args.vocab * 2
    positions = args.batches * args.batch_size * args.length
    print(
        f"teacher GPT-NeoX h{args.hidden} L{args.layers}, V={args.vocab}, K={args.top_k}, {args.batches} batches x {args.batch_size} x "
        f"{args.length} tokens, storage {args.storage_dtype}, {torch.get_num_threads()} threads"
    )
    print("| measure | value | ratio |")
    print("|---|---|---|")
    print(f"| bare forward | {positions / bare_seconds:,.0f} positions/s | 1.00 |")
    print(
        f"| scoring (forward + record + shards) | {positions / scored_seconds:,.0f} positions/s | "
        f"{bare_seconds / scored_seconds:.2f} of bare |"
    )
    print(
        f"| cache bytes per scored token | {cache_bytes / tokens:,.0f} B | "
        f"{cache_bytes / tokens / dense_bytes:.2%} of a dense bf16 row ({dense_bytes:,} B) |"
    )


if __name__ == "__main__":
    main()
