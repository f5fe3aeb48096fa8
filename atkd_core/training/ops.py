"""DeepSpeed's compiled ops, built before DeepSpeed asks for them, so that a killed build cannot hang
every later run.

DeepSpeed compiles an op it needs (the CPU backend's shared-memory allreduce, CPU-Adam, FusedAdam)
the first time a process asks for it, through torch's extension loader. That loader guards a build
with a lock *file* in the op's build directory and waits, with no limit and no message, for the
file to go. A build killed half-way (out of memory, a SIGKILL, a CI timeout) leaves the file
behind, and from then on every run on that machine that needs the op waits for ever.

So a stage builds the ops its settings need itself, before DeepSpeed does, one process at a time
under an ``flock`` (which the kernel releases when its holder dies, however it dies). While it
holds that lock no other process of this pipeline is building, so a lock file that no process
holds open is left by a dead build, and is removed with a message saying so. Ops already built,
or installed prebuilt (``DS_BUILD_OPS=1``), only load.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from atkd_core.config.training import TrainingConfig

BUILD_LOCK_NAME = "atkd-build.lock"
# A live build holds its lock file open from creation to removal; a file younger than this may be
# between the two steps of a release (closed, not yet removed), so it is never taken for stale.
STALE_AFTER_SECONDS = 60.0


def needed_op_builders(training: TrainingConfig, device: str) -> list[str]:
    """The DeepSpeed op builders a stage with ``training`` on ``device`` (cpu / cuda) will load.

    The CPU backend's allreduce uses the shared-memory op; DeepSpeed's own AdamW is CPU-Adam when
    the optimizer is offloaded, FusedAdam otherwise; torch's AdamW needs no op.
    """
    builders = ["ShareMemCommBuilder"] if device == "cpu" else []
    if training.optim.name == "adamw_deepspeed":
        offloaded = training.zero_stage >= 1 and training.offload_optimizer
        builders.append("CPUAdamBuilder" if offloaded else "FusedAdamBuilder")
    return builders


def _is_held_open(path: Path) -> bool:
    """Whether any process has ``path`` open, read from /proc (processes it may not read are
    skipped); False where /proc does not exist."""
    target = str(path.resolve())
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for descriptors in proc.glob("[0-9]*/fd"):
        try:
            links = list(descriptors.iterdir())
        except OSError:
            continue
        for link in links:
            try:
                if os.readlink(link) == target:
                    return True
            except OSError:
                continue
    return False


def remove_stale_build_lock(build_directory: Path, log: Callable[[str], None]) -> bool:
    """Remove the torch extension lock file in ``build_directory`` if a dead build left it: older
    than STALE_AFTER_SECONDS and held open by no process. Call only while holding ``build_lock``.
    Returns whether a file was removed."""
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_AFTER_SECONDS or _is_held_open(lock):
        return False
    lock.unlink(missing_ok=True)
    log(
        f"removed {lock}: an earlier build of this op was stopped before it finished "
        f"({age / 60:.0f} min ago) and its lock would have made this run wait for ever"
    )
    return True


@contextmanager
def build_lock(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory``/atkd-build.lock, saying so when another process
    holds it. The kernel releases it when the holder exits, killed or not."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / BUILD_LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is building DeepSpeed ops in {directory}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def extension_build_directory(name: str) -> Path:
    """Where torch's extension loader builds the op ``name`` (TORCH_EXTENSIONS_DIR, or its default
    per Python and CUDA version under ~/.cache/torch_extensions)."""
    from torch.utils import cpp_extension

    # torch exposes the root (get_default_build_root) but not the per-version folder under it;
    # this is the function its loader itself calls, so the two cannot disagree.
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def build_ops(builder_names: Sequence[str], log: Callable[[str], None]) -> None:
    """Load the DeepSpeed ops ``builder_names`` (see ``needed_op_builders``), compiling those that
    are neither installed nor built yet, one process at a time, after removing any lock a killed
    build left. DeepSpeed's accelerator must already be chosen (``DS_ACCELERATOR``)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    accelerator = get_accelerator()
    builders = [accelerator.create_op_builder(name) for name in builder_names]
    to_build = [b for b in builders if b is not None and b.is_compatible(verbose=False)]
    # DeepSpeed imports an op installed with the package for this accelerator, and compiles the rest.
    prebuilt = {
        name for name, present in installed_ops.items() if present and accelerator_name == accelerator._name
    }
    jit_built = [b for b in to_build if b.name not in prebuilt]
    if not jit_built:
        for builder in to_build:
            builder.load(verbose=False)
        return
    directories = {b.name: extension_build_directory(b.name) for b in jit_built}
    with build_lock(next(iter(directories.values())).parent, log):
        for builder in to_build:
            if builder.name in directories:
                remove_stale_build_lock(directories[builder.name], log)
            builder.load(verbose=False)
