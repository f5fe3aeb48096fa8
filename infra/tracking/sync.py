"""``atkd sync``: the outbox's calls replayed, in order, once the server answers again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from atkd_core.config import PipelineConfig
from infra.tracking.client import PARENT_TAG, PENDING_PREFIX, connect, root_cause
from infra.tracking.handle import RunHandle
from infra.tracking.outbox import Outbox
from infra.tracking.registry import register_version


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
            problems.append(f"{entry['kind']} for run {run_id}: {root_cause(exc)}")
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
        register_version(
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
