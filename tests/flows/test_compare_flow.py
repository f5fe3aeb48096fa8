"""The comparison flow on a tiny grid: shared teacher, nested MLflow runs, report and artifact."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from flows.compare import compare
from tests.atkd_core.test_compare import write_comparison
from tests.conftest import child_runs


@pytest.mark.slow
def test_compare_runs_cells_on_one_shared_teacher_and_reports(prefect_harness, tmp_path):
    path = write_comparison(
        tmp_path,
        axes={"teacher.preset": ["neox-tiny"], "objective": ["kd", "atkd"]},
        seeds=[0, 1],
        base_set=["eval.limit=4", "eval.max_new_tokens=6"],
    )
    result = compare(path)
    grid_dir = tmp_path / "grid"
    assert result.cells == 4 and result.failed == []
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(result.prefect_flow_run_id).name == f"compare {path}"
    (teacher_dir,) = (grid_dir / "teachers").iterdir()
    assert (teacher_dir / "models" / "teacher" / "manifest.json").is_file()
    assert (teacher_dir / "eval" / "teacher.json").is_file()
    students = sorted(p.relative_to(grid_dir) for p in grid_dir.glob("cells/*/*/seed*/models/student"))
    assert [str(p) for p in students] == [
        f"cells/neox-tiny/{o}/seed{s}/models/student" for o in ("atkd", "kd") for s in (0, 1)
    ]
    # No cell trained or scored a teacher of its own.
    assert not list(grid_dir.glob("cells/**/models/teacher")) and not list(
        grid_dir.glob("cells/**/teacher_cache")
    )

    report = (grid_dir / "report" / "report.md").read_text()
    # teacher.preset has one value here: a constant, so the table lays out the objectives alone.
    assert "| cell | kd | atkd |" in report and "| score |" in report and "reused" not in report
    assert "atkd - kd" in report and "95%" in report and "(1-p_g)·DKD" in report
    for name in ("scores.png", "unc.png", "results.csv", "summary.json"):
        assert (grid_dir / "report" / name).is_file(), name
    summary = json.loads((grid_dir / "report" / "summary.json").read_text())
    assert [row["n"] for row in summary["scores"]] == [2, 2]
    (teacher,) = summary["teachers"]
    assert teacher["val_loss"] > 0 and "val_loss_change_last_quarter" in teacher
    assert 0 <= teacher["unc_median"] <= 1 and teacher["kl"] == pytest.approx(
        teacher["tkd"] + teacher["weighted_dkd"], rel=1e-4
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{(grid_dir / 'mlflow.db').resolve()}")
    root = client.get_run(result.mlflow_run_id)
    assert root.data.tags["atkd.kind"] == "comparison" and root.data.params["compare.seeds"] == "[0, 1]"
    nested = child_runs(client, root)
    assert sorted(nested) == [
        "neox-tiny/atkd seed 0",
        "neox-tiny/atkd seed 1",
        "neox-tiny/kd seed 0",
        "neox-tiny/kd seed 1",
        "prepare_data",
        f"teacher {teacher_dir.name}",
    ]
    cell = nested["neox-tiny/atkd seed 0"]
    assert "student_score" in cell.data.metrics
    assert sorted(child_runs(client, cell)) == ["distill_student", "evaluate"]
    assert "report/report.md" in [a.path for a in client.list_artifacts(root.info.run_id, "report")]

    # Run again: every stage comes from the caches, and the report says so beside its run time.
    again = compare(path)
    assert again.cells == 4
    assert (
        "(4 of 4 runs reused from an earlier invocation's outputs)"
        in (grid_dir / "report" / "report.md").read_text()
    )


@pytest.mark.slow
def test_a_comparison_with_a_cross_tokenizer_arm_keeps_its_own_data_and_teacher(prefect_harness, tmp_path):
    """An arm whose teacher has its own tokenizer gets prepared data and a teacher group of its own,
    and the report reads that teacher's cache in its own tokens."""
    path = write_comparison(
        tmp_path,
        axes={"objective": ["kd", "hybrid_x"]},
        objectives={
            "hybrid_x": {"teacher.tokenizer": {"source": "train", "vocab_size": 1024}, "loss.objective": "kd"}
        },
        seeds=[0],
        pairs=[["kd", "hybrid_x"]],
        ablations={},
        base_set=["eval.limit=2", "eval.max_new_tokens=4", "scoring.top_k=8"],
    )
    result = compare(path)
    grid_dir = tmp_path / "grid"
    assert result.cells == 2 and result.failed == []
    assert len(list(grid_dir.glob("data-*"))) == 2 and len(list((grid_dir / "teachers").iterdir())) == 2
    summary = json.loads((grid_dir / "report" / "summary.json").read_text())
    by_kind = {("tkd" in row): row for row in summary["teachers"]}
    # The same-tokenizer teacher has the KL terms against the untrained student; the other cannot.
    assert set(by_kind) == {True, False} and 0 <= by_kind[False]["unc_median"] <= 1
