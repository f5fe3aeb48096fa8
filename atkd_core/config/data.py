"""Where the data comes from and how it becomes tokenised examples; the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from atkd_core.config.base import NON_EMPTY_STRING, StrictModel, cross_field_rules, when
from atkd_core.errors import ConfigError

EMBEDDED_FAMILIES = ("uppercase", "reverse", "sort", "count", "add", "recall", "compose", "choose")


class EmbeddedSuiteConfig(StrictModel):
    """The deterministic synthetic instruction suite that the demo runs on (no network)."""

    seed: int = Field(0, ge=0, description="Seed of the generator; same seed, same bytes. Range: >= 0.")
    train_size: int = Field(2400, ge=8, le=1_000_000, description="Training examples. Range: 8..1e6.")
    validation_size: int = Field(240, ge=8, le=100_000, description="Validation examples. Range: 8..1e5.")
    test_size: int = Field(240, ge=8, le=100_000, description="Test examples. Range: 8..1e5.")
    families: list[Literal[EMBEDDED_FAMILIES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(EMBEDDED_FAMILIES),
        min_length=1,
        description=f"Task families to include, drawn in equal shares. Allowed: {', '.join(EMBEDDED_FAMILIES)}.",
    )


class FieldMap(StrictModel):
    """Which JSON fields hold the instruction, its optional context, the response and a category."""

    instruction: str = Field("instruction", min_length=1, description="Field with the instruction text.")
    context: str | None = Field("context", description="Field with optional context/input; null for none.")
    response: str = Field("response", min_length=1, description="Field with the reference response.")
    category: str | None = Field("category", description="Field with a category label; null for none.")


FIELD_PRESETS: dict[str, FieldMap] = {
    "dolly": FieldMap(instruction="instruction", context="context", response="response", category="category"),
    "alpaca": FieldMap(instruction="instruction", context="input", response="output", category=None),
}

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_CONTEXT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"


class DataConfig(StrictModel):
    """Where the instruction data comes from and how it becomes token ids and labels."""

    model_config = cross_field_rules(
        when(
            "source",
            ("files",),
            {"properties": {"train_files": {"minItems": 1}}, "required": ["train_files"]},
        ),
        when("source", ("hub",), {"properties": {"hub_name": NON_EMPTY_STRING}, "required": ["hub_name"]}),
        when(
            "field_preset",
            ("custom",),
            {"properties": {"fields": {"type": "object"}}, "required": ["fields"]},
        ),
    )

    source: Literal["embedded", "files", "hub"] = Field(
        "embedded",
        description="embedded: the synthetic suite; files: local JSONL/JSON/Parquet/CSV; hub: a datasets name.",
    )
    embedded: EmbeddedSuiteConfig = Field(
        default_factory=EmbeddedSuiteConfig, description="The synthetic suite."
    )
    train_files: list[Path] = Field(default_factory=list, description="Training files (source=files).")
    validation_files: list[Path] = Field(default_factory=list, description="Validation files (source=files).")
    test_files: list[Path] = Field(default_factory=list, description="Test files (source=files).")
    hub_name: str | None = Field(None, description="A datasets name or local dataset script (source=hub).")
    field_preset: Literal["dolly", "alpaca", "custom"] = Field(
        "dolly",
        description="Field names: dolly (instruction/context/response), alpaca (instruction/input/output), custom.",
    )
    fields: FieldMap | None = Field(None, description="The field mapping when field_preset is custom.")
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt without context; must contain {instruction}."
    )
    context_template: str = Field(
        DEFAULT_CONTEXT_TEMPLATE, description="Prompt with context; must contain {instruction} and {context}."
    )
    max_length: int = Field(
        128, ge=16, le=32768, description="Tokens per example after truncation. Range: 16..32768."
    )
    holdout_fraction: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Share of train held out for a split given no files of its own. Range: (0, 0.5).",
    )
    holdout_seed: int = Field(0, ge=0, description="Seed of that hold-out. Range: >= 0.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A malformed or unusable row: fail naming file/line/field, or skip and count it."
    )
    on_overlong: Literal["truncate_prompt", "truncate", "skip", "error"] = Field(
        "truncate_prompt",
        description=(
            "An example longer than max_length. truncate_prompt: drop the middle of the prompt (its "
            "start, with the instruction, and its end, with the response marker, stay), down to "
            "min_prompt_tokens; a response that still does not fit with its EOS skips the row. "
            "truncate: the same, then cut the response (its EOS is then not trained). skip: skip every "
            "over-long row. error: fail naming the first one. Every case is counted in the manifest."
        ),
    )
    min_prompt_tokens: int = Field(
        16,
        ge=1,
        le=32767,
        description="The fewest prompt tokens truncation keeps. Range: 1..32767, below data.max_length.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError("data.train_files: must name at least one file when data.source is 'files'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name: must be set when data.source is 'hub'")
        if self.field_preset == "custom" and self.fields is None:
            raise ValueError("data.fields: must be set when data.field_preset is 'custom'")
        if self.min_prompt_tokens >= self.max_length:
            raise ValueError(
                f"data.min_prompt_tokens: {self.min_prompt_tokens} leaves no room for a response within "
                f"data.max_length={self.max_length}; allowed: 1..{self.max_length - 1}"
            )
        if "{instruction}" not in self.prompt_template:
            raise ValueError("data.prompt_template: must contain {instruction}")
        if "{instruction}" not in self.context_template or "{context}" not in self.context_template:
            raise ValueError("data.context_template: must contain {instruction} and {context}")
        return self

    def field_map(self) -> FieldMap:
        """The effective field mapping (the preset's, or the custom one)."""
        if self.field_preset != "custom":
            return FIELD_PRESETS[self.field_preset]
        # Validated at load; a config changed in code afterwards can still lack it.
        if self.fields is None:
            raise ConfigError("data.fields: must be set when data.field_preset is 'custom'")
        return self.fields


class TokenizerConfig(StrictModel):
    """The tokenizer: trained locally on the data (embedded default) or loaded from a model/directory."""

    model_config = cross_field_rules(
        when("source", ("path",), {"properties": {"path": NON_EMPTY_STRING}, "required": ["path"]}),
    )

    source: Literal["train", "teacher", "path"] = Field(
        "train", description="train: BPE trained on the training split; teacher: the teacher's; path: `path`."
    )
    path: str | None = Field(None, description="Tokenizer directory or hub id when source is 'path'.")
    vocab_size: int = Field(
        2048, ge=300, le=262_144, description="BPE vocabulary size when trained. Range: 300..262144."
    )
    pad_to: int | None = Field(
        None,
        ge=300,
        le=262_144,
        description="Pad a trained tokenizer with unused tokens up to this size: the memory shape of a real "
        "vocabulary (e.g. Pythia's 50304) on the embedded data. Range: 300..262144, >= vocab_size, or null.",
    )

    @model_validator(mode="after")
    def _check_path(self) -> TokenizerConfig:
        if self.source == "path" and not self.path:
            raise ValueError("tokenizer.path: must be set when tokenizer.source is 'path'")
        if self.pad_to is not None and (self.source != "train" or self.pad_to < self.vocab_size):
            raise ValueError(
                f"tokenizer.pad_to: {self.pad_to} needs tokenizer.source 'train' and at least tokenizer.vocab_size "
                f"({self.vocab_size})"
            )
        return self
