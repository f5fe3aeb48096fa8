"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run" state, because
Prefect runs tasks on worker threads where a thread-local active run would be lost. No module here
keeps state between calls: what outlives a call (calls not yet sent, an outage) is in the
workdir's outbox files (``Outbox``).

- ``client``: reaching a server (``connect``, ``is_server_uri``, ``tracking_status``).
- ``outbox``: calls that could not be made, and the outage that stopped them.
- ``handle``: ``RunHandle`` (calls that never raise once a run is under way), ``MetricsBuffer``.
- ``runs``: the pipeline's parent run, a stage's child run, cached stages recorded.
- ``registry``: the student registered as a model version.
- ``sync``: the outbox replayed (``atkd sync``).
"""

from infra.tracking.client import (
    TrackingUnavailable,
    check_tracking_server,
    connect,
    flatten,
    is_server_uri,
    mlflow_ui_url,
    tracking_status,
)
from infra.tracking.handle import MetricsBuffer, RunHandle
from infra.tracking.outbox import OUTBOX_NAME, Outbox
from infra.tracking.registry import register_model
from infra.tracking.runs import attach_run, ended_status, pipeline_run, record_stage, stage_run
from infra.tracking.sync import sync, unsent_calls

__all__ = [
    "mlflow_ui_url",
    "OUTBOX_NAME",
    "MetricsBuffer",
    "Outbox",
    "RunHandle",
    "TrackingUnavailable",
    "attach_run",
    "check_tracking_server",
    "connect",
    "ended_status",
    "flatten",
    "is_server_uri",
    "pipeline_run",
    "record_stage",
    "register_model",
    "stage_run",
    "sync",
    "tracking_status",
    "unsent_calls",
]
