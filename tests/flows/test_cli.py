"""The ``atkd`` stage commands, end to end on a tiny config (no Prefect, no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atkd_core.config import config_to_yaml
from flows.cli import main
from tests.conftest import PIPELINE_STAGES, REPO_ROOT, tiny_config


@pytest.mark.slow
def test_atkd_train_runs_seqkd_distillation(tmp_path, capsys):
    training = {
        "zero_stage": 2,
        "batch_size": 16,
        "micro_batch_size": 16,
        "max_steps": 6,
        "optim": {"lr": 3e-3},
    }
    config = tiny_config(
        tmp_path / "work",
        finetune={"training": training},
        distill={"data_source": "teacher_generated", "generation_max_new_tokens": 8, "training": training},
        loss={"objective": "atkd", "setting": "reverse"},
    )
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["train", str(path), "--stage", "distill"]) == 0
    out = capsys.readouterr().out
    assert "distill:" in out and "score_teacher: wrote" in out
    work = tmp_path / "work"
    assert (work / "prepared_teacher_generated" / "manifest.json").is_file()
    cache = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    generated = json.loads((work / "prepared_teacher_generated" / "manifest.json").read_text())
    # The cache was scored on the teacher's responses, not on the ground truth.
    assert cache["spec"]["prepared_data_sha256"] == generated["content_sha256"]
    metrics = (work / "models" / "student" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    config = tiny_config(tmp_path, data={"source": "files", "train_files": [str(tmp_path / "missing.jsonl")]})
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["data", "prepare", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"atkd: {tmp_path / 'missing.jsonl'}: file does not exist"


@pytest.mark.slow
def test_atkd_train_redistils_the_student_after_the_teacher_changes(tmp_path, capsys):
    """The stale-student case through the CLI: the cache's contents, not its path, key the student."""
    training = {"batch_size": 16, "micro_batch_size": 16, "max_steps": 3, "optim": {"lr": 3e-3}}

    def train(workdir, teacher_seed):
        config = tiny_config(
            workdir,
            teacher={"preset": "neox-tiny", "init_seed": teacher_seed},
            finetune={"training": training},
            distill={"training": training},
        )
        path = workdir.parent / f"{workdir.name}-{teacher_seed}.yaml"
        path.write_text(config_to_yaml(config))
        assert main(["train", str(path), "--stage", "distill"]) == 0
        return json.loads((workdir / "models" / "student" / "manifest.json").read_text())["content_sha256"]

    old = train(tmp_path / "shared", 0)
    changed = train(tmp_path / "shared", 1)
    assert "distill: reused" not in capsys.readouterr().out
    assert changed == train(tmp_path / "fresh", 1) != old


@pytest.mark.slow
def test_large_vocabulary_profile_trains_the_same_fused_and_unfused(tmp_path, capsys):
    """configs/large-vocab.yaml (a 50,304-token vocabulary, a Pythia-160M-wide student), a few steps
    with the output layer inside the loss and with plain logits: the same per-step losses."""
    config = REPO_ROOT / "configs" / "large-vocab.yaml"
    small = ["data.embedded.train_size=64", "finetune.enabled=false", "distill.training.max_steps=3"]

    def losses(fused: bool) -> list[float]:
        workdir = tmp_path / f"fused-{fused}"
        argv = ["train", str(config), "--stage", "distill", "--set", f"workdir={workdir}"]
        for override in [*small, f"loss.fused_linear={str(fused).lower()}"]:
            argv += ["--set", override]
        assert main(argv) == 0
        records = (workdir / "models" / "student" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in records]

    fused, plain = losses(True), losses(False)
    assert len(fused) == 3 and fused == pytest.approx(plain, rel=1e-4, abs=1e-7)
    from transformers import AutoConfig

    student = AutoConfig.from_pretrained(tmp_path / "fused-True" / "models" / "student")
    assert student.vocab_size == 50304 and student.hidden_size == 768


@pytest.mark.slow
def test_atkd_run_direct_runs_every_stage_without_prefect_or_mlflow(tmp_path, capsys):
    training = {"batch_size": 16, "micro_batch_size": 16, "max_steps": 2}
    config = tiny_config(
        tmp_path / "work", finetune={"training": training}, distill={"training": training}, eval={"limit": 2}
    )
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["run", str(path), "--direct"]) == 0
    out = capsys.readouterr().out
    listed = dict(line.split() for line in out.split("=== atkd run --direct: done in")[1].splitlines()[1:])
    assert set(listed) == PIPELINE_STAGES
    for output in listed.values():
        assert (Path(output) / "manifest.json").is_file()
    # No tracking: neither an MLflow store nor a run was written anywhere in the workdir.
    assert not list((tmp_path / "work").rglob("mlflow*"))


def test_atkd_score_verifies_a_reused_cache_and_scores_a_damaged_one_again(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(tiny_config(tmp_path / "work")))
    assert main(["score", str(path)]) == 0
    cache = tmp_path / "work" / "teacher_cache"
    first = json.loads((cache / "manifest.json").read_text())["content_sha256"]
    assert "score_teacher: reused" not in capsys.readouterr().out

    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    assert main(["score", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"the cache in {cache} is damaged (shard-00000 is corrupt" in out and "score_teacher: wrote" in out
    assert json.loads((cache / "manifest.json").read_text())["content_sha256"] == first

    # Online distillation does not read the cache: its reuse checks sizes only, which still catch a cut shard.
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["score", str(path), "--set", "distill.teacher_source=online"]) == 0
    assert "shard-00000 has" in capsys.readouterr().out
    assert main(["score", str(path)]) == 0
    assert "score_teacher: reused" in capsys.readouterr().out


def test_atkd_score_writes_the_difficulty_report_the_flow_writes_and_its_target_is_current(tmp_path):
    from atkd_core.pipeline import StageArguments, stage_target

    config = tiny_config(tmp_path / "work", finetune={"enabled": False})
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["score", str(path)]) == 0
    report = json.loads((config.layout.teacher_report / "difficulty.json").read_text())
    assert report["hard_fraction"] == config.loss.hard_fraction
    # The Prefect cache key of the stage sees the output the CLI made as current: no drift between them.
    arguments = StageArguments(teacher_dir=config.layout.teacher_init)
    target = stage_target("score_teacher", config, arguments)
    assert target is not None and target.current
