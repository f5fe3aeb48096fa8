"""Multi-process teacher scoring: ``torchrun --nproc_per_node N -m atkd_core.score_main ...``.

Each rank scores its round-robin share of the shards into the shared partial directory; after a
barrier, rank 0 verifies every shard and publishes the cache. Works as well under the DeepSpeed
launcher (it sets the same RANK / WORLD_SIZE / MASTER_* variables).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from atkd_core.manifest import require_manifest
from atkd_core.models.build import load_model
from atkd_core.outputs import PreparedManifest
from atkd_core.scoring import finalize_cache, score_teacher, scoring_spec
from atkd_core.scoring.encoding import ENCODINGS


def main(argv: list[str] | None = None) -> None:
    """Score on this rank, synchronise, and let rank 0 finalise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="teacher save_pretrained directory")
    parser.add_argument("--prepared", type=Path, required=True, help="prepare_data output directory")
    parser.add_argument("--out", type=Path, required=True, help="cache output directory")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--encoding", default="compact", choices=list(ENCODINGS))
    parser.add_argument("--logprob-bits", type=int, default=8, help="compact encoding: bits per log-prob")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--hard-fraction",
        type=lambda text: text if text in ("auto", "epsilon") else float(text),
        default=0.5,
        help="k recorded in the manifest (a number in (0, 1), auto or epsilon)",
    )
    parser.add_argument(
        "--unc-epsilon",
        type=float,
        default=None,
        help="with --hard-fraction epsilon: the easy tokens' UNC bound",
    )
    args = parser.parse_args(argv)

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu"
    manifest = require_manifest(args.prepared, "prepare_data", PreparedManifest)
    spec = scoring_spec(
        args.teacher,
        args.prepared,
        top_k=args.top_k,
        temperature=args.temperature,
        storage_dtype=args.storage_dtype,
        shard_size=args.shard_size,
        encoding=args.encoding,
        logprob_bits=args.logprob_bits,
    )
    model = load_model(args.teacher, device=device)
    score_teacher(
        model, args.prepared, args.out, spec, batch_size=args.batch_size, rank=rank, world_size=world_size
    )
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        result = finalize_cache(
            args.out,
            spec,
            hard_fraction=args.hard_fraction,
            num_examples=manifest.counts["train"].rows,
            unc_epsilon=args.unc_epsilon,
        )
        print(json.dumps({"tokens": result.tokens, "shards": result.num_shards}))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
