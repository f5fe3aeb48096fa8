"""Process-wide environment defaults, applied by the entry points before prefect, mlflow or lm-eval
are imported: the ``atkd`` command (and so the servers and worker ``atkd serve`` starts), and
``python -m infra.settings COMMAND``, the container images' entry point, through which their
worker and the flow runs it starts (Kubernetes jobs included) get them. Importing a module of this
product never changes the environment.
"""

from __future__ import annotations

import os
import sys

# Each default is one a user may override by exporting the variable themselves.
ENVIRONMENT_DEFAULTS = {
    # Prefect's telemetry adds noise and a "database is locked" message on the local API.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # The temporary local API takes longer than Prefect's 20 s default to start on a fresh
    # PREFECT_HOME on a small machine; a run then failed before its first stage.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Hub access is not set here: a run that needs no hub is made offline, and one that needs an
    # unreachable hub fails in seconds, by infra.hub_access before its first stage; the user's own
    # HF_HUB_OFFLINE / HF_ENDPOINT / HF_HOME / HF_TOKEN are left as they are.
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # A progress bar per tiny Arrow write clutters the Prefect log; stages report their own progress.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # MLflow's own git probing warns on every run outside a git checkout.
    "GIT_PYTHON_REFRESH": "quiet",
    # MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) make an unreachable
    # tracking server look like a hang of several minutes; these give up after ~7 s, and the
    # Prefect task's retries add the longer wait.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def apply_environment_defaults() -> None:
    """Set each default in ``os.environ`` unless the user already set it."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> None:
    """``python -m infra.settings COMMAND [ARG...]``: run COMMAND in this process with the defaults
    applied (an image's entry point: the worker and the flow runs it starts inherit them)."""
    command = sys.argv[1:] if argv is None else argv
    if not command:
        raise SystemExit("usage: python -m infra.settings COMMAND [ARG...]")
    apply_environment_defaults()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
