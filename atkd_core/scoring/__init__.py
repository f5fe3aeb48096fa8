"""Stage ``score_teacher``: one no-grad teacher pass over the training split into a verified cache.

Per valid target token (prompt and padding excluded) the cache holds the target id, the target
log-prob, UNC = 1 - p_g, the entropy, the top-K ids and log-probs and the log of the tail mass,
all at the loss temperature: the sparse teacher of :mod:`atkd_core.losses`, so training needs no
teacher in memory and the ATKD split is exact offline. ``encoding`` says how a shard stores the
top-K: exactly (``float``) or in about half the bytes (``compact``: Elias-Fano ids, quantised
log-probs).

Layout of the output directory::

    shard-00000.safetensors   examples [start, end) of the training split, flat over their tokens
    shard-00000.sha256        its checksum, written after the shard (a shard without one is unfinished)
    manifest.json             teacher / tokenizer / data identity, K, temperature, dtype, counts,
                              UNC quantiles, shard checksums
    verified.json             written by readers: each shard's size and time when its checksum
                              was last checked, so that an unchanged shard is not hashed again

Scoring writes into ``<output>.partial`` and renames it when every shard is there, so a killed run
resumes from the shards it finished and nothing half-written is ever read as a cache.

- ``spec``: ``ScoringSpec``, the identity of a cache (teacher weights, data, tokenizer, K, T, dtype).
- ``encoding``: ``TopKCodec``, a shard's top-K encoding (named in each shard).
- ``writer``: ``score_teacher`` (one rank's shards) and ``finalize_cache`` (check, manifest, publish).
- ``reader``: ``TeacherCache``, a verified cache handing out ``SparseTeacher`` batches.
- ``stage``: ``run_scoring_stage`` / ``score_from_config``, the stage with reuse.
"""

from atkd_core.scoring.encoding import ENCODINGS, STORAGE_DTYPES, TopKCodec
from atkd_core.scoring.reader import TeacherCache, cache_problem
from atkd_core.scoring.spec import (
    ScoringSpec,
    config_scoring_spec,
    prepared_data_sha256,
    scoring_spec,
    weights_sha256,
)
from atkd_core.scoring.stage import run_scoring_stage, score_from_config
from atkd_core.scoring.writer import QUANTILES, finalize_cache, score_batch, score_teacher

__all__ = [
    "ENCODINGS",
    "QUANTILES",
    "STORAGE_DTYPES",
    "ScoringSpec",
    "TeacherCache",
    "TopKCodec",
    "cache_problem",
    "config_scoring_spec",
    "finalize_cache",
    "prepared_data_sha256",
    "run_scoring_stage",
    "score_batch",
    "score_from_config",
    "score_teacher",
    "scoring_spec",
    "weights_sha256",
]
