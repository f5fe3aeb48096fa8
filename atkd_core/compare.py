"""A comparison grid: one base pipeline config, axes of variations, seeds; and its statistics.

``atkd compare`` expands the grid into cells (one pipeline config per axis combination and seed),
groups the cells that can share data and a teacher, and — once every cell has been evaluated —
summarises the scores per cell as mean ± std over seeds, with paired ATKD − baseline differences.
"""

from __future__ import annotations

import itertools
import json
import math
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
    pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(baseline, ATKD) objective pairs whose per-seed differences are reported with a 95% CI.",
    )
    ablations: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="Named alternative axes, run with `atkd compare CONFIG --ablation NAME` instead of `axes`.",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check_axes(self) -> CompareConfig:
        for axes in (self.axes, *self.ablations.values()):
            for name, values in axes.items():
                if not values or len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                    raise ValueError(f"axes.{name}: needs at least one value and no repeats, got {values}")
                if name == OBJECTIVE_AXIS and not set(values) <= set(OBJECTIVES):
                    raise ValueError(f"axes.objective: {values} not all in {sorted(OBJECTIVES)}")
        for baseline, atkd in self.pairs:
            if {baseline, atkd} - set(OBJECTIVES):
                raise ValueError(f"pairs: ({baseline}, {atkd}) must be objectives from {sorted(OBJECTIVES)}")
        return self


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
    def output_dir(self) -> Path:
        """Where the comparison's tables, figures and report go."""
        return self.comparison.workdir / ("report" if self.ablation is None else f"report-{self.ablation}")


def slug(value: Any) -> str:
    """A file-name-safe rendering of an axis value."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-") or "x"


def _short_hash(config: PipelineConfig, *sections: str) -> str:
    return config.section_hash(*sections)[:10]


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
        tracking["tracking_uri"] = f"sqlite:///{(comparison.workdir / 'mlflow.db').resolve()}"
    base = validate_config(base_raw, str(comparison.base))
    grid = Grid(comparison=comparison, ablation=ablation, base=base, cells=[])
    names = list(grid.axes)
    for combination in itertools.product(*grid.axes.values()):
        values = dict(zip(names, combination, strict=True))
        for seed in comparison.seeds:
            grid.cells.append(_cell(grid, base_raw, values, seed))
    for cell in grid.cells:
        cell.data_key = _short_hash(cell.config, "data", "tokenizer")
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
    for axis, value in values.items():
        settings.update(OBJECTIVES[value] if axis == OBJECTIVE_AXIS else {axis: value})
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


# --------------------------------------------------------------------------------------------
# Scores and statistics
# --------------------------------------------------------------------------------------------


def cell_scores(eval_dir: Path, metric: str) -> dict[str, float]:
    """A cell's scores from its evaluation summary: the student's and the teacher's mean ``metric``
    over the generation tasks, and both validation perplexities (NaN where absent)."""
    import csv

    rows = list(csv.DictReader((eval_dir / "summary.csv").open()))
    scores: dict[str, float] = {}
    for model in ("student", "teacher"):
        values = [float(r[model]) for r in rows if r["metric"] == metric and r.get(model) not in (None, "")]
        scores[f"{model}_score"] = sum(values) / len(values) if values else math.nan
        perplexity = [float(r[model]) for r in rows if r["metric"] == "token_perplexity" and r.get(model)]
        scores[f"{model}_perplexity"] = perplexity[0] if perplexity else math.nan
    return scores


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; infinite with a single value."""
    from scipy import stats

    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarize(results: list[dict[str, Any]], axes: list[str], key: str) -> list[dict[str, Any]]:
    """One row per cell: its axis values, ``key``'s mean and std over seeds, and the seed count."""
    groups: dict[tuple, list[float]] = {}
    for result in results:
        groups.setdefault(tuple(result["values"][a] for a in axes), []).append(result[key])
    rows = []
    for values, scores in groups.items():
        finite = [s for s in scores if math.isfinite(s)]
        mean, std = mean_std(finite) if finite else (math.nan, math.nan)
        rows.append({**dict(zip(axes, values, strict=True)), "mean": mean, "std": std, "n": len(finite)})
    return rows


