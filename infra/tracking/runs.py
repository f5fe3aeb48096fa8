"""Run lifecycle: one parent run per pipeline run, one child run per stage, cached stages recorded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from mlflow.tracking import MlflowClient

from atkd_core.config import PipelineConfig, config_to_yaml
from infra.tracking.client import (
    PARENT_TAG,
    PENDING_PREFIX,
    RUN_NAME_TAG,
    connect,
    flatten,
    is_server_uri,
)
from infra.tracking.handle import RunHandle
from infra.tracking.outbox import Outbox

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
