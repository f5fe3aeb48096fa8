"""The score_teacher stage: reuse an intact cache of these inputs, else score and publish one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from atkd_core.config import PipelineConfig
from atkd_core.devices import default_device
from atkd_core.manifest import (
    MANIFEST_NAME,
    require_manifest,
    up_to_date_manifest,
)
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.progress import Progress
from atkd_core.scoring.reader import cache_problem, remote_cache_problem
from atkd_core.scoring.spec import config_scoring_spec, scoring_spec
from atkd_core.scoring.writer import finalize_cache, score_teacher
from atkd_core.storage import Location, RemoteDirectory


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
    encoding: str = "compact",
    logprob_bits: int = 8,
    hard_fraction: float | str,
    unc_epsilon: float | None = None,
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
        encoding=encoding,
        logprob_bits=logprob_bits,
    )
    existing = up_to_date_manifest(output_dir, CacheManifest, spec.fingerprint())
    if existing is not None:
        problem = cache_problem(output_dir, existing, check_hashes=verify_hashes)
        if problem is None:
            return existing, True
        log(f"score_teacher: the cache in {output_dir} is damaged ({problem}); scoring it again")
    model = load_model(teacher_dir, device=device)
    score_teacher(model, prepared_dir, output_dir, spec, batch_size=batch_size, log=log)
    return finalize_cache(
        output_dir,
        spec,
        hard_fraction=hard_fraction,
        num_examples=manifest.counts["train"].rows,
        unc_epsilon=unc_epsilon,
    ), False


def score_from_config(
    config: PipelineConfig, teacher_dir: Path, prepared_dir: Path, log: Callable[[str], None] = print
) -> tuple[Location, CacheManifest, bool]:
    """The score_teacher stage with the pipeline config's settings into ``<workdir>/teacher_cache``
    and, with ``scoring.location``, uploaded there; returns (where the cache is read from, its
    manifest, reused). A cache at the location made from the same inputs is reused as it is."""
    location = config.scoring.location
    if location is not None:
        spec = config_scoring_spec(config, teacher_dir, prepared_dir)
        remote = up_to_date_manifest(location, CacheManifest, spec.fingerprint())
        if remote is not None:
            problem = remote_cache_problem(RemoteDirectory(location), remote)
            if problem is None:
                return location, remote, True
            log(f"score_teacher: the cache at {location} is damaged ({problem}); it is uploaded again")
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
        encoding=config.scoring.encoding,
        logprob_bits=config.scoring.logprob_bits,
        hard_fraction=config.loss.hard_fraction,
        unc_epsilon=config.loss.unc_epsilon,
        device=default_device(),
        # Hashing reads the whole cache: worth it when distillation is about to read it anyway.
        verify_hashes=config.distill.teacher_source == "offline",
        log=log,
    )
    if location is None:
        return output, manifest, reused
    upload_cache(output, manifest, location, log)
    return location, manifest, False


def upload_cache(
    directory: Path, manifest: CacheManifest, url: str, log: Callable[[str], None] = print
) -> None:
    """Copy the finished cache in ``directory`` to ``url``: any manifest there removed first and
    the manifest uploaded last, so that the URL never holds a finished-looking cache whose shards
    are not all there (a reader takes a cache without a manifest for none)."""
    remote = RemoteDirectory(url)
    remote.remove(MANIFEST_NAME)
    progress = Progress(manifest.num_shards, log, "score_teacher: upload", unit="shards", rate_unit="bytes")
    for name in sorted(manifest.shards):
        remote.upload(directory / f"{name}.safetensors", f"{name}.safetensors")
        progress.update(1, manifest.shard_bytes.get(name, 0))
    remote.upload(directory / MANIFEST_NAME, MANIFEST_NAME)
    progress.close()
    log(
        f"score_teacher: uploaded {directory} to {url} ({manifest.num_shards} shards, {manifest.cache_bytes / 2**20:.1f} MiB)"
    )
