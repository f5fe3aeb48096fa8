"""How a cache shard stores each token's top-K: exactly (``float``) or compactly (``compact``).

``float`` (format 1, every cache written before encodings existed): ids as int32 in rank order,
log-probs in the storage dtype. 4 + 2 or 4 bytes per entry.

``compact`` (format 2): per token, the ids sorted by id and Elias-Fano coded, and the log-probs
in the same order quantised to ``logprob_bits``. Elias-Fano stores K ids below V in
K * (2 + floor(log2(V / K))) bits at most, whatever the ids are, so every token takes the same
bytes and a row is sliced, not searched: at V = 128k and K = 64 that is 104 bytes against 256 for
int32. The row's top log-prob is kept exactly (float32, its code the largest, 2^bits - 1). Each
other log-prob is coded by its depth d below the largest of them on a square-root scale,
code = round(L * sqrt(d / D)) with D the deepest d and L = 2^bits - 2, so the grid is finest
where the probability is; then those entries are shifted together so that their decoded mass is
the exact one (the losses weigh a token's terms by the top-K mass, and ATKD's DKD renormalises
the mass off the target, which is usually the top). Each of them errs by at most
2 * (D / L + D / (4 L^2)) (its own rounding plus the shift), and by much less near the top.
``benchmarks/cache_fidelity.py`` measures what that does to each loss and its gradient.

The scalar fields (target id, its log-prob, UNC, tail mass) are float32 in both: the ATKD split
compares UNC with a threshold, and a coarser UNC would move tokens across it.

Each shard names its encoding in a small tensor (its JSON as bytes), so a reader needs nothing but
the shard. Not in the safetensors metadata: a second metadata entry is written in hash-map order,
so the same cache would not hash the same twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from atkd_core.errors import CacheError

ENCODINGS = ("float", "compact")
FORMAT_VERSION = {"float": 1, "compact": 2}
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per token beside the top-K: target id, target log-prob, UNC, tail mass (4 B each); entropy,
# which nothing trains on, is float32 in format 1 and float16 in format 2.
SCALAR_BYTES = {"float": 5 * 4, "compact": 4 * 4 + 2}
ENCODING_TENSOR = "topk_encoding"
# Log-probs this far below the row's top carry no probability a loss can see (e^-64 < 1e-27);
# clamping them keeps an exact zero (-inf) from stretching the quantisation grid to infinity.
LOGPROB_FLOOR_BELOW_TOP = 64.0


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack non-negative integers below 2**width, row by row, little-endian within each byte.

    values: [N, M] integer; returns [N, ceil(M * width / 8)] uint8.
    """
    rows = values.shape[0]
    if width == 0 or values.shape[1] == 0:
        return torch.zeros(rows, 0, dtype=torch.uint8)
    shifts = torch.arange(width, dtype=torch.int64)
    bits = ((values.long()[..., None] >> shifts) & 1).reshape(rows, -1)
    padding = -bits.shape[1] % 8
    bits = torch.nn.functional.pad(bits, (0, padding)).reshape(rows, -1, 8)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: packed [N, B] uint8 -> [N, count] int64."""
    rows = packed.shape[0]
    if width == 0 or count == 0:
        return torch.zeros(rows, count, dtype=torch.int64)
    bits = (packed.long()[..., None] >> torch.arange(8)) & 1
    bits = bits.reshape(rows, -1)[:, : count * width].reshape(rows, count, width)
    return (bits << torch.arange(width)).sum(-1)


@dataclass(frozen=True)
class TopKCodec:
    """One shard's top-K encoding: its name, K, the vocabulary the ids index, and its precision."""

    encoding: Literal["float", "compact"]
    top_k: int
    vocab_size: int
    storage_dtype: str = "float32"
    logprob_bits: int = 8

    @property
    def format_version(self) -> int:
        """1 for ``float`` (the original layout), 2 for ``compact``."""
        return FORMAT_VERSION[self.encoding]

    @property
    def low_bits(self) -> int:
        """Elias-Fano: the low bits stored verbatim per id, floor(log2(V / K)) (0 when K >= V/2)."""
        return max(0, (self.vocab_size // self.top_k).bit_length() - 1)

    @property
    def high_bitmap_bits(self) -> int:
        """Elias-Fano: the unary-coded high parts' bitmap, K ones among (V - 1) >> low_bits zeros."""
        return self.top_k + ((self.vocab_size - 1) >> self.low_bits)

    def topk_bytes_per_token(self) -> int:
        """Bytes one token's top-K ids and log-probs take in a shard."""
        if self.encoding == "float":
            return self.top_k * (4 + STORAGE_DTYPES[self.storage_dtype].itemsize)
        ids = math.ceil(self.top_k * self.low_bits / 8) + math.ceil(self.high_bitmap_bits / 8)
        # The row's top log-prob, the rest's shifted top and deepest depth (float32 each), the K codes.
        return ids + 12 + math.ceil(self.top_k * self.logprob_bits / 8)

    def bytes_per_token(self) -> int:
        """Bytes one scored token takes in a shard, its top-K and scalar fields together."""
        return self.topk_bytes_per_token() + SCALAR_BYTES[self.encoding]

    def as_tensor(self) -> Tensor:
        """The shard tensor that names this encoding: its JSON, sorted, as uint8 bytes."""
        text = json.dumps({"format_version": self.format_version, **asdict(self)}, sort_keys=True)
        return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)

    @classmethod
    def from_shard(cls, tensors: Mapping[str, Tensor], top_k: int, storage_dtype: str) -> TopKCodec:
        """The codec a shard was written with. A shard without the tensor is format 1 (``float``),
        the only one there was; ``top_k`` and ``storage_dtype`` then come from its cache's spec."""
        if ENCODING_TENSOR not in tensors:
            return cls("float", top_k, 0, storage_dtype)
        fields = json.loads(bytes(tensors[ENCODING_TENSOR].tolist()).decode())
        version = fields.pop("format_version")
        codec = cls(**fields)
        if version != codec.format_version:
            raise CacheError(
                f"shard format {version} for encoding {codec.encoding!r} is not one this version reads "
                f"(it reads {codec.format_version}); score the cache again with this version"
            )
        return codec

    def stored_fields(self) -> tuple[str, ...]:
        """The shard tensors that hold the top-K (what ``decode`` reads), each with a row per token."""
        if self.encoding == "float":
            return ("topk_ids", "topk_logprobs")
        return (
            "topk_ids_low",
            "topk_ids_high",
            "topk_logprob_top",
            "topk_logprob_rest_top",
            "topk_logprob_spread",
            "topk_logprob_codes",
        )

    def encode(self, topk_ids: Tensor, topk_logprobs: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        """A shard's top-K tensors and its entropy field.

        topk_ids: [N, K] int, distinct per row, below vocab_size; topk_logprobs: [N, K] float32;
        entropy: [N] float32. Returns the tensors to save, each with N rows.
        """
        if self.encoding == "float":
            return {
                "topk_ids": topk_ids.int(),
                "topk_logprobs": topk_logprobs.to(STORAGE_DTYPES[self.storage_dtype]),
                "entropy": entropy.float(),
            }
        ids, order = topk_ids.long().sort(-1)
        logprobs = topk_logprobs.float().gather(-1, order)
        low_mask = (1 << self.low_bits) - 1
        bitmap = torch.zeros(ids.shape[0], self.high_bitmap_bits, dtype=torch.int64)
        bitmap.scatter_(1, (ids >> self.low_bits) + torch.arange(self.top_k), 1)
        top, top_index = logprobs.max(-1)
        logprobs = torch.maximum(logprobs, top[:, None] - LOGPROB_FLOOR_BELOW_TOP)
        # The rest: every entry but the top, which is kept exactly under the largest code.
        is_top = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(1, top_index[:, None], True)
        rest = logprobs.masked_fill(is_top, -math.inf)
        rest_top = rest.max(-1).values if self.top_k > 1 else top
        depth = (rest_top[:, None] - logprobs).masked_fill(is_top, 0.0)
        spread = depth.max(-1).values
        rest_levels = (1 << self.logprob_bits) - 2
        # Codes on a square-root scale of the depth below the rest's top: finest where its mass is.
        codes = (depth / spread.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).sqrt() * rest_levels
        codes = codes.round()
        decoded = rest_top[:, None] - (codes / rest_levels).square() * spread[:, None]
        # Shift the rest so that its decoded mass is the exact one: a loss weighs each token's
        # terms by the top-K mass, and ATKD's DKD renormalises the mass off the target.
        shift = rest.logsumexp(-1) - decoded.masked_fill(is_top, -math.inf).logsumexp(-1)
        shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
        return {
            "topk_ids_low": pack_bits(ids & low_mask, self.low_bits),
            "topk_ids_high": pack_bits(bitmap, 1),
            "topk_logprob_top": top,
            "topk_logprob_rest_top": rest_top + shift,
            "topk_logprob_spread": spread,
            "topk_logprob_codes": pack_bits(
                codes.long().masked_fill(is_top, rest_levels + 1), self.logprob_bits
            ),
            "entropy": entropy.half(),
        }

    def decode(self, tensors: Mapping[str, Tensor], start: int, end: int) -> tuple[Tensor, Tensor]:
        """Tokens ``start:end`` of a shard: ids [n, K] int32 and log-probs [n, K] float32.

        ``compact`` returns each row's entries in id order, ``float`` in rank order; the losses
        do not depend on the order.
        """
        if self.encoding == "float":
            return tensors["topk_ids"][start:end], tensors["topk_logprobs"][start:end].float()
        rows = end - start
        bitmap = unpack_bits(tensors["topk_ids_high"][start:end], 1, self.high_bitmap_bits)
        # Each row's bitmap has exactly K ones, and nonzero lists them row by row, left to right.
        positions = bitmap.nonzero()[:, 1].reshape(rows, self.top_k)
        high = positions - torch.arange(self.top_k)
        low = unpack_bits(tensors["topk_ids_low"][start:end], self.low_bits, self.top_k)
        ids = (high << self.low_bits) | low
        codes = unpack_bits(tensors["topk_logprob_codes"][start:end], self.logprob_bits, self.top_k)
        rest_levels = (1 << self.logprob_bits) - 2
        rest_top = tensors["topk_logprob_rest_top"][start:end, None]
        spread = tensors["topk_logprob_spread"][start:end, None]
        rest = rest_top - (codes.float() / rest_levels).square() * spread
        return ids.int(), torch.where(codes > rest_levels, tensors["topk_logprob_top"][start:end, None], rest)
