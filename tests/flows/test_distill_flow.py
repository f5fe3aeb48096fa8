"""The pipeline flow under a temporary Prefect API, tracked in a SQLite MLflow store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from flows.distill import distill_pipeline
from tests.conftest import tiny_config


def test_flow_runs_and_logs_parent_and_child_runs(prefect_harness, tmp_path):
    config = tiny_config(tmp_path)
    result = distill_pipeline(config)
    assert (tmp_path / "prepared" / "manifest.json").is_file()
    assert result.outputs["prepare_data"] == str(tmp_path / "prepared")

    client = MlflowClient(tracking_uri=result.mlflow_tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["loss.lam"] == "0.2"
    assert parent.data.tags["prefect.flow_run_id"] == result.prefect_flow_run_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {c.data.tags["mlflow.runName"]: c for c in children}
    assert set(by_stage) == {
        "prepare_data",
        "finetune_teacher",
        "score_teacher",
        "distill_student",
        "evaluate",
    }
    evaluation = by_stage["evaluate"].data.metrics
    assert "eval/student/atkd_add/rougeL" in evaluation and "eval/teacher/atkd_add/exact_match" in evaluation
    assert "difficulty/hard/forward_kl" in evaluation
    eval_artifacts = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "eval")]
    assert {"eval/summary.md", "eval/summary.png", "eval/student.json"} <= set(eval_artifacts)
    assert all(c.info.status == "FINISHED" for c in children)
    assert by_stage["prepare_data"].data.metrics["train/rows"] == 64
    assert by_stage["score_teacher"].data.metrics["tokens"] > 0
    assert "manifest.json" in [a.path for a in client.list_artifacts(by_stage["prepare_data"].info.run_id)]
    difficulty = [a.path for a in client.list_artifacts(by_stage["score_teacher"].info.run_id, "difficulty")]
    assert "difficulty/unc_histogram.png" in difficulty
    assert (tmp_path / "teacher_cache" / "manifest.json").is_file()
    distill = by_stage["distill_student"]
    history = client.get_metric_history(distill.info.run_id, "loss")
    assert len(history) == 12 and history[-1].step == 12
    assert {"dkd_easy", "tkd_hard", "num_hard", "val_loss", "lr", "grad_norm"} <= set(distill.data.metrics)
    assert distill.data.params["loss.objective"] == "atkd"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result.outputs["distill_student"]).num_parameters() > 0


def test_flow_parameter_schema_is_the_config_model():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(distill_pipeline.fn).model_dump()
    assert "config" in schema["properties"]
    assert "PipelineConfig" in str(schema)
