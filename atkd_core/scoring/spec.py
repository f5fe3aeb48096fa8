"""What a cache is made from: its spec, whose fingerprint is the cache's identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atkd_core.audit import top_k_problem
from atkd_core.config import PipelineConfig
from atkd_core.errors import CacheError, ConfigError
from atkd_core.manifest import (
    fingerprint,
    require_manifest,
    weight_files_sha256,
)
from atkd_core.outputs import PreparedManifest


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


def prepared_data_sha256(prepared_dir: Path) -> str:
    """The content hash of a prepared-data output (from its manifest, or computed)."""
    return require_manifest(prepared_dir, "prepare_data", PreparedManifest).content_sha256
