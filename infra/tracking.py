"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run" state, because
Prefect runs tasks on worker threads where a thread-local active run would be lost.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig, config_to_yaml
from atkd_core.config import resolve_tracking_uri as tracking_uri_for
from atkd_core.errors import UserError

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000
METRICS_PER_BATCH = 1000


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached (after the client's own retries)."""

    # Prefect retries a task that failed on this; other user errors would fail the same way again.
    transient = True


def resolve_tracking_uri(config: PipelineConfig) -> str:
    """Where ``config``'s runs are tracked (atkd_core.config.resolve_tracking_uri)."""
    return tracking_uri_for(config.tracking.tracking_uri, config.workdir)


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

    def target(self) -> tuple[MlflowClient, str] | None:
        """(client, run id) of the live run, or None for the no-op handle."""
        if self.client is None or self.run_id is None:
            return None
        return self.client, self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit)."""
        if (target := self.target()) is None:
            return
        client, run_id = target
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        self.send_metrics(metric_records(metrics, step))

    def send_metrics(self, records: list[Metric]) -> None:
        """Send already timestamped metric records, in batches MLflow accepts."""
        if (target := self.target()) is None:
            return
        client, run_id = target
        for start in range(0, len(records), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=records[start : start + METRICS_PER_BATCH])

    def web_url(self) -> str | None:
        """The run's page in the MLflow UI when the tracking URI is a server, else None."""
        if self.run_id is None or not str(self.tracking_uri).startswith(("http://", "https://")):
            return None
        return f"{str(self.tracking_uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""
        if (target := self.target()) is not None:
            client, run_id = target
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory as artifacts."""
        if (target := self.target()) is None:
            return
        client, run_id = target
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save a text artifact."""
        if (target := self.target()) is not None:
            client, run_id = target
            client.log_text(run_id, text, artifact_file)


def metric_records(metrics: Mapping[str, float], step: int) -> list[Metric]:
    """MLflow metric records of the finite values in ``metrics``, stamped now."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]


class MetricsBuffer:
    """Training metrics sent to a run in batches; a failed send keeps them for the next attempt.

    Training calls it once per step and never sees a tracking error: an outage is reported once
    through ``warn``, the values wait (up to ``max_pending``, oldest dropped first), and
    ``close`` says how many never arrived (they are still in the stage's ``metrics.jsonl``).
    """

    def __init__(
        self,
        run: RunHandle,
        warn: Callable[[str], None],
        flush_every_steps: int = 10,
        max_pending: int = 200_000,
    ) -> None:
        self.run = run
        self.warn = warn
        self.flush_every_steps = flush_every_steps
        self.max_pending = max_pending
        self.pending: list[Metric] = []
        self.dropped = 0
        self.failures = 0
        self._steps_since_flush = 0
        self._in_outage = False

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one step's metrics; send every ``flush_every_steps`` steps."""
        self.pending.extend(metric_records(metrics, step))
        overflow = len(self.pending) - self.max_pending
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every_steps:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left pending."""
        self._steps_since_flush = 0
        if not self.pending:
            return True
        try:
            self.run.send_metrics(self.pending)
        except Exception as exc:  # the tracking server's errors are not the training's
            self.failures += 1
            if not self._in_outage:
                self.warn(f"MLflow metrics logging failed, training continues and will retry: {exc}")
            self._in_outage = True
            return False
        if self._in_outage:
            self.warn("MLflow metrics logging recovered; buffered metrics sent")
        self._in_outage = False
        self.pending.clear()
        return True

    def close(self) -> int:
        """Send the rest; return (and warn about) the number of values that never reached MLflow."""
        self.flush()
        lost = len(self.pending) + self.dropped
        if lost:
            self.warn(
                f"{lost} metric values could not be sent to MLflow after {self.failures} failed attempts; "
                "they are in the stage's metrics.jsonl"
            )
        return lost


def connect(uri: str) -> MlflowClient:
    """A client for ``uri`` that has answered one request; TrackingUnavailable when it does not.

    Without this probe an unreachable server surfaces as an obscure error from whichever call
    happens to come first.
    """
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailable(
            f"MLflow tracking at {uri} is unreachable ({_root_cause(exc)}). "
            "Start it (`atkd serve`), fix tracking.tracking_uri, or set tracking.enabled: false."
        ) from exc
    return client


def _root_cause(error: BaseException) -> str:
    """'Type: message' of the innermost exception in a chain (the HTTP stack wraps it three deep)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def register_model(
    run: RunHandle, model_dir: Path, name: str, description: str, content_hash: str
) -> str | None:
    """Log ``model_dir`` as the run's ``model`` artifact and register it as a version of ``name``.

    A version already registered for the same weights (``content_hash``) is reused, so re-running
    a fully cached pipeline does not pile up identical versions. Returns the version, or None when
    tracking is off.
    """
    if run.client is None:
        return None
    client = run.client
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="Students distilled by the ATKD pipeline.")
    existing = client.search_model_versions(f"name = '{name}' and tags.content_sha256 = '{content_hash}'")
    if existing:
        version = existing[0]
        client.update_model_version(name, version.version, description=description)
        return str(version.version)
    run.log_artifact(model_dir, "model")
    version = client.create_model_version(
        name,
        source=f"runs:/{run.run_id}/model",
        run_id=run.run_id,
        description=description,
        tags={"content_sha256": content_hash},
    )
    return str(version.version)


