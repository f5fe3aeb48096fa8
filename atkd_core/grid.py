"""A comparison grid: one base pipeline config, axes of variations, seeds.

``atkd compare`` expands the grid into cells (one pipeline config per axis combination and seed)
and groups the cells that can share data and a teacher. Its statistics, tables, figures and report
are in ``atkd_core.reports``. See docs/architecture.md, "Comparisons".
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from atkd_core.config import (
    PipelineConfig,
    StrictModel,
    apply_overrides,
    format_validation_error,
    read_yaml_mapping,
    resolve_tracking_uri,
    set_field,
    validate_config,
)
from atkd_core.errors import ConfigError

# The objectives of the paper's tables, as config settings. "objective" is the one axis name that
# is not a config field.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "sft": {"loss.objective": "sft"},
    "kd": {"loss.objective": "kd", "loss.divergence": "forward_kl"},
    "atkd": {"loss.objective": "atkd", "loss.setting": "forward"},
    "rkd": {"loss.objective": "kd", "loss.divergence": "reverse_kl"},
    "rkd_atkd": {"loss.objective": "atkd", "loss.setting": "reverse"},
}
OBJECTIVE_AXIS = "objective"


def _distinct_seeds(seeds: list[int]) -> bool:
    """Whether ``seeds`` (at least one) are distinct and >= 0."""
    return len(set(seeds)) == len(seeds) and min(seeds) >= 0


class PrimaryHypothesis(StrictModel):
    """A registered hypothesis: in ``setting``, ``arm`` scores above ``baseline`` (paired by seed)."""

    name: str = Field(min_length=1, description="A short name, e.g. H1.")
    setting: dict[str, Any] = Field(
        description="The setting's axis values, e.g. {testbed: suite, init: scratch}."
    )
    baseline: str = Field(description="The arm compared against.")
    arm: str = Field(description="The arm expected to score higher.")


class LeaderboardConfig(StrictModel):
    """The registered rule a comparison's leaderboard follows (reports/leaderboard.py)."""

    setting_axes: list[str] = Field(
        min_length=1,
        description="The axes whose values make a setting; the objectives are ranked within each.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="Family-wise error rate, Bonferroni-split per family. Range: (0, 1)."
    )
    primary: list[PrimaryHypothesis] = Field(
        default_factory=list, description="The primary hypotheses, tested together."
    )
    defaults: dict[str, str] = Field(
        default_factory=dict,
        description="The product's current default per setting ('axis=value,...' -> arm), kept unless the "
        "best arm is resolved above it.",
    )
    primary_ablation: str | None = Field(
        None,
        description="The ablation whose runs decide the primary hypotheses (e.g. one with more seeds): its "
        "report tests them, and the main grid's and every other ablation's rank their arms; null: the main "
        "grid does both.",
    )


