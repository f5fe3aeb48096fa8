"""``atkd check``: the readiness table in seconds, exit 0 when the run can start, else one line per
problem; ``atkd run`` refuses on the same problems before any stage, and its flow does not check twice."""

from __future__ import annotations

from flows.cli import main
from infra.readiness import checked, ensure_ready_once
from tests.conftest import free_port, tiny_config
from tests.flows.test_reliability import _write_config


def test_check_prints_the_table_and_says_the_run_can_start(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["check", str(_write_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    subjects = [line.split("  ")[0] for line in out.splitlines()[1:] if line.strip() and "  " in line]
    assert subjects == [
        "hub",
        "teacher model",
        "student model",
        "tokenizer",
        "data",
        "devices finetune",
        "devices distill",
        "disk",
        "tracking",
        "Prefect API",
    ]
    assert "ready to run" in out and not (tmp_path / "work").exists()  # a check writes nothing


def test_every_problem_is_one_line_and_the_run_starts_no_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    missing = tmp_path / "missing.jsonl"
    path = _write_config(
        tmp_path,
        data={"source": "files", "train_files": [str(missing)], "field_preset": "dolly"},
        tokenizer={"source": "path", "path": str(tmp_path / "no-tokenizer")},
    )
    assert main(["check", str(path)]) == 1
    problems = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in problems] == ["tokenizer", "data train", "Prefect API"]
    assert problems[1] == f"atkd: data train: {missing}: file does not exist"
    assert (
        problems[0]
        == f"atkd: tokenizer: tokenizer.path {str(tmp_path / 'no-tokenizer')!r} does not exist (a directory saved with save_pretrained, or a hub id, is expected)"
    )
    assert "did not answer within 5 s" in problems[2] and "atkd serve" in problems[2]

    assert main(["run", str(path)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 3
    assert not (tmp_path / "work" / "prepared").exists()


def test_the_flow_checks_unless_its_caller_just_did(tmp_path):
    config = tiny_config(tmp_path)
    assert ensure_ready_once(config) is not None
    with checked(config):
        assert ensure_ready_once(config) is None
        other = tiny_config(tmp_path, loss={"lam": 0.5})
        assert ensure_ready_once(other) is not None
    assert ensure_ready_once(config) is not None
