"""DeepSpeed's compiled ops: which a stage needs, and a build lock a killed build left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from atkd_core.config.training import TrainingConfig
from atkd_core.training.ops import (
    BUILD_LOCK_NAME,
    STALE_AFTER_SECONDS,
    build_lock,
    needed_op_builders,
    remove_stale_build_lock,
)


def age(path, seconds):
    """Set ``path``'s modification time ``seconds`` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize(
    ("settings", "device", "expected"),
    [
        ({}, "cpu", ["ShareMemCommBuilder"]),
        ({}, "cuda", []),
        ({"zero_stage": 2, "offload_optimizer": True}, "cuda", []),
        ({"optim": {"name": "adamw_deepspeed"}}, "cpu", ["ShareMemCommBuilder", "FusedAdamBuilder"]),
        ({"optim": {"name": "adamw_deepspeed"}}, "cuda", ["FusedAdamBuilder"]),
        (
            {"zero_stage": 3, "offload_optimizer": True, "optim": {"name": "adamw_deepspeed"}},
            "cuda",
            ["CPUAdamBuilder"],
        ),
    ],
)
def test_the_ops_a_stage_needs_follow_its_optimizer_and_device(settings, device, expected):
    assert needed_op_builders(TrainingConfig.model_validate(settings), device) == expected


def test_a_lock_left_by_a_dead_build_is_removed_and_said(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    age(lock, STALE_AFTER_SECONDS + 600)
    messages = []
    assert remove_stale_build_lock(tmp_path, messages.append)
    assert not lock.exists()
    assert "stopped before it finished (11 min ago)" in messages[0] and str(lock) in messages[0]
    assert not remove_stale_build_lock(tmp_path, messages.append), "no lock, nothing to remove"


def test_a_young_lock_or_one_a_live_build_holds_open_is_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    assert not remove_stale_build_lock(tmp_path, print), "a build may be releasing it"
    age(lock, STALE_AFTER_SECONDS + 600)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"f = open({str(lock)!r}); print('open', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        assert not remove_stale_build_lock(tmp_path, print)
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_build_lock(tmp_path, print), "once its holder is gone, it is stale"


def test_the_build_lock_serialises_processes_and_dies_with_its_holder(tmp_path):
    script = textwrap.dedent(
        f"""
        import fcntl, sys, time
        handle = open({str(tmp_path / BUILD_LOCK_NAME)!r}, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    messages = []
    # Killed as a build killed by the OOM killer would be: the kernel releases its flock.
    killer = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; time.sleep(1); os.kill({holder.pid}, 9)"]
    )
    with build_lock(tmp_path, messages.append):
        assert holder.wait(timeout=30) == -9
    killer.wait()
    assert messages == [f"waiting for another process that is building DeepSpeed ops in {tmp_path}"]
    with build_lock(tmp_path, messages.append):
        pass
    assert len(messages) == 1, "free: no wait, no message"