class CompareConfig(StrictModel):
    """A grid of pipeline runs compared side by side."""

    name: str = Field(min_length=1, max_length=60, description="A short name for the comparison's outputs.")
    workdir: Path = Field(
        description="Directory for the comparison: shared data, teachers, one folder per cell."
    )
    base: Path = Field(
        description="The pipeline config every cell starts from (a YAML file; a relative path is relative to this file)."
    )
    base_set: list[str] = Field(
        default_factory=list, description="KEY=VALUE overrides applied to the base config, as with --set."
    )
    axes: dict[str, list[Any]] = Field(
        description=(
            "Ordered axes: a dotted config field (e.g. teacher.preset, loss.lam) or 'objective' "
            f"(one of {sorted(OBJECTIVES)}) -> its values (at least one, no repeats)."
        ),
        min_length=1,
    )
    seeds: list[int] = Field(
        min_length=1, description="Seeds per cell (at least one, no repeats, each >= 0)."
    )
    seed_fields: list[str] = Field(
        default_factory=lambda: ["distill.training.seed", "student.init_seed"],
        min_length=1,
        description="The config fields a seed is written to (the student's data order and init).",
    )
    score_metric: str = Field(
        "rougeL",
        pattern=r"^(rougeL|exact_match)$",
        description="The generation metric averaged over the suite's tasks into a cell's score: rougeL or exact_match.",
    )
    objectives: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "Named arms beside the built-in objectives: name -> dotted config settings, e.g. atkd_auto: "
            "{loss.objective: atkd, loss.hard_fraction: auto}; usable in axes.objective and pairs. A name "
            f"may not be one of {sorted(OBJECTIVES)}."
        ),
    )
    named_values: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description=(
            "Named values of an axis that is not a config field, the way objectives name arms: axis -> "
            "value name -> dotted config settings, e.g. init: {scratch: {distill.sft_warmup_epochs: 0}, "
            "warm: {distill.sft_warmup_epochs: 1}}; the axis's values are then those names."
        ),
    )
    pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(baseline, ATKD) objective pairs whose per-seed differences are reported with a 95% CI.",
    )
    leaderboard: LeaderboardConfig | None = Field(
        None, description="Rank the objectives per setting by a registered rule (reports/leaderboard.py)."
    )
    ablations: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="Named alternative axes, run with `atkd compare CONFIG --ablation NAME` instead of `axes`.",
    )
    ablation_seeds: dict[str, list[int]] = Field(
        default_factory=dict,
        description="An ablation's own seeds where they differ from seeds (e.g. more seeds for the few arms "
        "a primary hypothesis compares); runs it shares with the main grid are reused.",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if not _distinct_seeds(seeds):
            raise ValueError(f"seeds must be distinct and >= 0, got {seeds}")
        return seeds

    @field_validator("ablation_seeds")
    @classmethod
    def _unique_ablation_seeds(cls, seeds: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, values in seeds.items():
            if not values or not _distinct_seeds(values):
                raise ValueError(
                    f"ablation_seeds.{name}: seeds must be given, distinct and >= 0, got {values}"
                )
        return seeds

    @property
    def all_objectives(self) -> dict[str, dict[str, Any]]:
        """The built-in objectives and this comparison's own arms, by name."""
        return {**OBJECTIVES, **self.objectives}

    @model_validator(mode="after")
    def _check_axes(self) -> CompareConfig:
        if clash := sorted(set(self.objectives) & set(OBJECTIVES)):
            raise ValueError(f"objectives: {clash} are built-in objectives; give the arm another name")
        known = sorted(self.all_objectives)
        if OBJECTIVE_AXIS in self.named_values:
            raise ValueError("named_values: objective arms are named under objectives")
        for axes in (self.axes, *self.ablations.values()):
            for name, values in axes.items():
                if not values or len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                    raise ValueError(f"axes.{name}: needs at least one value and no repeats, got {values}")
                if name == OBJECTIVE_AXIS and not set(values) <= set(known):
                    raise ValueError(f"axes.objective: {values} not all in {known}")
                if name in self.named_values and not set(values) <= set(self.named_values[name]):
                    raise ValueError(f"axes.{name}: {values} not all in {sorted(self.named_values[name])}")
        for baseline, atkd in self.pairs:
            if {baseline, atkd} - set(known):
                raise ValueError(f"pairs: ({baseline}, {atkd}) must be objectives from {known}")
        if unknown := sorted(set(self.ablation_seeds) - set(self.ablations)):
            raise ValueError(
                f"ablation_seeds: {unknown} are not ablations; defined: {sorted(self.ablations)}"
            )
        if self.leaderboard is not None:
            self._check_leaderboard(self.leaderboard, known)
        return self

    def _check_leaderboard(self, board: LeaderboardConfig, known: list[str]) -> None:
        if OBJECTIVE_AXIS in board.setting_axes or not set(board.setting_axes) <= set(self.axes):
            raise ValueError(
                f"leaderboard.setting_axes: {board.setting_axes} must be axes other than objective, from "
                f"{sorted(self.axes)}"
            )
        for hypothesis in board.primary:
            if {hypothesis.baseline, hypothesis.arm} - set(known):
                raise ValueError(
                    f"leaderboard.primary {hypothesis.name}: arms must be objectives from {known}"
                )
            if sorted(hypothesis.setting) != sorted(board.setting_axes):
                raise ValueError(
                    f"leaderboard.primary {hypothesis.name}: setting must give {board.setting_axes}, got "
                    f"{sorted(hypothesis.setting)}"
                )
        for label, arm in board.defaults.items():
            if arm not in known:
                raise ValueError(f"leaderboard.defaults {label}: {arm!r} is not an objective from {known}")
        if board.primary_ablation is not None and board.primary_ablation not in self.ablations:
            raise ValueError(
                f"leaderboard.primary_ablation: {board.primary_ablation!r} is not an ablation; defined: "
                f"{sorted(self.ablations)}"
            )


@dataclass
class Cell:
    """One run of the grid: a combination of axis values and a seed."""

    values: dict[str, Any]
    seed: int
    config: PipelineConfig
    data_key: str = ""
    teacher_key: str = ""

    @property
    def label(self) -> str:
        """'axis=value,...' without the seed: the cell of the summary table this run counts in."""
        return ",".join(f"{axis}={value}" for axis, value in self.values.items())


@dataclass
class Grid:
    """The expanded grid: the comparison, its cells and the shared stages' configs."""

    comparison: CompareConfig
    ablation: str | None
    base: PipelineConfig
    cells: list[Cell]
    data_configs: dict[str, PipelineConfig] = field(default_factory=dict)
    teacher_configs: dict[str, PipelineConfig] = field(default_factory=dict)

    @property
    def axes(self) -> dict[str, list[Any]]:
        """The axes this grid runs (an ablation's when one was chosen)."""
        return self.comparison.ablations[self.ablation] if self.ablation else self.comparison.axes

    @property
    def seeds(self) -> list[int]:
        """The seeds this grid runs (an ablation's own, when it has them)."""
        if self.ablation is not None and self.ablation in self.comparison.ablation_seeds:
            return self.comparison.ablation_seeds[self.ablation]
        return self.comparison.seeds

    @property
    def output_dir(self) -> Path:
        """Where the comparison's tables, figures and report go."""
        return self.comparison.workdir / ("report" if self.ablation is None else f"report-{self.ablation}")


def slug(value: Any) -> str:
    """A file-name-safe rendering of an axis value."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-") or "x"


def data_key(config: PipelineConfig) -> str:
    """Cells with the same key share one prepared-data directory: the data, the tokenizer and a
    teacher's own tokenizer (whose tokens are prepared beside the student's) decide it."""
    from atkd_core.manifest import fingerprint

    teacher_tokenizer = config.teacher.tokenizer
    return fingerprint(
        {
            "sections": config.section_hash("data", "tokenizer"),
            "teacher_tokenizer": None
            if teacher_tokenizer is None
            else teacher_tokenizer.model_dump(mode="json"),
        }
    )[:10]


def _teacher_fields(config: PipelineConfig) -> dict[str, Any]:
    """What decides anything under a teacher group's workdir (teacher, SeqKD data, cache)."""
    fields = config.model_dump(mode="json", include={"data", "tokenizer", "teacher", "finetune", "scoring"})
    fields["temperature"] = config.loss.temperature
    if config.distill.data_source == "teacher_generated":
        fields["generation"] = [
            config.distill.generation_max_new_tokens,
            config.distill.generation_temperature,
            config.distill.training.seed,
        ]
    return fields


def teacher_key(config: PipelineConfig) -> str:
    """Cells with the same key share one teacher (and its cache)."""
    from atkd_core.manifest import fingerprint

    return fingerprint(_teacher_fields(config))[:10]


def teacher_label(config: PipelineConfig) -> str:
    """A readable name for a teacher group's folder and runs."""
    name = config.teacher.preset or Path(str(config.teacher.path)).name
    return f"{slug(name)}-{teacher_key(config)}"


def load_grid(path: str | Path, overrides: list[str] | None = None, ablation: str | None = None) -> Grid:
    """Read a comparison YAML, apply ``overrides`` to it, and expand its grid (or the named ablation).

    Every cell's config is validated here, so a bad axis value fails before anything runs, with
    the cell named.
    """
    raw = apply_overrides(read_yaml_mapping(path), overrides or [])
    try:
        comparison = CompareConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path))) from None
    if ablation is not None and ablation not in comparison.ablations:
        raise ConfigError(
            f"{path}: --ablation {ablation!r} is not defined; defined: {sorted(comparison.ablations) or 'none'}"
        )
    if not comparison.base.is_absolute():
        comparison.base = Path(path).parent / comparison.base
    base_raw = apply_overrides(read_yaml_mapping(comparison.base), comparison.base_set)
    # Every run of the grid logs to one store, so the cells nest under the comparison's run: the
    # configured one, else $MLFLOW_TRACKING_URI (a server), else one SQLite store for the whole
    # grid (the pipeline's own fallback is per workdir, i.e. per cell).
    tracking = base_raw.setdefault("tracking", {})
    if not tracking.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # Not frozen when the environment names a server: the cells read it when they run.
        tracking["tracking_uri"] = resolve_tracking_uri(None, comparison.workdir)
    base = validate_config(base_raw, str(comparison.base))
    grid = Grid(comparison=comparison, ablation=ablation, base=base, cells=[])
    names = list(grid.axes)
    for combination in itertools.product(*grid.axes.values()):
        values = dict(zip(names, combination, strict=True))
        for seed in grid.seeds:
            grid.cells.append(_cell(grid, base_raw, values, seed))
    for cell in grid.cells:
        cell.data_key = data_key(cell.config)
        grid.data_configs.setdefault(
            cell.data_key,
            cell.config.model_copy(update={"workdir": comparison.workdir / f"data-{cell.data_key}"}),
        )
        cell.teacher_key = teacher_key(cell.config)
        grid.teacher_configs.setdefault(
            cell.teacher_key,
            cell.config.model_copy(
                update={
                    "workdir": comparison.workdir / "teachers" / teacher_label(cell.config),
                    "eval": cell.config.eval.model_copy(
                        update={"include_teacher": base.eval.include_teacher}
                    ),
                }
            ),
        )
    return grid


