"""Shared test fixtures: an isolated Prefect home and a tiny pipeline config."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before prefect is imported anywhere: an isolated home (removed when the session ends), no
# telemetry.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="atkd-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
from infra.settings import apply_environment_defaults  # noqa: E402

apply_environment_defaults()
# The tests make their own offline world: no test may wait on a real hub (the hub tests start
# their own server on the loopback and point HF_ENDPOINT at it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from atkd_core.config import PipelineConfig  # noqa: E402
from atkd_core.training.distributed import free_port  # noqa: E402, F401 (re-exported for tests)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (started once: ~10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _no_debug_leak(monkeypatch):
    """``atkd --debug`` run in-process exports ATKD_DEBUG for its child processes; keep it to the test."""
    monkeypatch.delenv("ATKD_DEBUG", raising=False)


def tiny_config(workdir: Path, **sections) -> PipelineConfig:
    """A pipeline config small enough for a unit test (a few hundred examples, tiny models)."""
    raw = {
        "name": "test",
        "workdir": str(workdir),
        "data": {"embedded": {"train_size": 64, "validation_size": 16, "test_size": 16}, "max_length": 48},
        "tokenizer": {"vocab_size": 400},
        "teacher": {"preset": "neox-tiny"},
        "student": {"preset": "neox-tiny"},
        "tracking": {"experiment_name": "test"},
    }
    raw.update(sections)
    return PipelineConfig.model_validate(raw)


PIPELINE_STAGES = {"prepare_data", "finetune_teacher", "score_teacher", "distill_student", "evaluate"}


def child_runs(client, parent) -> dict:
    """The MLflow runs nested directly under ``parent``, by run name."""
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return {child.data.tags["mlflow.runName"]: child for child in children}
