"""User-facing errors: their messages are meant to be printed as they are, without a traceback."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """Base of every error caused by the user's input (config, data, models, caches)."""


class ConfigError(UserError):
    """A problem in a configuration: one line per problem naming field, value and what is allowed."""


class DataError(UserError):
    """A problem with the user's data; the message names the file, line and field."""


class TokenizerMismatch(UserError):
    """A model whose tokenizer or vocabulary does not match the pipeline's tokenizer."""


class CacheError(UserError):
    """A teacher cache that does not match what it is used with, or is damaged."""


class FilesystemError(UserError):
    """A path the filesystem refused to write or read: the message names it and what to do."""


# What the user can do about each fault the filesystem reports, by errno.
_FILESYSTEM_ADVICE = {
    errno.ENOSPC: "no space left on its device; free space there or set workdir on a larger disk",
    errno.EDQUOT: "the disk quota is used up; free space there or set workdir on another disk",
    errno.EFBIG: "a file grew past the filesystem's or the process's file-size limit (ulimit -f); raise "
    "the limit or set workdir on a filesystem that takes large files",
    errno.EACCES: "permission denied; make it writable by this user or set workdir elsewhere",
    errno.EPERM: "operation not permitted; make it writable by this user or set workdir elsewhere",
    errno.EROFS: "the filesystem is read-only; set workdir on a writable one",
    errno.ENOTDIR: "a regular file stands where a directory is expected; move or delete that file",
    errno.EISDIR: "a directory stands where a file is expected; move or delete that directory",
}
# Rust libraries (safetensors, tokenizers) report an I/O error as text ending in "(os error N)".
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def _blocking_file(path: Path) -> Path:
    """The regular file among ``path``'s ancestors that stops it being a directory path, else ``path``."""
    for ancestor in reversed(path.parents):
        if ancestor.is_file():
            return ancestor
    return path


def filesystem_error(exc: BaseException, path: Path | str | None = None) -> FilesystemError | None:
    """The one-line FilesystemError for a filesystem fault (an OSError, or a library error whose
    text ends in ``(os error N)``), naming the OSError's file, else ``path``; None when ``exc`` is
    another kind of error, which then keeps its traceback."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (match := _OS_ERROR_TEXT.search(str(exc))) is not None:
        code = int(match.group(1))
    if code not in _FILESYSTEM_ADVICE:
        return None
    where = getattr(exc, "filename", None) or path
    if where is None:
        return FilesystemError(f"the filesystem refused a write: {_FILESYSTEM_ADVICE[code]}")
    if code == errno.ENOTDIR:
        where = _blocking_file(Path(where))
    return FilesystemError(f"{where}: {_FILESYSTEM_ADVICE[code]}")


@contextmanager
def faults_named(path: Path | str) -> Iterator[None]:
    """Within the block, a filesystem fault that names no file (safetensors reports none) becomes
    a FilesystemError naming ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        fault = filesystem_error(exc, path)
        if fault is None:
            raise
        raise fault from exc
