"""Reaching MLflow: the one check that a tracking server answers, and what a config tracks to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000
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
            return f"the tracking server at {uri} did not answer ({root_cause(exc.__cause__ or exc)})"
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
            f"MLflow tracking at {uri} is unreachable ({root_cause(exc)}). "
            "Start it (`atkd serve`), fix tracking.tracking_uri, or set tracking.enabled: false."
        ) from exc
    return client


def root_cause(error: BaseException) -> str:
    """'Type: message' of the innermost exception in a chain (the HTTP stack wraps it three deep)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def check_tracking_server(config: PipelineConfig) -> None:
    """Before a run: a tracking server (an http(s) URI) answers; TrackingUnavailable (one line)
    otherwise. A local store needs no check: it is created on first use."""
    uri = config.resolved_tracking_uri
    if is_server_uri(uri):
        connect(uri)


# MLflow 3's UI opens in its GenAI view (traces, "Evaluations") in a browser that has not chosen
# otherwise: it keeps the choice in local storage, not on the server, whatever the experiment's
# tags say. This parameter opens the view of training runs, where these runs' metrics are.
TRAINING_RUNS_VIEW = "workflowType=machine_learning"


def mlflow_ui_url(server: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI's page of a server (``http://host:port``), an experiment in it or a run of
    that experiment, in the training-runs view (TRAINING_RUNS_VIEW)."""
    route = "/#/experiments"
    if experiment_id is not None:
        route += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id is not None else "")
    return f"{server.rstrip('/')}{route}?{TRAINING_RUNS_VIEW}"
