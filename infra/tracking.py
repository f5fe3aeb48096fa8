"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run" state, because
Prefect runs tasks on worker threads where a thread-local active run would be lost.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig, config_to_yaml
from atkd_core.errors import UserError

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000
OUTBOX_NAME = "tracking-outbox.jsonl"
OUTAGE_NAME = "tracking-outage.json"
PENDING_PREFIX = "pending-"  # the outbox's key of a run the server has not created yet
METRICS_PER_BATCH = 1000


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached (after the client's own retries)."""

    # Prefect retries a task that failed on this; other user errors would fail the same way again.
    transient = True


def is_server_uri(uri: str | None) -> bool:
    """Whether ``uri`` names a tracking server (http or https), not a local store (or nothing)."""
    return uri is not None and uri.startswith(("http://", "https://"))


def tracking_status(config: PipelineConfig) -> str:
    """One line on where ``config`` tracks and whether it answers now: a server is asked once, a
    local store is looked for on disk."""
    uri = config.resolved_tracking_uri
    if not config.tracking.enabled:
        return f"tracking is off (tracking.enabled: false); runs would go to {uri}"
    if is_server_uri(uri):
        try:
            connect(uri)
        except TrackingUnavailable as exc:
            return f"the tracking server at {uri} did not answer ({_root_cause(exc.__cause__ or exc)})"
        return f"the tracking server at {uri} answered"
    database = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(database).is_file():
        return f"the local tracking store {database} does not exist yet (no run has been tracked there)"
    return f"the local tracking store is {uri}"


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


class Outbox:
    """Tracking calls that could not be made, kept as JSON lines in the workdir until ``atkd sync``
    sends them: the science never waits on, or fails for, the tracking server."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / OUTBOX_NAME
        self.outage_path = workdir / OUTAGE_NAME

    def outage(self, uri: str | None) -> str | None:
        """The cause of the outage of ``uri`` this process met while tracking to this workdir, or
        None. Once one call failed, later ones go straight to the outbox instead of each waiting
        out the HTTP client's retries. The record sits beside the outbox, so every handle of the
        run sees it whichever task made it; another process (a later run, ``atkd sync``) starts
        afresh."""
        try:
            record = json.loads(self.outage_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
        return record.get("cause") if ours and record.get("uri") == uri else None

    def note_outage(self, uri: str, error: BaseException) -> None:
        """Record that ``uri`` failed (``error``) for the rest of this process, warning once."""
        if self.outage(uri) is not None:
            return
        cause = _root_cause(error)
        record = {"uri": uri, "cause": cause, "pid": os.getpid(), "host": socket.gethostname()}
        self.outage_path.parent.mkdir(parents=True, exist_ok=True)
        self.outage_path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        print(
            f"atkd: warning: MLflow at {uri} failed ({cause}); the run goes on and keeps what was not "
            f"logged in {self.path}: send it later with `atkd sync CONFIG`",
            file=sys.stderr,
            flush=True,
        )

    def clear_outage(self) -> None:
        """Forget a recorded outage (the server answered again)."""
        self.outage_path.unlink(missing_ok=True)

    def add(self, entry: dict[str, Any]) -> None:
        """Append one call (``run``: its run id or pending key, ``kind``, its arguments)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        """Every call not yet sent, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def replace(self, entries: list[dict[str, Any]]) -> None:
        """Keep only ``entries`` (what a sync could not send)."""
        if entries:
            self.path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        else:
            self.path.unlink(missing_ok=True)


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
        return f"{str(self.tracking_uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

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
    run: RunHandle,
    model_dir: Path,
    name: str,
    description: str,
    content_hash: str,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log ``model_dir`` as the run's ``model`` artifact and register it as a version of ``name``.

    A version already registered for the same weights (``content_hash``) is reused, so re-running
    a fully cached pipeline does not pile up identical versions. Returns the version, or None when
    tracking is off or the server cannot be reached (then the registration waits in the outbox).
    """
    arguments = {
        "model_dir": str(model_dir.resolve()),
        "name": name,
        "description": description,
        "content_hash": content_hash,
        "tags": dict(tags or {}),
    }
    target = run.target()
    if target is None or (run.outbox is not None and run.outbox.outage(run.tracking_uri) is not None):
        if run.outbox is not None and run.run_id is not None:
            run.outbox.add({"run": run.run_id, "kind": "register", **arguments})
        return None
    try:
        return _register(run, target[0], model_dir, name, description, content_hash, tags)
    except Exception as exc:
        if run.outbox is None:
            raise
        run.outbox.note_outage(str(run.tracking_uri), exc)
        run.outbox.add({"run": run.run_id, "kind": "register", **arguments})
        return None


def _register(
    run: RunHandle,
    client: MlflowClient,
    model_dir: Path,
    name: str,
    description: str,
    content_hash: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="Students distilled by the ATKD pipeline.")
    existing = client.search_model_versions(f"name = '{name}' and tags.content_sha256 = '{content_hash}'")
    if existing:
        version = existing[0]
        client.update_model_version(name, version.version, description=description)
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version.version, key, value)
        return str(version.version)
    client.log_artifacts(str(run.run_id), str(model_dir), "model")
    version = client.create_model_version(
        name,
        source=f"runs:/{run.run_id}/model",
        run_id=run.run_id,
        description=description,
        tags={**(tags or {}), "content_sha256": content_hash},
    )
    return str(version.version)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3's UI opens an experiment of this kind in its training-runs view, not the GenAI one.
