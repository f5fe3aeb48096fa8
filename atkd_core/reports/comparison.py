"""A comparison's report: per-cell scores, the teacher analysis, tables, figures and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from atkd_core.data.prepare import teacher_prepared_dir
from atkd_core.grid import Grid, teacher_label
from atkd_core.manifest import read_manifest
from atkd_core.outputs import ModelInitManifest
from atkd_core.reports.difficulty import cache_unc, kl_decomposition_magnitudes
from atkd_core.reports.figures import plot_summary, plot_unc
from atkd_core.reports.leaderboard import leaderboard, leaderboard_markdown
from atkd_core.reports.publishing import write_html
from atkd_core.reports.statistics import paired_differences, summarize
from atkd_core.reports.tables import pairs_markdown, pivot_markdown, teachers_markdown
from atkd_core.scoring import TeacherCache
from atkd_core.storage import as_location


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


def validation_convergence(metrics_path: Path) -> dict[str, float]:
    """A training run's final validation loss and its relative change over the last quarter of
    the steps (how flat the curve was at the end); empty when the run logged no validation loss."""
    if not metrics_path.is_file():
        return {}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not curve:
        return {}
    final_step, final = curve[-1]
    earlier = [loss for step, loss in curve if step <= 0.75 * final_step] or [curve[0][1]]
    return {"val_loss": final, "val_loss_change_last_quarter": final / earlier[-1] - 1}


def teacher_analysis(
    grid: Grid, teachers: dict[str, Any], results: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per teacher group: its score, UNC statistics and the KL terms against the untrained student;
    and every group's UNC values for the figure."""
    rows, unc_by_teacher = [], {}
    for key, config in grid.teacher_configs.items():
        upstream = teachers[key]
        name = teacher_label(config)
        cache = TeacherCache(as_location(upstream.cache))
        # The cache is in the teacher's tokens: its own prepared data's, when it has its own tokenizer.
        scored_data = teacher_prepared_dir(config, Path(upstream.train_data))
        unc = cache_unc(cache, scored_data)
        unc_by_teacher[name] = unc.numpy()
        row: dict[str, Any] = {
            "teacher": name,
            "parameters": getattr(
                read_manifest(config.layout.teacher_init, ModelInitManifest), "parameters", None
            ),
            "unc_mean": float(unc.mean()),
            "unc_median": float(unc.median()),
            "easy_share": float((unc < 0.1).double().mean()),
        }
        row.update(validation_convergence(Path(upstream.teacher) / "metrics.jsonl"))
        if (config.layout.eval / "summary.csv").is_file():
            scores = cell_scores(config.layout.eval, grid.comparison.score_metric)
            row.update(teacher_score=scores["teacher_score"], teacher_perplexity=scores["teacher_perplexity"])
        # The same untrained student (the first seed's init) against every teacher.
        first = next((r for r in results if r["teacher_key"] == key), None)
        student_init = Path(first["workdir"]) / "models" / "student-init" if first else None
        # Token by token against the untrained student: not defined when the two tokenize differently.
        if student_init is not None and student_init.is_dir() and not config.cross_tokenizer:
            row.update(kl_decomposition_magnitudes(cache, Path(upstream.train_data), student_init))
        rows.append(row)
    return rows, unc_by_teacher


def write_report(
    grid: Grid,
    results: list[dict[str, Any]],
    teachers: list[dict[str, Any]],
    unc_by_teacher: dict[str, Any],
    failed: list[str],
    elapsed_s: float,
    command: str,
) -> str:
    """Write the comparison's tables, figures, ``report.md`` and a self-contained ``report.html``
    into ``grid.output_dir``; return the Markdown."""
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
    board = None
    if comparison.leaderboard is not None:
        # The grid that decides the primary hypotheses tests them; every other grid ranks its arms,
        # and the main grid does both when no ablation is named for them.
        primary = grid.ablation == comparison.leaderboard.primary_ablation
        board = leaderboard(
            results, comparison.leaderboard, ranking=grid.ablation is None or not primary, primary=primary
        )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "scores": summary,
                "perplexity": perplexity,
                "pairs": pairs,
                "teachers": teachers,
                "leaderboard": board,
            },
            indent=2,
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
        f"- Run by: {command}" if command.startswith("the Prefect deployment") else f"- Command: `{command}`",
        f"- Base config: `{comparison.base}`"
        + (f" with `{' '.join(comparison.base_set)}`" if comparison.base_set else ""),
        f"- Grid: {' x '.join(f'{name} {values}' for name, values in grid.axes.items())}, seeds {grid.seeds}: "
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
    if board is not None:
        lines += [leaderboard_markdown(board)]
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
    # What MLflow's artifact viewer can show with its figures (it renders HTML, not linked PNGs).
    write_html(markdown, out, f"Comparison {comparison.name}")
    return markdown
