"""The workdir's record of tracking calls that could not be made, and of the outage that stopped them."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from infra.tracking.client import root_cause

OUTBOX_NAME = "tracking-outbox.jsonl"
OUTAGE_NAME = "tracking-outage.json"


class Outbox:
    """Tracking calls that could not be made, kept as JSON lines in the workdir until ``atkd sync``
    sends them: the science never waits on, or fails for, the tracking server."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / OUTBOX_NAME
        self.outage_path = workdir / OUTAGE_NAME

    def outage(self, uri: str | None) -> str | None:
        """The cause of the outage of ``uri`` this process met while tracking to this workdir, or
        None. Once one call failed, later ones go straight to the outbox instead of each waiting
        out the HTTP client's retries. The record sits beside the outbox, so every handle of the
        run sees it whichever task made it; another process (a later run, ``atkd sync``) starts
        afresh."""
        try:
            record = json.loads(self.outage_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
        return record.get("cause") if ours and record.get("uri") == uri else None

    def note_outage(self, uri: str, error: BaseException) -> None:
        """Record that ``uri`` failed (``error``) for the rest of this process, warning once."""
        if self.outage(uri) is not None:
            return
        cause = root_cause(error)
        record = {"uri": uri, "cause": cause, "pid": os.getpid(), "host": socket.gethostname()}
        self.outage_path.parent.mkdir(parents=True, exist_ok=True)
        self.outage_path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        print(
            f"atkd: warning: MLflow at {uri} failed ({cause}); the run goes on and keeps what was not "
            f"logged in {self.path}: send it later with `atkd sync CONFIG`",
            file=sys.stderr,
            flush=True,
        )

    def clear_outage(self) -> None:
        """Forget a recorded outage (the server answered again)."""
        self.outage_path.unlink(missing_ok=True)

    def add(self, entry: dict[str, Any]) -> None:
        """Append one call (``run``: its run id or pending key, ``kind``, its arguments)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        """Every call not yet sent, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def replace(self, entries: list[dict[str, Any]]) -> None:
        """Keep only ``entries`` (what a sync could not send)."""
        if entries:
            self.path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        else:
            self.path.unlink(missing_ok=True)
