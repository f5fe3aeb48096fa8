"""Hub access decided once per run, before any stage: offline when the config needs no hub, a
fast one-line failure when it needs one that does not answer (atkd_core.hub has the rules)."""

from __future__ import annotations

import os

from atkd_core.config import PipelineConfig
from atkd_core.errors import UserError
from atkd_core.hub import hub_needs, hub_offline, hub_problem, offline_environment


def prepare_hub_access(
    config: PipelineConfig, harness_datasets: dict[str, list[str]] | None = None
) -> list[str]:
    """Check and set up this process's hub access for ``config``; return what it reads from the hub.

    harness_datasets: {task: dataset ids} of ``eval.harness_tasks`` when the caller has them (else
    read from lm-eval's task index here).

    Nothing on the hub: the Hugging Face libraries are told to stay offline (unless the user set
    these variables), so no stage waits on a network. Something on it with HF_HUB_OFFLINE set:
    left to the stages, which read the local cache (check_model_paths names a missing model).
    Otherwise the hub must answer within a few seconds, else UserError naming what was needed.
    """
    if harness_datasets is None and config.eval.enabled and config.eval.harness_tasks:
        from atkd_core.evaluation.harness import harness_datasets as datasets_of

        harness_datasets = datasets_of(config.eval.harness_tasks)
    needs = hub_needs(config, harness_datasets)
    if not needs:
        stay_offline()
        return needs
    if not hub_offline() and (problem := hub_problem()) is not None:
        raise UserError(
            f"the run reads from the Hugging Face hub ({'; '.join(needs)}) but {problem}; check the network "
            "and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 with those files in the local cache (HF_HOME)"
        )
    return needs


def stay_offline() -> None:
    """Tell the Hugging Face libraries of this process and its children to make no network call,
    unless the user set these variables. For runs that read nothing from the hub."""
    for key, value in offline_environment().items():
        os.environ.setdefault(key, value)
