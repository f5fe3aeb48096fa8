"""Against real servers started here: deploy from prefect.yaml, run through the process worker,
find the runs, metrics, artifacts and registered model in MLflow; stop exactly what was started."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atkd_core.errors import UserError
from atkd_core.workdir import process_alive
from infra.kubernetes import TEMPLATE_PATH
from infra.servers import postgres_bin_dir, read_state, start, stop
from tests.conftest import PIPELINE_STAGES, REPO_ROOT, child_runs, free_port, tiny_config

PREFECT = str(Path(sys.executable).parent / "prefect")


def _prefect(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _wait_for_flow_run(api_url: str, flow_run_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as response:
            run = json.load(response)
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


def _postgres_rows(servers, database: str, query: str) -> int:
    done = subprocess.run(
        [
            str(postgres_bin_dir() / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(servers.postgres_port),
            "-U",
            "postgres",
            "-d",
            database,
            "-tAc",
            query,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


@pytest.fixture
def state_dir(tmp_path):
    """Where the servers keep their state: outside pytest's root-only directory, since PostgreSQL
    runs as another user when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="atkd-servers-"))
    path.chmod(0o711)
    yield path / "state"
    shutil.rmtree(path, ignore_errors=True)


def _start_on_free_ports(state: Path, backend: str, attempts: int = 3):
    """start() on ports that were free a moment ago. The servers are separate programs that bind
    the port they are given (none reports a port the system chose), so a port another process took
    in between fails one attempt (start's check, or the server's log) and the next uses new ports."""
    for _ in range(attempts - 1):
        try:
            return start(state, free_port(), free_port(), backend=backend, postgres_port=free_port())
        except UserError as exc:
            if not re.search("already in use", str(exc), re.IGNORECASE):
                raise
            stop(state, log=lambda _: None)
    return start(state, free_port(), free_port(), backend=backend, postgres_port=free_port())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_deployment_runs_through_the_worker_and_lands_in_mlflow(tmp_path, state_dir, backend):
    state = state_dir
    servers = _start_on_free_ports(state, backend)
    try:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING"))
        }
        env.update(servers.environment())
        env["PREFECT_HOME"] = str(tmp_path / "client-home")
        deployed = _prefect(["deploy", "--all"], env)
        assert "distill_pipeline/adhoc" in deployed and "compare/compare-kd-atkd" in deployed
        nightly = _prefect(["deployment", "inspect", "distill_config_file/demo-nightly"], env)
        assert "0 2 * * *" in nightly and "configs/demo.yaml" in nightly and "atkd-local" in nightly
        for name in ("distill_pipeline/adhoc", "compare/compare-kd-atkd"):
            assert "atkd-local" in _prefect(["deployment", "inspect", name], env)
        if backend == "sqlite":
            # The Kubernetes pool takes the shipped template, and the server accepts prefect.k8s.yaml's
            # deployment against it (it validates job variables against the pool's template).
            template = str(REPO_ROOT / TEMPLATE_PATH)
            pool = [
                "work-pool",
                "create",
                "atkd-kubernetes",
                "--type",
                "kubernetes",
                "--base-job-template",
                template,
            ]
            _prefect(pool, env)
            image = "registry.example/atkd-worker:cuda"
            k8s_env = {**env, "ATKD_IMAGE": image, "MLFLOW_TRACKING_URI": "http://mlflow.atkd:5000"}
            deployed = _prefect(["deploy", "--all", "--prefect-file", "prefect.k8s.yaml"], k8s_env)
            assert "distill_config_file/pythia-dolly-gpu" in deployed
            inspected = _prefect(["deployment", "inspect", "distill_config_file/pythia-dolly-gpu"], env)
            assert image in inspected and "'gpu_count': 8" in inspected

        config = tiny_config(tmp_path / "work", eval={"limit": 4, "max_new_tokens": 6})
        params = json.dumps({"config": config.model_dump(mode="json")})
        started = _prefect(["deployment", "run", "distill_pipeline/adhoc", "--params", params], env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        run = _wait_for_flow_run(servers.prefect_api_url, flow_run_id, timeout_s=600)
        worker_log = (state / "worker.log").read_text()
        assert run["state"]["type"] == "COMPLETED", worker_log[-3000:]

        client = MlflowClient(tracking_uri=servers.mlflow_url)
        (parent,) = client.search_runs(
            [client.get_experiment_by_name("test").experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
        )
        assert parent.info.status == "FINISHED" and parent.data.params["loss.objective"] == "atkd"
        url = parent.data.tags["prefect.flow_run_url"]
        # The UI's route for a flow run (runs/flow-run/<id>), not prefect.runtime's flow-runs/... (a 404).
        assert url == f"{servers.prefect_ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"
        by_stage = child_runs(client, parent)
        assert set(by_stage) == PIPELINE_STAGES
        history = client.get_metric_history(by_stage["distill_student"].info.run_id, "loss")
        assert len(history) == 12 and [m.step for m in history] == list(range(1, 13))
        assert "eval/student/atkd_add/rougeL" in by_stage["evaluate"].data.metrics
        # Artifacts went through the server's proxy into its artifact store.
        summary = client.download_artifacts(
            by_stage["evaluate"].info.run_id, "eval/summary.md", str(tmp_path)
        )
        assert "| atkd_add |" in Path(summary).read_text()
        assert list((state / "mlartifacts").rglob("summary.md"))
        version = client.get_model_version("test-student", parent.data.tags["registered_model"].split("/")[1])
        assert version.run_id == parent.info.run_id and "| atkd_add |" in version.description

        # The Prefect side links back: the flow run's Markdown artifact names the MLflow run.
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{servers.prefect_api_url}/artifacts/filter",
                data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ) as response:
            artifacts = json.load(response)
        assert any(parent.info.run_id in (a.get("data") or "") for a in artifacts)
        if backend == "postgres":
            # Both servers kept their state in PostgreSQL (compose's databases and URI forms), not SQLite.
            assert servers.postgres_pid is not None and not (state / "mlflow.db").exists()
            assert _postgres_rows(servers, "mlflow", "SELECT count(*) FROM runs") >= len(PIPELINE_STAGES) + 1
            assert (
                _postgres_rows(
                    servers, "prefect", f"SELECT count(*) FROM flow_run WHERE id = '{flow_run_id}'"
                )
                == 1
            )
    finally:
        # Stopped whatever happened above; checked after, so a failure above is the one reported.
        stopped = stop(state, log=lambda _: None)
    pids = [servers.prefect_pid, servers.mlflow_pid, servers.worker_pid, servers.postgres_pid]
    assert stopped and read_state(state) is None
    assert not any(process_alive(pid) for pid in pids if pid is not None)


def test_start_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            start(tmp_path, prefect_port=port, mlflow_port=free_port())


def test_stop_without_servers_says_so(tmp_path):
    assert stop(tmp_path, log=lambda _: None) is False
