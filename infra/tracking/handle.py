"""One MLflow run as the stages see it: calls that never raise, and buffered metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from infra.tracking.client import (
    MAX_PARAM_LENGTH,
    METRICS_PER_BATCH,
    is_server_uri,
    mlflow_ui_url,
)
from infra.tracking.outbox import Outbox


@dataclass
class RunHandle:
    """A live MLflow run, a run waiting in the outbox (``client`` None, ``outbox`` set), or a no-op
    one when tracking is off (both None). With an outbox, no tracking call ever raises: what the
    server does not take is kept for ``atkd sync``."""

    client: MlflowClient | None
    run_id: str | None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    outbox: Outbox | None = None

    def target(self) -> tuple[MlflowClient, str] | None:
        """(client, run id) of the live run, or None for the no-op and the offline handle."""
        if self.client is None or self.run_id is None:
            return None
        return self.client, self.run_id

    def _call(
        self, kind: str, arguments: dict[str, Any], send: Callable[[MlflowClient, str], object]
    ) -> None:
        """``send`` to the live run, or keep the call in the outbox when the server cannot take it."""
        target = self.target()
        if target is not None and (self.outbox is None or self.outbox.outage(self.tracking_uri) is None):
            try:
                send(*target)
                return
            except Exception as exc:
                if self.outbox is None:
                    raise
                self.outbox.note_outage(str(self.tracking_uri), exc)
        if self.outbox is not None and self.run_id is not None:
            self.outbox.add({"run": self.run_id, "kind": kind, **arguments})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit)."""
        values = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}

        def send(client: MlflowClient, run_id: str) -> None:
            items = [Param(k, v) for k, v in values.items()]
            for start in range(0, len(items), 100):
                client.log_batch(run_id, params=items[start : start + 100])

        self._call("params", {"params": values}, send)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        self.send_metrics(metric_records(metrics, step))

    def send_metrics(self, records: list[Metric]) -> None:
        """Send already timestamped metric records, in batches MLflow accepts."""

        def send(client: MlflowClient, run_id: str) -> None:
            for start in range(0, len(records), METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=records[start : start + METRICS_PER_BATCH])

        rows = [[m.key, m.value, m.timestamp, m.step] for m in records]
        self._call("metrics", {"metrics": rows}, send)

    def web_url(self) -> str | None:
        """The run's page in the MLflow UI when the tracking URI is a server, else None."""
        if self.run_id is None or not is_server_uri(self.tracking_uri):
            return None
        return mlflow_ui_url(str(self.tracking_uri), self.experiment_id, self.run_id)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""
        values = {k: str(v) for k, v in tags.items()}
        self._call(
            "tags",
            {"tags": values},
            lambda client, run_id: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in values.items()]),
        )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory as artifacts."""

        def send(client: MlflowClient, run_id: str) -> None:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)

        self._call("artifact", {"path": str(path.resolve()), "artifact_path": artifact_path}, send)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save a text artifact."""
        self._call(
            "text",
            {"text": text, "artifact_file": artifact_file},
            lambda client, run_id: client.log_text(run_id, text, artifact_file),
        )

    def terminate(self, status: str) -> None:
        """Mark the run FINISHED or FAILED."""
        self._call(
            "terminate", {"status": status}, lambda client, run_id: client.set_terminated(run_id, status)
        )


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
        flush_every_steps: int = 100,
        flush_every_seconds: float = 5.0,
        max_pending: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.warn = warn
        self.flush_every_steps = flush_every_steps
        self.flush_every_seconds = flush_every_seconds
        self.max_pending = max_pending
        self.clock = clock
        self.pending: list[Metric] = []
        self.dropped = 0
        self.failures = 0
        self._steps_since_flush = 0
        self._last_flush = clock()
        self._in_outage = False

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one step's metrics; send them every ``flush_every_seconds`` (the UI's curves stay
        live) or ``flush_every_steps`` steps, whichever comes first. A send has a fixed cost (about
        30 ms on a SQLite store), which every 10 steps of a small model was 3% of its training."""
        self.pending.extend(metric_records(metrics, step))
        overflow = len(self.pending) - self.max_pending
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
        self._steps_since_flush += 1
        if (
            self._steps_since_flush >= self.flush_every_steps
            or self.clock() - self._last_flush >= self.flush_every_seconds
        ):
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left pending."""
        self._steps_since_flush = 0
        self._last_flush = self.clock()
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
