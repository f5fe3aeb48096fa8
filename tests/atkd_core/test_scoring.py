"""Teacher scoring: exact cache, resumable, verified on load, multi-process, difficulty report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk

from atkd_core.data.batching import collate, next_token_logits, shift_targets
from atkd_core.data.prepare import prepare_data
from atkd_core.errors import CacheError
from atkd_core.losses import atkd_loss, otsu_threshold
from atkd_core.manifest import read_manifest
from atkd_core.models.build import load_model, materialize_model
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.reports.difficulty import token_difficulty_report
from atkd_core.scoring import ScoringSpec, TeacherCache, run_scoring_stage
from tests.conftest import REPO_ROOT, free_port, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    config = tiny_config(root)
    prepare_data(config, root / "prepared", log=lambda _: None)
    teacher = materialize_model(config.teacher, root / "prepared" / "tokenizer", root / "teacher")
    return config, root, root / "prepared", root / "teacher", teacher


def score(prepared, teacher_dir, out, top_k=8, shard_size=24, **kwargs):
    return run_scoring_stage(
        teacher_dir,
        prepared,
        out,
        top_k=top_k,
        temperature=1.0,
        storage_dtype="float32",
        shard_size=shard_size,
        batch_size=8,
        hard_fraction=0.5,
        log=lambda _: None,
        **kwargs,
    )


def live_batch(prepared, teacher_dir, rows):
    train = load_from_disk(str(prepared / "dataset"))["train"].select(rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    batch = collate(list(train), tokenizer.pad_token_id)
    model = load_model(teacher_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return list(train["id"]), next_token_logits(logits, len(tokenizer)), shift_targets(batch["labels"])


@pytest.mark.parametrize("encoding", ["float", "compact"])
def test_cache_equals_a_fresh_teacher_forward(setup, tmp_path, encoding):
    """float: every field exactly; compact: the same, but the top-K in id order and its log-probs
    within the encoding's bound (tests/atkd_core/test_cache_encoding.py states it)."""
    _, _, prepared, teacher_dir, _ = setup
    manifest, reused = score(prepared, teacher_dir, tmp_path / "cache", encoding=encoding)
    assert not reused and manifest.num_examples == 64
    assert manifest.format_version == (1 if encoding == "float" else 2)
    cache = TeacherCache(tmp_path / "cache")
    ids, logits, targets = live_batch(prepared, teacher_dir, range(5, 13))
    log_p = torch.log_softmax(logits, -1)
    for row, example_id in enumerate(ids):
        valid = targets[row] != -100
        expected = log_p[row][valid]
        target = targets[row][valid]
        torch.testing.assert_close(
            cache.field(example_id, "target_logprob"), expected.gather(-1, target[:, None]).squeeze(-1)
        )
        top = expected.topk(8, -1)
        ids, logprobs = top.indices, top.values
        if encoding == "compact":
            ids, order = ids.sort(-1)
            logprobs = logprobs.gather(-1, order)
        tolerance = 0.0 if encoding == "float" else 0.05
        torch.testing.assert_close(
            cache.field(example_id, "topk_logprobs"), logprobs, atol=tolerance, rtol=1e-6
        )
        assert torch.equal(cache.field(example_id, "topk_ids").long(), ids)
        torch.testing.assert_close(
            cache.field(example_id, "unc"), 1 - expected.gather(-1, target[:, None]).squeeze(-1).exp()
        )
        tail = 1 - top.values.exp().sum(-1)
        torch.testing.assert_close(cache.field(example_id, "log_tail_mass").exp(), tail, atol=1e-6, rtol=1e-4)


