"""The pipeline flow under a temporary Prefect API, tracked in a SQLite MLflow store."""

from __future__ import annotations

import base64
import json
import re

import pytest
from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig, load_config
from flows.distill import distill_pipeline
from tasks.publish import registered_model_name
from tests.conftest import PIPELINE_STAGES, REPO_ROOT, child_runs, tiny_config


def test_flow_runs_and_logs_parent_and_child_runs(prefect_harness, tmp_path):
    config = tiny_config(tmp_path)
    result = distill_pipeline(config)
    assert (tmp_path / "prepared" / "manifest.json").is_file()
    assert result.outputs["prepare_data"] == str(tmp_path / "prepared")

    client = MlflowClient(tracking_uri=result.mlflow_tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["loss.lam"] == "0.2"
    resolved = client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path / "downloaded"))
    assert load_config(resolved) == config
    assert parent.data.tags["prefect.flow_run_id"] == result.prefect_flow_run_id
    by_stage = child_runs(client, parent)
    assert set(by_stage) == PIPELINE_STAGES
    evaluation = by_stage["evaluate"].data.metrics
    assert "eval/student/atkd_add/rougeL" in evaluation and "eval/teacher/atkd_add/exact_match" in evaluation
    assert "difficulty/hard/forward_kl" in evaluation
    eval_artifacts = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "eval")]
    assert {"eval/summary.md", "eval/summary.png", "eval/student.json"} <= set(eval_artifacts)
    assert all(c.info.status == "FINISHED" for c in by_stage.values())
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

    # The student is registered with the summary table as its description, and is loadable from there.
    assert (
        result.registered_model == "test-student/1"
        and parent.data.tags["registered_model"] == "test-student/1"
    )
    version = client.get_model_version("test-student", "1")
    assert version.run_id == parent.info.run_id and "| atkd_add |" in version.description
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{parent.info.run_id}/model", tracking_uri=result.mlflow_tracking_uri
    )
    assert AutoModelForCausalLM.from_pretrained(local).num_parameters() > 0

    # The Prefect side links back: a Markdown artifact naming the MLflow run, with the table.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["atkd-test"]))
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == result.prefect_flow_run_id]
    assert len(mine) == 1 and result.mlflow_run_id in mine[0].data and "| atkd_add |" in mine[0].data
    # Its figure travels inside it (a file link would not resolve in the Prefect UI).
    (encoded,) = re.findall(
        r"!\[evaluation summary\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", mine[0].data
    )
    assert base64.b64decode(encoded).startswith(b"\x89PNG")

    # What a Prefect and MLflow user sees at a glance: the flow run named from the config, the
    # parent run's headline metrics, the training-runs view, the registered version's tags.
    with get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(result.prefect_flow_run_id)
    assert flow_run.name == "test: atkd k=0.5 lam=0.2 seed=0"
    headline = parent.data.metrics
    assert headline["score_gap"] == pytest.approx(headline["student_score"] - headline["teacher_score"])
    assert headline["student_perplexity"] > 1 and headline["teacher_perplexity"] > 1
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = version.tags
    assert (tags["objective"], tags["hard_fraction"], tags["lam"], tags["teacher"], tags["seed"]) == (
        "atkd",
        "0.5",
        "0.2",
        "neox-tiny",
        "0",
    )
    assert len(tags["data_sha256"]) == 64 and tags["divergence"] == "-"


def test_flow_parameter_schema_is_the_config_model():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(distill_pipeline.fn).model_dump()
    assert "config" in schema["properties"]
    assert "PipelineConfig" in str(schema)
    # The ad-hoc form opens on the demo config, in a workdir and under a registry name of its own.
    default = PipelineConfig.model_validate(schema["properties"]["config"]["default"])
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert default.model_dump(exclude={"name", "workdir"}) == demo.model_dump(exclude={"name", "workdir"})
    assert (default.name, str(default.workdir)) == ("adhoc", "runs/adhoc")
    assert registered_model_name(default) == "adhoc-student" != registered_model_name(demo)


