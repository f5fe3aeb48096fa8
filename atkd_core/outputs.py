"""What each stage's ``manifest.json`` holds: one typed model per kind of output.

Every manifest has the fields of :class:`atkd_core.manifest.StageManifest` (stage, input
fingerprint, content hash, creation time); each kind below adds its own. Readers get these models
from ``read_manifest(directory, Kind)``, never a dict read by string keys, so a field a stage stops
writing is a type error, not a ``KeyError`` at the end of a run. A manifest that does not parse as
its kind (written by an older version, or damaged) reads as absent: its output is rebuilt.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from atkd_core.manifest import StageManifest


class SplitCounts(BaseModel):
    """One tokenised split: rows kept, tokens, response (label) tokens, and what became of the
    over-long rows (prompt_truncated, context_cut, instruction_cut, response_truncated, skipped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int
    tokens: int
    label_tokens: int
    overlong: dict[str, int]
    # A teacher's own split (teacher.tokenizer): the share of the student's label tokens that sit in
    # spans of one token on each side (None without label tokens).
    matched_share: float | None = None


class PreparedManifest(StageManifest):
    """``prepare_data`` (the user's or the embedded data) or ``generate_teacher_data`` (the
    teacher's responses, SeqKD): tokenised splits and the tokenizer."""

    source: str
    counts: dict[str, SplitCounts]
    vocab_size: int
    tokenizer_sha256: str
    skipped_rows: int = 0
    skipped_examples: list[str] = []
    prompt_template: str | None = None
    context_template: str | None = None
    config: dict[str, Any] | None = None
    teacher: str | None = None
    empty_responses: int = 0


class ModelInitManifest(StageManifest):
    """A preset model's seeded initialisation."""

    preset: str | None
    init_seed: int
    parameters: int


class CacheManifest(StageManifest):
    """``score_teacher``: the sparse teacher cache's identity, shards and UNC statistics."""

    spec: dict[str, Any]
    # 1: float shards (every cache before encodings existed, whose manifests lack the field);
    # 2: compact shards. Each compact shard also names its format (its topk_encoding tensor).
    format_version: int = 1
    num_examples: int
    num_shards: int
    tokens: int
    shards: dict[str, str]
    shard_bytes: dict[str, int]
    cache_bytes: int
    unc_quantiles: dict[str, float]
    unc_mean: float
    hard_fraction: float | str
    unc_threshold_at_hard_fraction: float | None
    unc_histogram: list[int]
    unc_auto_threshold: float
    unc_auto_hard_fraction: float


class TrainedModelManifest(StageManifest):
    """``finetune_teacher`` / ``distill_student``: a model trained by the pipeline. Its content
    hash covers the weights and architecture only (metrics.jsonl carries timings)."""

    objective: str
    steps: int
    final: dict[str, float]
    world_size: int
    train_data_sha256: str


class EvaluationManifest(StageManifest):
    """``evaluate``: the models scored and the report (results, errors, easy / hard analysis, tasks)."""

    models: dict[str, str]
    report: dict[str, Any]
