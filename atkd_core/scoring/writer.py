"""Scoring: the teacher's pass over the training split, shard by shard, resumable, then published."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from datasets import load_from_disk
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from atkd_core.auto_split import auto_split_fields
from atkd_core.data.batching import IGNORE_INDEX, collate, shift_targets
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.errors import CacheError, faults_named
from atkd_core.losses.uncertainty import UncStatistics, epsilon_threshold
from atkd_core.manifest import (
    fingerprint,
    publish,
    require_manifest,
    sha256_file,
    write_manifest,
)
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.progress import Progress
from atkd_core.scoring.encoding import ENCODING_TENSOR, FORMAT_VERSION, TopKCodec
from atkd_core.scoring.spec import ScoringSpec

QUANTILES = (0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9)


# Logits scored together, by device type. On a CPU, 2^21 float32 values (8 MiB) stay in cache
# between the record's passes. On a GPU, smaller chunks would cost a dozen kernel launches each;
# 2^26 values (256 MiB per temporary) bound the memory the record adds to the logits'.
RECORD_CHUNK_VALUES = {"cpu": 1 << 21}
GPU_RECORD_CHUNK_VALUES = 1 << 26


def score_batch(
    logits: Tensor, labels: Tensor, vocab_size: int, top_k: int, temperature: float
) -> dict[str, Tensor]:
    """Per valid target token of a batch, in row-major order: the cache's fields.

    logits: [B, T, V'] teacher logits; labels: [B, T] prepared labels. Returns flat tensors over
    the n valid targets: targets [n] int32, target_logprob / unc / entropy / log_tail_mass [n]
    float32, topk_ids [n, K] int32, topk_logprobs [n, K] float32.

    Memory-bound over [n, V], so it works on chunks of rows small enough to stay in cache and
    makes as few vocabulary-sized passes per chunk as it can (see :func:`_record_rows`).
    """
    targets = shift_targets(labels)
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    target = targets[rows, columns]
    # Rows of the contiguous logits picked by flat index: slicing first would copy all of them.
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = rows * logits.shape[1] + columns
    step = max(1, RECORD_CHUNK_VALUES.get(logits.device.type, GPU_RECORD_CHUNK_VALUES) // vocab_size)
    # One empty chunk when no target is valid, so that the record still has every field.
    parts = [
        _record_rows(
            flat_logits.index_select(0, flat_index[start : start + step])[:, :vocab_size].float(),
            target[start : start + step],
            min(top_k, vocab_size),
            temperature,
        )
        for start in range(0, max(len(target), 1), step)
    ]
    record = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    record["targets"] = target.int()
    return record


def _record_rows(chosen: Tensor, target: Tensor, top_k: int, temperature: float) -> dict[str, Tensor]:
    """The record of m rows: chosen [m, V] float32 logits (overwritten), target [m] ids.

    Passes over [m, V]: one top-K (whose first value is the row's maximum), one in-place shift by
    it, one exp (the only one), one sum, one dot product for the entropy and one masked sum for
    the tail. With Z = sum(exp(x - max)): log p = x - max - log Z, H = log Z - sum(e (x - max)) / Z.
    """
    if temperature != 1.0:
        chosen.div_(temperature)
    top = chosen.topk(top_k, -1)
    shifted = chosen.sub_(top.values[:, :1])
    exps = shifted.exp()
    normalizer = exps.sum(-1)
    log_normalizer = normalizer.log()
    # A batched dot product: several times faster on a CPU than vecdot or (a * b).sum(-1).
    entropy = log_normalizer - torch.einsum("nv,nv->n", exps, shifted) / normalizer
    target_logprob = shifted.gather(-1, target[:, None]).squeeze(-1) - log_normalizer
    topk_logprobs = top.values - top.values[:, :1] - log_normalizer[:, None]
    # The tail as a sum of the probabilities outside the top-K (never 1 - sum(top-K), which cancels).
    log_tail = exps.scatter_(-1, top.indices, 0.0).sum(-1).log() - log_normalizer
    # UNC = 1 - p_g. When g is in the top-K, sum the other buckets (exact even when p_g rounds to
    # 1); otherwise p_g is at most the K-th probability and 1 - exp(log p_g) loses nothing.
    is_target = top.indices == target[:, None]
    rest_buckets = torch.cat([topk_logprobs.masked_fill(is_target, -math.inf), log_tail[:, None]], -1)
    unc = torch.where(is_target.any(-1), rest_buckets.logsumexp(-1).exp(), -torch.expm1(target_logprob))
    return {
        "target_logprob": target_logprob,
        "unc": unc,
        "entropy": entropy,
        "topk_ids": top.indices.int(),
        "topk_logprobs": topk_logprobs,
        "log_tail_mass": log_tail,
    }


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(
    directory: Path,
    index: int,
    ids: list[str],
    parts: list[dict[str, Tensor]],
    counts: list[int],
    codec: TopKCodec,
) -> str:
    """Write one shard: the examples ``ids`` whose ``counts`` scored tokens are the concatenated
    records ``parts`` (score_batch's fields), the top-K stored by ``codec``; return its sha256."""
    tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    tensors.update(
        codec.encode(tensors.pop("topk_ids"), tensors.pop("topk_logprobs"), tensors.pop("entropy"))
    )
    tensors["offsets"] = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    path = directory / f"{_shard_name(index)}.safetensors"
    staging = path.with_suffix(".tmp")
    if codec.encoding != "float":
        # Format 1 shards carry no such tensor, so a float cache is byte for byte what it always was.
        tensors[ENCODING_TENSOR] = codec.as_tensor()
    with faults_named(staging):
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(staging),
            metadata={"example_ids": json.dumps(ids)},
        )
    staging.rename(path)
    digest = sha256_file(path)
    # The checksum file is written last: its presence marks a finished shard.
    (directory / f"{_shard_name(index)}.sha256").write_text(digest + "\n")
    return digest


def _finished_shard(directory: Path, index: int) -> str | None:
    """The checksum of a finished, intact shard, or None (then it is redone)."""
    path = directory / f"{_shard_name(index)}.safetensors"
    checksum = directory / f"{_shard_name(index)}.sha256"
    if not (path.is_file() and checksum.is_file()):
        return None
    digest = checksum.read_text().strip()
    return digest if sha256_file(path) == digest else None


@torch.no_grad()
def score_teacher(
    model: torch.nn.Module,
    prepared_dir: Path,
    output_dir: Path,
    spec: ScoringSpec,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
    stop_after_shards: int | None = None,
) -> None:
    """Score this rank's shards of the training split into ``output_dir``'s partial directory.

    Shards are dealt round-robin to ranks; every rank writes its own into the shared partial
    directory. The caller synchronises ranks before rank 0 calls :func:`finalize_cache`.
    ``stop_after_shards`` stops early (simulates a killed run in tests). Without autograd: a
    record that kept its graph would hold every batch's activations until its shard is written.
    """
    dataset = load_from_disk(str(prepared_dir / "dataset"))["train"]
    tokenizer_vocab = require_manifest(prepared_dir, "prepare_data", PreparedManifest).vocab_size
    pad_id = load_tokenizer(prepared_dir / "tokenizer").pad_token_id
    partial = _partial_dir(output_dir)
    _claim_partial(partial, spec, rank)
    num_shards = math.ceil(len(dataset) / spec.shard_size)
    mine = [i for i in range(num_shards) if i % world_size == rank]
    todo = [i for i in mine if _finished_shard(partial, i) is None]
    if len(todo) < len(mine):
        log(f"score_teacher: rank {rank} resumes, {len(mine) - len(todo)} of {len(mine)} shards already done")
    codec = spec.codec(tokenizer_vocab)
    device = next(model.parameters()).device
    progress = Progress(
        sum(min(spec.shard_size, len(dataset) - i * spec.shard_size) for i in todo), log, "score_teacher"
    )
    model.eval()
    # Shards are encoded and written on a second thread while the teacher scores the next one, so
    # the forward never waits on the disk; at most one shard is in flight (two shards' records in
    # memory), and a write's error surfaces here, before the next shard is handed over.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        in_flight: Future[str] | None = None
        for written, shard in enumerate(todo):
            if stop_after_shards is not None and written >= stop_after_shards:
                break
            start, end = shard * spec.shard_size, min((shard + 1) * spec.shard_size, len(dataset))
            parts, counts = [], []
            for batch_start in range(start, end, batch_size):
                rows = dataset.select(range(batch_start, min(batch_start + batch_size, end)))
                batch = collate(list(rows), pad_id)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                labels = batch["labels"].to(device)
                record = score_batch(logits, labels, tokenizer_vocab, spec.top_k, spec.temperature)
                parts.append({k: v.cpu() for k, v in record.items()})
                per_row = (shift_targets(labels) != IGNORE_INDEX).sum(-1).tolist()
                counts.extend(per_row)
                progress.update(len(rows), int(sum(per_row)))
            if in_flight is not None:
                in_flight.result()
            ids = list(dataset["id"][start:end])
            in_flight = writer.submit(write_shard, partial, shard, ids, parts, counts, codec)
        if in_flight is not None:
            in_flight.result()
    progress.close()


def _partial_dir(output_dir: Path) -> Path:
    return output_dir.parent / f"{output_dir.name}.partial"


def _claim_partial(partial: Path, spec: ScoringSpec, rank: int) -> None:
    """Keep a partial directory made for the same spec (resume); start afresh otherwise."""
    stamp = partial / "spec.json"
    if rank == 0:
        if partial.exists() and (
            not stamp.is_file() or json.loads(stamp.read_text()).get("fingerprint") != spec.fingerprint()
        ):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"fingerprint": spec.fingerprint(), **spec.__dict__}, indent=2))
    else:
        deadline = time.time() + 600
        while not (
            stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == spec.fingerprint()
        ):
            if time.time() > deadline:
                raise CacheError(f"rank {rank}: rank 0 did not prepare {partial} within 600 s")
            time.sleep(0.2)


