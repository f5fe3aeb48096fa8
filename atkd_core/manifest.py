"""Stage outputs: one directory per stage with a ``manifest.json``, written atomically.

One protocol for every stage, training and evaluation included: an output whose manifest carries
the fingerprint of its inputs now is reused (``is_up_to_date``); otherwise it is built in a
temporary sibling directory (``atomic_output``, or a resumable staging directory of the stage's
own that ``publish`` renames), its manifest is written last (``write_manifest``: stage, input
fingerprint, ``content_sha256``, ``created_unix`` and the stage's typed fields, see
``atkd_core.outputs``), and it replaces the old output in one rename.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from atkd_core.errors import UserError
from atkd_core.storage import Location, RemoteDirectory, is_url
from atkd_core.workdir import process_alive

MANIFEST_NAME = "manifest.json"


class StageManifest(BaseModel):
    """What every manifest holds. stage: the stage that wrote it. input_fingerprint: the identity
    of what it was made from (reuse key). content_sha256: the identity of what it holds (what
    outputs made from it are keyed by). created_unix: when it was written (seconds since the epoch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    input_fingerprint: str
    content_sha256: str
    created_unix: float


Manifest = TypeVar("Manifest", bound=StageManifest)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(directory: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> str:
    """Hex sha256 over a directory's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def fingerprint(payload: Any) -> str:
    """Hex sha256 of a JSON-serialisable payload (keys sorted): a stage's input identity."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(directory: Location, kind: type[Manifest] = StageManifest) -> Manifest | None:  # type: ignore[assignment]
    """The manifest of a stage output (a local directory, or a URL: a cache in object storage) as
    ``kind``, or None when there is none, it is unreadable, or it is not a ``kind`` (a manifest of
    an older format reads as absent: the output is rebuilt). ``StageManifest`` reads the fields
    every manifest has, whatever its stage."""
    try:
        if is_url(directory):
            text = RemoteDirectory(str(directory)).read_text(MANIFEST_NAME)
            if text is None:
                return None
        else:
            text = (Path(directory) / MANIFEST_NAME).read_text()
        data = json.loads(text)
        if kind is StageManifest and isinstance(data, dict):
            data = {name: data[name] for name in StageManifest.model_fields if name in data}
        return kind.model_validate(data)
    except (FileNotFoundError, json.JSONDecodeError, ValidationError):
        return None


def weight_files_sha256(model_dir: Path) -> str | None:
    """sha256 over a model directory's weight files (safetensors / bin), or None when it has none."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"})
    return fingerprint({p.name: sha256_file(p) for p in files}) if files else None


def content_identity(location: Location) -> str:
    """What an input *is*, for the fingerprints of what is made from it (never where it is).

    A stage output: its manifest's content hash (a cache at a URL: the remote manifest's). A model
    directory made elsewhere: the hash of its weights and config. Any other directory: the hash of
    its files. A hub id: itself.
    """
    if is_url(location):
        remote = read_manifest(location)
        return str(location) if remote is None else remote.content_sha256
    path = Path(location)
    if not path.is_dir():
        return str(location)
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest.content_sha256
    weights = weight_files_sha256(path)
    if weights is not None and (path / "config.json").is_file():
        return fingerprint({"weights": weights, "config": sha256_file(path / "config.json")})
    return sha256_tree(path)


def require_manifest(directory: Path, stage: str, kind: type[Manifest]) -> Manifest:
    """The manifest of ``stage``'s output ``directory`` as ``kind``; a UserError saying to run the
    stage when there is none (or it is of an older format)."""
    manifest = read_manifest(directory, kind)
    if manifest is None:
        raise UserError(f"{directory}: no readable manifest.json; run {stage} first")
    return manifest


def up_to_date_manifest(directory: Location, kind: type[Manifest], input_fingerprint: str) -> Manifest | None:
    """The manifest (as ``kind``) of a finished output in ``directory`` made from inputs with this
    fingerprint, or None: the one reuse check every stage makes."""
    manifest = read_manifest(directory, kind)
    return manifest if manifest is not None and manifest.input_fingerprint == input_fingerprint else None


def is_up_to_date(directory: Location, input_fingerprint: str) -> bool:
    """True when ``directory`` holds a finished output made from inputs with this fingerprint."""
    return up_to_date_manifest(directory, StageManifest, input_fingerprint) is not None


def _sibling(directory: Path, kind: str) -> Path:
    """A hidden sibling of ``directory`` named after this host and process, so a later run can tell
    one left by a dead process (``kind``: tmp, being written; old, being replaced)."""
    return (
        directory.parent
        / f".{directory.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def remove_dead_siblings(directory: Path) -> None:
    """Remove the temporary siblings of ``directory`` left by a process of this host that is gone
    (a killed run). Those of live processes, or of other hosts, are left alone."""
    for kind in ("tmp", "old"):
        for sibling in directory.parent.glob(f".{glob.escape(directory.name)}.{kind}-*"):
            owner = sibling.name.removeprefix(f".{directory.name}.{kind}-").rpartition("-")[0]
            host, _, pid = owner.rpartition("-")
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)


def _umask() -> int:
    """This process's umask. Read from /proc where it is there: setting it to read it back, the
    only portable way, would briefly change it under the other threads of a flow run."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def publishable_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode a plain ``open`` would (0644 under the usual
    umask): safetensors writes its files 0600, which other users of a shared output cannot read."""
    umask = _umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def publish(staging: Path, directory: Path) -> None:
    """Make the finished ``staging`` directory ``directory`` in one rename, replacing what was
    there (moved aside first, removed after), with the file modes a plain ``open`` would give."""
    publishable_modes(staging)
    if directory.exists():
        retired = _sibling(directory, "old")
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(directory)


@contextmanager
def atomic_output(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``directory`` (``publish``).

    On failure the temporary directory is removed and ``directory`` keeps what it had, so the next
    stage never reads a half-written output. Siblings a killed run left behind are removed first.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_siblings(directory)
    staging = _sibling(directory, "tmp")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, directory)


def write_manifest(
    directory: Path,
    kind: type[Manifest],
    *,
    stage: str,
    input_fingerprint: str,
    content_sha256: str | None = None,
    **fields: Any,
) -> Manifest:
    """Write ``directory``'s ``manifest.json`` as ``kind`` and return it. ``content_sha256``: the
    hash of every file in ``directory`` unless the stage gives the one that identifies its output."""
    manifest = kind(
        stage=stage,
        input_fingerprint=input_fingerprint,
        content_sha256=content_sha256 or sha256_tree(directory),
        created_unix=round(time.time(), 3),
        **fields,
    )
    # Python mode, not pydantic's JSON mode, which would write NaN (an empty split's UNC) as null.
    text = json.dumps(manifest.model_dump(), indent=2, sort_keys=True, default=str)
    (directory / MANIFEST_NAME).write_text(text + "\n")
    return manifest


def run_stage(
    directory: Path,
    kind: type[Manifest],
    *,
    stage: str,
    input_fingerprint: str,
    build: Callable[[Path], dict[str, Any]],
    force: bool = False,
) -> tuple[Manifest, bool]:
    """Build a stage output unless an up-to-date one exists; return (manifest, reused).

    ``build(staging_dir)`` writes the output files and returns ``kind``'s own manifest fields.
    """
    existing = None if force else up_to_date_manifest(directory, kind, input_fingerprint)
    if existing is not None:
        return existing, True
    with atomic_output(directory) as staging:
        fields = build(staging)
        manifest = write_manifest(staging, kind, stage=stage, input_fingerprint=input_fingerprint, **fields)
    return manifest, False