TRAINING_EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(client: MlflowClient, config: PipelineConfig) -> str:
    name = config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
        return experiment.experiment_id
    tags = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
    if is_server_uri(client.tracking_uri):
        return client.create_experiment(name, tags=tags)  # the server decides (and serves) artifact storage
    # A local store needs an explicit location: otherwise artifacts land in ./mlruns of the cwd.
    artifacts = (config.workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts, tags=tags)


@contextmanager
def pipeline_run(
    config: PipelineConfig, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None
) -> Iterator[RunHandle]:
    """The parent run of one pipeline run (nested in ``parent_run_id``, e.g. a comparison's run);
    marks it FINISHED or FAILED on exit.

    A top-level run needs the server at its start (TrackingUnavailable, one line, before any stage
    runs); from then on an outage never fails the run (see Outbox).
    """
    if not config.tracking.enabled:
        yield RunHandle(client=None, run_id=None)
        return
    run_tags = {RUN_NAME_TAG: config.tracking.run_name or config.name, **(tags or {})}
    if parent_run_id is not None:
        handle = _child_run(config, parent_run_id, run_tags)
    else:
        uri = config.resolved_tracking_uri
        client = connect(uri)
        experiment_id = _experiment_id(client, config)
        run = client.create_run(experiment_id, tags=run_tags)
        handle = RunHandle(client, run.info.run_id, uri, experiment_id, Outbox(config.workdir))
    handle.log_params(flatten(config.model_dump(mode="json")))
    handle.log_text(config_to_yaml(config), "config.yaml")
    with _terminate_on_exit(handle):
        yield handle


def _child_run(config: PipelineConfig, parent_key: str, tags: dict[str, str]) -> RunHandle:
    """A new run nested in ``parent_key``: live, or waiting in the outbox when the server is down."""
    outbox = Outbox(config.workdir)
    uri = config.resolved_tracking_uri
    if outbox.outage(uri) is None and not parent_key.startswith(PENDING_PREFIX):
        try:
            client = connect(uri)
            experiment_id = client.get_run(parent_key).info.experiment_id
            run = client.create_run(experiment_id, tags={PARENT_TAG: parent_key, **tags})
            return RunHandle(client, run.info.run_id, uri, experiment_id, outbox)
        except Exception as exc:
            outbox.note_outage(uri, exc)
    key = f"{PENDING_PREFIX}{uuid.uuid4().hex}"
    outbox.add({"run": key, "kind": "create", "parent": parent_key, "tags": tags})
    return RunHandle(None, key, uri, None, outbox)


def attach_run(config: PipelineConfig, run_id: str | None) -> RunHandle:
    """A handle on an existing run (a no-op handle when tracking is off or ``run_id`` is None; an
    offline one, which fills the outbox, when the server is down)."""
    if not config.tracking.enabled or run_id is None:
        return RunHandle(client=None, run_id=None)
    outbox = Outbox(config.workdir)
    uri = config.resolved_tracking_uri
    if outbox.outage(uri) is None and not run_id.startswith(PENDING_PREFIX):
        try:
            client = connect(uri)
            return RunHandle(client, run_id, uri, client.get_run(run_id).info.experiment_id, outbox)
        except Exception as exc:
            outbox.note_outage(uri, exc)
    return RunHandle(None, run_id, uri, None, outbox)


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
    handle = _child_run(config, parent_run_id, {RUN_NAME_TAG: stage})
    if params:
        handle.log_params(params)
    with _terminate_on_exit(handle):
        yield handle


STAGE_KEY_TAG = "atkd.stage_key"
CACHED_TAG = "cached"
MADE_BY_TAG = "atkd.made_by_run"


