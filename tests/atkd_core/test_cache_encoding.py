"""Cache encodings: every encoding round-trips, the compact one within its stated bound, and a
cache written before encodings existed (format 1, a fixture made by that version) still reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atkd_core.errors import CacheError
from atkd_core.losses import atkd_loss, forward_kl
from atkd_core.manifest import fingerprint, sha256_file
from atkd_core.scoring import ScoringSpec, TeacherCache, TopKCodec
from atkd_core.scoring.encoding import ENCODING_TENSOR, pack_bits, unpack_bits
from atkd_core.scoring.writer import _partial_dir, finalize_cache, score_batch, write_shard

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 13, 16, 17])
def test_bits_round_trip_at_every_width(width):
    values = torch.randint(0, 1 << width, (37, 11), generator=torch.Generator().manual_seed(width))
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.shape == (37, math.ceil(11 * width / 8))
    assert torch.equal(unpack_bits(packed, width, 11), values)


def _top_k(rows: int, vocab: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return top.indices.int(), top.values


@pytest.mark.parametrize(("vocab", "k"), [(300, 8), (128_256, 64), (16, 16), (1000, 1), (50, 3)])
def test_compact_ids_are_exact_and_log_probs_within_the_stated_bound(vocab, k):
    ids, logprobs = _top_k(200, vocab, k)
    # The extremes of the id range must survive the split into high and low bits.
    others = torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(1))[: k - 1]
    ids[0] = torch.cat([torch.tensor([0]), others + 1]).int()
    ids[1] = torch.cat([torch.tensor([vocab - 1]), others]).int()
    codec = TopKCodec("compact", k, vocab, logprob_bits=8)
    encoded = codec.encode(ids, logprobs, torch.rand(200))
    decoded_ids, decoded = codec.decode(encoded, 0, 200)
    order = ids.long().argsort(-1)
    assert torch.equal(decoded_ids.long(), ids.long().gather(-1, order))
    expected = logprobs.gather(-1, order)
    # The row's top is exact; the rest within the bound the module states.
    top = expected.argmax(-1, keepdim=True)
    assert torch.equal(decoded.gather(-1, top), expected.gather(-1, top))
    levels = 254
    ranked = logprobs.sort(-1, descending=True).values
    spread = (ranked[:, 1:2] - ranked[:, -1:]) if k > 1 else torch.zeros(200, 1)
    bound = 2 * (spread / levels + spread / (4 * levels**2))
    assert ((decoded - expected).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    # The decoded top-K mass is the exact one: a loss weighs each token's terms by it.
    torch.testing.assert_close(decoded.logsumexp(-1), expected.logsumexp(-1), atol=2e-6, rtol=0)
    stored = sum(
        tensor[0].numel() * tensor.element_size() for name, tensor in encoded.items() if name != "entropy"
    )
    assert stored == codec.topk_bytes_per_token()


def test_compact_decodes_any_slice_of_a_shard():
    ids, logprobs = _top_k(50, 4000, 16, seed=3)
    codec = TopKCodec("compact", 16, 4000)
    encoded = codec.encode(ids, logprobs, torch.rand(50))
    whole_ids, whole = codec.decode(encoded, 0, 50)
    part_ids, part = codec.decode(encoded, 17, 31)
    assert torch.equal(part_ids, whole_ids[17:31]) and torch.equal(part, whole[17:31])


def test_compact_survives_minus_infinity_and_equal_log_probs():
    ids = torch.tensor([[3, 1, 2, 0], [0, 1, 2, 3]], dtype=torch.int32)
    logprobs = torch.tensor([[-0.1, -3.0, -math.inf, -math.inf], [-math.log(4.0)] * 4])
    codec = TopKCodec("compact", 4, 10)
    _, decoded = codec.decode(codec.encode(ids, logprobs, torch.zeros(2)), 0, 2)
    assert decoded.isfinite().all()
    # -inf becomes a log-prob 64 below the top: a probability under 1e-27, zero to any loss.
    assert decoded[0].min() == pytest.approx(-64.1, abs=0.01)
    assert torch.allclose(decoded[1], torch.full((4,), -math.log(4.0)))


def test_float_encoding_keeps_rank_order_and_the_storage_dtype():
    ids, logprobs = _top_k(20, 300, 8)
    codec = TopKCodec("float", 8, 300, "bfloat16")
    encoded = codec.encode(ids, logprobs, torch.rand(20))
    assert encoded["topk_logprobs"].dtype == torch.bfloat16 and encoded["entropy"].dtype == torch.float32
    decoded_ids, decoded = codec.decode(encoded, 0, 20)
    assert torch.equal(decoded_ids, ids) and torch.equal(decoded, logprobs.bfloat16().float())


def _write_cache(directory: Path, spec: ScoringSpec, logits: torch.Tensor, labels: torch.Tensor) -> None:
    record = score_batch(logits, labels, logits.shape[-1], spec.top_k, 1.0)
    counts = (labels[:, 1:] != -100).sum(-1).tolist()
    partial = _partial_dir(directory)
    partial.mkdir(parents=True)
    ids = [f"ex-{row}" for row in range(len(counts))]
    write_shard(partial, 0, ids, [record], counts, spec.codec(logits.shape[-1]))
    finalize_cache(directory, spec, hard_fraction=0.5, num_examples=len(counts))


def _spec(**kwargs) -> ScoringSpec:
    return ScoringSpec(
        "teacher", "a" * 64, "b" * 64, "c" * 64, kwargs.pop("top_k", 32), 1.0, "float32", 8, **kwargs
    )


def test_a_compact_cache_trains_as_the_float_one_within_its_bound(tmp_path):
    """Same hard tokens (UNC is stored exactly), and the loss and its gradient within 1e-3."""
    generator = torch.Generator().manual_seed(0)
    vocab = 500
    logits = torch.randn(6, 40, vocab, generator=generator) * 4
    labels = torch.randint(0, vocab, (6, 40), generator=generator)
    labels[:, :10] = -100
    targets = labels[:, 1:]
    student = torch.randn(6, 39, vocab, generator=generator) * 2
    ids = [f"ex-{row}" for row in range(6)]
    results = {}
    for name, spec in {"float": _spec(), "compact": _spec(encoding="compact", logprob_bits=8)}.items():
        _write_cache(tmp_path / name, spec, logits, labels)
        cache = TeacherCache(tmp_path / name, expected=spec)
        teacher = cache.sparse_teacher(ids, targets)
        leaf = student.clone().requires_grad_(True)
        output = atkd_loss(leaf, teacher, targets, hard_fraction=0.5)
        kd = forward_kl(leaf, teacher, targets)
        (output.loss + kd).backward()
        results[name] = (teacher, output, kd, leaf.grad)
    (f_teacher, f_out, f_kd, f_grad), (c_teacher, c_out, c_kd, c_grad) = results["float"], results["compact"]
    assert torch.equal(f_teacher.unc, c_teacher.unc) and torch.equal(f_out.hard_mask, c_out.hard_mask)
    assert abs(c_out.loss.item() - f_out.loss.item()) <= 1e-3 * abs(f_out.loss.item())
    assert abs(c_kd.item() - f_kd.item()) <= 1e-3 * abs(f_kd.item())
    assert (c_grad - f_grad).norm() <= 1e-2 * f_grad.norm()


def test_the_encoding_is_part_of_a_cache_identity_but_not_of_a_float_one():
    before_encodings = {
        "teacher_weights_sha256": "a" * 64,
        "prepared_data_sha256": "b" * 64,
        "tokenizer_sha256": "c" * 64,
        "top_k": 32,
        "temperature": 1.0,
        "storage_dtype": "float32",
        "shard_size": 8,
    }
    assert _spec().fingerprint() == fingerprint(before_encodings)
    compact = _spec(encoding="compact")
    assert compact.fingerprint() != _spec().fingerprint()
    assert compact.fingerprint() != _spec(encoding="compact", logprob_bits=6).fingerprint()


def test_a_format_1_cache_still_reads():
    """The fixture was written by the version before encodings (27e4ccf): bfloat16, K = 4."""
    directory = FIXTURES / "teacher-cache-format-1"
    expected = json.loads((FIXTURES / "teacher-cache-format-1.json").read_text())
    cache = TeacherCache(directory)
    assert cache.manifest.input_fingerprint == expected["fingerprint"]
    with safe_open(str(directory / "shard-00000.safetensors"), "pt") as handle:
        assert ENCODING_TENSOR not in handle.keys()  # noqa: SIM118
    targets = torch.tensor(expected["labels"])[:, 1:]
    teacher = cache.sparse_teacher(["ex-0", "ex-1"], targets)
    valid = targets != -100
    torch.testing.assert_close(teacher.unc[valid], torch.tensor(expected["unc"]))
    torch.testing.assert_close(teacher.topk_ids[valid], torch.tensor(expected["topk_ids"], dtype=torch.int32))
    stored = torch.tensor(expected["topk_logprobs"]).bfloat16().float()
    torch.testing.assert_close(teacher.topk_logprobs[valid], stored)
    torch.testing.assert_close(teacher.log_tail_mass[valid], torch.tensor(expected["log_tail_mass"]))


def test_a_shard_of_an_unknown_format_is_refused_with_what_to_do(tmp_path):
    spec = _spec(encoding="compact", top_k=4)
    logits = torch.randn(2, 6, 40)
    labels = torch.randint(0, 40, (2, 6))
    _write_cache(tmp_path / "cache", spec, logits, labels)
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    fields = json.loads(bytes(tensors[ENCODING_TENSOR].tolist()).decode())
    text = json.dumps({**fields, "format_version": 9})
    tensors[ENCODING_TENSOR] = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
    save_file(tensors, str(shard), metadata=metadata)
    with pytest.raises(CacheError, match="shard format 9 .* score the cache again"):
        _open_rewritten(tmp_path / "cache")


def _open_rewritten(directory: Path) -> TeacherCache:
    """Open a cache whose shard was rewritten: refresh the manifest's checksum and size first."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = directory / "shard-00000.safetensors"
    manifest["shards"]["shard-00000"] = sha256_file(shard)
    manifest["shard_bytes"]["shard-00000"] = shard.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    return TeacherCache(directory)