def paired_differences(
    results: list[dict[str, Any]], axes: list[str], pairs: list[tuple[str, str]], key: str
) -> list[dict[str, Any]]:
    """For each (baseline, ATKD) pair and each combination of the other axes: the per-seed
    differences ATKD − baseline (same seed, so same init and data order), their mean and 95% CI."""
    if OBJECTIVE_AXIS not in axes:
        return []
    others = [a for a in axes if a != OBJECTIVE_AXIS]
    by_cell = {
        (tuple(r["values"][a] for a in others), r["values"][OBJECTIVE_AXIS], r["seed"]): r[key]
        for r in results
    }
    rows = []
    contexts = sorted({context for context, _, _ in by_cell}, key=str)
    for baseline, atkd in pairs:
        for context in contexts:
            seeds = sorted(
                s for c, o, s in by_cell if c == context and o == atkd and (c, baseline, s) in by_cell
            )
            diffs = [by_cell[(context, atkd, s)] - by_cell[(context, baseline, s)] for s in seeds]
            diffs = [d for d in diffs if math.isfinite(d)]
            if not diffs:
                continue
            mean, low, high = confidence_interval(diffs)
            rows.append(
                {
                    **dict(zip(others, context, strict=True)),
                    "pair": f"{atkd} - {baseline}",
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n": len(diffs),
                }
            )
    return rows


