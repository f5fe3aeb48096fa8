"""Prefect policies of the stage tasks: caching (reuse when the inputs are unchanged) and retries.

There is one reuse key: the library's. A stage's Prefect cache key is its output directory and the
fingerprint of the settings and input contents it is made from, the very fingerprint the library
records in the output's manifest and checks before redoing a stage. A changed loss setting
therefore changes the keys of distill_student and (through the new student's contents) evaluate,
and nothing upstream; a retrained teacher changes its cache's contents and so everything after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.manifest import fingerprint
from atkd_core.pipeline import StageArguments, StageTarget, stage_target
from infra.tracking import record_stage

R = TypeVar("R")


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


@dataclass
class StageInputs(CachePolicy):
    """Cache key = the library's own reuse key for the stage: its output directory and the
    fingerprint of the inputs that output must be made from (atkd_core.pipeline.stage_target).

    ``stage`` names the stage; the task's arguments are its inputs by name. Inputs that are not
    the stage's (e.g. a parent MLflow run id) play no part.
    """

    stage: str = ""

    def target(self, inputs: dict[str, Any]) -> StageTarget | None:
        """The stage's target on these task arguments; None when it writes nothing, or when an input
        is unusable (the task then runs and reports it)."""
        config = inputs.get("config")
        if not isinstance(config, PipelineConfig):
            return None
        try:
            return stage_target(self.stage, config, StageArguments.model_validate(inputs))
        except UserError:
            return None

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        """The key, or None (no caching) when the stage has no target."""
        target = self.target(inputs)
        return None if target is None else target_key(target)


def target_key(target: StageTarget) -> str:
    """A stage's reuse key: its output directory and the fingerprint of what it is made from."""
    return fingerprint({"output": str(target.output.resolve()), "inputs": target.fingerprint})


def run_cached(stage_task: Task[..., R], **inputs: Any) -> R:
    """Run ``stage_task`` on ``inputs``; a cached result is served only while the stage's output on
    disk is still the one made from these inputs (else the task runs and re-caches: an output that
    was deleted or replaced is rebuilt, never pointed at). Tracked stages are keyed in MLflow, and
    one served from the cache gets a child run saying so (infra.tracking.record_stage)."""
    policy = stage_task.cache_policy
    target = policy.target(inputs) if isinstance(policy, StageInputs) else None
    state = stage_task.with_options(refresh_cache=target is None or not target.current)(
        **inputs, return_state=True
    )
    result = state.result()
    if isinstance(policy, StageInputs) and target is not None and "parent_run_id" in inputs:
        record_stage(
            inputs["config"],
            inputs["parent_run_id"],
            policy.stage,
            target_key(target),
            state.name == "Cached",
        )
    return result
