"""Where a teacher cache lives: a local directory, or a URL that fsspec opens (object storage).

A location is a ``Path`` for a local directory and a ``str`` for a URL (``s3://bucket/prefix``,
``gs://``, ``az://``, ``file:///``, ``memory://``): ``Path`` would fold a URL's ``//``. Credentials
and endpoints come from the filesystem's own settings, as with any fsspec user (for S3: the AWS
environment variables, ``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible server), so none is
ever written into a config or a manifest.

Remote files are read by byte ranges (``read_ranges``: one concurrent request per range on
asynchronous filesystems such as s3fs), never downloaded whole: a distillation process holds only
the rows its batches need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from atkd_core.errors import UserError

Location = Path | str

# What a protocol needs installed, for the message when it is missing (fsspec's own names it too,
# but only after a traceback through its registry).
PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}
# Stores whose first path component is a bucket (or container) that an upload does not create.
BUCKET_PROTOCOLS = frozenset(PROTOCOL_PACKAGES)


def is_url(location: Location) -> bool:
    """True for a URL (``scheme://...``), False for a local path."""
    return isinstance(location, str) and "://" in location


def as_location(text: Location) -> Location:
    """A location from its text: the URL kept as a string, a local path as a ``Path``."""
    return text if is_url(text) else Path(text)


def known_protocol(url: str) -> bool:
    """True when fsspec knows the URL's scheme (whether or not its package is installed)."""
    return url.split("://", 1)[0] in fsspec.available_protocols()


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path within it; a UserError naming the package to
    install when the scheme's implementation is missing."""
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise UserError(f"{url}: reading {protocol}:// needs {package} (pip install {package})") from None
    except ValueError as error:
        raise UserError(f"{url}: not a location fsspec can open ({error})") from None


class RemoteDirectory:
    """A directory at a URL: listing, whole small files, byte ranges of large ones, uploads."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)

    def path(self, name: str) -> str:
        """The filesystem path of the file ``name`` in this directory."""
        return f"{self.root.rstrip('/')}/{name}"

    def read_text(self, name: str) -> str | None:
        """The text of the file ``name``, or None when there is none."""
        try:
            return bytes(self.fs.cat_file(self.path(name))).decode()
        except FileNotFoundError:
            return None

    def sizes(self) -> dict[str, int]:
        """Each file's size in bytes, by name (empty when the directory does not exist)."""
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in entries}

    def missing_bucket(self) -> str | None:
        """The bucket (or container) of this directory when its store has buckets and this one does
        not exist; None otherwise (a file system's upload makes its directories)."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if not protocols & BUCKET_PROTOCOLS:
            return None
        bucket = self.root.strip("/").split("/", 1)[0]
        return None if self.fs.exists(bucket) else bucket

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes ``[start, end)`` of each (file name, start, end), in one call (concurrent
        where the filesystem is asynchronous)."""
        if not requests:
            return []
        names, starts, ends = zip(*requests, strict=True)
        blocks = self.fs.cat_ranges([self.path(n) for n in names], list(starts), list(ends))
        for (name, start, end), block in zip(requests, blocks, strict=True):
            if isinstance(block, Exception) or len(block) != end - start:
                raise OSError(f"{self.url}/{name}: bytes {start}..{end} could not be read ({block!r:.200})")
        return [bytes(block) for block in blocks]

    def upload(self, local: Path, name: str) -> None:
        """Copy the local file ``local`` to ``name`` in this directory."""
        if isinstance(self.fs, LocalFileSystem):
            # Object stores have no directories to make; a file system needs its own first.
            self.fs.makedirs(self.root, exist_ok=True)
        self.fs.put_file(str(local), self.path(name))

    def remove(self, name: str) -> None:
        """Remove the file ``name`` if it exists."""
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))