CROSS_FIELD_MISTAKES = {
    "data.source hub without hub_name": {"data": {"source": "hub", "hub_name": None}},
    "data.source files without files": {"data": {"source": "files", "train_files": []}},
    "data.field_preset custom without fields": {"data": {"field_preset": "custom", "fields": None}},
    "tokenizer.source path without path": {"tokenizer": {"source": "path", "path": None}},
    "fp16 on cpu": {"finetune": {"training": {"precision": "fp16", "device": "cpu"}}},
    "threshold split without a threshold": {"loss": {"split_scope": "threshold", "unc_threshold": None}},
    "threshold split with auto k": {
        "loss": {"split_scope": "threshold", "unc_threshold": 0.3, "hard_fraction": "auto"}
    },
    "on-policy data with the offline teacher": {
        "distill": {"data_source": "on_policy", "teacher_source": "offline"}
    },
    "on-policy data with an SFT warm-up": {
        "distill": {"data_source": "on_policy", "teacher_source": "online", "sft_warmup_epochs": 1.0}
    },
}


def _merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("mistake", sorted(CROSS_FIELD_MISTAKES))
def test_cross_field_mistakes_are_refused_at_submit(mistake):
    """What the Prefect server checks when a run is submitted (the deployment's parameter schema,
    with Prefect's own validator) refuses the combinations the config model refuses."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError as SubmitError
    from prefect.utilities.schema_tools.validation import validate

    schema = parameter_schema(distill_pipeline.fn).model_dump()
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    validate({"config": demo}, schema, raise_on_error=True)
    bad = _merged(demo, CROSS_FIELD_MISTAKES[mistake])
    with pytest.raises(ValueError):
        PipelineConfig.model_validate(bad)
    with pytest.raises(SubmitError):
        validate({"config": bad}, schema, raise_on_error=True)


def test_every_deployment_parameter_is_described():
    from prefect.utilities.callables import parameter_schema

    from flows.compare import compare
    from flows.distill import distill_config_file

    for fn in (distill_config_file.fn, compare.fn):
        properties = parameter_schema(fn).model_dump()["properties"]
        assert all(p.get("description") for p in properties.values()), properties


def _task_states(flow_run_id: str) -> dict[str, str]:
    """Task name -> final state name of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


STAGES = (
    "prepare_data",
    "materialize_teacher",
    "finetune_teacher",
    "score_teacher",
    "distill_student",
    "evaluate",
)


@pytest.mark.slow
def test_second_run_hits_the_caches_and_a_loss_change_reruns_only_training_and_evaluation(
    prefect_harness, tmp_path
):
    config = tiny_config(tmp_path, eval={"limit": 4, "max_new_tokens": 8})
    first = distill_pipeline(config)
    assert {stage: _task_states(first.prefect_flow_run_id)[stage] for stage in STAGES} == dict.fromkeys(
        STAGES, "Completed"
    )
    again = distill_pipeline(config)
    assert {stage: _task_states(again.prefect_flow_run_id)[stage] for stage in STAGES} == dict.fromkeys(
        STAGES, "Cached"
    )
    assert again.outputs == first.outputs
    # The cached stages leave a trace in MLflow: a child run each, tagged and linked to its maker.
    client = MlflowClient(tracking_uri=again.mlflow_tracking_uri)
    made = child_runs(client, client.get_run(first.mlflow_run_id))
    served = child_runs(client, client.get_run(again.mlflow_run_id))
    tracked = {"prepare_data", "finetune_teacher", "score_teacher", "distill_student", "evaluate"}
    assert tracked <= set(made) and tracked <= set(served)
    for stage in tracked:
        assert made[stage].data.tags["cached"] == "false"
        assert served[stage].data.tags["cached"] == "true"
        assert served[stage].data.tags["atkd.made_by_run"] == made[stage].info.run_id
        assert served[stage].data.tags["atkd.stage_key"] == made[stage].data.tags["atkd.stage_key"]
        assert served[stage].info.status == "FINISHED"

    changed = config.model_copy(update={"loss": config.loss.model_copy(update={"lam": 0.7})})
    states = _task_states(distill_pipeline(changed).prefect_flow_run_id)
    rerun = {stage for stage in STAGES if states[stage] == "Completed"}
    assert rerun == {"distill_student", "evaluate"}
    assert {states[stage] for stage in STAGES if stage not in rerun} == {"Cached"}

    # A deleted output is rebuilt rather than served from a cache record pointing at nothing.
    import shutil

    shutil.rmtree(tmp_path / "eval")
    states = _task_states(distill_pipeline(changed).prefect_flow_run_id)
    assert states["evaluate"] == "Completed" and states["distill_student"] == "Cached"
    assert (tmp_path / "eval" / "summary.md").is_file()


