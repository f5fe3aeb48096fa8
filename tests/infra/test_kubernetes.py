"""prefect.k8s.yaml's deployment against the Kubernetes work pool's job template, as Prefect checks it."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from infra.kubernetes import TEMPLATE_PATH, gpu_job_template
from tests.conftest import REPO_ROOT

DEPLOY_ENV = {
    "ATKD_IMAGE": "registry.example/atkd-worker:cuda",
    "MLFLOW_TRACKING_URI": "http://mlflow.atkd:5000",
}


@pytest.fixture
def deployment(monkeypatch) -> dict:
    """The deployment as `prefect deploy` resolves it, with the variables it reads from the environment."""
    from prefect.utilities.templating import apply_values

    for key, value in DEPLOY_ENV.items():
        monkeypatch.setenv(key, value)
    (raw,) = yaml.safe_load((REPO_ROOT / "prefect.k8s.yaml").read_text())["deployments"]
    return apply_values(raw, {}, remove_notset=False)


def test_the_shipped_template_is_the_locked_default_with_the_gpu_request():
    shipped = json.loads((REPO_ROOT / TEMPLATE_PATH).read_text())
    assert shipped == gpu_job_template(), (
        f"regenerate: .venv/bin/python -m infra.kubernetes > {TEMPLATE_PATH}"
    )


def test_the_deployment_validates_against_the_template_and_renders_a_gpu_job(deployment):
    from prefect.utilities.schema_tools.validation import validate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = gpu_job_template()
    variables = deployment["work_pool"]["job_variables"]
    assert variables["image"] == DEPLOY_ENV["ATKD_IMAGE"]
    # What the server checks when the deployment is created and when a run of it is created.
    validate(variables, template["variables"], raise_on_error=True, ignore_required=True)
    defaults = {key: spec.get("default") for key, spec in template["variables"]["properties"].items()}
    validate(
        {**defaults, **variables}, template["variables"], raise_on_error=True, allow_none_with_default=True
    )

    configuration = asyncio.run(
        # A client is only used to resolve block references, which these values do not have.
        KubernetesWorkerJobConfiguration.from_template_and_values(template, variables, client=object())
    )
    manifest = configuration.job_manifest
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == DEPLOY_ENV["ATKD_IMAGE"] and manifest["metadata"]["namespace"] == "atkd"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert container["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
    assert configuration.env["MLFLOW_TRACKING_URI"] == DEPLOY_ENV["MLFLOW_TRACKING_URI"]

    with pytest.raises(Exception, match="gpu_count"):
        validate({**variables, "gpu_count": -1}, template["variables"], raise_on_error=True)


def test_the_deployment_runs_the_pipeline_on_the_real_config(deployment):
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from atkd_core.config import load_config
    from flows.distill import distill_config_file

    assert deployment["entrypoint"] == "flows/distill.py:distill_config_file"
    schema = parameter_schema(distill_config_file.fn).model_dump()
    validate(deployment["parameters"], schema, raise_on_error=True)
    config = load_config(REPO_ROOT / deployment["parameters"]["config_path"])
    assert config.distill.training.num_processes == deployment["work_pool"]["job_variables"]["gpu_count"]
