"""A distillation process's memory against the teacher cache's size, and its read time per batch.

Writes a synthetic cache (random records in the real shard format, through the scoring writer's
own ``write_shard`` and ``finalize_cache``), then, in a fresh process per cache size, opens it with
``TeacherCache`` and reads every example once in batches as distillation does (``sparse_teacher``),
sampling the process's resident memory after opening and after each batch, in its two kinds:

- ``RssAnon``, what the process holds itself: it would grow with the cache if the reader copied
  the shards into memory;
- ``RssFile``, pages of the memory-mapped shard files that reading has touched: page cache, shared
  and clean, which the kernel drops under memory pressure and reads again when needed.

``--store reopen`` opens the directory in a second fresh process after a first, as every later
rank and run does: the first checks every shard's sha256 and records it (``verified.json``), the
second finds the shards unchanged and reads none of them whole.

With ``--store file`` or ``--store s3`` the cache is uploaded (``upload_cache``) and read from a
URL by byte ranges: ``file://`` on this disk, or ``s3://`` on an S3-compatible server (moto) that
the bench starts on 127.0.0.1, which measures the requests' cost, not a real store's latency.

    .venv/bin/python benchmarks/cache_memory_bench.py --tokens 1000000 4000000 8000000
    .venv/bin/python benchmarks/cache_memory_bench.py --tokens 1000000 4000000 --store local reopen
    .venv/bin/python benchmarks/cache_memory_bench.py --tokens 1000000 4000000 --store local file s3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EXAMPLE_TOKENS = 200


def resident_mib() -> tuple[float, float]:
    """This process's (anonymous, file-backed) resident memory in MiB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024  # kB
    if "RssAnon" not in fields:
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")
    return fields["RssAnon"], fields["RssFile"]


def write_cache(directory: Path, tokens: int, top_k: int, vocab: int, storage_dtype: str) -> None:
    """A cache of ``tokens`` random records in examples of EXAMPLE_TOKENS, 1,024 per shard."""
    import torch

    from atkd_core.scoring.encoding import TopKCodec
    from atkd_core.scoring.spec import ScoringSpec
    from atkd_core.scoring.writer import _partial_dir, finalize_cache, write_shard

    examples = tokens // EXAMPLE_TOKENS
    spec = ScoringSpec("synthetic", "0" * 64, "0" * 64, "0" * 64, top_k, 1.0, storage_dtype, 1024)
    partial = _partial_dir(directory)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index, start in enumerate(range(0, examples, spec.shard_size)):
        count = min(spec.shard_size, examples - start)
        n = count * EXAMPLE_TOKENS
        record = {
            "targets": torch.randint(0, vocab, (n,), generator=generator, dtype=torch.int32),
            "target_logprob": -torch.rand(n, generator=generator) * 5,
            "unc": torch.rand(n, generator=generator),
            "entropy": torch.rand(n, generator=generator) * 5,
            "topk_ids": torch.randint(0, vocab, (n, top_k), generator=generator, dtype=torch.int32),
            "topk_logprobs": -torch.rand(n, top_k, generator=generator) * 10,
            "log_tail_mass": -torch.rand(n, generator=generator) * 5,
        }
        ids = [f"ex-{start + i}" for i in range(count)]
        codec = TopKCodec("float", top_k, vocab, storage_dtype)
        write_shard(partial, index, ids, [record], [EXAMPLE_TOKENS] * count, codec)
    finalize_cache(directory, spec, hard_fraction=0.5, num_examples=examples)


def measure(directory: str, batch: int) -> dict[str, float]:
    """In this (fresh) process: resident memory after opening the cache, and the peaks over
    reading every example once in batches of ``batch``."""
    import torch

    from atkd_core.scoring import TeacherCache
    from atkd_core.storage import as_location

    opened = time.perf_counter()
    cache = TeacherCache(as_location(directory))
    open_seconds = time.perf_counter() - opened
    anon, file_backed = resident_mib()
    figures = {"open_anon": anon, "open_file": file_backed, "peak_anon": anon, "peak_file": file_backed}
    ids = list(cache._rows)
    reading = time.perf_counter()
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        targets = torch.stack([cache.field(example_id, "targets").long() for example_id in chunk])
        # Shifted targets as collate lays them out: the example's tokens after its first position.
        cache.sparse_teacher(chunk, torch.cat([targets, torch.full((len(chunk), 1), -100)], 1))
        anon, file_backed = resident_mib()
        figures["peak_anon"] = max(figures["peak_anon"], anon)
        figures["peak_file"] = max(figures["peak_file"], file_backed)
    batches = -(-len(ids) // batch)
    return {
        **figures,
        "cache_mib": cache.manifest.cache_bytes / 2**20,
        "open_s": open_seconds,
        "batch_ms": 1000 * (time.perf_counter() - reading) / batches,
    }


def s3_server() -> tuple[object, dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with an empty bucket ``bench``; (server, the environment that
    points an S3 client at it)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    s3fs.S3FileSystem().mkdir("bench")
    return server, env


def place(directory: Path, store: str, tmp: Path) -> str:
    """Where the bench reads the cache in ``directory`` from: itself, or a URL it is uploaded to."""
    if store in ("local", "reopen"):
        return str(directory)
    from atkd_core.manifest import read_manifest
    from atkd_core.outputs import CacheManifest
    from atkd_core.scoring.stage import upload_cache

    url = f"file://{tmp}/uploaded" if store == "file" else f"s3://bench/{directory.parent.name}"
    manifest = read_manifest(directory, CacheManifest)
    assert manifest is not None
    upload_cache(directory, manifest, url, log=lambda _: None)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--storage-dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8, help="examples per batch")
    parser.add_argument(
        "--store",
        nargs="+",
        choices=("local", "reopen", "file", "s3"),
        default=["local"],
        help="read the cache from its directory (local), from it again after a first open (reopen), "
        "a file:// URL, or s3:// on a loopback moto server",
    )
    parser.add_argument("--measure", metavar="LOCATION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch)))
        return
    server, env = s3_server() if "s3" in args.store else (None, {})
    print(
        "| cache tokens | cache MiB | read from | open (s) | ms per batch | RssAnon after open | RssAnon peak | "
        "RssFile after open | RssFile peak (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for tokens in args.tokens:
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp) / "cache"
                write_cache(directory, tokens, args.top_k, args.vocab, args.storage_dtype)
                for store in args.store:
                    location = place(directory, store, Path(tmp))
                    command = [sys.executable, __file__, "--measure", location, "--batch", str(args.batch)]
                    opens = 2 if store == "reopen" else 1
                    for _ in range(opens):
                        out = subprocess.run(
                            command, check=True, capture_output=True, text=True, env={**os.environ, **env}
                        ).stdout
                    f = json.loads(out.strip().splitlines()[-1])
                    print(
                        f"| {tokens:,} | {f['cache_mib']:,.0f} | {store} | {f['open_s']:.2f} | {f['batch_ms']:.1f} | "
                        f"{f['open_anon']:,.0f} | {f['peak_anon']:,.0f} | {f['open_file']:,.0f} | {f['peak_file']:,.0f} |"
                    )
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
