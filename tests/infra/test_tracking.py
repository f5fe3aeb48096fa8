"""Tracking failures: an unreachable server is a clear error at the start and costs a running
stage nothing (its calls wait in the outbox); a flaky one never costs training its metrics."""

from __future__ import annotations

import json

import pytest
from prefect import flow

from infra import tracking
from infra.tracking import MetricsBuffer, RunHandle, TrackingUnavailable, connect, ended_status
from tasks.data import prepare_data_task
from tests.conftest import free_port, tiny_config


class FlakyRun(RunHandle):
    """A run handle whose sends fail while ``down`` is set."""

    def __init__(self):
        super().__init__(client=None, run_id="fake")
        self.down = False
        self.received = []

    def send_metrics(self, records):
        if self.down:
            raise ConnectionError("server went away")
        self.received.extend(records)


@flow
def run_one_stage(config, parent_run_id):
    """prepare_data in a flow; (failed, its error, the task run id) without failing the flow."""
    state = prepare_data_task(config, parent_run_id, return_state=True)
    return state.is_failed(), state.result(raise_on_failure=False), state.state_details.task_run_id


def run_count(task_run_id) -> int:
    """How many times Prefect ran a task run (1 + retries taken)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).run_count


def test_buffer_keeps_metrics_through_an_outage_and_sends_them_in_order():
    run, warnings = FlakyRun(), []
    buffer = MetricsBuffer(run, warnings.append, flush_every_steps=2)
    for step in range(1, 4):
        buffer({"loss": float(step)}, step)
    run.down = True
    for step in range(4, 9):
        buffer({"loss": float(step)}, step)
    assert [m.step for m in run.received] == [1, 2]
    assert len(warnings) == 1 and "will retry" in warnings[0]
    run.down = False
    buffer({"loss": 9.0}, 9)
    buffer({"loss": 10.0}, 10)
    assert [m.step for m in run.received] == list(range(1, 11)) and "recovered" in warnings[-1]
    assert buffer.close() == 0


def test_buffer_sends_every_few_seconds_or_steps_whichever_comes_first():
    run, now = FlakyRun(), [0.0]
    buffer = MetricsBuffer(run, [].append, flush_every_steps=4, flush_every_seconds=5.0, clock=lambda: now[0])
    for step in range(1, 4):  # fast steps: nothing sent before the fourth
        buffer({"loss": float(step)}, step)
    assert run.received == []
    buffer({"loss": 4.0}, 4)
    assert [m.step for m in run.received] == [1, 2, 3, 4]
    now[0] = 6.0  # a slow step: sent at once
    buffer({"loss": 5.0}, 5)
    assert [m.step for m in run.received] == [1, 2, 3, 4, 5]


def test_buffer_reports_what_never_arrived():
    run, warnings = FlakyRun(), []
    buffer = MetricsBuffer(run, warnings.append, flush_every_steps=100, max_pending=3)
    run.down = True
    for step in range(1, 6):
        buffer({"loss": float(step), "lr": 0.1}, step)
    assert buffer.close() == 10
    assert "10 metric values could not be sent" in warnings[-1] and "metrics.jsonl" in warnings[-1]


def test_connect_names_the_unreachable_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match=rf"MLflow tracking at {uri} is unreachable .*atkd serve"):
        connect(uri)


@pytest.mark.slow
def test_a_stage_completes_and_keeps_its_calls_when_the_server_is_unreachable(
    prefect_harness, tmp_path, monkeypatch
):
    """Mid-pipeline, an unreachable server costs the stage nothing: no retry, no failure; its run
    and everything logged to it wait in the outbox for `atkd sync`."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    config = tiny_config(tmp_path, tracking={"experiment_name": "x", "tracking_uri": uri})

    failed, _, task_run_id = run_one_stage(config, "some-parent-run")
    assert not failed and run_count(task_run_id) == 1
    entries = tracking.Outbox(config.workdir).entries()
    assert entries[0]["kind"] == "create" and entries[0]["parent"] == "some-parent-run"
    assert {"params", "metrics", "artifact", "terminate"} <= {e["kind"] for e in entries}
    assert {e["run"] for e in entries} == {entries[0]["run"]}


def test_a_stopped_run_is_killed_and_a_broken_one_failed():
    from prefect.exceptions import TerminationSignal

    assert ended_status(KeyboardInterrupt()) == ended_status(TerminationSignal(15)) == "KILLED"
    assert ended_status(ValueError("bad")) == "FAILED"


def test_user_errors_are_not_retried(prefect_harness, tmp_path):
    config = tiny_config(
        tmp_path,
        data={"source": "files", "train_files": [str(tmp_path / "missing.jsonl")]},
        tracking={"enabled": False},
    )

    failed, error, task_run_id = run_one_stage(config, None)
    assert failed and "does not exist" in str(error)
    assert run_count(task_run_id) == 1


def test_an_outage_is_kept_beside_the_outbox_for_this_process_only(tmp_path, capsys):
    outbox = tracking.Outbox(tmp_path)
    assert outbox.outage("http://a") is None
    outbox.note_outage("http://a", ConnectionError("refused"))
    outbox.note_outage("http://a", ConnectionError("refused again"))
    assert capsys.readouterr().err.count("MLflow at http://a failed") == 1  # warned once
    assert outbox.outage("http://a") == "ConnectionError: refused" and outbox.outage("http://b") is None
    # A later process (another pid) starts afresh: its calls try the server again.
    record = json.loads(outbox.outage_path.read_text())
    outbox.outage_path.write_text(json.dumps({**record, "pid": record["pid"] + 1}))
    assert outbox.outage("http://a") is None
    outbox.clear_outage()
    assert not outbox.outage_path.exists()


def test_run_links_open_the_mlflow_training_runs_view():
    """MLflow 3's UI starts a fresh browser in its GenAI view whatever the experiment's tags say;
    the links the product prints carry the parameter that opens the training runs."""
    handle = RunHandle(client=None, run_id="abc", tracking_uri="http://127.0.0.1:5000/", experiment_id="7")
    assert handle.web_url() == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert tracking.mlflow_ui_url("http://mlflow.atkd:5000") == (
        "http://mlflow.atkd:5000/#/experiments?workflowType=machine_learning"
    )
    local = RunHandle(
        client=None, run_id="abc", tracking_uri="sqlite:///runs/demo/mlflow.db", experiment_id="7"
    )
    assert local.web_url() is None
