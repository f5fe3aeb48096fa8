"""Config values whose allowed range depends on an input, checked as soon as that input is known.

The config alone cannot say whether ``scoring.top_k: 500`` fits: that depends on the tokenizer.
Once the prepared data exists, its tokenizer, its training rows and the models' configs are known,
so every such value is checked there, before a teacher is fine-tuned or scored, and each one that
cannot run is a line naming the field, its value and the limit. Audited:

- ``scoring.top_k`` against the tokenizer's vocabulary (more columns than tokens cannot be stored);
- ``data.max_length`` against each model's positions (a preset's table, a directory's config.json);
- ``finetune.training.batch_size`` (when fine-tuning) and ``distill.training.batch_size`` against
  the training rows: an optimizer step takes one whole global batch.

``micro_batch_size`` against processes and ``batch_size`` is checked when the config is loaded
(``TrainingConfig``), as is ``data.max_length`` against a preset's positions.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from atkd_core.config import ModelConfig, PipelineConfig
from atkd_core.data.prepare import teacher_prepared_dir
from atkd_core.errors import ConfigError
from atkd_core.manifest import require_manifest
from atkd_core.models.presets import PRESETS
from atkd_core.outputs import PreparedManifest

# Where transformers' configs of the common families keep their context length.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def top_k_problem(top_k: int, vocab_size: int) -> str | None:
    """The line refusing ``scoring.top_k`` over a vocabulary of ``vocab_size`` tokens, or None."""
    if top_k <= vocab_size:
        return None
    return (
        f"scoring.top_k: {top_k} is over the tokenizer's vocabulary of {vocab_size} tokens; "
        f"set it to at most {vocab_size}"
    )


def model_positions(spec: ModelConfig) -> tuple[int, str] | None:
    """(the longest sequence ``spec``'s model takes, where that number comes from), or None when its
    config names no limit."""
    if spec.preset is not None:
        return PRESETS[spec.preset][1].max_positions, f"preset {spec.preset}"
    config = AutoConfig.from_pretrained(str(spec.path), trust_remote_code=spec.trust_remote_code)
    return config_positions(config.to_dict(), str(spec.path))


def config_positions(config_json: dict, where: str) -> tuple[int, str] | None:
    """(the context length a model's config.json gives, which field of ``where`` gives it), or None."""
    for name in _POSITION_FIELDS:
        value = config_json.get(name)
        if isinstance(value, int) and value > 0:
            return value, f"{name} in {where}'s config"
    return None


def max_length_problem(max_length: int, role: str, positions: tuple[int, str] | None) -> str | None:
    """The line refusing ``data.max_length`` over the ``role`` model's ``positions``, or None."""
    if positions is None or max_length <= positions[0]:
        return None
    return (
        f"data.max_length: {max_length} is over the {role}'s {positions[0]} positions "
        f"({positions[1]}); set it to at most {positions[0]}"
    )


def audit_prepared(config: PipelineConfig, prepared_dir: Path) -> None:
    """Refuse (ConfigError, one line per problem) every audited value that cannot run on the
    prepared data in ``prepared_dir`` and the configured models."""
    manifest = require_manifest(prepared_dir, "prepare_data", PreparedManifest)
    # The cache is in the teacher's vocabulary: its own, when it has its own tokenizer.
    scored = require_manifest(teacher_prepared_dir(config, prepared_dir), "prepare_data", PreparedManifest)
    problems = [top_k_problem(config.scoring.top_k, scored.vocab_size)]
    for role, spec in (("teacher", config.teacher), ("student", config.student)):
        problems.append(max_length_problem(config.data.max_length, role, model_positions(spec)))
    rows = manifest.counts["train"].rows
    trainings = [("distill", config.distill.training)]
    if config.finetune.enabled:
        trainings.insert(0, ("finetune", config.finetune.training))
    for section, training in trainings:
        if training.batch_size > rows:
            problems.append(
                f"{section}.training.batch_size: {training.batch_size} is over the {rows} training rows of "
                f"{prepared_dir}, so no optimizer step can be taken; set it to at most {rows} (a multiple "
                f"of micro_batch_size x processes = {training.micro_batch_size * training.world_size})"
            )
    found = [problem for problem in problems if problem is not None]
    if found:
        raise ConfigError("\n".join(found))
