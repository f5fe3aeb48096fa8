"""Prefect policies of the stage tasks: caching (reuse when the inputs are unchanged) and retries.

A stage's cache key is the hash of the config fields it reads, the directory it writes, and the
manifests of the stage outputs it is given. A changed loss setting therefore changes the keys of
distill_student (its config fields) and evaluate (the new student's manifest), and nothing upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.manifest import MANIFEST_NAME, fingerprint, sha256_file

TaskT = TypeVar("TaskT", bound=Task)


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a failed task unless it failed on the user's input (which would fail the same way).

    Errors that mark themselves ``transient`` (an unreachable tracking server) are retried.
    """
    error = state.data
    if isinstance(error, BaseException):
        return bool(getattr(error, "transient", not isinstance(error, UserError)))
    return True


# For I/O-bound tasks (file reads and writes, tracking calls): 2 retries after 2 s and 4 s.
IO_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_condition_fn": retry_transient,
}


def _manifest_hash(value: Any) -> Any:
    """The hash of a stage output's manifest when ``value`` is the path of one (per entry for a
    mapping of paths), else None."""
    if isinstance(value, dict):
        hashes = {key: _manifest_hash(item) for key, item in sorted(value.items())}
        return hashes if any(h is not None for h in hashes.values()) else None
    if not isinstance(value, str):
        return None
    manifest = Path(value) / MANIFEST_NAME
    return sha256_file(manifest) if manifest.is_file() else None


@dataclass
class StageInputs(CachePolicy):
    """Cache key = the stage's config fields + the run's workdir + the manifests of its input paths.

    ``config_fields`` maps a config to the part of it the stage reads (so unrelated edits do not
    invalidate it). Inputs that are not stage outputs (e.g. a parent MLflow run id) are ignored.
    """

    config_fields: Callable[[PipelineConfig], Any] = field(default=lambda config: None)

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        """The key, or None (no caching) when the task has no ``config`` input."""
        config = inputs.get("config")
        if not isinstance(config, PipelineConfig):
            return None
        manifests = {name: _manifest_hash(value) for name, value in sorted(inputs.items())}
        return fingerprint(
            {
                "task": task_ctx.task.name,
                "workdir": str(config.workdir.resolve()),
                "config": self.config_fields(config),
                "inputs": {name: digest for name, digest in manifests.items() if digest is not None},
            }
        )


def sections(*names: str) -> Callable[[PipelineConfig], Any]:
    """``config_fields`` reading whole top-level config sections."""
    return lambda config: config.model_dump(mode="json", include=set(names))


def cached(stage_task: TaskT, finished_marker: Path) -> TaskT:
    """``stage_task`` set to recompute (and re-cache) when the file marking its output finished is gone.

    A cache record only holds the output's path; after the directory is deleted the record would
    point at nothing, so the task runs again instead (the stage itself then rebuilds the output).
    """
    return cast(TaskT, stage_task.with_options(refresh_cache=not finished_marker.is_file()))
