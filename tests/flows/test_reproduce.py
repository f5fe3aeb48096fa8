"""The reproduction grid (configs/reproduce.yaml) end to end, shrunk to minutes: every objective,
two teacher sizes, two seeds, tiny data and step counts. The full grid is `make reproduce`."""

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


def tiny_reproduction(tmp_path) -> str:
    """configs/reproduce.yaml with its base copied beside it and the sizes shrunk."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "reproduce.yaml").read_text())
    (tmp_path / raw["base"]).write_text((REPO_ROOT / "configs" / raw["base"]).read_text())
    raw["workdir"] = str(tmp_path / "reproduce")
    raw["base_set"] = TINY
    raw["axes"]["teacher.preset"] = ["neox-tiny", "neox-small"]
    raw["seeds"] = [0, 1]
    path = tmp_path / "reproduce.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


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
def test_tiny_reproduction_grid_runs_and_reports(prefect_harness, tmp_path, capsys):
    path = tiny_reproduction(tmp_path)
    docs = tmp_path / "docs"
    assert main(["compare", path, "--report-to", str(docs)]) == 0
    assert "=== atkd compare: 20 runs done" in capsys.readouterr().out
    report = (docs / "report.md").read_text()
    assert "| teacher.preset | sft | kd | atkd | rkd | rkd_atkd |" in report
    for pair in ("atkd - kd", "rkd_atkd - rkd"):
        assert report.count(f"| {pair} |") == 2
    summary = json.loads((docs / "summary.json").read_text())
    assert len(summary["scores"]) == 10 and all(row["n"] == 2 for row in summary["scores"])
    assert [t["teacher"].split("-")[1] for t in summary["teachers"]] == ["tiny", "small"]
    assert all(0 < t["unc_mean"] < 1 and "teacher_score" in t for t in summary["teachers"])
    for name in ("scores.png", "unc.png"):
        assert (docs / name).stat().st_size > 1000
