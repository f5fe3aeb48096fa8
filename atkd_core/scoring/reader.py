"""Reading a cache: verified against its manifest, handing out SparseTeacher batches.

A cache is read where it lives. In a local directory its shards are memory-mapped (safetensors)
and each batch slices its rows; at a URL (object storage through fsspec) only the shards' headers
and row offsets are read at open, and each batch fetches its rows' byte ranges in one call. Either
way a distillation process holds the index from example to row, not the cache.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from atkd_core.data.batching import IGNORE_INDEX, Placement, target_columns
from atkd_core.errors import CacheError
from atkd_core.losses import SparseTeacher
from atkd_core.manifest import (
    read_manifest,
    sha256_file,
)
from atkd_core.outputs import CacheManifest
from atkd_core.scoring.encoding import ENCODING_TENSOR, TopKCodec
from atkd_core.scoring.spec import ScoringSpec
from atkd_core.storage import Location, RemoteDirectory, is_url

# What sparse_teacher needs of a row beside its top-K (every tensor named topk_*, by encoding).
SCALAR_FIELDS = ("targets", "target_logprob", "unc", "log_tail_mass")
# Rows fetched per call when a field of many examples is read from a URL: a bound on one call's
# requests, so that a pass over a large cache (the difficulty report) streams.
REMOTE_ROWS_PER_CALL = 4096
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

Row = tuple[int, int, int]  # shard index, first token, end token
# Beside a local cache's shards: each shard's sha256 with the size and modification time it had
# when that sha256 was last checked (see cache_problem).
VERIFIED_NAME = "verified.json"


def _shard_size_problem(name: str, size: int | None, manifest: CacheManifest) -> str | None:
    """What is wrong with shard ``name`` of ``size`` bytes (None: absent) for ``manifest``, or None."""
    if size is None:
        return f"{name} is missing"
    if name in manifest.shard_bytes and size != manifest.shard_bytes[name]:
        return f"{name} has {size} bytes, the manifest says {manifest.shard_bytes[name]}"
    return None


def _read_verified(directory: Path) -> dict[str, list[str | int]]:
    try:
        stamps = json.loads((directory / VERIFIED_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_verified(directory: Path, stamps: dict[str, list[str | int]]) -> None:
    # Written whole and renamed: ranks opening the cache at once (on one node or several sharing
    # the directory) each write the same stamps, each through a file of its own.
    temporary = directory / f".{VERIFIED_NAME}.{socket.gethostname()}.{os.getpid()}"
    try:
        temporary.write_text(json.dumps(stamps, indent=1, sort_keys=True))
        os.replace(temporary, directory / VERIFIED_NAME)
    except OSError:
        # A read-only cache (a shared mount) is hashed again at the next open, which is all this costs.
        temporary.unlink(missing_ok=True)


def cache_problem(directory: Path, manifest: CacheManifest, *, check_hashes: bool) -> str | None:
    """What is wrong with a finished cache's shards (missing, another size, another sha256), or None.

    With ``check_hashes``, a shard whose sha256 was checked before (``verified.json``) and whose
    size and modification time have not changed since is not read again: every rank of every run
    opens the cache, and hashing a billion-token cache reads about 200 GB. A file rewritten or
    replaced changes its time; damage that leaves the time alone (bit rot) is for the storage's
    own checksums, and removing ``verified.json`` has every shard hashed at the next open."""
    verified = _read_verified(directory) if check_hashes else {}
    checked: dict[str, list[str | int]] = {}
    for name, digest in sorted(manifest.shards.items()):
        path = directory / f"{name}.safetensors"
        status = path.stat() if path.is_file() else None
        problem = _shard_size_problem(name, None if status is None else status.st_size, manifest)
        if problem is not None or status is None:
            return problem
        if not check_hashes:
            continue
        stamp: list[str | int] = [digest, status.st_size, status.st_mtime_ns]
        if verified.get(name) != stamp and sha256_file(path) != digest:
            return f"{name} is corrupt (its sha256 differs from the manifest)"
        checked[name] = stamp
    if check_hashes and checked != verified:
        _write_verified(directory, checked)
    return None


@dataclass(frozen=True)
class _TensorLocation:
    """Where one tensor of a shard file lies: dtype, shape, and its bytes' offset in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int

    def row_range(self, first: int, end: int) -> tuple[int, int]:
        """The file's bytes holding rows ``first:end`` (rows along the first dimension)."""
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        return self.start + first * row_bytes, self.start + end * row_bytes

    def decode(self, block: bytes, rows: int) -> Tensor:
        """``rows`` rows of this tensor from their bytes."""
        return torch.frombuffer(bytearray(block), dtype=self.dtype).reshape(rows, *self.shape[1:])


