"""Stage ``score_teacher``: one no-grad teacher pass over the training split into a verified cache.

Per valid target token (prompt and padding excluded) the cache holds the target id, the target
log-prob, UNC = 1 - p_g, the entropy, the top-K ids and log-probs and the log of the tail mass,
all at the loss temperature: the sparse teacher of :mod:`atkd_core.losses`, so training needs no
teacher in memory and the ATKD split is exact offline.

Layout of the output directory::

    shard-00000.safetensors   examples [start, end) of the training split, flat over their tokens
    shard-00000.sha256        its checksum, written after the shard (a shard without one is unfinished)
    manifest.json             teacher / tokenizer / data identity, K, temperature, dtype, counts,
                              UNC quantiles, shard checksums

Scoring writes into ``<output>.partial`` and renames it when every shard is there, so a killed run
resumes from the shards it finished and nothing half-written is ever read as a cache.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from atkd_core.audit import top_k_problem
from atkd_core.auto_split import auto_split_fields
from atkd_core.config import PipelineConfig
from atkd_core.data.batching import IGNORE_INDEX, collate, shift_targets
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.devices import default_device
from atkd_core.errors import CacheError, ConfigError, faults_named
from atkd_core.losses import SparseTeacher
from atkd_core.manifest import (
    fingerprint,
    publish,
    read_manifest,
    require_manifest,
    sha256_file,
    weight_files_sha256,
    write_manifest,
)
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.progress import Progress

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTILES = (0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9)


@dataclass(frozen=True)
class ScoringSpec:
    """What a cache is made from and how: its identity is the fingerprint of all of it."""

    teacher_dir: str
    teacher_weights_sha256: str
    prepared_data_sha256: str
    tokenizer_sha256: str
    top_k: int
    temperature: float
    storage_dtype: str
    shard_size: int

    def fingerprint(self) -> str:
        """A hex digest of every field except the teacher's location."""
        fields = {k: v for k, v in self.__dict__.items() if k != "teacher_dir"}
        return fingerprint(fields)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over a model directory's weight files (safetensors / bin), the model's identity."""
    digest = weight_files_sha256(model_dir)
    if digest is None:
        raise CacheError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    return digest


def scoring_spec(
    teacher_dir: Path,
    prepared_dir: Path,
    *,
    top_k: int,
    temperature: float,
    storage_dtype: str,
    shard_size: int,
) -> ScoringSpec:
    """The spec of a cache of ``teacher_dir`` over ``prepared_dir`` (identity by content)."""
    manifest = require_manifest(prepared_dir, "prepare_data", PreparedManifest)
    if (problem := top_k_problem(top_k, manifest.vocab_size)) is not None:
        raise ConfigError(problem)
    return ScoringSpec(
        teacher_dir=str(teacher_dir),
        teacher_weights_sha256=weights_sha256(teacher_dir),
        prepared_data_sha256=prepared_data_sha256(prepared_dir),
        tokenizer_sha256=manifest.tokenizer_sha256,
        top_k=top_k,
        temperature=temperature,
        storage_dtype=storage_dtype,
        shard_size=shard_size,
    )


def config_scoring_spec(config: PipelineConfig, teacher_dir: Path, prepared_dir: Path) -> ScoringSpec:
    """The spec of the pipeline config's cache of ``teacher_dir`` over ``prepared_dir``."""
    return scoring_spec(
        teacher_dir,
        prepared_dir,
        top_k=config.scoring.top_k,
        temperature=config.loss.temperature,
        storage_dtype=config.scoring.storage_dtype,
        shard_size=config.scoring.shard_size,
    )


