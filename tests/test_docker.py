"""docker/: the Dockerfiles pass hadolint and the compose file validates.

The Docker engine cannot run here, so nothing is built or started: the compose file is checked
against the Compose specification's schema (vendored in check-jsonschema) plus the references the
schema cannot see, and ``docker compose config`` runs wherever the compose plugin is installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.servers import MLFLOW_POSTGRES_SCHEME, PREFECT_POSTGRES_SCHEME
from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def test_versions_the_images_pin_are_the_locks():
    """A package an image pins by hand (torch from its wheel index, MLflow in its own image) must
    be the lock's version, or the image runs another stack than the one the tests ran."""
    lock = dict(
        line.lower().replace("_", "-").split("==")
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pinned = [
        (dockerfile.name, name.lower().replace("_", "-"), version)
        for dockerfile in DOCKERFILES
        for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", dockerfile.read_text())
    ]
    checked = [pin for pin in pinned if pin[1] in lock]
    assert "torch" in {name for _, name, _ in checked}, pinned
    assert [(image, name, lock[name]) for image, name, _ in checked] == checked
    # The MLflow image pins nothing by hand: it installs MLflow and the driver under the lock.
    mlflow_image = (DOCKER / "Dockerfile.mlflow").read_text()
    assert "COPY constraints.txt" in mlflow_image and "-c /tmp/constraints.txt" in mlflow_image
    assert not [pin for pin in pinned if pin[0] == "Dockerfile.mlflow"]


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
    assert any("postgresql+psycopg2://" in part for part in services["mlflow"]["command"])
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
    reason="the docker compose plugin is not installed on this machine; the schema test above covers the file",
)
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_each_database_uri_names_a_driver_its_image_installs():
    """SQLAlchemy maps a bare postgresql:// to psycopg 3, which the MLflow image does not have
    (the service then fails at start): each URI must name the driver, and its image install it."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    command = " ".join(compose["services"]["mlflow"]["command"])
    (scheme,) = re.findall(r"--backend-store-uri=(postgresql[+\w]*)://", command)
    # The same URI forms as the Postgres-backed servers the tests run (infra.servers), whose drivers
    # are the lock's: the MLflow image installs its driver under that lock.
    assert scheme == MLFLOW_POSTGRES_SCHEME == "postgresql+psycopg2"
    assert "psycopg2-binary" in (DOCKER / "Dockerfile.mlflow").read_text()
    assert "psycopg2-binary==" in (REPO_ROOT / "constraints.txt").read_text()
    prefect_url = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert (
        prefect_url.startswith(f"{PREFECT_POSTGRES_SCHEME}://")
        and PREFECT_POSTGRES_SCHEME == "postgresql+asyncpg"
    )


def _container_runtime() -> str | None:
    """docker or podman, when one is installed and can reach its engine."""
    for tool in ("docker", "podman"):
        if shutil.which(tool) is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run([tool, "info"], capture_output=True, timeout=30).returncode == 0:
                return tool
    return None


IMAGE_TEST_ASKED = os.environ.get("ATKD_TEST_IMAGES") == "1"


@pytest.mark.skipif(
    not IMAGE_TEST_ASKED,
    reason="builds the CPU image (~20 min, needs Docker Hub and the PyTorch wheel index): set ATKD_TEST_IMAGES=1",
)
def test_the_cpu_image_builds_and_its_entry_points_run():
    runtime = _container_runtime()
    if runtime is None:
        pytest.skip("no working container runtime here (docker or podman that reaches its engine)")
    tag = "atkd-worker:test"
    build = subprocess.run(
        [runtime, "build", "-f", "docker/Dockerfile.cpu", "-t", tag, "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    shown = subprocess.run(
        [runtime, "run", "--rm", tag, "atkd", "config", "show", "configs/demo.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0 and "name: demo" in shown.stdout, shown.stderr[-2000:]
    # The image's worker against a Prefect server in the same container: one poll, then exit 0.
    worker = subprocess.run(
        [
            runtime,
            "run",
            "--rm",
            "-e",
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            tag,
            "sh",
            "-c",
            "prefect server start --host 127.0.0.1 --port 4200 >/tmp/server.log 2>&1 & "
            'for i in $(seq 60); do python -c "import urllib.request as u; '
            "u.urlopen('http://127.0.0.1:4200/api/health')\" 2>/dev/null && break; sleep 1; done; "
            "prefect worker start --pool atkd-local --type process --run-once",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
    size = subprocess.run(
        [runtime, "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"{tag}: {int(size.stdout.strip()) / 1e9:.2f} GB")