def _experiment_id(client: MlflowClient, config: PipelineConfig) -> str:
    name = config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if str(client.tracking_uri).startswith(("http://", "https://")):
        return client.create_experiment(name)  # the server decides (and serves) artifact storage
    # A local store needs an explicit location: otherwise artifacts land in ./mlruns of the cwd.
    artifacts = (config.workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


@contextmanager
def pipeline_run(
    config: PipelineConfig, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None
) -> Iterator[RunHandle]:
    """The parent run of one pipeline run (nested in ``parent_run_id``, e.g. a comparison's run);
    marks it FINISHED or FAILED on exit."""
    if not config.tracking.enabled:
        yield RunHandle(client=None, run_id=None)
        return
    uri = resolve_tracking_uri(config)
    client = connect(uri)
    experiment_id = _experiment_id(client, config)
    run_tags = {RUN_NAME_TAG: config.tracking.run_name or config.name, **(tags or {})}
    if parent_run_id is not None:
        run_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=run_tags)
    handle = RunHandle(client=client, run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id)
    handle.log_params(flatten(config.model_dump(mode="json")))
    handle.log_text(config_to_yaml(config), "config.yaml")
    with _terminate_on_exit(handle):
        yield handle


def attach_run(config: PipelineConfig, run_id: str | None) -> RunHandle:
    """A handle on an existing run (a no-op handle when tracking is off or ``run_id`` is None)."""
    if not config.tracking.enabled or run_id is None:
        return RunHandle(client=None, run_id=None)
    client, uri, experiment_id = _open_run(config, run_id)
    return RunHandle(client=client, run_id=run_id, tracking_uri=uri, experiment_id=experiment_id)


def _open_run(config: PipelineConfig, run_id: str) -> tuple[MlflowClient, str, str]:
    """(client, tracking URI, experiment id) of the existing run ``run_id``."""
    uri = resolve_tracking_uri(config)
    client = connect(uri)
    return client, uri, client.get_run(run_id).info.experiment_id


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
    client, uri, experiment_id = _open_run(config, parent_run_id)
    run = client.create_run(experiment_id, tags={PARENT_TAG: parent_run_id, RUN_NAME_TAG: stage})
    handle = RunHandle(client=client, run_id=run.info.run_id, tracking_uri=uri, experiment_id=experiment_id)
    if params:
        handle.log_params(params)
    with _terminate_on_exit(handle):
        yield handle


@contextmanager
def _terminate_on_exit(handle: RunHandle) -> Iterator[None]:
    target = handle.target()
    if target is None:
        yield
        return
    client, run_id = target
    try:
        yield
    except BaseException:
        # The stage's own error is the one to report, even when the server went away with it.
        with suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
