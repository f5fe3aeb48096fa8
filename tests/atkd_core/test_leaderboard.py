"""The leaderboard's registered rule on made-up scores: ranking, Bonferroni intervals against
scipy, what is resolved, the recommendation, and the primary hypotheses."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from atkd_core.grid import LeaderboardConfig
from atkd_core.reports.leaderboard import leaderboard, leaderboard_markdown

SEEDS = [9, 10, 11, 12, 13]
NOISE = [0.3, -0.2, 0.1, -0.4, 0.2]


def results(offsets: dict[str, dict[str, float]]) -> list[dict]:
    """Rows of a testbed x init x objective grid: score = the arm's offset + a per-seed shift
    shared by every arm (what pairing removes) + a little arm-specific noise."""
    rows = []
    for setting, arms in offsets.items():
        testbed, init = setting.split("/")
        for index, (arm, offset) in enumerate(arms.items()):
            for seed, noise in zip(SEEDS, NOISE, strict=True):
                rows.append(
                    {
                        "values": {"testbed": testbed, "init": init, "objective": arm},
                        "seed": seed,
                        "student_score": 10 + offset + seed * 0.5 + noise * (index + 1) / 3,
                    }
                )
    return rows


CONFIG = LeaderboardConfig(
    setting_axes=["testbed", "init"],
    alpha=0.05,
    primary=[
        {
            "name": "H1",
            "setting": {"testbed": "suite", "init": "scratch"},
            "baseline": "kd_ce",
            "arm": "atkd_ce",
        },
        {
            "name": "H2",
            "setting": {"testbed": "wordnet", "init": "scratch"},
            "baseline": "kd_ce",
            "arm": "atkd_ce",
        },
    ],
    defaults={"testbed=suite,init=scratch": "atkd_ce", "testbed=wordnet,init=scratch": "atkd_ce"},
)


def test_the_best_arm_is_recommended_only_when_resolved_above_the_default():
    rows = results(
        {
            # taid far ahead of the default: resolved, so it is recommended.
            "suite/scratch": {"atkd_ce": 0.0, "kd_ce": -0.1, "taid": 3.0, "sft": -4.0},
            # taid ahead by a hair: not resolved, the default stays.
            "wordnet/scratch": {"atkd_ce": 0.0, "kd_ce": -2.0, "taid": 0.05, "sft": -0.02},
        }
    )
    board = leaderboard(rows, CONFIG)
    by_setting = {s["setting"]: s for s in board["settings"]}
    suite = by_setting["testbed=suite,init=scratch"]
    assert [row["arm"] for row in suite["ranking"]] == ["taid", "atkd_ce", "kd_ce", "sft"]
    assert suite["recommended"] == "taid" and "resolved above the current default" in suite["reason"]
    assert suite["level"] == pytest.approx(1 - 0.05 / 3)
    wordnet = by_setting["testbed=wordnet,init=scratch"]
    assert wordnet["recommended"] == "atkd_ce" and "not resolved" in wordnet["reason"]
    # The interval of best − arm is scipy's paired t-interval at the Bonferroni level.
    versus = next(r for r in suite["ranking"] if r["arm"] == "sft")["versus_best"]
    scores = {
        arm: [
            r["student_score"]
            for r in rows
            if r["values"]["objective"] == arm and r["values"]["testbed"] == "suite"
        ]
        for arm in ("taid", "sft")
    }
    diffs = [a - b for a, b in zip(scores["taid"], scores["sft"], strict=True)]
    low, high = stats.t.interval(1 - 0.05 / 3, len(diffs) - 1, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert (versus["low"], versus["high"]) == (pytest.approx(low), pytest.approx(high))
    assert versus["resolved"]
    assert json.loads(json.dumps(board))["settings"][0]["setting"] == suite["setting"]  # the report's JSON
    markdown = leaderboard_markdown(board)
    assert "Recommended: **taid**" in markdown and "### testbed=wordnet,init=scratch" in markdown


def test_primary_hypotheses_are_tested_together_and_read_plainly():
    rows = results(
        {
            "suite/scratch": {"atkd_ce": 2.0, "kd_ce": 0.0},
            "wordnet/scratch": {"atkd_ce": -2.0, "kd_ce": 0.0},
        }
    )
    primary = {row["name"]: row for row in leaderboard(rows, CONFIG)["primary"]}
    assert primary["H1"]["outcome"] == "supported" and primary["H2"]["outcome"] == "refuted"
    assert primary["H1"]["level"] == pytest.approx(0.975) and primary["H1"]["n"] == len(SEEDS)
    assert primary["H1"]["mean"] == pytest.approx(2.0, abs=0.3) and math.isfinite(primary["H1"]["detectable"])
    # Where another run (an ablation with more seeds) decides them, these runs only rank, and back.
    assert leaderboard(rows, CONFIG, primary=False)["primary"] == []
    only_primary = leaderboard(rows, CONFIG, ranking=False)
    assert only_primary["settings"] == [] and len(only_primary["primary"]) == 2
    tied = results({"suite/scratch": {"atkd_ce": 0.0, "kd_ce": 0.0}})
    outcomes = {row["name"]: row["outcome"] for row in leaderboard(tied, CONFIG)["primary"]}
    assert outcomes == {"H1": "not shown", "H2": "not run"}


def test_a_leaderboard_must_name_axes_and_arms_of_the_grid(tmp_path):
    from atkd_core.errors import ConfigError
    from atkd_core.grid import load_grid
    from tests.atkd_core.test_compare import write_comparison

    board = {"setting_axes": ["teacher.preset"], "defaults": {"teacher.preset=neox-tiny": "atkd"}}
    grid = load_grid(write_comparison(tmp_path, leaderboard=board))
    assert grid.comparison.leaderboard is not None
    with pytest.raises(ConfigError, match="leaderboard.setting_axes"):
        load_grid(write_comparison(tmp_path, leaderboard={"setting_axes": ["objective"]}))
    with pytest.raises(ConfigError, match="leaderboard.defaults"):
        load_grid(write_comparison(tmp_path, leaderboard={**board, "defaults": {"x": "nope"}}))
    with pytest.raises(ConfigError, match="leaderboard.primary_ablation"):
        load_grid(write_comparison(tmp_path, leaderboard={**board, "primary_ablation": "more"}))
    wrong = {"name": "H1", "setting": {"init": "scratch"}, "baseline": "kd", "arm": "atkd"}
    with pytest.raises(ConfigError, match="setting must give"):
        load_grid(write_comparison(tmp_path, leaderboard={**board, "primary": [wrong]}))
