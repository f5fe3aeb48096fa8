"""Local servers for orchestrated runs: a Prefect server, an MLflow tracking server, a process worker.

``start`` launches the three in their own process groups on 127.0.0.1, waits until both servers
answer their health checks, and records pids, ports and URLs in ``<state_dir>/servers.json``;
``stop`` terminates exactly the process groups recorded there (never anything found by name).
State (SQLite databases, artifacts, logs) stays in ``state_dir`` between starts.
"""

from __future__ import annotations

import json
import os
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

STATE_FILE = "servers.json"
WORK_POOL = "atkd-local"


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

    def environment(self) -> dict[str, str]:
        """The variables that point clients (the CLI, ``prefect deploy``, flows) at these servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise UserError(
                f"{url}: the server exited with {process.returncode}; last lines of {log_path}:\n{tail}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UserError(f"{url}: no healthy answer after {timeout_s:.0f} s; see {log_path}")


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own session and process group, so that stop() ends the server's children (uvicorn and
    # gunicorn workers, flow-run subprocesses) with it and nothing else.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.getcwd()
        )


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
) -> Servers:
    """Start the Prefect server, the MLflow server and a process worker; return what was started.

    Refuses to start when servers recorded in ``state_dir`` are still running or a port is taken.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = read_state(state_dir)
    if existing is not None and any(_alive(pid) for pid in _pids(existing)):
        raise UserError(
            f"servers from {state_dir / STATE_FILE} are still running; stop them first (atkd serve --stop)"
        )
    for port in (prefect_port, mlflow_port):
        if _port_in_use(port):
            raise UserError(
                f"port {port} on 127.0.0.1 is already in use; choose another (--prefect-port/--mlflow-port)"
            )
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    # Without the rendezvous variables an in-process training run may have left in this process:
    # a flow run of the worker would inherit them and try to bind this process's port.
    base_env = {**child_environment(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base_env.pop("PREFECT_API_URL", None)
    started: list[subprocess.Popen] = []
    try:
        prefect_env = {
            **base_env,
            "PREFECT_HOME": str(state_dir / "prefect"),
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": prefect_api,
        }
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
                f"sqlite:///{state_dir / 'mlflow.db'}",
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
    return [servers.worker_pid, servers.mlflow_pid, servers.prefect_pid]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) answers signal 0 but runs nothing.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _terminate_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it if it outlives the grace period."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped = pid if not _alive(pid) else 0
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
    for name, pid in zip(("worker", "MLflow server", "Prefect server"), _pids(servers), strict=True):
        if _alive(pid):
            _terminate_group(pid)
            log(f"stopped {name} (process group {pid})")
        else:
            log(f"{name} (pid {pid}) was not running")
    (state_dir.resolve() / STATE_FILE).unlink()
    return True