@torch.no_grad()
def score_batch(
    logits: Tensor, labels: Tensor, vocab_size: int, top_k: int, temperature: float
) -> dict[str, Tensor]:
    """Per valid target token of a batch, in row-major order: the cache's fields.

    logits: [B, T, V'] teacher logits; labels: [B, T] prepared labels. Returns flat tensors over
    the n valid targets: targets [n] int32, target_logprob / unc / entropy / log_tail_mass [n]
    float32, topk_ids [n, K] int32, topk_logprobs [n, K] float32.

    Memory-bound over [n, V], so it makes as few vocabulary-sized passes as it can: one copy, one
    fused log-softmax, one exp, top-K and one masked sum.
    """
    targets = shift_targets(labels)
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    target = targets[rows, columns]
    # Rows of the contiguous logits picked by flat index: slicing first would copy all of them.
    flat_logits = logits.reshape(-1, logits.shape[-1])
    chosen = flat_logits.index_select(0, rows * logits.shape[1] + columns)[:, :vocab_size].float()
    if temperature != 1.0:
        chosen.div_(temperature)
    log_p = torch.log_softmax(chosen, -1)
    del chosen
    target_logprob = log_p.gather(-1, target[:, None]).squeeze(-1)
    probs = log_p.exp()
    entropy = -(probs * log_p).sum(-1)
    top = log_p.topk(min(top_k, vocab_size), -1)
    # The tail as a sum of the probabilities outside the top-K (never 1 - sum(top-K), which cancels).
    log_tail = probs.scatter_(-1, top.indices, 0.0).sum(-1).log()
    # UNC = 1 - p_g. When g is in the top-K, sum the other buckets (exact even when p_g rounds to
    # 1); otherwise p_g is at most the K-th probability and 1 - exp(log p_g) loses nothing.
    is_target = top.indices == target[:, None]
    rest_buckets = torch.cat([top.values.masked_fill(is_target, -math.inf), log_tail[:, None]], -1)
    unc = torch.where(is_target.any(-1), rest_buckets.logsumexp(-1).exp(), -torch.expm1(target_logprob))
    return {
        "targets": target.int(),
        "target_logprob": target_logprob,
        "unc": unc,
        "entropy": entropy,
        "topk_ids": top.indices.int(),
        "topk_logprobs": top.values,
        "log_tail_mass": log_tail,
    }


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _write_shard(
    directory: Path,
    index: int,
    ids: list[str],
    parts: list[dict[str, Tensor]],
    counts: list[int],
    dtype: torch.dtype,
) -> str:
    tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    tensors["topk_logprobs"] = tensors["topk_logprobs"].to(dtype)
    tensors["offsets"] = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    path = directory / f"{_shard_name(index)}.safetensors"
    staging = path.with_suffix(".tmp")
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
    ``stop_after_shards`` stops early (simulates a killed run in tests).
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
    dtype = STORAGE_DTYPES[spec.storage_dtype]
    device = next(model.parameters()).device
    progress = Progress(
        sum(min(spec.shard_size, len(dataset) - i * spec.shard_size) for i in todo), log, "score_teacher"
    )
    model.eval()
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
        _write_shard(partial, shard, list(dataset["id"][start:end]), parts, counts, dtype)
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
    output_dir: Path, spec: ScoringSpec, *, hard_fraction: float | str, num_examples: int
) -> CacheManifest:
    """Check every shard of the partial directory, write the manifest and publish it (rank 0)."""
    partial = _partial_dir(output_dir)
    num_shards = math.ceil(num_examples / spec.shard_size)
    checksums, tokens, uncs = {}, 0, []
    for index in range(num_shards):
        digest = _finished_shard(partial, index)
        if digest is None:
            raise CacheError(
                f"{partial}: {_shard_name(index)} is missing or damaged; re-run scoring to redo it"
            )
        checksums[_shard_name(index)] = digest
        with safe_open(str(partial / f"{_shard_name(index)}.safetensors"), "pt") as handle:
            unc = handle.get_tensor("unc")
        tokens += unc.numel()
        uncs.append(unc)
    unc = torch.cat(uncs) if uncs else torch.zeros(0)
    quantiles = {
        f"{q:g}": float(torch.quantile(unc.double(), q)) if unc.numel() else float("nan") for q in QUANTILES
    }
    auto_split = auto_split_fields(unc)
    easy_threshold = (
        auto_split["unc_auto_threshold"]
        if hard_fraction == "auto"
        else quantiles.get(f"{1 - float(hard_fraction):g}")
    )
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
        num_examples=num_examples,
        num_shards=num_shards,
        tokens=tokens,
        shards=checksums,
        shard_bytes=shard_bytes,
        cache_bytes=sum(shard_bytes.values()),
        unc_quantiles=quantiles,
        unc_mean=float(unc.mean()) if unc.numel() else float("nan"),
        hard_fraction=hard_fraction,
        unc_threshold_at_hard_fraction=easy_threshold,
        **auto_split,
    )
    publish(partial, output_dir)
    return manifest


