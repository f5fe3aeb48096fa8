"""The comparison grid: expansion, shared groups, validation, and its statistics against scipy."""

from __future__ import annotations

import math

import pytest
import yaml
from scipy import stats

from atkd_core.config import config_to_yaml
from atkd_core.errors import ConfigError
from atkd_core.grid import OBJECTIVES, load_grid
from atkd_core.reports.statistics import confidence_interval, paired_differences, summarize
from atkd_core.reports.tables import pivot_markdown
from tests.conftest import tiny_config


def write_comparison(tmp_path, **fields) -> str:
    """A base pipeline YAML and a comparison YAML over it in ``tmp_path``; returns the latter's path."""
    (tmp_path / "base.yaml").write_text(config_to_yaml(tiny_config(tmp_path / "unused")))
    raw = {
        "name": "grid",
        "workdir": str(tmp_path / "grid"),
        "base": "base.yaml",
        "axes": {"teacher.preset": ["neox-tiny", "llama-tiny"], "objective": ["kd", "atkd"]},
        "seeds": [0, 1, 2],
        "pairs": [["kd", "atkd"]],
        "ablations": {"lam": {"objective": ["atkd"], "loss.lam": [0.0, 0.5]}},
        **fields,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_grid_logs_to_the_tracking_server_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    grid = load_grid(write_comparison(tmp_path))
    assert {c.config.tracking.tracking_uri for c in grid.cells} == {None}


def test_grid_expands_axes_and_seeds_and_shares_data_and_teachers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = load_grid(write_comparison(tmp_path))
    assert len(grid.cells) == 2 * 2 * 3
    first = grid.cells[0]
    assert first.values == {"teacher.preset": "neox-tiny", "objective": "kd"} and first.seed == 0
    assert first.config.loss.objective == "kd" and first.config.loss.divergence == "forward_kl"
    assert first.config.distill.training.seed == 0 and first.config.student.init_seed == 0
    assert first.config.workdir == tmp_path / "grid" / "cells" / "neox-tiny" / "kd" / "seed0"
    rkd_atkd = load_grid(write_comparison(tmp_path, axes={"objective": ["rkd_atkd"]})).cells[0].config
    assert (rkd_atkd.loss.objective, rkd_atkd.loss.setting) == ("atkd", "reverse")
    # One prepared dataset, one teacher per preset: objectives and seeds do not retrain teachers.
    assert len(grid.data_configs) == 1 and len(grid.teacher_configs) == 2
    assert {c.teacher_key for c in grid.cells if c.values["teacher.preset"] == "neox-tiny"} == {
        grid.cells[0].teacher_key
    }
    # Every run logs to the comparison's store, so the runs nest under its MLflow run.
    assert {c.config.tracking.tracking_uri for c in grid.cells} == {
        f"sqlite:///{(tmp_path / 'grid' / 'mlflow.db').resolve()}"
    }
    assert not any(c.config.eval.include_teacher for c in grid.cells)


def test_ablation_replaces_the_axes(tmp_path):
    grid = load_grid(write_comparison(tmp_path), ablation="lam")
    assert [c.config.loss.lam for c in grid.cells] == [0.0] * 3 + [0.5] * 3
    assert grid.cells[3].config.workdir == tmp_path / "grid" / "cells" / "atkd" / "loss.lam=0.5" / "seed0"
    assert grid.output_dir == tmp_path / "grid" / "report-lam"
    with pytest.raises(ConfigError, match=r"--ablation 'k' is not defined; defined: \['lam'\]"):
        load_grid(write_comparison(tmp_path), ablation="k")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"axes": {"objective": ["kd", "dpo"]}}, "axes.objective"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"axes": {"loss.lam": [0.1, 0.1]}}, "no repeats"),
        ({"pairs": [["kd", "nope"]]}, "pairs"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_comparison_configs_name_the_field(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_comparison(tmp_path, **fields))


def test_a_bad_axis_value_names_the_cell(tmp_path):
    path = write_comparison(tmp_path, axes={"loss.lam": [0.5, 1.5]})
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    assert "loss.lam=1.5, seed 0" in str(error.value) and "loss.lam = 1.5" in str(error.value)


def test_paired_differences_match_a_scipy_t_interval():
    scores = {
        ("kd", 0): 10.0,
        ("kd", 1): 12.0,
        ("kd", 2): 11.0,
        ("atkd", 0): 11.5,
        ("atkd", 1): 12.5,
        ("atkd", 2): 13.0,
    }
    results = [
        {"values": {"objective": objective}, "seed": seed, "score": value}
        for (objective, seed), value in scores.items()
    ]
    (row,) = paired_differences(results, ["objective"], [("kd", "atkd")], "score")
    diffs = [1.5, 0.5, 2.0]
    low, high = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert row["pair"] == "atkd - kd" and row["n"] == 3
    assert row["mean"] == pytest.approx(4 / 3) and (row["ci_low"], row["ci_high"]) == pytest.approx(
        (low, high)
    )
    assert confidence_interval([1.0])[1] == -math.inf


def test_summary_and_pivot_table():
    results = [
        {"values": {"t": t, "objective": o}, "seed": s, "score": float(i)}
        for i, (t, o, s) in enumerate((t, o, s) for t in ("a", "b") for o in ("kd", "atkd") for s in (0, 1))
    ]
    rows = summarize(results, ["t", "objective"], "score")
    assert rows[0] == {"t": "a", "objective": "kd", "mean": 0.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    table = pivot_markdown(rows, ["t", "objective"])
    assert table.splitlines()[0] == "| t | kd | atkd |"
    assert table.splitlines()[3] == "| b | 4.50 ± 0.71 | 6.50 ± 0.71 |"
    assert set(OBJECTIVES) == {"sft", "kd", "atkd", "rkd", "rkd_atkd"}


def test_named_arms_expand_to_their_settings_and_may_not_shadow_a_built_in(tmp_path):
    arms = {
        "atkd_auto": {"loss.objective": "atkd", "loss.hard_fraction": "auto"},
        "atkd_k07": {"loss.objective": "atkd", "loss.hard_fraction": 0.7},
    }
    path = write_comparison(
        tmp_path,
        objectives=arms,
        axes={"objective": ["kd", "atkd_auto", "atkd_k07"]},
        pairs=[["kd", "atkd_auto"]],
    )
    grid = load_grid(path)
    by_arm = {c.values["objective"]: c.config.loss for c in grid.cells}
    assert by_arm["atkd_auto"].hard_fraction == "auto" and by_arm["atkd_k07"].hard_fraction == 0.7
    assert by_arm["kd"].objective == "kd" and len(grid.cells) == 9
    with pytest.raises(ConfigError, match=r"\['kd'\] are built-in objectives"):
        load_grid(write_comparison(tmp_path, objectives={"kd": {"loss.lam": 0.1}}))
    with pytest.raises(ConfigError, match="not all in"):
        load_grid(write_comparison(tmp_path, axes={"objective": ["kd", "atkd_nope"]}))


def test_named_values_of_an_axis_expand_to_their_settings(tmp_path):
    named = {
        "init": {"scratch": {"distill.sft_warmup_epochs": 0.0}, "warm": {"distill.sft_warmup_epochs": 1.0}},
        "testbed": {
            "small": {"data.embedded.train_size": 64, "tokenizer.vocab_size": 400},
            "larger": {"data.embedded.train_size": 96, "tokenizer.vocab_size": 500},
        },
    }
    path = write_comparison(
        tmp_path,
        named_values=named,
        axes={"testbed": ["small", "larger"], "init": ["scratch", "warm"], "objective": ["kd"]},
    )
    grid = load_grid(path)
    assert len(grid.cells) == 2 * 2 * 3
    for cell in grid.cells:
        config = cell.config
        assert config.distill.sft_warmup_epochs == (1.0 if cell.values["init"] == "warm" else 0.0)
        assert (config.data.embedded.train_size, config.tokenizer.vocab_size) == (
            (64, 400) if cell.values["testbed"] == "small" else (96, 500)
        )
        assert str(config.workdir).endswith(
            f"{cell.values['testbed']}/{cell.values['init']}/kd/seed{cell.seed}"
        )
    # Both testbeds' data are prepared once each, and each gets its own teacher.
    assert len(grid.data_configs) == 2 and len(grid.teacher_configs) == 2
    with pytest.raises(ConfigError, match=r"axes.init: \['cold'\] not all in \['scratch', 'warm'\]"):
        load_grid(write_comparison(tmp_path, named_values=named, axes={"init": ["cold"]}))
    with pytest.raises(ConfigError, match="objective arms are named under objectives"):
        load_grid(write_comparison(tmp_path, named_values={"objective": {"x": {}}}))


def test_an_ablation_may_run_its_own_seeds_and_shares_the_main_grids_runs(tmp_path):
    path = write_comparison(tmp_path, ablation_seeds={"lam": [0, 1, 2, 3, 4]})
    main_grid, ablation = load_grid(path), load_grid(path, ablation="lam")
    assert main_grid.seeds == [0, 1, 2] and ablation.seeds == [0, 1, 2, 3, 4] and len(ablation.cells) == 10
    # The same arm, value and seed is the same folder, so a run the main grid made is reused.
    assert ablation.cells[0].config.workdir == tmp_path / "grid" / "cells" / "atkd" / "loss.lam=0.0" / "seed0"
    with pytest.raises(ConfigError, match=r"ablation_seeds: \['k'\] are not ablations"):
        load_grid(write_comparison(tmp_path, ablation_seeds={"k": [1]}))
    with pytest.raises(ConfigError, match="ablation_seeds.lam"):
        load_grid(write_comparison(tmp_path, ablation_seeds={"lam": [1, 1]}))


def test_the_pooled_row_takes_each_seeds_mean_over_teachers_and_reports_the_detectable_effect():
    diffs = {("a", 0): 1.0, ("a", 1): 2.0, ("a", 2): 0.0, ("b", 0): 3.0, ("b", 1): -1.0, ("b", 2): 1.0}
    results = []
    for (teacher, seed), diff in diffs.items():
        results.append({"values": {"t": teacher, "objective": "kd"}, "seed": seed, "score": 10.0})
        results.append({"values": {"t": teacher, "objective": "atkd"}, "seed": seed, "score": 10.0 + diff})
    rows = paired_differences(results, ["t", "objective"], [("kd", "atkd")], "score")
    pooled = rows[-1]
    assert pooled["t"].startswith("all") and pooled["n"] == 3
    seed_means = [2.0, 0.5, 0.5]
    assert pooled["mean"] == pytest.approx(sum(seed_means) / 3)
    sd = stats.tstd(seed_means)
    expected = (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * sd / math.sqrt(3)
    assert pooled["detectable"] == pytest.approx(expected)


def _png(path, color):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1, 1))
    axes.plot([0, 1], [0, 1], color=color)
    figure.savefig(path)
    plt.close(figure)


def test_published_reports_carry_their_figures_inside_them(tmp_path):
    """The Prefect artifact's Markdown and MLflow's HTML embed the PNGs: a link by file name would
    not resolve in either UI."""
    import base64
    import re

    from atkd_core.reports.publishing import inline_images, write_html

    _png(tmp_path / "scores.png", "red")
    markdown = (
        "# Report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![scores](scores.png)\n\n![gone](missing.png)\n"
    )
    inlined = inline_images(markdown, tmp_path)
    (uri,) = re.findall(r"!\[scores\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inlined)
    assert base64.b64decode(uri) == (tmp_path / "scores.png").read_bytes()
    assert "![gone](missing.png)" in inlined  # nothing to embed: left as it was
    html = write_html(markdown, tmp_path, "t").read_text()
    assert "<table>" in html and "<td>1</td>" in html
    (src,) = re.findall(r'<img alt="scores" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert base64.b64decode(src).startswith(b"\x89PNG")
