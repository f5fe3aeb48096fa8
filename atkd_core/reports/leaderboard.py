"""A comparison's leaderboard: per setting (e.g. testbed x student init), the objectives ranked by
their mean score with intervals, which differences from the best the seeds resolve under a
Bonferroni correction, the registered primary hypotheses, and the objective the registered rule
recommends as each setting's default.

The rule (``LeaderboardConfig``): in a setting, the best arm is the one with the highest mean
score. Each other arm is compared with it, paired by seed, at the two-sided level 1 - alpha / m (m:
the setting's comparisons), and is *resolved* below it when the whole interval of best − arm lies
above 0. The recommendation is the best arm when it is resolved above the setting's current
default, else the current default stays (the evidence does not say to change it). Primary
hypotheses are tested together at 1 - alpha / (their number).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from atkd_core.grid import OBJECTIVE_AXIS
from atkd_core.reports.statistics import confidence_interval, detectable_effect

if TYPE_CHECKING:
    from atkd_core.grid import LeaderboardConfig


def setting_label(setting: dict[str, Any]) -> str:
    """'axis=value,...' of a setting, in the order given."""
    return ",".join(f"{axis}={value}" for axis, value in setting.items())


def _scores(results: list[dict[str, Any]], setting_axes: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """setting label -> arm -> seed -> score, finite scores only."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for result in results:
        score = result["student_score"]
        if not math.isfinite(score):
            continue
        label = setting_label({axis: result["values"][axis] for axis in setting_axes})
        table.setdefault(label, {}).setdefault(result["values"][OBJECTIVE_AXIS], {})[result["seed"]] = score
    return table


def _paired(first: dict[int, float], second: dict[int, float]) -> list[float]:
    """second − first per seed both have, in seed order."""
    return [second[seed] - first[seed] for seed in sorted(set(first) & set(second))]


def _difference(diffs: list[float], level: float) -> dict[str, Any]:
    mean, low, high = confidence_interval(diffs, level) if diffs else (math.nan, math.nan, math.nan)
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "n": len(diffs),
        "detectable": detectable_effect(diffs, level) if diffs else math.inf,
    }


def leaderboard(
    results: list[dict[str, Any]], config: LeaderboardConfig, *, ranking: bool = True, primary: bool = True
) -> dict[str, Any]:
    """The leaderboard of ``results`` (as the comparison collects them: values, seed,
    student_score) under ``config``'s registered rule: {settings: [...], primary: [...]};
    ``ranking`` / ``primary``: whether these runs rank the arms / decide the primary hypotheses."""
    table = _scores(results, config.setting_axes)
    settings = []
    for label, arms in table.items() if ranking else ():
        ranked = sorted(
            ({"arm": arm, **_difference(list(seeds.values()), 0.95)} for arm, seeds in arms.items()),
            key=lambda row: -row["mean"],
        )
        best = ranked[0]["arm"]
        # best − arm per seed, once per arm; only arms with two pairs or more are compared.
        gaps = {row["arm"]: _paired(arms[row["arm"]], arms[best]) for row in ranked[1:]}
        others = [arm for arm, diffs in gaps.items() if len(diffs) >= 2]
        level = 1 - config.alpha / max(len(others), 1)
        for row in ranked:
            if row["arm"] == best:
                row["versus_best"] = None
                continue
            versus = _difference(gaps[row["arm"]], level)
            # bool(): scipy's bounds are numpy floats, and a numpy bool is not JSON.
            versus["resolved"] = bool(row["arm"] in others and versus["low"] > 0)
            row["versus_best"] = versus
        default = config.defaults.get(label)
        recommendation: dict[str, Any] = {"default": default, "recommended": default, "reason": ""}
        if default is None:
            recommendation.update(recommended=best, reason="no current default: the best arm")
        elif default == best:
            recommendation["reason"] = "the current default is the best arm"
        elif default not in arms:
            recommendation["reason"] = f"the current default {default} was not run in this setting"
        else:
            versus = next(row["versus_best"] for row in ranked if row["arm"] == default)
            if versus["resolved"]:
                recommendation.update(
                    recommended=best,
                    reason=f"{best} is resolved above the current default {default}",
                )
            else:
                recommendation["reason"] = (
                    f"{best} leads the current default {default} by {versus['mean']:+.2f}, not resolved"
                )
        settings.append({"setting": label, "level": level, "ranking": ranked, **recommendation})
    tested: list[dict[str, Any]] = []
    level = 1 - config.alpha / max(len(config.primary), 1)
    for hypothesis in config.primary if primary else ():
        arms = table.get(setting_label(hypothesis.setting), {})
        diffs = _paired(arms.get(hypothesis.baseline, {}), arms.get(hypothesis.arm, {}))
        result = _difference(diffs, level)
        if not diffs or len(diffs) < 2:
            outcome = "not run"
        elif result["low"] > 0:
            outcome = "supported"
        elif result["high"] < 0:
            outcome = "refuted"
        else:
            outcome = "not shown"
        tested.append(
            {"name": hypothesis.name, **hypothesis.model_dump(), **result, "level": level, "outcome": outcome}
        )
    return {"settings": settings, "primary": tested}


def _interval(row: dict[str, Any]) -> str:
    return f"{row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"


def leaderboard_markdown(board: dict[str, Any]) -> str:
    """The leaderboard as Markdown: the primary hypotheses, then one ranked table per setting."""
    lines = ["## Leaderboard", ""]
    if board["primary"]:
        lines += [
            "### Primary hypotheses",
            "",
            "| hypothesis | setting | difference | interval level | pairs | detectable | outcome |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in board["primary"]:
            lines.append(
                f"| {row['name']}: {row['arm']} − {row['baseline']} | {setting_label(row['setting'])} | "
                f"{_interval(row)} | {row['level']:.2%} | {row['n']} | {row['detectable']:.2f} | {row['outcome']} |"
            )
        lines.append("")
    for setting in board["settings"]:
        lines += [
            f"### {setting['setting']}",
            "",
            f"Mean score with its 95% interval over seeds; best − arm at {setting['level']:.2%} "
            "(Bonferroni over the setting's comparisons with the best), resolved when it excludes 0.",
            "",
            "| rank | arm | score | seeds | best − arm | resolved |",
            "|---|---|---|---|---|---|",
        ]
        for rank, row in enumerate(setting["ranking"], 1):
            versus = row["versus_best"]
            gap = "—" if versus is None else _interval(versus)
            resolved = "—" if versus is None else ("yes" if versus["resolved"] else "no")
            lines.append(
                f"| {rank} | {row['arm']} | {row['mean']:.2f} [{row['low']:.2f}, {row['high']:.2f}] | "
                f"{row['n']} | {gap} | {resolved} |"
            )
        lines += ["", f"Recommended: **{setting['recommended']}** ({setting['reason']}).", ""]
    return "\n".join(lines)
