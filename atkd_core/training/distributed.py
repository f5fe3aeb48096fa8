"""Processes and devices: free ports, the device to use, the process group of a training stage.

One place for what the training entry point, the launcher and the servers share, so no caller
edits ``os.environ`` by hand. See docs/architecture.md, "Training".
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from atkd_core.training.ops import build_ops

# What a process group's rendezvous reads from the environment (torchrun / DeepSpeed conventions).
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment() -> dict[str, str]:
    """This process's environment without rendezvous variables, for starting unrelated processes.

    A process started from inside a launched rank (or a shell that ran one) would otherwise join,
    or try to bind, that job's rendezvous port.
    """
    return {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_VARIABLES}


@contextmanager
def process_group(
    device: str, ops: Sequence[str] = (), log: Callable[[str], None] = print
) -> Iterator[tuple[int, int]]:
    """Join the launcher's process group, or create a one-process group; yield (rank, world_size).

    The DeepSpeed ops named in ``ops`` (builders, see ``training.ops.needed_op_builders``) are
    built or loaded first, safely against a build an earlier run was killed in (``training.ops``).

    Under a launcher the rendezvous variables are already set. In-process, they are set for the
    group's creation and put back as they were on exit, together with ``DS_ACCELERATOR``, so
    nothing started later from this process inherits them. The group itself stays, so the next
    stage in this process joins it again without a new rendezvous.
    """
    import torch.distributed as dist

    touched = (*DISTRIBUTED_VARIABLES, "DS_ACCELERATOR")
    saved = {key: os.environ.get(key) for key in touched}
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if device == "cpu":
        defaults["DS_ACCELERATOR"] = "cpu"
    try:
        for key, default in defaults.items():
            os.environ.setdefault(key, default)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        # Imported only now: DeepSpeed picks its accelerator from DS_ACCELERATOR on first use.
        import deepspeed

        build_ops(ops, log)
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        yield dist.get_rank(), dist.get_world_size()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def all_reduce_sum(value: float, world_size: int, device: torch.device | str) -> float:
    """``value`` summed over the ranks of the process group (itself with one rank)."""
    if world_size == 1:
        return value
    import deepspeed.comm as ds_comm

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    ds_comm.all_reduce(tensor)
    return float(tensor)


def barrier() -> None:
    """Wait for every rank, when a process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
