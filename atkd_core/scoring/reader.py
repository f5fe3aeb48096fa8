"""Reading a cache: verified against its manifest, handing out SparseTeacher batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from atkd_core.scoring.encoding import TopKCodec
from atkd_core.scoring.spec import ScoringSpec


def cache_problem(directory: Path, manifest: CacheManifest, *, check_hashes: bool) -> str | None:
    """What is wrong with a finished cache's shards (missing, another size, another sha256), or None."""
    sizes = manifest.shard_bytes
    for name, digest in sorted(manifest.shards.items()):
        path = directory / f"{name}.safetensors"
        if not path.is_file():
            return f"{name} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {sizes[name]}"
        if check_hashes and sha256_file(path) != digest:
            return f"{name} is corrupt (its sha256 differs from the manifest)"
    return None


class TeacherCache:
    """A verified, loaded teacher cache; hands out SparseTeacher batches aligned with targets."""

    def __init__(self, directory: Path, *, expected: ScoringSpec | None = None):
        """Open ``directory``; with ``expected``, refuse a cache made from anything else."""
        manifest = read_manifest(directory, CacheManifest)
        if manifest is None or manifest.stage != "score_teacher":
            raise CacheError(f"{directory}: not a teacher cache (no score_teacher manifest.json)")
        if expected is not None and manifest.input_fingerprint != expected.fingerprint():
            differs = [
                f"{key}: cache has {manifest.spec.get(key)!r}, expected {value!r}"
                for key, value in expected.__dict__.items()
                if key != "teacher_dir" and manifest.spec.get(key) != value
            ]
            raise CacheError(
                f"{directory}: made for different inputs; "
                + "; ".join(differs)
                + "; score it again for these inputs (`atkd score CONFIG`)"
            )
        self.directory = directory
        self.manifest = manifest
        self.spec = manifest.spec
        self._rows: dict[str, tuple[int, int, int]] = {}
        self._shards: list[dict[str, Tensor]] = []
        self._codecs: list[TopKCodec] = []
        problem = cache_problem(directory, manifest, check_hashes=True)
        if problem is not None:
            raise CacheError(f"{directory}: {problem}; `atkd score CONFIG` scores it again")
        for shard_index, name in enumerate(sorted(manifest.shards)):
            path = directory / f"{name}.safetensors"
            with safe_open(str(path), "pt") as handle:
                ids = json.loads(handle.metadata()["example_ids"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            try:
                codec = TopKCodec.from_shard(tensors, self.spec["top_k"], self.spec["storage_dtype"])
            except CacheError as error:
                raise CacheError(f"{path}: {error}") from None
            self._shards.append(tensors)
            self._codecs.append(codec)
            offsets = tensors["offsets"].tolist()
            for row, example_id in enumerate(ids):
                self._rows[example_id] = (shard_index, offsets[row], offsets[row + 1])

    def __len__(self) -> int:
        return len(self._rows)

    def field(self, example_id: str, name: str) -> Tensor:
        """One cached field of one example, over its valid tokens in order: a scalar field
        (targets, target_logprob, unc, log_tail_mass, entropy) [n], or topk_ids / topk_logprobs
        [n, K] decoded (int32 / float32)."""
        shard, start, end = self._row(example_id)
        if name in ("topk_ids", "topk_logprobs"):
            ids, logprobs = self._codecs[shard].decode(self._shards[shard], start, end)
            return ids if name == "topk_ids" else logprobs
        return self._shards[shard][name][start:end]

    def _row(self, example_id: str) -> tuple[int, int, int]:
        if example_id not in self._rows:
            raise CacheError(f"{self.directory}: example {example_id!r} is not in the cache")
        return self._rows[example_id]

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
        for example_id, placement in zip(example_ids, placements, strict=True):
            shard, start, end = self._row(example_id)
            tensors = self._shards[shard]
            row, columns = placement.row, target_columns(placement)
            positions = (targets[row, columns] != IGNORE_INDEX).nonzero().squeeze(-1).cpu() + columns.start
            cached_targets = tensors["targets"][start:end]
            if positions.numel() != cached_targets.numel() or not torch.equal(
                targets[row, positions].cpu().int(), cached_targets
            ):
                raise CacheError(
                    f"{self.directory}: example {example_id!r}: the batch's targets differ from the cached ones "
                    f"({positions.numel()} vs {cached_targets.numel()} tokens); the cache was made from other data"
                )
            target_logprob[row, positions] = tensors["target_logprob"][start:end]
            unc[row, positions] = tensors["unc"][start:end]
            log_tail[row, positions] = tensors["log_tail_mass"][start:end]
            topk_ids[row, positions], topk_logprobs[row, positions] = self._codecs[shard].decode(
                tensors, start, end
            )
        device = targets.device
        return SparseTeacher(
            target_logprob.to(device),
            topk_ids.to(device),
            topk_logprobs.to(device),
            log_tail.to(device),
            unc.to(device),
        )
