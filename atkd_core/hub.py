"""What a run needs from the Hugging Face hub, and whether it can have it, before any stage starts.

Models, tokenizers, datasets and harness tasks named by hub id are downloaded by transformers,
datasets and lm-eval when a stage first reads them, through ``HF_ENDPOINT`` (default
https://huggingface.co) unless ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` say otherwise; the
user's own settings of these (and ``HF_HOME``, ``HF_TOKEN``) are what count. A run whose config
names nothing on the hub is told to stay offline (``offline_environment``), so it never waits on a
network; one that needs the hub learns in seconds whether it is reachable (``hub_problem``)
instead of after 45 s of retries inside a stage.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from atkd_core.config import PipelineConfig

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
TRUE_VALUES = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub the libraries download from: ``HF_ENDPOINT``, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether the user asked for no hub access (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing local path: what the libraries would download."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and " " not in name
        and not Path(name).expanduser().exists()
    )


def hub_needs(config: PipelineConfig, harness_datasets: dict[str, list[str]] | None = None) -> list[str]:
    """What ``config`` reads from the hub, one ``field: id`` entry each (empty: nothing).

    harness_datasets: {task: dataset ids} of ``eval.harness_tasks`` (evaluation.harness_datasets),
    when the caller has them; lm-eval downloads the ones that are hub ids.
    """
    needs = [
        f"{role}.path {spec.path}"
        for role, spec in (("teacher", config.teacher), ("student", config.student))
        if spec.path is not None and looks_like_hub_id(spec.path)
    ]
    if (
        config.tokenizer.source == "path"
        and config.tokenizer.path
        and looks_like_hub_id(config.tokenizer.path)
    ):
        needs.append(f"tokenizer.path {config.tokenizer.path}")
    if config.data.source == "hub" and config.data.hub_name and looks_like_hub_id(config.data.hub_name):
        needs.append(f"data.hub_name {config.data.hub_name}")
    for task, datasets in sorted((harness_datasets or {}).items()):
        needs.extend(
            f"eval.harness_tasks {task} ({dataset})" for dataset in datasets if looks_like_hub_id(dataset)
        )
    return needs


def hub_problem(endpoint: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub at ``endpoint`` (default ``hub_endpoint()``) cannot be reached, or None when it
    answers. Any HTTP answer counts as reachable (an error status is the libraries' to report
    with the file it concerns); no answer within ``timeout_s`` does not."""
    url = endpoint or hub_endpoint()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/api/models?limit=1", method="HEAD"), timeout=timeout_s
        ):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} did not answer within {timeout_s:g} s ({type(reason).__name__}: {reason})"


def offline_environment() -> dict[str, str]:
    """The variables that keep the Hugging Face libraries from any network call."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
