"""Hub access before the first stage: offline when the config needs no hub, one line within seconds
when it needs a hub that does not answer, nothing in the way when the hub answers."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from atkd_core.config import load_config
from atkd_core.errors import UserError
from atkd_core.hub import hub_needs, hub_problem
from flows.cli import main
from infra.hub_access import prepare_hub_access
from tests.conftest import REPO_ROOT, free_port, tiny_config
from tests.flows.test_reliability import _write_config


def _closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


@pytest.fixture()
def answering_hub():
    """A loopback HTTP server that answers every request with 200 (a stand-in for the hub's API)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_demo_needs_no_hub_and_the_real_scale_config_names_what_it_needs():
    assert hub_needs(load_config(REPO_ROOT / "configs" / "demo.yaml")) == []
    real = load_config(REPO_ROOT / "configs" / "pythia-dolly.yaml")
    assert hub_needs(real, {"mmlu": ["cais/mmlu"]}) == [
        "teacher.path EleutherAI/pythia-1.4b",
        "student.path EleutherAI/pythia-160m",
        "eval.harness_tasks mmlu (cais/mmlu)",
    ]


def test_a_run_that_needs_no_hub_is_made_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert prepare_hub_access(tiny_config(tmp_path)) == []
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    config = tiny_config(tmp_path, student={"path": "org/model"})
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        prepare_hub_access(config)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        f"the run reads from the Hugging Face hub (student.path org/model) but http://127.0.0.1:{port}"
    )


def test_a_hub_that_answers_lets_the_run_start_and_offline_mode_skips_the_probe(
    tmp_path, monkeypatch, answering_hub
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", answering_hub)
    config = tiny_config(tmp_path, student={"path": "org/model"})
    assert hub_problem() is None
    assert prepare_hub_access(config) == ["student.path org/model"]
    # Offline, the probe is not made (the stages read the local cache): an unreachable endpoint is fine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert prepare_hub_access(config) == ["student.path org/model"]


def test_the_command_line_fails_in_seconds_with_one_line_when_the_hub_does_not_answer(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A listening socket that never accepts: the probe waits for its timeout, not a refusal.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler = socket.create_connection(silent.getsockname())  # fills the backlog of 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    config = str(_write_config(tmp_path))
    started = time.monotonic()
    try:
        code = main(
            ["data", "prepare", config, "--set", "student.preset=null", "--set", "student.path=org/model"]
        )
    finally:
        filler.close()
        silent.close()
    assert code != 0 and time.monotonic() - started < 15
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the run reads from the Hugging Face hub (student.path org/model)" in lines[0]
    assert not (tmp_path / "work" / "prepared").exists()