def cache_problem(directory: Path, manifest: CacheManifest, *, check_hashes: bool) -> str | None:
    """What is wrong with a finished cache's shards (missing, another size, another sha256), or None."""
    sizes = manifest.shard_bytes
    for name, digest in sorted(manifest.shards.items()):
        path = directory / f"{name}.safetensors"
        if not path.is_file():
            return f"{name} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {sizes[name]}"
        if check_hashes and sha256_file(path) != digest:
            return f"{name} is corrupt (its sha256 differs from the manifest)"
    return None


def prepared_data_sha256(prepared_dir: Path) -> str:
    """The content hash of a prepared-data output (from its manifest, or computed)."""
    return require_manifest(prepared_dir, "prepare_data", PreparedManifest).content_sha256


class TeacherCache:
    """A verified, loaded teacher cache; hands out SparseTeacher batches aligned with targets."""

    def __init__(self, directory: Path, *, expected: ScoringSpec | None = None):
        """Open ``directory``; with ``expected``, refuse a cache made from anything else."""
        manifest = read_manifest(directory, CacheManifest)
        if manifest is None or manifest.stage != "score_teacher":
            raise CacheError(f"{directory}: not a teacher cache (no score_teacher manifest.json)")
        if expected is not None and manifest.input_fingerprint != expected.fingerprint():
            differs = [
                f"{key}: cache has {manifest.spec.get(key)!r}, expected {value!r}"
                for key, value in expected.__dict__.items()
                if key != "teacher_dir" and manifest.spec.get(key) != value
            ]
            raise CacheError(
                f"{directory}: made for different inputs; "
                + "; ".join(differs)
                + "; score it again for these inputs (`atkd score CONFIG`)"
            )
        self.directory = directory
        self.manifest = manifest
        self.spec = manifest.spec
        self._rows: dict[str, tuple[int, int, int]] = {}
        self._shards: list[dict[str, Tensor]] = []
        problem = cache_problem(directory, manifest, check_hashes=True)
        if problem is not None:
            raise CacheError(f"{directory}: {problem}; `atkd score CONFIG` scores it again")
        for shard_index, name in enumerate(sorted(manifest.shards)):
            path = directory / f"{name}.safetensors"
            with safe_open(str(path), "pt") as handle:
                ids = json.loads(handle.metadata()["example_ids"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            self._shards.append(tensors)
            offsets = tensors["offsets"].tolist()
            for row, example_id in enumerate(ids):
                self._rows[example_id] = (shard_index, offsets[row], offsets[row + 1])

    def __len__(self) -> int:
        return len(self._rows)

    def field(self, example_id: str, name: str) -> Tensor:
        """One cached field of one example, over its valid tokens in order."""
        shard, start, end = self._row(example_id)
        return self._shards[shard][name][start:end]

    def _row(self, example_id: str) -> tuple[int, int, int]:
        if example_id not in self._rows:
            raise CacheError(f"{self.directory}: example {example_id!r} is not in the cache")
        return self._rows[example_id]

    def sparse_teacher(self, example_ids: Sequence[str], targets: Tensor) -> SparseTeacher:
        """The SparseTeacher for a batch whose shifted targets are ``targets`` [B, T].

        Refuses (CacheError) any example whose valid targets differ from the cached ones: a cache
        misaligned with the data would otherwise train on the wrong teacher silently.
        """
        batch, length = targets.shape
        k = self.spec["top_k"]
        target_logprob = torch.zeros(batch, length)
        unc = torch.zeros(batch, length)
        log_tail = torch.zeros(batch, length)
        topk_ids = torch.zeros(batch, length, k, dtype=torch.int32)
        topk_logprobs = torch.zeros(batch, length, k)
        for row, example_id in enumerate(example_ids):
            shard, start, end = self._row(example_id)
            tensors = self._shards[shard]
            positions = (targets[row] != IGNORE_INDEX).nonzero().squeeze(-1).cpu()
            cached_targets = tensors["targets"][start:end]
            if positions.numel() != cached_targets.numel() or not torch.equal(
                targets[row, positions].cpu().int(), cached_targets
            ):
                raise CacheError(
                    f"{self.directory}: example {example_id!r}: the batch's targets differ from the cached ones "
                    f"({positions.numel()} vs {cached_targets.numel()} tokens); the cache was made from other data"
                )
            target_logprob[row, positions] = tensors["target_logprob"][start:end]
            unc[row, positions] = tensors["unc"][start:end]
            log_tail[row, positions] = tensors["log_tail_mass"][start:end]
            topk_ids[row, positions] = tensors["topk_ids"][start:end]
            topk_logprobs[row, positions] = tensors["topk_logprobs"][start:end].float()
        device = targets.device
        return SparseTeacher(
            target_logprob.to(device),
            topk_ids.to(device),
            topk_logprobs.to(device),
            log_tail.to(device),
            unc.to(device),
        )


def run_scoring_stage(
    teacher_dir: Path,
    prepared_dir: Path,
    output_dir: Path,
    *,
    top_k: int,
    temperature: float,
    storage_dtype: str,
    shard_size: int,
    batch_size: int,
    hard_fraction: float | str,
    device: str = "cpu",
    verify_hashes: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[CacheManifest, bool]:
    """The whole single-process stage: reuse an up-to-date, intact cache, else score, finalise;
    (manifest, reused). A cache is intact when every shard is there at its recorded size and, with
    ``verify_hashes``, its sha256; a damaged one is scored again, with a log line saying so."""
    from atkd_core.models.build import load_model

    manifest = require_manifest(prepared_dir, "prepare_data", PreparedManifest)
    spec = scoring_spec(
        teacher_dir,
        prepared_dir,
        top_k=top_k,
        temperature=temperature,
        storage_dtype=storage_dtype,
        shard_size=shard_size,
    )
    existing = read_manifest(output_dir, CacheManifest)
    if existing is not None and existing.input_fingerprint == spec.fingerprint():
        problem = cache_problem(output_dir, existing, check_hashes=verify_hashes)
        if problem is None:
            return existing, True
        log(f"score_teacher: the cache in {output_dir} is damaged ({problem}); scoring it again")
    model = load_model(teacher_dir, device=device)
    score_teacher(model, prepared_dir, output_dir, spec, batch_size=batch_size, log=log)
    return finalize_cache(
        output_dir, spec, hard_fraction=hard_fraction, num_examples=manifest.counts["train"].rows
    ), False


def score_from_config(
    config: PipelineConfig, teacher_dir: Path, prepared_dir: Path, log: Callable[[str], None] = print
) -> tuple[Path, CacheManifest, bool]:
    """The score_teacher stage with the pipeline config's settings into ``<workdir>/teacher_cache``;
    returns (cache directory, manifest, reused)."""
    output = config.layout.teacher_cache
    manifest, reused = run_scoring_stage(
        teacher_dir,
        prepared_dir,
        output,
        top_k=config.scoring.top_k,
        temperature=config.loss.temperature,
        storage_dtype=config.scoring.storage_dtype,
        shard_size=config.scoring.shard_size,
        batch_size=config.scoring.batch_size,
        hard_fraction=config.loss.hard_fraction,
        device=default_device(),
        # Hashing reads the whole cache: worth it when distillation is about to read it anyway.
        verify_hashes=config.distill.teacher_source == "offline",
        log=log,
    )
    return output, manifest, reused