def _student_weights(workdir) -> str:
    import json

    return json.loads((workdir / "models" / "student" / "manifest.json").read_text())["content_sha256"]


@pytest.mark.slow
def test_a_retrained_teacher_reruns_exactly_the_stages_after_it_and_the_student_follows_it(
    prefect_harness, tmp_path
):
    """Same workdir, another teacher seed: the cache is re-scored and the student is distilled from
    the new teacher (equal to a fresh workdir's), never reused from the old one."""
    config = tiny_config(tmp_path / "shared", eval={"limit": 2, "max_new_tokens": 4})
    distill_pipeline(config)
    old_student = _student_weights(tmp_path / "shared")
    retrained = config.model_copy(update={"teacher": config.teacher.model_copy(update={"init_seed": 1})})
    states = _task_states(distill_pipeline(retrained).prefect_flow_run_id)
    assert {stage for stage in STAGES if states[stage] == "Completed"} == set(STAGES) - {"prepare_data"}
    assert states["prepare_data"] == "Cached"

    fresh = retrained.model_copy(update={"workdir": tmp_path / "fresh"})
    distill_pipeline(fresh)
    assert _student_weights(tmp_path / "shared") == _student_weights(tmp_path / "fresh") != old_student


def test_the_auto_split_is_logged_with_the_distillation_and_the_difficulty_report(prefect_harness, tmp_path):
    config = tiny_config(tmp_path, loss={"hard_fraction": "auto"}, eval={"enabled": False})
    result = distill_pipeline(config)
    client = MlflowClient(tracking_uri=result.mlflow_tracking_uri)
    distill = child_runs(client, client.get_run(result.mlflow_run_id))["distill_student"]
    cache = json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())
    assert float(distill.data.params["loss.auto_unc_threshold"]) == pytest.approx(cache["unc_auto_threshold"])
    assert distill.data.metrics["auto_hard_fraction"] == pytest.approx(cache["unc_auto_hard_fraction"])
    assert distill.data.params["loss.hard_fraction"] == "auto"
    report = json.loads((config.layout.teacher_report / "difficulty.json").read_text())
    assert report["hard_fraction"] == "auto"
    assert report["unc_threshold"] == pytest.approx(cache["unc_auto_threshold"], nan_ok=True)


def test_the_cross_tokenizer_config_runs_through_the_flow(prefect_harness, tmp_path):
    """configs/cross-tokenizer.yaml at a tiny size: two tokenizers, the alignment's statistics on
    the prepare_data run, ATKD over spans in the distillation run."""
    config = load_config(
        REPO_ROOT / "configs" / "cross-tokenizer.yaml",
        [
            f"workdir={tmp_path}",
            "data.embedded.train_size=64",
            "data.embedded.validation_size=16",
            "data.embedded.test_size=16",
            "teacher.preset=neox-tiny",
            "finetune.training.max_steps=2",
            "finetune.training.batch_size=16",
            "finetune.training.micro_batch_size=16",
            "distill.training.max_steps=3",
            "distill.training.batch_size=16",
            "distill.training.micro_batch_size=16",
            "scoring.top_k=8",
            "eval.limit=2",
            "eval.max_new_tokens=4",
            "tracking.experiment_name=cross",
        ],
    )
    assert config.cross_tokenizer and config.tokenizer.vocab_size != config.teacher.tokenizer.vocab_size
    result = distill_pipeline(config)
    client = MlflowClient(tracking_uri=result.mlflow_tracking_uri)
    by_stage = child_runs(client, client.get_run(result.mlflow_run_id))
    assert set(by_stage) == PIPELINE_STAGES
    assert all(run.info.status == "FINISHED" for run in by_stage.values())
    prepared = by_stage["prepare_data"].data
    assert 0 < prepared.metrics["train/matched_share"] < 1
    assert int(prepared.params["teacher_vocab_size"]) > int(prepared.params["vocab_size"])
    distill = by_stage["distill_student"].data.metrics
    assert distill["num_spans"] > 0 and "tkd" in distill and "num_matched" in distill
