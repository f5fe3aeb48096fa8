"""What an adversarial user meets: one run per workdir, one line per bad input, and a tracking
outage that never fails the science."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from atkd_core.config import config_to_yaml
from atkd_core.workdir import LOCK_NAME, WorkdirBusy, workdir_lock
from flows.cli import main
from infra import tracking
from tests.conftest import REPO_ROOT, child_runs, free_port, tiny_config

HOLD_LOCK = """
import sys, time
from pathlib import Path
from atkd_core.workdir import workdir_lock
with workdir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _write_config(tmp_path, **sections):
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(tiny_config(tmp_path / "work", **sections)))
    return path


def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_holder(tmp_path, capsys):
    path = _write_config(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "work")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        # Non-blocking by construction (LOCK_NB): refused, not queued behind the holder.
        assert main(["data", "prepare", str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"atkd: workdir {tmp_path / 'work'} is in use by another run (pid {holder.pid} "
        )
        assert socket.gethostname() in err and len(err.splitlines()) == 1
        assert not (tmp_path / "work" / "prepared").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed: it could not clean up): its lock is taken over, with a warning.
    assert main(["data", "prepare", str(path)]) == 0
    assert f"took over the lock of a run that is gone (pid {holder.pid} " in capsys.readouterr().err


def test_the_workdir_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    warnings: list[str] = []
    with workdir_lock(tmp_path, warn=warnings.append), workdir_lock(tmp_path, warn=warnings.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == "" and not warnings
    with workdir_lock(tmp_path, warn=warnings.append):
        pass
    assert not warnings


def test_a_busy_workdir_is_refused_by_the_library_too(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid} on"), workdir_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()


def _bad_inputs(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        b'{"instruction": "ok", "response": "fine"}\n{"instruction": "caf\xe9", "response": "x"}\n'
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    port = free_port()
    return {
        "malformed --set": (
            ["config", "show", "{config}", "--set", "loss.lam"],
            "--set 'loss.lam': expected KEY=VALUE",
        ),
        "--set value not YAML": (
            ["config", "show", "{config}", "--set", "loss.lam=[1"],
            "--set 'loss.lam=[1': VALUE is not valid YAML",
        ),
        "non-UTF-8 data": (
            [
                "data",
                "prepare",
                "{config}",
                "--set",
                "data.source=files",
                "--set",
                f"data.train_files=[{latin1}]",
            ],
            f"{latin1}:2: not UTF-8 (byte 0xe9)",
        ),
        "missing teacher.path": (
            [
                "data",
                "prepare",
                "{config}",
                "--set",
                "teacher.preset=null",
                "--set",
                f"teacher.path={tmp_path}/nope",
            ],
            f"teacher.path: '{tmp_path}/nope' does not exist",
        ),
        "hub id not in the cache": (
            [
                "data",
                "prepare",
                "{config}",
                "--set",
                "student.preset=null",
                "--set",
                "student.path=org/not-cached",
            ],
            "student.path: 'org/not-cached' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
        ),
        "unwritable workdir": (
            ["data", "prepare", "{config}", "--set", f"workdir={a_file}/work"],
            f"workdir {a_file}/work cannot be written: Not a directory",
        ),
        "unreachable tracking server": (
            ["run", "{config}", "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"],
            f"MLflow tracking at http://127.0.0.1:{port} is unreachable (ConnectionRefusedError",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "malformed --set",
        "--set value not YAML",
        "non-UTF-8 data",
        "missing teacher.path",
        "hub id not in the cache",
        "unwritable workdir",
        "unreachable tracking server",
    ],
)
def test_each_user_error_is_one_line_and_a_nonzero_exit(tmp_path, capsys, case):
    argv, expected = _bad_inputs(tmp_path)[case]
    config = str(_write_config(tmp_path))
    argv = [config if a == "{config}" else a for a in argv]
    assert main(argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    with pytest.raises(Exception, match=expected.split(" (")[0][:40].replace("[", r"\[")):
        main(["--debug", *argv])


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="fp16 under device auto is valid on a CUDA machine"
)
def test_fp16_with_device_auto_is_refused_before_any_stage_on_a_cpu_machine(tmp_path, capsys):
    config = str(_write_config(tmp_path))
    fp16 = ["--set", "distill.training.precision=fp16"]
    # The config itself is valid whatever machine reads it (a GPU machine runs it)...
    assert main(["config", "show", config, *fp16]) == 0
    capsys.readouterr()
    # ...and a run on this CPU machine is refused where the device is chosen, before any stage.
    assert main(["train", config, "--stage", "distill", *fp16]) == 2
    err = capsys.readouterr().err
    assert (
        "distill.training.precision: 'fp16' would run on the CPU (device 'auto' found no CUDA device on this machine)"
        in err
    )
    assert not (tmp_path / "work" / "prepared").exists()


def test_a_tracking_outage_after_the_outputs_keeps_the_calls_and_sync_sends_them(
    prefect_harness, tmp_path, monkeypatch, capsys
):
    """The server 'goes away' once the evaluation starts logging: the flow completes, the outbox
    keeps what was not sent, and ``atkd sync`` delivers it (artifacts, status, registration)."""
    from flows.distill import distill_pipeline

    config_path = _write_config(tmp_path)
    config = tiny_config(tmp_path / "work")
    real_log_artifact = MlflowClient.log_artifact

    def refuse(self, run_id, local_path, artifact_path=None):
        if "/eval/" in str(local_path):
            raise ConnectionError("simulated outage: connection refused")
        return real_log_artifact(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    result = distill_pipeline(config)
    assert set(result.outputs) >= {"evaluate", "distill_student"}
    assert (tmp_path / "work" / "eval" / "summary.md").is_file()
    assert result.unsent_tracking_calls > 0 and result.registered_model is None
    kinds = [e["kind"] for e in tracking.Outbox(config.workdir).entries()]
    assert {"artifact", "terminate", "register"} <= set(kinds)
    assert "MLflow at" in capsys.readouterr().err

    monkeypatch.setattr(MlflowClient, "log_artifact", real_log_artifact)
    assert main(["sync", str(config_path)]) == 0
    assert f"atkd sync: {len(kinds)} tracking calls sent" in capsys.readouterr().out
    assert not (tmp_path / "work" / tracking.OUTBOX_NAME).exists()
    client = MlflowClient(tracking_uri=result.mlflow_tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    evaluate = child_runs(client, parent)["evaluate"]
    assert evaluate.info.status == "FINISHED"
    assert "eval/summary.md" in [a.path for a in client.list_artifacts(evaluate.info.run_id, "eval")]
    assert client.get_model_version("test-student", "1").run_id == parent.info.run_id


def test_a_user_error_inside_the_flow_prints_no_traceback(prefect_harness, tmp_path, capfd):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"instruction": "caf\xe9", "response": "x"}\n')
    config = str(_write_config(tmp_path, data={"source": "files", "train_files": [str(latin1)]}))
    assert main(["run", config]) == 1
    captured = capfd.readouterr()
    assert f"atkd: {latin1}:1: not UTF-8 (byte 0xe9)" in captured.err
    assert "Traceback" not in captured.out + captured.err