def _search_one(client: MlflowClient, experiment_id: str, filter_string: str) -> str | None:
    """The newest run of the experiment matching ``filter_string``, or None."""
    runs = client.search_runs(
        [experiment_id], filter_string, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def _quoted(value: str) -> str:
    """``value`` as an MLflow search-filter string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def record_stage(
    config: PipelineConfig, parent_run_id: str | None, stage: str, stage_key: str, cached: bool
) -> None:
    """Leave a stage's trace under ``parent_run_id`` keyed by its reuse key (the cache key).

    A stage that ran already has its child run: it is tagged with the key and ``cached=false``. A
    stage Prefect served from its cache ran no code, so it gets a child run of its own, tagged
    ``cached`` and linked (tag and note) to the newest run that made that output. Tracking never
    fails the pipeline: with the server away the cached run waits in the outbox like any other and
    the link is left out.
    """
    if not config.tracking.enabled or parent_run_id is None:
        return
    parent = attach_run(config, parent_run_id)
    target = parent.target()

    def newest(filter_string: str) -> str | None:
        if target is None or parent.experiment_id is None:
            return None
        with suppress(Exception):
            return _search_one(target[0], parent.experiment_id, filter_string)
        return None

    if not cached:
        own = newest(
            f"tags.`{PARENT_TAG}` = {_quoted(parent_run_id)} and tags.`{RUN_NAME_TAG}` = {_quoted(stage)}"
        )
        if own is not None and target is not None:
            with suppress(Exception):
                target[0].set_tag(own, STAGE_KEY_TAG, stage_key)
                # Explicitly false: MLflow's search cannot match a run by a tag it lacks.
                target[0].set_tag(own, CACHED_TAG, "false")
        return
    made_by = newest(f"tags.`{STAGE_KEY_TAG}` = {_quoted(stage_key)} and tags.`{CACHED_TAG}` = 'false'")
    tags = {RUN_NAME_TAG: stage, CACHED_TAG: "true", STAGE_KEY_TAG: stage_key}
    if made_by is not None:
        tags[MADE_BY_TAG] = made_by
    handle = _child_run(config, parent_run_id, tags)
    maker = f"run `{made_by}`" if made_by is not None else "an earlier run (not found in this experiment)"
    handle.set_tags(
        {
            "mlflow.note.content": f"Served from Prefect's cache: its inputs are unchanged, and {maker} made its output."
        }
    )
    handle.terminate("FINISHED")


@contextmanager
def _terminate_on_exit(handle: RunHandle) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        # The stage's own error is the one to report, even when the server went away with it.
        with suppress(Exception):
            handle.terminate(ended_status(exc))
        raise
    handle.terminate("FINISHED")


# How Prefect stops a cancelled run (by name: infra does not depend on Prefect's internals).
CANCELLATIONS = {"TerminationSignal", "Abort", "CancelledRun", "CancelledError"}


def ended_status(error: BaseException) -> str:
    """The MLflow status of a run that ended with ``error``: KILLED when it was stopped
    (cancelled in Prefect, interrupted), FAILED when it broke."""
    stopped = isinstance(error, KeyboardInterrupt | SystemExit) or type(error).__name__ in CANCELLATIONS
    return "KILLED" if stopped else "FAILED"


def unsent_calls(config: PipelineConfig) -> int:
    """How many tracking calls of ``config``'s workdir wait in the outbox for ``atkd sync``."""
    return len(Outbox(config.workdir).entries()) if config.tracking.enabled else 0


def sync(config: PipelineConfig) -> tuple[int, list[str]]:
    """Send the calls waiting in ``config``'s outbox, in order; returns (sent, problems). What cannot
    be sent stays for the next sync. TrackingUnavailable (one line) when the server is still down."""
    outbox = Outbox(config.workdir)
    entries = outbox.entries()
    if not entries:
        return 0, []
    uri = config.resolved_tracking_uri
    client = connect(uri)
    outbox.clear_outage()
    created: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    problems: list[str] = []
    for entry in entries:
        run_id = created.get(entry["run"], entry["run"])
        try:
            if entry["kind"] == "create":
                parent = created.get(entry["parent"], entry["parent"])
                experiment_id = client.get_run(parent).info.experiment_id
                run = client.create_run(experiment_id, tags={PARENT_TAG: parent, **entry["tags"]})
                created[entry["run"]] = run.info.run_id
                continue
            if run_id.startswith(PENDING_PREFIX):
                raise RuntimeError("its run could not be created")
            _replay(RunHandle(client, run_id, uri), entry)
        except Exception as exc:
            kept.append({**entry, "run": run_id})
            problems.append(f"{entry['kind']} for run {run_id}: {_root_cause(exc)}")
    outbox.replace(kept)
    return len(entries) - len(kept), problems


def _replay(handle: RunHandle, entry: dict[str, Any]) -> None:
    """Make one outbox call on a live run (raising on failure)."""
    kind = entry["kind"]
    if kind == "params":
        handle.log_params(entry["params"])
    elif kind == "metrics":
        handle.send_metrics([Metric(key, value, stamp, step) for key, value, stamp, step in entry["metrics"]])
    elif kind == "tags":
        handle.set_tags(entry["tags"])
    elif kind == "artifact":
        path = Path(entry["path"])
        if not path.exists():
            raise FileNotFoundError(f"{path} no longer exists")
        handle.log_artifact(path, entry["artifact_path"])
    elif kind == "text":
        handle.log_text(entry["text"], entry["artifact_file"])
    elif kind == "terminate":
        handle.terminate(entry["status"])
    elif kind == "register":
        assert handle.client is not None
        _register(
            handle,
            handle.client,
            Path(entry["model_dir"]),
            entry["name"],
            entry["description"],
            entry["content_hash"],
            entry.get("tags"),
        )
    else:
        raise ValueError(f"unknown outbox entry kind {kind!r}")


def check_tracking_server(config: PipelineConfig) -> None:
    """Before a run: a tracking server (an http(s) URI) answers; TrackingUnavailable (one line)
    otherwise. A local store needs no check: it is created on first use."""
    uri = config.resolved_tracking_uri
    if is_server_uri(uri):
        connect(uri)
