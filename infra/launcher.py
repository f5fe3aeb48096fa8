"""Run a training stage: in this process for one process, else under the DeepSpeed launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atkd_core.config import config_to_yaml
from atkd_core.errors import UserError
from atkd_core.training.loop import MetricsFn, TrainJob


class LaunchError(RuntimeError):
    """The DeepSpeed launcher (or one of its ranks) failed; the message ends with its last lines."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_environment() -> dict[str, str]:
    """This process's environment without the rendezvous variables an in-process run may have set,
    which would point a new process group at this process's (still bound) port."""
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}


def entry_arguments(job: TrainJob, config_path: Path) -> list[str]:
    """The arguments of ``atkd_core.training.main`` for ``job`` (its config saved at ``config_path``)."""
    arguments = ["--config", str(config_path), "--stage", job.stage, "--prepared", str(job.prepared_dir)]
    arguments += [
        "--init",
        str(job.init_dir),
        "--out",
        str(job.output_dir),
        "--checkpoints",
        str(job.checkpoint_dir),
    ]
    if job.cache_dir is not None:
        arguments += ["--cache", str(job.cache_dir)]
    if job.teacher_dir is not None:
        arguments += ["--teacher", str(job.teacher_dir)]
    return arguments


def launcher_command(job: TrainJob, config_path: Path, hostfile: Path | None = None) -> list[str]:
    """The ``deepspeed`` command line that runs ``atkd_core.training.main`` on every rank."""
    command = [str(Path(sys.executable).with_name("deepspeed"))]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    else:
        command += ["--num_gpus", str(job.training.num_processes), "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "--module", "atkd_core.training.main"]
    return command + entry_arguments(job, config_path)


def launch_training(
    job: TrainJob, log_metrics: MetricsFn, log: Callable[[str], None] = print, hostfile: Path | None = None
) -> dict[str, Any]:
    """Train ``job``; return its output manifest. Several processes: stream the launcher's log,
    then replay rank 0's metrics file through ``log_metrics``; a failed rank fails the stage."""
    from atkd_core.manifest import read_manifest
    from atkd_core.training.main import finished_output, run_training

    hostfile = hostfile or job.training.hostfile
    if job.training.num_processes == 1 and hostfile is None:
        return run_training(job, log_metrics, log)
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config_path = job.checkpoint_dir / "config.yaml"
    config_path.write_text(config_to_yaml(job.config))
    env = {**child_environment(), "PYTHONUNBUFFERED": "1"}
    if job.training.device != "cuda":
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Two processes on few cores: one thread each, or they fight over the cores.
        env.setdefault("OMP_NUM_THREADS", "1")
    command = launcher_command(job, config_path, hostfile)
    log(f"{job.stage}: launching {job.training.num_processes} processes: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            if line and not line.startswith("[") or "error" in line.lower():
                log(line)
    if process.returncode != 0:
        raise LaunchError(
            f"{job.stage}: the DeepSpeed launcher exited with {process.returncode}; last lines:\n"
            + "\n".join(tail)
        )
    manifest = read_manifest(job.output_dir)
    if manifest is None:
        raise UserError(f"{job.stage}: the launcher finished but wrote no model to {job.output_dir}")
    for line in (job.output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
    return manifest
