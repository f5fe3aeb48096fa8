"""One run per workdir: an advisory lock held for a run's life, and the checks made before a run.

The lock is ``WORKDIR/.atkd-lock``, an ``flock`` held by the running process; the file's contents
name the holder (pid, host, since). The operating system releases the lock when its process dies,
so a lock left by a killed run is taken over, with a warning naming that run. The file is never
deleted (a run that removed it could let two others lock two different files). ``flock`` is
per host: two hosts sharing a workdir over a network file system are not guarded against.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from atkd_core.errors import UserError

LOCK_NAME = ".atkd-lock"

# Locks this process holds, with how many nested holders: the CLI locks before it starts the flow,
# and the flow locks again for its runs started elsewhere (a Prefect worker).
_held: dict[Path, int] = {}


class WorkdirBusy(UserError):
    """Another live run holds the workdir."""


def ensure_writable(workdir: Path) -> None:
    """Create ``workdir`` when missing and prove it is writable; UserError naming it otherwise."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".atkd-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"workdir {workdir} cannot be written: {exc.strerror or exc}") from None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) answers signal 0 but runs nothing.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"


def _read_holder(handle) -> dict:
    handle.seek(0)
    text = handle.read()
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": 0}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def workdir_lock(workdir: Path, warn: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``workdir``'s lock for the ``with`` block (re-entrant within this process).

    Raises WorkdirBusy (one line: the holder's pid, host and start) when a live run holds it, and
    UserError when the workdir cannot be written. ``warn`` gets one line when a dead run's lock is
    taken over.
    """
    ensure_writable(workdir)
    path = (workdir / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        handle.close()
        raise WorkdirBusy(
            f"workdir {workdir} is in use by another run ({_describe(holder)}); wait for it to finish "
            "or use another workdir"
        ) from None
    previous = _read_holder(handle)
    if previous:
        warn(f"workdir {workdir}: took over the lock of a run that is gone ({_describe(previous)})")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    handle.flush()
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        handle.seek(0)
        handle.truncate()
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
