"""The model registry: a trained student as a version of a registered model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient

from infra.tracking.handle import RunHandle


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
        return register_version(run, target[0], model_dir, name, description, content_hash, tags)
    except Exception as exc:
        if run.outbox is None:
            raise
        run.outbox.note_outage(str(run.tracking_uri), exc)
        run.outbox.add({"run": run.run_id, "kind": "register", **arguments})
        return None


def register_version(
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