def remote_cache_problem(remote: RemoteDirectory, manifest: CacheManifest) -> str | None:
    """What is wrong with a finished cache's shards at a URL (missing, another size), or None.
    Their sha256 is not read: that would download the whole cache (the object store checks what
    it stores; ``atkd score`` checks every shard's sha256 before it uploads)."""
    sizes = remote.sizes()
    for name in sorted(manifest.shards):
        problem = _shard_size_problem(name, sizes.get(f"{name}.safetensors"), manifest)
        if problem is not None:
            return problem
    return None


class _RemoteShards:
    """A cache's shards at a URL, read by byte ranges: headers and offsets at open, rows on demand."""

    def __init__(self, remote: RemoteDirectory, names: list[str]) -> None:
        self.remote = remote
        self.files = [f"{name}.safetensors" for name in names]
        lengths = remote.read_ranges([(file, 0, 8) for file in self.files])
        header_sizes = [int.from_bytes(block, "little") for block in lengths]
        headers = remote.read_ranges(
            [(file, 8, 8 + n) for file, n in zip(self.files, header_sizes, strict=True)]
        )
        self.layouts: list[dict[str, _TensorLocation]] = []
        self.example_ids: list[list[str]] = []
        for file, size, header in zip(self.files, header_sizes, headers, strict=True):
            fields = json.loads(header)
            self.example_ids.append(json.loads(fields.pop("__metadata__")["example_ids"]))
            try:
                self.layouts.append(
                    {
                        key: _TensorLocation(
                            SAFETENSORS_DTYPES[value["dtype"]],
                            tuple(value["shape"]),
                            8 + size + value["data_offsets"][0],
                        )
                        for key, value in fields.items()
                    }
                )
            except KeyError as error:
                raise CacheError(
                    f"{remote.url}/{file}: a tensor of dtype {error} is not one a cache holds"
                ) from None
        whole = ["offsets", ENCODING_TENSOR]
        requests, owners = [], []
        for index, layout in enumerate(self.layouts):
            for key in whole:
                if key in layout:
                    requests.append((self.files[index], *layout[key].row_range(0, layout[key].shape[0])))
                    owners.append((index, key))
        self.small: list[dict[str, Tensor]] = [{} for _ in self.files]
        for (index, key), block in zip(owners, remote.read_ranges(requests), strict=True):
            location = self.layouts[index][key]
            self.small[index][key] = location.decode(block, location.shape[0])

    def rows(self, wanted: Sequence[Row], names: Sequence[str]) -> list[dict[str, Tensor]]:
        """For each (shard, first, end): the tensors ``names`` over those rows, in one call."""
        requests = [
            (self.files[shard], *self.layouts[shard][name].row_range(first, end))
            for shard, first, end in wanted
            for name in names
        ]
        blocks = iter(self.remote.read_ranges(requests))
        return [
            {name: self.layouts[shard][name].decode(next(blocks), end - first) for name in names}
            for shard, first, end in wanted
        ]


