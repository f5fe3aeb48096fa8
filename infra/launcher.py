"""Run a training stage: in this process for one process, else under the DeepSpeed launcher."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atkd_core.errors import UserError
from atkd_core.manifest import read_manifest
from atkd_core.training.distributed import child_environment, free_port
from atkd_core.training.job import MetricsFn, TrainJob
from atkd_core.training.main import finished_output, run_training

JOB_FILE = "job.json"


class LaunchError(RuntimeError):
    """The DeepSpeed launcher (or one of its ranks) failed; the message ends with its last lines."""


def launcher_command(job: TrainJob, job_path: Path, hostfile: Path | None = None) -> list[str]:
    """The ``deepspeed`` command line that runs ``atkd_core.training.main`` on every rank for the
    job saved at ``job_path``."""
    command = [str(Path(sys.executable).with_name("deepspeed"))]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    else:
        command += ["--num_gpus", str(job.training.num_processes), "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "--module", "atkd_core.training.main"]
    return command + ["--job", str(job_path)]


def launch_training(
    job: TrainJob, log_metrics: MetricsFn, log: Callable[[str], None] = print, hostfile: Path | None = None
) -> dict[str, Any]:
    """Train ``job``; return its output manifest. Several processes: stream the launcher's log,
    then replay rank 0's metrics file through ``log_metrics``; a failed rank fails the stage."""
    hostfile = hostfile or job.training.hostfile
    if job.training.num_processes == 1 and hostfile is None:
        return run_training(job, log_metrics, log)
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    job_path = job.checkpoint_dir / JOB_FILE
    job.save(job_path)
    env = {**child_environment(), "PYTHONUNBUFFERED": "1"}
    if job.training.device != "cuda":
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Two processes on few cores: one thread each, or they fight over the cores.
        env.setdefault("OMP_NUM_THREADS", "1")
    command = launcher_command(job, job_path, hostfile)
    log(f"{job.stage}: launching {job.training.num_processes} processes: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        for line in process.stdout or ():
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