def pivot_markdown(rows: list[dict[str, Any]], axes: list[str], digits: int = 2) -> str:
    """A Markdown table of ``summarize`` rows: the last axis across, the others down, 'mean ± std'."""
    across = axes[-1]
    down = axes[:-1]
    columns = list(dict.fromkeys(r[across] for r in rows))
    lines = [
        "| " + " | ".join([*(down or ["cell"]), *map(str, columns)]) + " |",
        "|" + "---|" * (len(down or ["cell"]) + len(columns)),
    ]
    row_keys = list(dict.fromkeys(tuple(r[a] for a in down) for r in rows))
    for key in row_keys:
        cells = []
        for column in columns:
            match = [r for r in rows if tuple(r[a] for a in down) == key and r[across] == column]
            cells.append(f"{match[0]['mean']:.{digits}f} ± {match[0]['std']:.{digits}f}" if match else "-")
        lines.append("| " + " | ".join([*(map(str, key) if down else ["score"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def pairs_markdown(rows: list[dict[str, Any]], axes: list[str], digits: int = 2) -> str:
    """A Markdown table of ``paired_differences`` rows."""
    others = [a for a in axes if a != OBJECTIVE_AXIS]
    lines = [
        "| " + " | ".join([*others, "difference", "mean", "95% CI", "seeds"]) + " |",
        "|" + "---|" * (len(others) + 4),
    ]
    for row in rows:
        interval = f"[{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"
        lines.append(
            "| "
            + " | ".join(
                [
                    *(str(row[a]) for a in others),
                    row["pair"],
                    f"{row['mean']:+.{digits}f}",
                    interval,
                    str(row["n"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict[str, Any]], axes: list[str], path: Path, ylabel: str) -> None:
    """Grouped bars of the cell means with ±std error bars: the last axis as the bars in a group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across, down = axes[-1], axes[:-1]
    columns = list(dict.fromkeys(r[across] for r in rows))
    groups = list(dict.fromkeys(tuple(r[a] for a in down) for r in rows))
    width = 0.8 / len(columns)
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(columns) / 2 + 3), 4))
    for index, column in enumerate(columns):
        means, stds = [], []
        for group in groups:
            match = [r for r in rows if tuple(r[a] for a in down) == group and r[across] == column]
            means.append(match[0]["mean"] if match else math.nan)
            stds.append(match[0]["std"] if match else 0.0)
        positions = [g + (index - (len(columns) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, means, width, yerr=stds, capsize=3, label=str(column))
    axis.set_xticks(range(len(groups)), [", ".join(map(str, g)) or "all" for g in groups])
    axis.set(ylabel=ylabel, xlabel=", ".join(down) or "", title=f"mean ± std over seeds, by {across}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_unc(unc_by_teacher: dict[str, Any], path: Path) -> None:
    """One figure of the teachers' UNC distributions (density histograms, shared bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bins = np.linspace(0.0, 1.0, 41)
    figure, (density, cumulative) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in unc_by_teacher.items():
        array = np.asarray(values, dtype=float)
        density.hist(array, bins=bins, density=True, histtype="step", linewidth=1.8, label=name)
        ordered = np.sort(array)
        cumulative.plot(ordered, np.arange(1, len(ordered) + 1) / max(len(ordered), 1), label=name)
    density.set(xlabel="teacher UNC = 1 - p(target)", ylabel="density", title="UNC per teacher")
    density.set_yscale("log")
    cumulative.set(xlabel="teacher UNC", ylabel="share of tokens with UNC <= x", title="cumulative")
    for axis in (density, cumulative):
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


TEACHER_COLUMNS = (
    ("teacher", "teacher", "{}"),
    ("parameters", "params", "{:,}"),
    ("teacher_score", "teacher score", "{:.2f}"),
    ("teacher_perplexity", "val ppl", "{:.2f}"),
    ("val_loss", "final val loss", "{:.3f}"),
    ("val_loss_change_last_quarter", "Δ last 25% of steps", "{:+.1%}"),
    ("unc_mean", "UNC mean", "{:.3f}"),
    ("unc_median", "UNC median", "{:.3f}"),
    ("easy_share", "share UNC < 0.1", "{:.1%}"),
    ("tkd", "TKD", "{:.4g}"),
    ("dkd", "DKD", "{:.4g}"),
    ("weighted_dkd", "(1-p_g)·DKD", "{:.4g}"),
    ("weighted_dkd_share", "(1-p_g)·DKD / KL", "{:.1%}"),
)


def teachers_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the teacher analysis rows (absent values shown as '-')."""
    lines = [
        "| " + " | ".join(title for _, title, _ in TEACHER_COLUMNS) + " |",
        "|" + "---|" * len(TEACHER_COLUMNS),
    ]
    for row in rows:
        cells = []
        for key, _, pattern in TEACHER_COLUMNS:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and not math.isfinite(value))
            cells.append("-" if missing else pattern.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    grid: Grid,
    results: list[dict[str, Any]],
    teachers: list[dict[str, Any]],
    unc_by_teacher: dict[str, Any],
    failed: list[str],
    elapsed_s: float,
    command: str,
) -> str:
    """Write the comparison's tables, figures and ``report.md`` into ``grid.output_dir``; return the Markdown."""
    import csv

    comparison = grid.comparison
    out = grid.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # Axes with a single value are constants of this grid: they would only add a column of one
    # value to the tables, so the tables and plot lay out the varying axes alone.
    axes = [name for name, values in grid.axes.items() if len(values) > 1] or list(grid.axes)[-1:]
    metric = comparison.score_metric
    columns = ["label", *grid.axes, "seed", "student_score", "student_perplexity", "workdir"]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for result in results:
            writer.writerow({**result, **result["values"]})
    summary = summarize(results, axes, "student_score")
    perplexity = summarize(results, axes, "student_perplexity")
    pairs = paired_differences(results, axes, comparison.pairs, "student_score")
    (out / "summary.json").write_text(
        json.dumps(
            {"scores": summary, "perplexity": perplexity, "pairs": pairs, "teachers": teachers}, indent=2
        )
    )
    if summary:
        plot_summary(summary, axes, out / "scores.png", f"student {metric} (mean over suite tasks)")
    if unc_by_teacher:
        plot_unc(unc_by_teacher, out / "unc.png")
    minutes, seconds = divmod(int(elapsed_s), 60)
    reused = sum(1 for r in results if r.get("reused"))
    title = f"# Comparison `{comparison.name}`" + (f", ablation `{grid.ablation}`" if grid.ablation else "")
    lines = [
        title,
        "",
        f"- Command: `{command}`",
        f"- Base config: `{comparison.base}`"
        + (f" with `{' '.join(comparison.base_set)}`" if comparison.base_set else ""),
        f"- Grid: {' x '.join(f'{name} {values}' for name, values in grid.axes.items())}, seeds {comparison.seeds}: "
        f"{len(grid.cells)} runs, {len(results)} finished, {len(failed)} failed",
        f"- Run time: {minutes} min {seconds:02d} s"
        + (
            f" ({reused} of {len(results)} runs reused from an earlier invocation's outputs)"
            if reused
            else ""
        ),
        "",
        f"## Student score: {metric} averaged over the generation tasks (mean ± std over seeds)",
        "",
        pivot_markdown(summary, axes) if summary else "(no finished runs)\n",
    ]
    if summary:
        lines += ["![scores](scores.png)", ""]
    if pairs:
        lines += [
            "## Paired differences (same seed: same student init and data order)",
            "",
            "Mean difference in the student score with a 95% Student-t interval over seeds.",
            "",
            pairs_markdown(pairs, axes),
        ]
    if teachers:
        lines += [
            "## Teachers",
            "",
            "UNC is the teacher's 1 - p(target) over the training tokens. TKD, DKD and (1-p_g)·DKD are "
            "the mean per-token forward-KL terms of the same untrained student against each teacher: "
            "(1-p_g)·DKD is the diversity part plain KD optimises, and its share of the KL is what a "
            "confident teacher suppresses.",
            "",
            teachers_markdown(teachers),
        ]
        if unc_by_teacher:
            lines += ["![UNC per teacher](unc.png)", ""]
    if perplexity and any(math.isfinite(r["mean"]) for r in perplexity):
        lines += [
            "## Student validation perplexity (mean ± std over seeds)",
            "",
            pivot_markdown(perplexity, axes),
        ]
    if failed:
        lines += ["## Failed runs", "", *(f"- {item}" for item in failed), ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    return markdown
