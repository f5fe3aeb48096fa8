"""The pre-registered confirmation (configs/confirm.yaml, `make reproduce`) end to end, shrunk to
minutes: every arm, two teacher sizes, two seeds, tiny data and step counts; and the shape of the
exploratory grid (configs/reproduce.yaml, `make reproduce-exploratory`)."""

from __future__ import annotations

import json

import pytest
import yaml

from atkd_core.grid import OBJECTIVES, load_grid
from flows.cli import main
from tests.conftest import REPO_ROOT

TINY = [
    "data.embedded.train_size=48",
    "data.embedded.validation_size=16",
    "data.embedded.test_size=16",
    "data.max_length=48",
    "tokenizer.vocab_size=400",
    "finetune.training.max_steps=4",
    "finetune.training.batch_size=16",
    "finetune.training.micro_batch_size=16",
    "distill.training.max_steps=4",
    "distill.training.batch_size=16",
    "distill.training.micro_batch_size=16",
    "eval.limit=2",
    "eval.max_new_tokens=4",
]


def tiny_confirmation(tmp_path) -> str:
    """configs/confirm.yaml with its base copied beside it and the sizes shrunk."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "confirm.yaml").read_text())
    (tmp_path / raw["base"]).write_text((REPO_ROOT / "configs" / raw["base"]).read_text())
    raw["workdir"] = str(tmp_path / "reproduce")
    raw["base_set"] = [*raw["base_set"], *TINY]
    raw["axes"]["teacher.preset"] = ["neox-tiny", "neox-small"]
    raw["seeds"] = [3, 4]
    path = tmp_path / "confirm.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_the_shipped_confirmation_is_the_preregistered_design():
    """What docs/reproduction.md registered: 3 teachers x 4 warm-started arms x seeds 3-8, new
    seeds only, one budget; and the from-scratch ce_weight 0.5 ablation."""
    grid = load_grid(REPO_ROOT / "configs" / "confirm.yaml")
    assert grid.axes == {
        "teacher.preset": ["neox-tiny", "neox-small", "neox-medium"],
        "objective": ["kd", "atkd_k05", "atkd_auto", "atkd_k07"],
    }
    assert grid.comparison.seeds == [3, 4, 5, 6, 7, 8] and len(grid.cells) == 72
    exploratory = load_grid(REPO_ROOT / "configs" / "reproduce.yaml").comparison.seeds
    assert not set(grid.comparison.seeds) & set(exploratory)
    assert grid.comparison.pairs[0] == ("kd", "atkd_auto")
    arms = {c.values["objective"]: c.config.loss for c in grid.cells}
    assert [arms[a].hard_fraction for a in ("atkd_k05", "atkd_auto", "atkd_k07")] == [0.5, "auto", 0.7]
    assert all(c.config.distill.sft_warmup_epochs == 1.0 for c in grid.cells)
    budgets = {
        json.dumps(c.config.distill.training.model_dump(mode="json", exclude={"seed"}), sort_keys=True)
        for c in grid.cells
    }
    assert len(budgets) == 1 and len(grid.teacher_configs) == 3
    scratch = load_grid(REPO_ROOT / "configs" / "confirm.yaml", ablation="scratch_ce")
    assert len(scratch.cells) == 36
    assert all(
        c.config.distill.sft_warmup_epochs == 0.0 and c.config.loss.ce_weight == 0.5 for c in scratch.cells
    )
    # The teachers are the exploratory grid's: same groups, so the confirmation reuses them.
    assert (
        set(scratch.teacher_configs)
        == set(grid.teacher_configs)
        == set(load_grid(REPO_ROOT / "configs" / "reproduce.yaml").teacher_configs)
    )


def test_the_shipped_grid_is_the_papers():
    grid = load_grid(REPO_ROOT / "configs" / "reproduce.yaml")
    assert list(grid.axes) == ["teacher.preset", "objective"]
    assert len(grid.axes["teacher.preset"]) >= 3 and grid.axes["objective"] == list(OBJECTIVES)
    assert len(grid.comparison.seeds) >= 3 and len(grid.cells) == 45 and len(grid.teacher_configs) == 3
    # The same budget for every objective: identical training sections and data.
    budgets = {
        json.dumps(c.config.distill.training.model_dump(mode="json", exclude={"seed"}), sort_keys=True)
        for c in grid.cells
    }
    assert len(budgets) == 1
    assert all(c.config.data == grid.cells[0].config.data for c in grid.cells)
    k = load_grid(REPO_ROOT / "configs" / "reproduce.yaml", ablation="k")
    assert sorted({c.config.loss.hard_fraction for c in k.cells}) == [0.3, 0.5, 0.7]
    lam = load_grid(REPO_ROOT / "configs" / "reproduce.yaml", ablation="lam")
    assert sorted({c.config.loss.lam for c in lam.cells}) == [0.0, 0.2, 0.5, 0.9]


@pytest.mark.slow
def test_tiny_confirmation_runs_and_reports(prefect_harness, tmp_path, capsys):
    path = tiny_confirmation(tmp_path)
    docs = tmp_path / "docs"
    assert main(["compare", path, "--report-to", str(docs)]) == 0
    assert "=== atkd compare: 16 runs done" in capsys.readouterr().out
    report = (docs / "report.md").read_text()
    assert "| teacher.preset | kd | atkd_k05 | atkd_auto | atkd_k07 |" in report
    for pair in ("atkd_auto - kd", "atkd_k05 - kd", "atkd_k07 - kd"):
        # One row per teacher and the row pooled over them per seed.
        assert report.count(f"| {pair} |") == 3
    assert "| all (mean over them per seed) | atkd_auto - kd |" in report
    summary = json.loads((docs / "summary.json").read_text())
    assert len(summary["scores"]) == 8 and all(row["n"] == 2 for row in summary["scores"])
    assert [t["teacher"].split("-")[1] for t in summary["teachers"]] == ["tiny", "small"]
    assert all(0 < t["unc_mean"] < 1 and "teacher_score" in t for t in summary["teachers"])
    for name in ("scores.png", "unc.png"):
        assert (docs / name).stat().st_size > 1000
    # MLflow's viewer shows the HTML with its figures; the Markdown's links only work in a checkout.
    html = (docs / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == report.count(".png)") >= 2
