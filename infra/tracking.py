"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run" state, because
Prefect runs tasks on worker threads where a thread-local active run would be lost.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(config: PipelineConfig) -> str:
    """The configured tracking URI, or a SQLite store inside the workdir."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return f"sqlite:///{(config.workdir / 'mlflow.db').resolve()}"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config into ``a.b.c -> str(value)`` params."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


@dataclass
class RunHandle:
    """A live MLflow run (or a no-op one when tracking is off)."""

    client: MlflowClient | None
    run_id: str | None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    _step_metrics: list[Metric] = field(default_factory=list)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit)."""
        if self.client is None:
            return
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        if self.client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""
        if self.client is not None:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory as artifacts."""
        if self.client is None:
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save a text artifact."""
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)


def _experiment_id(client: MlflowClient, config: PipelineConfig) -> str:
    name = config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # An explicit artifact location: otherwise artifacts land in ./mlruns of whatever the cwd is.
    artifacts = (config.workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


@contextmanager
def pipeline_run(config: PipelineConfig, tags: Mapping[str, str] | None = None) -> Iterator[RunHandle]:
    """The parent run of one pipeline run; marks it FINISHED or FAILED on exit."""
    if not config.tracking.enabled:
        yield RunHandle(client=None, run_id=None)
        return
    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, config)
    run_tags = {RUN_NAME_TAG: config.tracking.run_name or config.name, **(tags or {})}
    run = client.create_run(experiment_id, tags=run_tags)
    handle = RunHandle(client=client, run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id)
    handle.log_params(flatten(config.model_dump(mode="json")))
    with _terminate_on_exit(handle):
        yield handle


@contextmanager
def stage_run(
    config: PipelineConfig, parent_run_id: str | None, stage: str, params: Mapping[str, Any] | None = None
) -> Iterator[RunHandle]:
    """A child run of ``parent_run_id`` for one stage; marks it FINISHED or FAILED on exit.

    Takes the parent's id, not a client, so Prefect tasks receive plain strings.
    """
    if not config.tracking.enabled or parent_run_id is None:
        yield RunHandle(client=None, run_id=None)
        return
    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment_id, tags={PARENT_TAG: parent_run_id, RUN_NAME_TAG: stage})
    handle = RunHandle(client=client, run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id)
    if params:
        handle.log_params(params)
    with _terminate_on_exit(handle):
        yield handle


@contextmanager
def _terminate_on_exit(handle: RunHandle) -> Iterator[None]:
    try:
        yield
    except BaseException:
        handle.client.set_terminated(handle.run_id, status="FAILED")
        raise
    handle.client.set_terminated(handle.run_id, status="FINISHED")