def _cell(grid: Grid, base_raw: dict[str, Any], values: dict[str, Any], seed: int) -> Cell:
    settings: dict[str, Any] = {}
    named = grid.comparison.named_values
    for axis, value in values.items():
        if axis == OBJECTIVE_AXIS:
            settings.update(grid.comparison.all_objectives[value])
        elif axis in named:
            settings.update(named[axis][value])
        else:
            settings.update({axis: value})
    settings.update(dict.fromkeys(grid.comparison.seed_fields, seed))
    # A name stands for itself in the cell's path; a number needs its field, or two ablations
    # (k = 0.5 and lam = 0.5) would share a folder and one's checkpoints would meet the other's.
    label = "/".join(
        slug(value) if isinstance(value, str) else f"{axis}={slug(value)}" for axis, value in values.items()
    )
    raw = json.loads(json.dumps(base_raw, default=str))
    for key, value in settings.items():
        set_field(raw, key, value, f"axis {key}")
    name = f"{grid.comparison.name}-{label.replace('/', '-')}-s{seed}"
    raw["name"] = name[:100]
    raw["workdir"] = str(grid.comparison.workdir / "cells" / label / f"seed{seed}")
    tracking = raw.setdefault("tracking", {})
    tracking["run_name"] = f"{label} seed {seed}"
    # One registered model per comparison, a version per run, rather than a model per run.
    tracking["registered_model_name"] = (
        tracking.get("registered_model_name") or f"{grid.comparison.name}-student"
    )
    # The teacher group evaluates its teacher once; every cell repeating it would double the grid's time.
    raw.setdefault("eval", {})["include_teacher"] = False
    source = f"{grid.comparison.base} with {', '.join(f'{k}={v}' for k, v in values.items())}, seed {seed}"
    return Cell(values=values, seed=seed, config=validate_config(raw, source))
