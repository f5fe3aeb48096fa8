"""Run a training stage: in this process for one process, else under the DeepSpeed launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from atkd_core.config import TrainingConfig
from atkd_core.errors import UserError
from atkd_core.manifest import read_manifest
from atkd_core.outputs import TrainedModelManifest
from atkd_core.training.distributed import child_environment, free_port
from atkd_core.training.job import MetricsFn, TrainJob
from atkd_core.training.main import finished_output, run_training

JOB_FILE = "job.json"


class LaunchError(RuntimeError):
    """The DeepSpeed launcher (or one of its ranks) failed; the message ends with its last lines."""


NODE_RANK_VARIABLES = ("NODE_RANK", "JOB_COMPLETION_INDEX", "SLURM_NODEID")
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class NodeRole:
    """This machine's place in a job of several nodes, each started on its own."""

    rank: int
    master_addr: str
    master_port: int


def node_role_from_env(training: TrainingConfig, environ: Mapping[str, str] = os.environ) -> NodeRole | None:
    """The node's rank and the first node's address as Kubernetes indexed Jobs and Slurm give them;
    None for a one-node job or one started over ssh from a hostfile."""
    if training.num_nodes == 1 or training.hostfile is not None:
        return None
    rank = next((environ[name] for name in NODE_RANK_VARIABLES if environ.get(name, "").strip()), None)
    master = environ.get("MASTER_ADDR", "").strip()
    if rank is None or not master:
        raise UserError(
            f"training.num_nodes is {training.num_nodes}: start the stage on each node with NODE_RANK "
            "(or JOB_COMPLETION_INDEX, SLURM_NODEID) and MASTER_ADDR, the first node's address, set "
            "(MASTER_PORT optional, default 29500); or give training.hostfile to start them over ssh"
        )
    if not rank.isdigit() or int(rank) >= training.num_nodes:
        raise UserError(f"node rank {rank!r} must be an integer in [0, {training.num_nodes})")
    return NodeRole(int(rank), master, int(environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT))


def launcher_command(
    job: TrainJob, job_path: Path, hostfile: Path | None = None, node: NodeRole | None = None
) -> list[str]:
    """The ``deepspeed`` command line that runs ``atkd_core.training.main`` on every rank of this
    machine for the job saved at ``job_path``: the whole job here, over ssh from ``hostfile``, or
    this ``node``'s ranks of a job whose nodes are started on their own (no ssh)."""
    command = [str(Path(sys.executable).with_name("deepspeed"))]
    if node is not None:
        # DeepSpeed's launcher without ssh: every node reads the same host list, starts its own
        # num_processes ranks and numbers them from its node rank.
        nodes = job.checkpoint_dir / f"hostfile-node{node.rank}"
        nodes.write_text(
            "".join(
                f"node-{index} slots={job.training.num_processes}\n"
                for index in range(job.training.num_nodes)
            )
        )
        command += ["--hostfile", str(nodes), "--no_ssh", "--node_rank", str(node.rank)]
        command += ["--master_addr", node.master_addr, "--master_port", str(node.master_port)]
    elif hostfile is not None:
        command += ["--hostfile", str(hostfile), "--master_port", str(free_port())]
    else:
        command += ["--num_gpus", str(job.training.num_processes), "--master_addr", "127.0.0.1"]
        command += ["--master_port", str(free_port())]
    command += ["--module", "atkd_core.training.main"]
    return command + ["--job", str(job_path)]


def remove_shared_memory_buffers(master_port: int, shm_dir: Path = Path("/dev/shm")) -> int:
    """Remove the allreduce buffers that DeepSpeed's CPU communication left in ``shm_dir`` for the
    ranks of this machine that rendezvoused on ``master_port``; return how many. DeepSpeed creates
    one per rank (66 MiB, named after the user, address, port and rank) and never unlinks it, so
    without this every multi-process CPU run would hold that memory until the machine reboots."""
    removed = 0
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def launch_training(
    job: TrainJob,
    log_metrics: MetricsFn,
    log: Callable[[str], None] = print,
    hostfile: Path | None = None,
    node: NodeRole | None = None,
) -> TrainedModelManifest | None:
    """Train ``job``; return its output manifest (None on a node that does not write it). Several processes: stream the launcher's log,
    then replay rank 0's metrics file through ``log_metrics``; a failed rank fails the stage.

    A job of several nodes started one by one runs this on each with its ``node`` role (by
    default read from the environment, see node_role_from_env); the first node (global rank 0)
    writes the model and returns its manifest, the others return once their ranks are done.
    """
    hostfile = hostfile or job.training.hostfile
    node = node or node_role_from_env(job.training)
    if job.training.world_size == 1 and hostfile is None:
        return run_training(job, log_metrics, log)
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # One file per node: on shared storage every node writes its own, never one another reads.
    job_path = job.checkpoint_dir / (JOB_FILE if node is None else f"job-node{node.rank}.json")
    job.save(job_path)
    env = {**child_environment(), "PYTHONUNBUFFERED": "1"}
    if job.training.device != "cuda":
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Two processes on few cores: one thread each, or they fight over the cores.
        env.setdefault("OMP_NUM_THREADS", "1")
    command = launcher_command(job, job_path, hostfile, node)
    where = "" if node is None else f" as node {node.rank} of {job.training.num_nodes}"
    log(f"{job.stage}: launching {job.training.num_processes} processes{where}: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=40)
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as process:
            for line in process.stdout or ():
                line = line.rstrip()
                tail.append(line)
                if line and not line.startswith("[") or "error" in line.lower():
                    log(line)
    finally:
        # The ranks are gone (or never started): their shared memory is no one's now.
        remove_shared_memory_buffers(int(command[command.index("--master_port") + 1]))
    if process.returncode != 0:
        raise LaunchError(
            f"{job.stage}: the DeepSpeed launcher exited with {process.returncode}; last lines:\n"
            + "\n".join(tail)
        )
    if node is not None and node.rank != 0:
        # The model and the metrics are the first node's (global rank 0), perhaps on its own disk.
        log(f"{job.stage}: node {node.rank}'s ranks are done; the first node writes the model")
        return None
    manifest = read_manifest(job.output_dir, TrainedModelManifest)
    if manifest is None:
        raise UserError(f"{job.stage}: the launcher finished but wrote no model to {job.output_dir}")
    for line in (job.output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
    return manifest
