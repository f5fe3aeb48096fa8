"""The objective leaderboard (configs/leaderboard.yaml, `make leaderboard`): the shipped grid is the
design docs/leaderboard.md registered, and a tiny twin of it runs end to end through the three
comparisons `make leaderboard` runs, both testbeds included (WordNet from the repository's
fixture), with the leaderboard in the reports."""

from __future__ import annotations

import json

import pytest
import yaml

from atkd_core.data.wordnet import build
from atkd_core.grid import load_grid
from flows.cli import main
from tests.conftest import REPO_ROOT
from tests.flows.test_reproduce import TINY

SHIPPED = REPO_ROOT / "configs" / "leaderboard.yaml"


def test_the_shipped_leaderboard_is_the_registered_design():
    scratch, warm = load_grid(SHIPPED), load_grid(SHIPPED, ablation="warm")
    primary = load_grid(SHIPPED, ablation="primary")
    objectives = ["sft", "kd", "rkd", "jsd", "tvd", "skew_kl", "atkd_k05", "atkd_auto", "atkd_eps", "abkd"]
    objectives += ["taid", "adakd"]
    assert scratch.axes == {
        "testbed": ["suite", "wordnet"],
        "init": ["scratch"],
        "objective": [*objectives, "kd_noce", "atkd_auto_noce"],
    }
    assert warm.axes["objective"] == [*objectives[:9], "atkd_k07", *objectives[9:], "kd_ce", "atkd_auto_ce"]
    assert scratch.seeds == [9, 10, 11, 12] and warm.seeds == [9, 10, 11, 12]
    assert primary.seeds == list(range(9, 20)) and primary.axes["objective"] == ["kd", "atkd_auto"]
    assert (len(scratch.cells), len(warm.cells), len(primary.cells)) == (112, 120, 44)
    # New seeds only: the reproduction spent 0-8, the cache study 20-29, the tokenizer study 30-41.
    spent = set(range(9)) | set(range(20, 42))
    assert not spent & (set(scratch.seeds) | set(primary.seeds))
    for grid in (scratch, warm):
        for cell in grid.cells:
            config, init = cell.config, cell.values["init"]
            assert config.distill.sft_warmup_epochs == (0.0 if init == "scratch" else 1.0)
            expected_ce = {"kd_noce": 0.0, "atkd_auto_noce": 0.0, "kd_ce": 0.5, "atkd_auto_ce": 0.5}
            assert config.loss.ce_weight == expected_ce.get(
                cell.values["objective"], 0.5 if init == "scratch" else 0.0
            )
    arms = {cell.values["objective"]: cell.config.loss for cell in scratch.cells}
    assert (arms["atkd_eps"].hard_fraction, arms["atkd_eps"].unc_epsilon) == ("epsilon", 0.05)
    assert (arms["abkd"].abkd_alpha, arms["abkd"].abkd_beta) == (0.2, 0.7)
    assert arms["adakd"].divergence == "reverse_kl" and arms["taid"].objective == "taid"
    # One training budget per testbed for every arm, and one teacher per testbed.
    for testbed in ("suite", "wordnet"):
        budgets = {
            json.dumps(c.config.distill.training.model_dump(mode="json", exclude={"seed"}), sort_keys=True)
            for grid in (scratch, warm)
            for c in grid.cells
            if c.values["testbed"] == testbed
        }
        assert len(budgets) == 1, testbed
    assert len(scratch.teacher_configs) == len(warm.teacher_configs) == 2
    board = scratch.comparison.leaderboard
    assert board is not None and board.primary_ablation == "primary" and board.alpha == 0.05
    assert [(h.name, h.setting, h.baseline, h.arm) for h in board.primary] == [
        ("H1", {"testbed": "suite", "init": "scratch"}, "kd", "atkd_auto"),
        ("H2", {"testbed": "wordnet", "init": "scratch"}, "kd", "atkd_auto"),
    ]
    assert board.defaults == {
        "testbed=suite,init=scratch": "atkd_auto",
        "testbed=wordnet,init=warm": "atkd_k07",
    }


def tiny_leaderboard(tmp_path) -> str:
    """configs/leaderboard.yaml with its base beside it, WordNet built from the fixture, the sizes
    shrunk and a few arms per grid."""
    out = tmp_path / "wordnet"
    build(
        REPO_ROOT / "tests" / "fixtures" / "wordnet",
        out,
        num_synsets=9,
        validation_size=3,
        test_size=4,
        vocab_size=300,
        seed=0,
        source={"name": "fixture"},
    )
    raw = yaml.safe_load(SHIPPED.read_text())
    (tmp_path / raw["base"]).write_text((REPO_ROOT / "configs" / raw["base"]).read_text())
    raw["workdir"] = str(tmp_path / "leaderboard")
    raw["base_set"] = [*raw["base_set"], *TINY]
    wordnet = raw["named_values"]["testbed"]["wordnet"]
    for split in ("train", "validation", "test"):
        wordnet["data"][f"{split}_files"] = [str(out / f"{split}.jsonl")]
    wordnet["tokenizer"]["path"] = str(out / "tokenizer")
    raw["axes"]["objective"] = ["kd", "atkd_auto", "taid"]
    raw["ablations"]["warm"]["objective"] = ["kd", "atkd_k07", "adakd"]
    raw["seeds"] = [9, 10]
    raw["ablation_seeds"]["primary"] = [9, 10, 11]
    path = tmp_path / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_tiny_leaderboard_runs_ranks_and_tests_its_hypotheses(prefect_harness, tmp_path, capsys):
    path = tiny_leaderboard(tmp_path)
    docs = tmp_path / "docs"
    assert main(["compare", path, "--report-to", str(docs / "scratch")]) == 0
    assert main(["compare", path, "--ablation", "warm", "--report-to", str(docs / "warm")]) == 0
    assert main(["compare", path, "--ablation", "primary", "--report-to", str(docs / "primary")]) == 0
    out = capsys.readouterr().out
    assert "=== atkd compare: 12 runs done" in out
    scratch = json.loads((docs / "scratch" / "summary.json").read_text())["leaderboard"]
    assert [s["setting"] for s in scratch["settings"]] == [
        "testbed=suite,init=scratch",
        "testbed=wordnet,init=scratch",
    ]
    assert scratch["primary"] == []  # the primary ablation's seeds decide them
    for setting in scratch["settings"]:
        assert sorted(row["arm"] for row in setting["ranking"]) == ["atkd_auto", "kd", "taid"]
        assert all(row["n"] == 2 for row in setting["ranking"])
    warm = json.loads((docs / "warm" / "summary.json").read_text())["leaderboard"]
    wordnet_warm = next(s for s in warm["settings"] if s["setting"] == "testbed=wordnet,init=warm")
    assert wordnet_warm["default"] == "atkd_k07" and wordnet_warm["recommended"] in (
        "atkd_k07",
        "kd",
        "adakd",
    )
    primary = json.loads((docs / "primary" / "summary.json").read_text())["leaderboard"]
    assert primary["settings"] == []
    assert [(row["name"], row["n"]) for row in primary["primary"]] == [("H1", 3), ("H2", 3)]
    assert all(row["outcome"] in ("supported", "refuted", "not shown") for row in primary["primary"])
    report = (docs / "primary" / "report.md").read_text()
    assert "### Primary hypotheses" in report and "| H1: atkd_auto − kd |" in report
    # The primary ablation reused the 2 x 2 x 2 runs the first comparison made on seeds 9 and 10.
    assert "(8 of 12 runs reused from an earlier invocation's outputs)" in report