def finalize_cache(
    output_dir: Path,
    spec: ScoringSpec,
    *,
    hard_fraction: float | str,
    num_examples: int,
    unc_epsilon: float | None = None,
) -> CacheManifest:
    """Check every shard of the partial directory, write the manifest and publish it (rank 0).
    ``hard_fraction`` (with ``unc_epsilon`` for ``epsilon``) is the split the manifest records the
    threshold of."""
    partial = _partial_dir(output_dir)
    num_shards = math.ceil(num_examples / spec.shard_size)
    checksums: dict[str, str] = {}
    statistics = UncStatistics()
    for index in range(num_shards):
        digest = _finished_shard(partial, index)
        if digest is None:
            raise CacheError(
                f"{partial}: {_shard_name(index)} is missing or damaged; re-run scoring to redo it"
            )
        checksums[_shard_name(index)] = digest
        with safe_open(str(partial / f"{_shard_name(index)}.safetensors"), "pt") as handle:
            statistics.add(handle.get_tensor("unc"))
    quantiles = {f"{q:g}": statistics.quantile(q) for q in QUANTILES}
    auto_split = auto_split_fields(statistics.histogram)
    if hard_fraction == "auto":
        easy_threshold = auto_split["unc_auto_threshold"]
    elif hard_fraction == "epsilon":
        easy_threshold = epsilon_threshold(unc_epsilon)
    else:
        easy_threshold = quantiles.get(f"{1 - float(hard_fraction):g}")
    (partial / "spec.json").unlink(missing_ok=True)
    shard_bytes = {name: (partial / f"{name}.safetensors").stat().st_size for name in checksums}
    manifest = write_manifest(
        partial,
        CacheManifest,
        stage="score_teacher",
        input_fingerprint=spec.fingerprint(),
        # The shards' checksums are their contents: what is made from the cache depends on these.
        content_sha256=fingerprint(checksums),
        spec=spec.__dict__,
        format_version=FORMAT_VERSION[spec.encoding],
        num_examples=num_examples,
        num_shards=num_shards,
        tokens=statistics.tokens,
        shards=checksums,
        shard_bytes=shard_bytes,
        cache_bytes=sum(shard_bytes.values()),
        unc_quantiles=quantiles,
        unc_mean=statistics.mean(),
        hard_fraction=hard_fraction,
        unc_threshold_at_hard_fraction=easy_threshold,
        **auto_split,
    )
    publish(partial, output_dir)
    return manifest