class TeacherCache:
    """A verified teacher cache, local or at a URL; hands out SparseTeacher batches aligned with
    targets. Locally every shard's sha256 is checked at open, unless it was checked before and the
    shard is unchanged since (see cache_problem); at a URL their sizes (see remote_cache_problem)."""

    def __init__(self, location: Location, *, expected: ScoringSpec | None = None):
        """Open the cache at ``location``; with ``expected``, refuse a cache made from anything else."""
        manifest = read_manifest(location, CacheManifest)
        if manifest is None or manifest.stage != "score_teacher":
            raise CacheError(f"{location}: not a teacher cache (no score_teacher manifest.json)")
        if expected is not None and manifest.input_fingerprint != expected.fingerprint():
            differs = [
                f"{key}: cache has {manifest.spec.get(key)!r}, expected {value!r}"
                for key, value in expected.__dict__.items()
                if key != "teacher_dir" and manifest.spec.get(key) != value
            ]
            raise CacheError(
                f"{location}: made for different inputs; "
                + "; ".join(differs)
                + "; score it again for these inputs (`atkd score CONFIG`)"
            )
        self.location = location
        self.manifest = manifest
        self.spec = manifest.spec
        self._rows: dict[str, Row] = {}
        self._shards: list[dict[str, Tensor]] = []
        self._remote: _RemoteShards | None = None
        names = sorted(manifest.shards)
        if is_url(location):
            remote = RemoteDirectory(str(location))
            problem = remote_cache_problem(remote, manifest)
            if problem is not None:
                raise CacheError(f"{location}: {problem}; `atkd score CONFIG` scores it again")
            self._remote = _RemoteShards(remote, names)
            shard_ids, small = self._remote.example_ids, self._remote.small
        else:
            directory = Path(location)
            problem = cache_problem(directory, manifest, check_hashes=True)
            if problem is not None:
                raise CacheError(f"{location}: {problem}; `atkd score CONFIG` scores it again")
            shard_ids = []
            for name in names:
                with safe_open(str(directory / f"{name}.safetensors"), "pt") as handle:
                    shard_ids.append(json.loads(handle.metadata()["example_ids"]))
                    self._shards.append({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
            small = self._shards
        self._codecs: list[TopKCodec] = []
        for name, tensors in zip(names, small, strict=True):
            try:
                self._codecs.append(
                    TopKCodec.from_shard(tensors, self.spec["top_k"], self.spec["storage_dtype"])
                )
            except CacheError as error:
                raise CacheError(f"{location}/{name}.safetensors: {error}") from None
        for shard_index, (ids, tensors) in enumerate(zip(shard_ids, small, strict=True)):
            offsets = tensors["offsets"].tolist()
            for row, example_id in enumerate(ids):
                self._rows[example_id] = (shard_index, offsets[row], offsets[row + 1])

    def __len__(self) -> int:
        return len(self._rows)

    def field(self, example_id: str, name: str) -> Tensor:
        """One cached field of one example, over its valid tokens in order: a scalar field
        (targets, target_logprob, unc, log_tail_mass, entropy) [n], or topk_ids / topk_logprobs
        [n, K] decoded (int32 / float32)."""
        return next(self.fields([example_id], name))

    def fields(self, example_ids: Sequence[str], name: str) -> Iterator[Tensor]:
        """``field`` of each example in turn; from a URL, fetched REMOTE_ROWS_PER_CALL rows a call."""
        topk = name in ("topk_ids", "topk_logprobs")
        for start in range(0, len(example_ids), REMOTE_ROWS_PER_CALL):
            chunk = example_ids[start : start + REMOTE_ROWS_PER_CALL]
            for shard, tokens, tensors in self._fetch(chunk, topk, () if topk else (name,)):
                if not topk:
                    yield tensors[name]
                    continue
                ids, logprobs = self._codecs[shard].decode(tensors, 0, tokens)
                yield ids if name == "topk_ids" else logprobs

    def _fetch(
        self, example_ids: Sequence[str], topk: bool, names: Sequence[str]
    ) -> list[tuple[int, int, dict[str, Tensor]]]:
        """Each example's shard index, its token count and its rows of the tensors ``names`` (and,
        with ``topk``, of the tensors its shard stores the top-K in)."""
        wanted = [self._row(example_id) for example_id in example_ids]
        stored = {
            name for shard, _, _ in wanted for name in (self._codecs[shard].stored_fields() if topk else ())
        }
        fields = [*names, *sorted(stored - set(names))]
        if self._remote is not None:
            rows = self._remote.rows(wanted, fields)
        else:
            rows = [
                {name: self._shards[shard][name][first:end] for name in fields}
                for shard, first, end in wanted
            ]
        return [
            (shard, end - first, tensors) for (shard, first, end), tensors in zip(wanted, rows, strict=True)
        ]

    def _row(self, example_id: str) -> Row:
        if example_id not in self._rows:
            raise CacheError(f"{self.location}: example {example_id!r} is not in the cache")
        return self._rows[example_id]

    def example_rows(self, example_ids: Sequence[str]) -> tuple[SparseTeacher, Tensor, list[int]]:
        """The cached rows of ``example_ids``, one after another: the SparseTeacher of their M label
        tokens, the teacher's token ids there [M] (long), and each example's token count.

        For a batch that is not laid out in the teacher's tokens (a student that tokenizes
        differently): the caller joins the rows to its own by the counts.
        """
        fetched = self._fetch(example_ids, True, SCALAR_FIELDS)
        pieces: dict[str, list[Tensor]] = {name: [] for name in (*SCALAR_FIELDS, "topk_ids", "topk_logprobs")}
        counts = []
        for shard, tokens, tensors in fetched:
            counts.append(tokens)
            for name in SCALAR_FIELDS:
                pieces[name].append(tensors[name])
            topk_ids, topk_logprobs = self._codecs[shard].decode(tensors, 0, tokens)
            pieces["topk_ids"].append(topk_ids)
            pieces["topk_logprobs"].append(topk_logprobs)
        joined = {name: torch.cat(values) for name, values in pieces.items()}
        record = SparseTeacher(
            target_logprob=joined["target_logprob"].float(),
            topk_ids=joined["topk_ids"],
            topk_logprobs=joined["topk_logprobs"].float(),
            log_tail_mass=joined["log_tail_mass"].float(),
            unc=joined["unc"].float(),
        )
        return record, joined["targets"].long(), counts

    def sparse_teacher(
        self, example_ids: Sequence[str], targets: Tensor, placements: Sequence[Placement] | None = None
    ) -> SparseTeacher:
        """The SparseTeacher for a batch whose shifted targets are ``targets`` [B, T].

        ``placements``: where each example sits (data.batching.pack); by default example i fills
        row i from column 0 (collate). Refuses (CacheError) any example whose valid targets differ
        from the cached ones: a cache misaligned with the data would otherwise train on the wrong
        teacher silently.
        """
        if placements is None:
            placements = [Placement(row, 0, targets.shape[1] + 1) for row in range(len(example_ids))]
        batch, length = targets.shape
        k = self.spec["top_k"]
        target_logprob = torch.zeros(batch, length)
        unc = torch.zeros(batch, length)
        log_tail = torch.zeros(batch, length)
        topk_ids = torch.zeros(batch, length, k, dtype=torch.int32)
        topk_logprobs = torch.zeros(batch, length, k)
        fetched = self._fetch(example_ids, True, SCALAR_FIELDS)
        for example_id, placement, (shard, tokens, tensors) in zip(
            example_ids, placements, fetched, strict=True
        ):
            row, columns = placement.row, target_columns(placement)
            positions = (targets[row, columns] != IGNORE_INDEX).nonzero().squeeze(-1).cpu() + columns.start
            cached_targets = tensors["targets"]
            if positions.numel() != tokens or not torch.equal(
                targets[row, positions].cpu().int(), cached_targets
            ):
                raise CacheError(
                    f"{self.location}: example {example_id!r}: the batch's targets differ from the cached ones "
                    f"({positions.numel()} vs {tokens} tokens); the cache was made from other data"
                )
            target_logprob[row, positions] = tensors["target_logprob"]
            unc[row, positions] = tensors["unc"]
            log_tail[row, positions] = tensors["log_tail_mass"]
            topk_ids[row, positions], topk_logprobs[row, positions] = self._codecs[shard].decode(
                tensors, 0, tokens
            )
        device = targets.device
        return SparseTeacher(
            target_logprob.to(device),
            topk_ids.to(device),
            topk_logprobs.to(device),
            log_tail.to(device),
            unc.to(device),
        )
