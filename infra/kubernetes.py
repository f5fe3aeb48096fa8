"""The Kubernetes work pool's base job template: prefect-kubernetes' default plus a GPU request.

The default template (locked prefect-kubernetes) has CPU and memory variables but no GPU one. This
one adds ``gpu_count``, requested as ``nvidia.com/gpu`` limits on the flow run's container, and is
otherwise the default, so an upgrade of the lock shows up as a difference the tests name.

    .venv/bin/python -m infra.kubernetes > docker/kubernetes-job-template.json   # regenerate
    prefect work-pool create atkd-kubernetes --type kubernetes \\
        --base-job-template docker/kubernetes-job-template.json
"""

from __future__ import annotations

import copy
import json
from typing import Any

TEMPLATE_PATH = "docker/kubernetes-job-template.json"
GPU_VARIABLE = {
    "title": "GPUs",
    "description": "NVIDIA GPUs for the flow run's container (nvidia.com/gpu limit); 0 for none.",
    "type": "integer",
    "minimum": 0,
    "default": 0,
}


def gpu_job_template() -> dict[str, Any]:
    """The default Kubernetes base job template with the ``gpu_count`` variable and its limit."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    template["variables"]["properties"]["gpu_count"] = GPU_VARIABLE
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    return template


if __name__ == "__main__":
    print(json.dumps(gpu_job_template(), indent=2))