def test_sparse_atkd_from_cache_equals_dense_with_live_teacher_when_k_is_v(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    vocab = read_manifest(prepared, PreparedManifest).vocab_size
    # float: this is a parity test with the dense teacher, to float32 rounding.
    score(prepared, teacher_dir, tmp_path / "cache", top_k=vocab, encoding="float")
    cache = TeacherCache(tmp_path / "cache")
    ids, teacher_logits, targets = live_batch(prepared, teacher_dir, range(0, 6))
    student = torch.randn(
        teacher_logits.shape, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    for setting in ("forward", "reverse"):
        dense = atkd_loss(student, teacher_logits, targets, setting=setting)
        sparse = atkd_loss(student, cache.sparse_teacher(ids, targets), targets, setting=setting)
        torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-5, rtol=1e-5)
        assert (sparse.num_easy, sparse.num_hard) == (dense.num_easy, dense.num_hard)


def test_second_run_reuses_and_interrupted_run_resumes(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    from atkd_core.scoring import score_teacher

    spec_args = dict(top_k=8, shard_size=24)
    # A run killed after its first shard: the partial directory holds shard 0 only.
    manifest = read_manifest(prepared, PreparedManifest)
    from atkd_core.scoring import prepared_data_sha256, weights_sha256

    spec = ScoringSpec(
        str(teacher_dir),
        weights_sha256(teacher_dir),
        prepared_data_sha256(prepared),
        manifest.tokenizer_sha256,
        8,
        1.0,
        "float32",
        24,
        encoding="compact",
    )
    score_teacher(
        load_model(teacher_dir),
        prepared,
        tmp_path / "cache",
        spec,
        batch_size=8,
        stop_after_shards=1,
        log=lambda _: None,
    )
    partial = tmp_path / "cache.partial"
    first = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    assert not (partial / "shard-00001.sha256").exists() and not (tmp_path / "cache").exists()
    messages = []
    manifest, reused = run_scoring_stage(
        teacher_dir,
        prepared,
        tmp_path / "cache",
        temperature=1.0,
        storage_dtype="float32",
        batch_size=8,
        hard_fraction=0.5,
        log=messages.append,
        **spec_args,
    )
    assert not reused and any("resumes, 1 of 3 shards already done" in m for m in messages)
    assert (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert not partial.exists()
    _, reused = score(prepared, teacher_dir, tmp_path / "cache")
    assert reused


def test_corrupt_shard_and_wrong_teacher_are_refused(setup, tmp_path):
    config, root, prepared, teacher_dir, _ = setup
    score(prepared, teacher_dir, tmp_path / "cache")
    manifest = read_manifest(tmp_path / "cache", CacheManifest)
    other = materialize_model(
        config.teacher.model_copy(update={"init_seed": 9}), prepared / "tokenizer", tmp_path / "other"
    )
    from atkd_core.scoring import weights_sha256

    expected = ScoringSpec(**{**manifest.spec, "teacher_weights_sha256": weights_sha256(tmp_path / "other")})
    with pytest.raises(CacheError, match="teacher_weights_sha256: cache has"):
        TeacherCache(tmp_path / "cache", expected=expected)
    assert other
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001 is corrupt"):
        TeacherCache(tmp_path / "cache")


def test_a_shard_is_hashed_again_only_when_its_size_or_time_changed(setup, tmp_path, monkeypatch):
    from atkd_core.scoring import reader

    _, _, prepared, teacher_dir, _ = setup
    cache = tmp_path / "cache"
    score(prepared, teacher_dir, cache)
    hashed: list[str] = []
    real_sha256 = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda path: hashed.append(path.stem) or real_sha256(path))
    shards = sorted(read_manifest(cache, CacheManifest).shards)

    TeacherCache(cache)
    assert hashed == shards and (cache / reader.VERIFIED_NAME).is_file()
    hashed.clear()
    TeacherCache(cache)
    assert hashed == []

    shard = cache / "shard-00001.safetensors"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001 is corrupt"):
        TeacherCache(cache)
    assert hashed == ["shard-00001"]
    # Damage that keeps the size and the time is not seen until the stamps are removed.
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    TeacherCache(cache)
    (cache / reader.VERIFIED_NAME).unlink()
    with pytest.raises(CacheError, match="shard-00001 is corrupt"):
        TeacherCache(cache)


def test_misaligned_batch_is_refused(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    score(prepared, teacher_dir, tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    ids, _, targets = live_batch(prepared, teacher_dir, range(0, 4))
    with pytest.raises(CacheError, match="differ from the cached ones"):
        cache.sparse_teacher(list(reversed(ids)), targets)


def test_difficulty_report(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    score(prepared, teacher_dir, tmp_path / "cache")
    report = token_difficulty_report(TeacherCache(tmp_path / "cache"), prepared, 0.3, tmp_path / "report")
    assert (tmp_path / "report" / "unc_histogram.png").stat().st_size > 1000
    assert (
        abs(report["hard_share"] - 0.3) < 0.05 and abs(report["hard_share"] + report["easy_share"] - 1) < 1e-9
    )
    assert sum(f["tokens"] for f in report["families"].values()) == report["tokens"]
    assert json.loads((tmp_path / "report" / "difficulty.json").read_text()) == report


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    single, _ = score(prepared, teacher_dir, tmp_path / "single")
    from atkd_core.training.distributed import child_environment

    env = {**child_environment(), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "atkd_core.score_main",
            "--teacher",
            str(teacher_dir),
            "--prepared",
            str(prepared),
            "--out",
            str(tmp_path / "multi"),
            "--top-k",
            "8",
            "--shard-size",
            "24",
            "--batch-size",
            "8",
        ],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=180,
    )
    multi = read_manifest(tmp_path / "multi", CacheManifest)
    assert multi.shards == single.shards and multi.tokens == single.tokens


def test_the_cache_records_the_auto_split_and_the_report_uses_it(setup, tmp_path):
    _, _, prepared, teacher_dir, _ = setup
    manifest, _ = score(prepared, teacher_dir, tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    unc = torch.cat([cache.field(i, "unc") for i in load_from_disk(str(prepared / "dataset"))["train"]["id"]])
    assert sum(manifest.unc_histogram) == unc.numel() == manifest.tokens
    threshold, share = otsu_threshold(manifest.unc_histogram)
    recorded = [manifest.unc_auto_threshold, manifest.unc_auto_hard_fraction]
    assert recorded == pytest.approx([threshold, share], nan_ok=True)
    report = token_difficulty_report(cache, prepared, "auto", tmp_path / "report")
    assert report["hard_fraction"] == "auto"
    assert report["unc_threshold"] == pytest.approx(threshold, nan_ok=True)


def test_a_cache_manifest_of_an_older_format_is_scored_again(setup, tmp_path):
    """A manifest that does not parse as today's (here: written before the UNC histogram was
    recorded) reads as absent, so the cache is made again, never used half-described."""
    _, _, prepared, teacher_dir, _ = setup
    manifest, _ = score(prepared, teacher_dir, tmp_path / "cache")
    old = {k: v for k, v in manifest.model_dump().items() if not k.startswith(("unc_histogram", "unc_auto"))}
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(tmp_path / "cache", CacheManifest) is None
    again, reused = score(prepared, teacher_dir, tmp_path / "cache")
    assert not reused and again.unc_histogram == manifest.unc_histogram
    assert again.content_sha256 == manifest.content_sha256


def test_scoring_runs_without_autograd(setup, tmp_path):
    """A record that kept its autograd graph held every batch's activations until its shard was
    written: 11.5 GB for 267 Dolly-length examples on a 4M-parameter teacher."""
    from atkd_core.scoring.spec import scoring_spec
    from atkd_core.scoring.writer import score_teacher

    _, _, prepared, teacher_dir, _ = setup
    model = load_model(teacher_dir)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(torch.is_grad_enabled()))
    spec = scoring_spec(
        teacher_dir, prepared, top_k=4, temperature=1.0, storage_dtype="float32", shard_size=24
    )
    score_teacher(model, prepared, tmp_path / "cache", spec, batch_size=8, log=lambda _: None)
    assert seen and not any(seen)


def test_the_manifests_unc_statistics_are_accumulated_shard_by_shard():
    from atkd_core.losses import unc_histogram
    from atkd_core.losses.uncertainty import QUANTILE_BINS, UncStatistics
    from atkd_core.scoring.writer import QUANTILES

    generator = torch.Generator().manual_seed(0)
    # Bimodal like a fine-tuned teacher's: most tokens near 0, the rest spread; one shard tiny.
    shards = [
        torch.cat([torch.rand(n, generator=generator) * 0.02, torch.rand(n // 3, generator=generator)])
        for n in (3000, 7, 1200)
    ]
    everything = torch.cat(shards)
    statistics = UncStatistics()
    for unc in shards:
        statistics.add(unc)
    assert statistics.tokens == everything.numel()
    assert statistics.mean() == pytest.approx(float(everything.double().mean()), abs=1e-12)
    assert statistics.histogram == unc_histogram(everything)
    for q in (0.0, *QUANTILES, 1.0):
        exact = float(torch.quantile(everything.double(), q))
        assert abs(statistics.quantile(q) - exact) <= 1 / QUANTILE_BINS, q
    for threshold in (statistics.quantile(0.7), 0.5, 0.015):
        exact = float((everything.double() >= threshold).double().mean())
        # Only the tokens in the threshold's own fine bin may be counted on the other side.
        same_bin = (everything.double() * QUANTILE_BINS).long() == int(threshold * QUANTILE_BINS)
        slack = float(same_bin.double().mean())
        assert abs(statistics.share_at_or_above(threshold) - exact) <= slack + 1e-12, threshold
    empty = UncStatistics()
    assert empty.tokens == 0 and torch.isnan(torch.tensor(empty.quantile(0.5)))
    assert torch.isnan(torch.tensor(statistics.share_at_or_above(float("nan"))))


@pytest.mark.parametrize("chunk_values", [150, 1 << 21])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_score_batch_matches_a_float64_reference(monkeypatch, chunk_values, temperature):
    """Every field against float64 math from the definitions, over chunks of 3 rows or one, with
    a padded vocabulary (50 of 53 columns), peaked rows (p_g within 1e-12 of 1) and a target
    outside the top-K."""
    import atkd_core.scoring.writer as writer

    monkeypatch.setattr(writer, "RECORD_CHUNK_VALUES", {"cpu": chunk_values})
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 9, 53, generator=generator) * 3
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[:, :2] = -100
    labels[2, 7:] = -100
    logits[0, 3, labels[0, 4]] = 50.0 * temperature  # p_g = 1 - ~1e-18: UNC from the other buckets
    logits[1, 2, :50] = torch.arange(50.0)
    labels[1, 3] = 0  # the least likely token: outside the top-K
    record = writer.score_batch(logits, labels, 50, 8, temperature)

    targets = shift_targets(labels)
    valid = targets != -100
    log_p = torch.log_softmax(logits[:, :-1][valid][:, :50].double() / temperature, -1)
    target = targets[valid]
    p = log_p.exp()
    top = log_p.topk(8, -1)
    outside = p.scatter(-1, top.indices, 0.0).sum(-1)
    unc = p.scatter(-1, target[:, None], 0.0).sum(-1)
    assert torch.equal(record["targets"], target.int())
    assert torch.equal(record["topk_ids"].long(), top.indices)
    expected = {
        "target_logprob": log_p.gather(-1, target[:, None]).squeeze(-1),
        "topk_logprobs": top.values,
        "entropy": -(p * log_p).sum(-1),
        "log_tail_mass": outside.log(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(record[name].double(), value, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(record["unc"].double(), unc, atol=1e-7, rtol=1e-4)
    assert record["unc"][unc < 1e-12].min() > 0  # not rounded to zero where p_g rounds to 1
