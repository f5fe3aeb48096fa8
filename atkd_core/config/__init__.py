"""The whole pipeline's configuration as pydantic v2 models, one per concern.

Import-light on purpose (pydantic and yaml only): the CLI, the Prefect UI form and the tests load it
without pulling torch. A bad value fails at load with one line per problem naming the field path,
the value and what is allowed (see :func:`format_validation_error`).

- ``base``: StrictModel, the base of every section.
- ``data``: data sources, field maps, prompt templates, the tokenizer.
- ``training``: models, optimizer and DeepSpeed settings, the loss, scoring, distillation.
- ``pipeline``: evaluation, tracking, and ``PipelineConfig``, the whole pipeline.
- ``loading``: YAML, ``--set`` overrides, error messages, YAML output.
"""

from atkd_core.config.base import StrictModel
from atkd_core.config.data import (
    DEFAULT_CONTEXT_TEMPLATE,
    DEFAULT_TEMPLATE,
    EMBEDDED_FAMILIES,
    FIELD_PRESETS,
    DataConfig,
    EmbeddedSuiteConfig,
    FieldMap,
    TokenizerConfig,
)
from atkd_core.config.loading import (
    apply_overrides,
    config_to_yaml,
    format_validation_error,
    load_config,
    read_yaml_mapping,
    set_field,
    validate_config,
)
from atkd_core.config.pipeline import EvalConfig, PipelineConfig, TrackingConfig, resolve_tracking_uri
from atkd_core.config.training import (
    DIVERGENCES,
    DistillConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScoringConfig,
    TrainingConfig,
)
from atkd_core.errors import ConfigError

__all__ = [
    "DEFAULT_CONTEXT_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "DIVERGENCES",
    "EMBEDDED_FAMILIES",
    "FIELD_PRESETS",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EmbeddedSuiteConfig",
    "EvalConfig",
    "FieldMap",
    "FinetuneConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "ScoringConfig",
    "StrictModel",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_to_yaml",
    "format_validation_error",
    "load_config",
    "read_yaml_mapping",
    "resolve_tracking_uri",
    "set_field",
    "validate_config",
]
