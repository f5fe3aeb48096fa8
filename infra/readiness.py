"""The readiness table of a run (atkd_core.readiness) with the services only this layer knows: the
MLflow tracking server and the Prefect API. ``atkd check`` prints it; ``atkd run`` and the flows
refuse to start on its problems."""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.hub import hub_needs, hub_problem
from atkd_core.readiness import Readiness, check_config, check_hub
from infra.hub_access import stay_offline

PREFECT_PROBE_TIMEOUT_S = 5.0
# Configs (as JSON) the caller has just found ready, so that a flow called by `atkd run` in the same
# context does not make the same checks (and hub probes) again; a flow a worker starts makes them.
_CHECKED: ContextVar[frozenset[str]] = ContextVar("atkd_checked_configs", default=frozenset())


def _check_tracking(config: PipelineConfig, readiness: Readiness) -> None:
    if not config.tracking.enabled:
        readiness.add("tracking", True, "off (tracking.enabled: false)")
        return
    from infra.tracking import check_tracking_server, is_server_uri

    uri = config.resolved_tracking_uri
    try:
        check_tracking_server(config)
    except UserError as exc:
        readiness.add("tracking", False, str(exc))
        return
    kind = "server answers" if is_server_uri(uri) else "local store, created on first use"
    readiness.add("tracking", True, f"MLflow at {uri} ({kind})")


def prefect_api_url() -> str | None:
    """The Prefect API runs report to: PREFECT_API_URL from the environment or the active Prefect
    profile; None when unset (a flow run then starts a temporary local API of its own)."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    return str(configured) if configured else None


def _check_prefect(readiness: Readiness) -> None:
    url = prefect_api_url()
    if url is None:
        readiness.add("Prefect API", True, "none configured: the run starts a temporary local API")
        return
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=PREFECT_PROBE_TIMEOUT_S):
            readiness.add("Prefect API", True, f"{url} answers")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        readiness.add(
            "Prefect API",
            False,
            f"{url} did not answer within {PREFECT_PROBE_TIMEOUT_S:g} s ({type(reason).__name__}: {reason}); "
            "start it (`atkd serve`) or unset PREFECT_API_URL",
        )


def check_run(
    config: PipelineConfig, *, services: bool = True, probe: Callable[[], str | None] = hub_problem
) -> Readiness:
    """The whole table for ``config``: hub, models, tokenizer, data, harness tasks, devices, disk,
    and (``services``) the tracking server and the Prefect API. A run that reads nothing from the
    hub is told to stay offline (as prepare_hub_access does); an unreachable hub is the hub row."""
    harness: dict[str, list[str]] | None = None
    if config.eval.enabled and config.eval.harness_tasks:
        from atkd_core.evaluation.harness import harness_datasets

        # An unknown task name is check_harness's row, not an error here.
        with contextlib.suppress(UserError):
            harness = harness_datasets(config.eval.harness_tasks)
    needs = hub_needs(config, harness)
    if not needs:
        stay_offline()
    readiness = check_config(config, needs, harness, probe)
    if services:
        _check_tracking(config, readiness)
        _check_prefect(readiness)
    return readiness


def format_table(readiness: Readiness) -> str:
    """The table ``atkd check`` prints: one row per check, ``ok`` or ``PROBLEM``."""
    width = max(len(check.subject) for check in readiness.checks)
    lines = [f"{'check'.ljust(width)}  status   found"]
    for check in readiness.checks:
        status = "ok     " if check.ok else "PROBLEM"
        lines.append(f"{check.subject.ljust(width)}  {status}  {check.detail}")
    return "\n".join(lines)


def ensure_ready(config: PipelineConfig, *, services: bool = True) -> Readiness:
    """check_run, raising UserError with one line per problem when the run cannot start.

    A hub that models or data need and that does not answer fails at once, before lm-eval's task
    index (read for the harness tasks' datasets, ~10 s) is read."""
    probe = functools.cache(hub_problem)
    early = Readiness()
    if needs := hub_needs(config):
        check_hub(early, needs, probe)
    if early.problems:
        raise UserError("\n".join(early.problems))
    readiness = check_run(config, services=services, probe=probe)
    if readiness.problems:
        raise UserError("\n".join(readiness.problems))
    return readiness


@contextlib.contextmanager
def checked(config: PipelineConfig) -> Iterator[None]:
    """Within this block, ``ensure_ready_once`` takes ``config`` as checked (the caller just did)."""
    token = _CHECKED.set(_CHECKED.get() | {config.model_dump_json()})
    try:
        yield
    finally:
        _CHECKED.reset(token)


def ensure_ready_once(config: PipelineConfig) -> Readiness | None:
    """ensure_ready without the services (a flow has its API; its tracking is checked when its run
    opens), unless the caller checked ``config`` already (``checked``): then None."""
    if config.model_dump_json() in _CHECKED.get():
        return None
    return ensure_ready(config, services=False)
