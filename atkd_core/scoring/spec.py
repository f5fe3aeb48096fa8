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
from atkd_core.scoring.encoding import TopKCodec


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
    # A spec without these (as every spec was before encodings existed) is a float cache's;
    # scoring_spec() and the config default to compact.
    encoding: str = "float"
    logprob_bits: int = 8

    def fingerprint(self) -> str:
        """A hex digest of every field that shapes the cache's contents (not the teacher's location).

        A float cache leaves out the encoding fields, so caches written before encodings existed
        keep their identity; a compact one leaves out the storage dtype, which it does not use.
        """
        unused = {
            "teacher_dir",
            *(("encoding", "logprob_bits") if self.encoding == "float" else ("storage_dtype",)),
        }
        return fingerprint({k: v for k, v in self.__dict__.items() if k not in unused})

    def codec(self, vocab_size: int) -> TopKCodec:
        """How this cache's shards store the top-K of a ``vocab_size`` vocabulary."""
        return TopKCodec(self.encoding, self.top_k, vocab_size, self.storage_dtype, self.logprob_bits)  # type: ignore[arg-type]


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
    encoding: str = "compact",
    logprob_bits: int = 8,
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
        encoding=encoding,
        logprob_bits=logprob_bits,
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
        encoding=config.scoring.encoding,
        logprob_bits=config.scoring.logprob_bits,
    )


def prepared_data_sha256(prepared_dir: Path) -> str:
    """The content hash of a prepared-data output (from its manifest, or computed)."""
    return require_manifest(prepared_dir, "prepare_data", PreparedManifest).content_sha256
