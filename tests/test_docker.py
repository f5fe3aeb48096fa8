"""docker/: the Dockerfiles pass hadolint and the compose file validates.

The Docker engine cannot run here, so nothing is built or started: the compose file is checked
against the Compose specification's schema (vendored in check-jsonschema) plus the references the
schema cannot see, and ``docker compose config`` runs wherever the compose plugin is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def test_there_are_cpu_cuda_and_mlflow_images():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_specification():
    done = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DOCKER / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_references_resolve():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "prefect-server", "worker", "worker-gpu"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    # MLflow's store is Postgres, and both servers' databases exist.
    assert any("postgresql://" in part for part in services["mlflow"]["command"])
    assert "CREATE DATABASE prefect" in (DOCKER / "postgres-init" / "01-databases.sql").read_text()
    # Every ${VAR} has a default, so `docker compose config` needs no .env file.
    text = (DOCKER / "compose.yaml").read_text()
    assert all(":-" in match for match in re.findall(r"(?<!\$)\$\{([^}]*)\}", text))


def test_images_copy_what_the_package_needs():
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} - {"tests"}
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DOCKER / dockerfile).read_text()
        for package in packages:
            assert f"COPY {package} ./{package}" in text, (dockerfile, package)
        assert "-c constraints.txt" in text or "constraints-no-deepspeed" in text


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed here; the schema test above covers the file",
)
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
