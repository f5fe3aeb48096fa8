"""A teacher cache kept at a URL (fsspec): uploaded whole or not at all, read by byte ranges exactly
as the local one, on the local filesystem, in memory and on an S3-compatible server on the loopback."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atkd_core.config import LossConfig, PipelineConfig
from atkd_core.data.batching import Placement
from atkd_core.errors import CacheError, UserError
from atkd_core.manifest import MANIFEST_NAME, read_manifest
from atkd_core.outputs import CacheManifest
from atkd_core.pipeline import LocalStages, StageArguments, pipeline_outputs, stage_target
from atkd_core.readiness import Readiness, check_cache_location
from atkd_core.scoring import ScoringSpec, TeacherCache
from atkd_core.scoring.stage import upload_cache
from atkd_core.scoring.writer import _partial_dir, finalize_cache, score_batch, write_shard
from atkd_core.storage import RemoteDirectory, as_location, is_url
from atkd_core.training.teacher import CachedTeacher
from infra.launcher import launch_training
from tests.conftest import free_port, tiny_config

VOCAB = 300
EXAMPLES = 7


def _spec(encoding: str) -> ScoringSpec:
    return ScoringSpec("teacher", "a" * 64, "b" * 64, "c" * 64, 16, 1.0, "bfloat16", 3, encoding=encoding)


def _labels(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (EXAMPLES, 20), generator=generator)
    for row in range(EXAMPLES):  # examples of different lengths, some shorter than others
        labels[row, : 2 + row] = -100
    return labels


def _write_cache(directory: Path, encoding: str) -> tuple[list[str], torch.Tensor]:
    """A cache of EXAMPLES examples in shards of 3 (the last one short); its ids and labels."""
    spec = _spec(encoding)
    labels = _labels(1)
    logits = torch.randn(EXAMPLES, 20, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    partial = _partial_dir(directory)
    partial.mkdir(parents=True)
    ids = [f"ex-{row}" for row in range(EXAMPLES)]
    for shard, start in enumerate(range(0, EXAMPLES, spec.shard_size)):
        rows = slice(start, start + spec.shard_size)
        record = score_batch(logits[rows], labels[rows], VOCAB, spec.top_k, 1.0)
        counts = (labels[rows, 1:] != -100).sum(-1).tolist()
        write_shard(partial, shard, ids[rows], [record], counts, spec.codec(VOCAB))
    finalize_cache(directory, spec, hard_fraction=0.5, num_examples=EXAMPLES)
    return ids, labels


@pytest.fixture
def s3_bucket(monkeypatch):
    """An empty bucket on a moto S3 server on 127.0.0.1, reached as any S3-compatible endpoint is:
    through the AWS environment variables."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    # fsspec caches filesystems by their arguments, not the environment: none from another endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"atkd-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _url(kind: str, tmp_path: Path, request) -> str:
    if kind == "file":
        return f"file://{tmp_path}/remote/cache"
    if kind == "memory":
        return f"memory://atkd-tests/{uuid.uuid4().hex}/cache"
    return f"{request.getfixturevalue('s3_bucket')}/teachers/cache"


@pytest.mark.parametrize("kind", ["file", "memory", "s3"])
@pytest.mark.parametrize("encoding", ["float", "compact"])
def test_a_cache_at_a_url_reads_exactly_as_the_local_one(tmp_path, request, kind, encoding):
    ids, labels = _write_cache(tmp_path / "local", encoding)
    url = _url(kind, tmp_path, request)
    local = TeacherCache(tmp_path / "local", expected=_spec(encoding))
    upload_cache(tmp_path / "local", local.manifest, url, log=lambda _: None)

    remote = TeacherCache(url, expected=_spec(encoding))
    assert len(remote) == len(local) == EXAMPLES
    assert remote.manifest == local.manifest
    # A batch across shards, in an order that is not the cache's.
    batch = ["ex-5", "ex-0", "ex-3", "ex-6"]
    targets = labels[[int(i.split("-")[1]) for i in batch], 1:]
    expected, got = local.sparse_teacher(batch, targets), remote.sparse_teacher(batch, targets)
    for name in ("target_logprob", "topk_ids", "topk_logprobs", "log_tail_mass", "unc"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    for name in ("unc", "entropy", "targets", "topk_ids", "topk_logprobs"):
        for a, b in zip(local.fields(ids, name), remote.fields(ids, name), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(CacheError, match="the batch's targets differ"):
        remote.sparse_teacher(["ex-1"], labels[[2], 1:])


def test_an_upload_that_fails_leaves_no_cache_at_the_url(tmp_path, monkeypatch):
    _write_cache(tmp_path / "local", "compact")
    manifest = read_manifest(tmp_path / "local", CacheManifest)
    url = f"file://{tmp_path}/remote"
    upload_cache(tmp_path / "local", manifest, url, log=lambda _: None)
    assert read_manifest(url, CacheManifest) == manifest
    uploaded = []

    def fail_on_the_second_shard(self, local: Path, name: str) -> None:
        uploaded.append(name)
        if len(uploaded) == 2:
            raise OSError("connection reset")
        shutil.copy(local, f"{tmp_path}/remote/{name}")

    # A second upload over the first, interrupted: the old manifest is gone before any shard moves.
    monkeypatch.setattr(RemoteDirectory, "upload", fail_on_the_second_shard)
    with pytest.raises(OSError, match="connection reset"):
        upload_cache(tmp_path / "local", manifest, url, log=lambda _: None)
    assert read_manifest(url, CacheManifest) is None
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(url)


def test_a_damaged_cache_at_a_url_is_refused_with_what_to_do(tmp_path):
    _write_cache(tmp_path / "local", "float")
    manifest = read_manifest(tmp_path / "local", CacheManifest)
    url = f"file://{tmp_path}/remote"
    upload_cache(tmp_path / "local", manifest, url, log=lambda _: None)
    shard = tmp_path / "remote" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CacheError, match=r"shard-00001 has \d+ bytes, the manifest says \d+; `atkd score"):
        TeacherCache(url)
    shard.unlink()
    with pytest.raises(CacheError, match="shard-00001 is missing"):
        TeacherCache(url)


def test_a_bucket_that_does_not_exist_is_a_problem_before_the_run(tmp_path, s3_bucket):
    """An upload into a missing bucket fails only after hours of scoring: the check says so first."""

    def row(location: str) -> tuple[bool, str]:
        readiness = Readiness()
        check_cache_location(tiny_config(tmp_path / "work", scoring={"location": location}), readiness)
        (check,) = readiness.checks
        return check.ok, check.detail

    assert row(f"{s3_bucket}/teachers/cache") == (
        True,
        f"{s3_bucket}/teachers/cache: reachable, empty; score_teacher uploads the cache there",
    )
    missing = f"s3://nosuch-{uuid.uuid4().hex[:8]}"
    assert row(f"{missing}/teachers/cache") == (
        False,
        f"{missing}/teachers/cache: the bucket {missing.removeprefix('s3://')!r} does not exist, and "
        "score_teacher's upload does not create one; create it, or set scoring.location to a bucket "
        "that exists",
    )


def test_a_location_names_what_to_install_for_its_scheme():
    with pytest.raises(UserError, match=r"gs:// needs gcsfs \(pip install gcsfs\)"):
        RemoteDirectory("gs://bucket/cache")
    assert is_url("s3://b/c") and not is_url("/data/cache")
    assert as_location("s3://b/c") == "s3://b/c" and as_location("/data/cache") == Path("/data/cache")


@pytest.mark.parametrize(
    ("value", "message"),
    [("/data/cache", "must be a URL"), ("nosuch://bucket/cache", "nosuch:// is not a scheme fsspec knows")],
)
def test_a_bad_location_fails_at_load_naming_the_field(tmp_path, value, message):
    with pytest.raises(ValueError, match=rf"scoring\.location(.|\n)*{message}"):
        tiny_config(tmp_path, scoring={"location": value})


def test_the_pipeline_uploads_its_cache_and_distils_from_the_url(tmp_path):
    """Scored into the workdir, uploaded, distilled from the URL; a workdir without the local copy
    reuses the cache at the URL instead of scoring the teacher again."""
    url = f"file://{tmp_path}/bucket/teacher"
    config = tiny_config(
        tmp_path / "work",
        scoring={"location": url, "top_k": 8},
        finetune={"training": {"max_steps": 2, "batch_size": 8}},
        distill={"training": {"max_steps": 2, "batch_size": 8}},
        eval={"limit": 2, "max_new_tokens": 4},
    )
    lines: list[str] = []
    stages = LocalStages(
        config, train=lambda job: launch_training(job, lambda m, s: None, log=lines.append), log=lines.append
    )
    outputs = pipeline_outputs(config, stages)
    assert outputs["score_teacher"] == url
    assert any(
        line.startswith(f"score_teacher: uploaded {config.layout.teacher_cache} to {url}") for line in lines
    )
    assert any(f"offline teacher from {url}" in line for line in lines), lines
    remote = read_manifest(url, CacheManifest)
    assert remote == read_manifest(config.layout.teacher_cache, CacheManifest)
    assert (
        json.loads((tmp_path / "bucket" / "teacher" / MANIFEST_NAME).read_text())["tokens"] == remote.tokens
    )

    # The same student as from the local cache: the read-ahead hands every step its own teachers.
    local_config = config.model_copy(
        update={
            "workdir": tmp_path / "work-local",
            "scoring": config.scoring.model_copy(update={"location": None}),
        }
    )
    local_stages = LocalStages(
        local_config, train=lambda job: launch_training(job, lambda m, s: None), log=print
    )
    local_outputs = pipeline_outputs(local_config, local_stages)
    student = load_file(Path(outputs["distill_student"]) / "model.safetensors")
    local_student = load_file(Path(local_outputs["distill_student"]) / "model.safetensors")
    assert all(torch.equal(student[name], local_student[name]) for name in student)

    shutil.rmtree(config.layout.teacher_cache)
    lines.clear()
    again = LocalStages(
        config, train=lambda job: launch_training(job, lambda m, s: None, log=lines.append), log=lines.append
    )
    assert again.score_teacher(outputs["prepare_data"], outputs["finetune_teacher"]) == url
    assert any(line.startswith(f"score_teacher: reused {url}") for line in lines), lines
    assert not config.layout.teacher_cache.exists()
    assert isinstance(PipelineConfig.model_validate(config.model_dump()).scoring.location, str)

    # The stage's reuse key follows the location: a cache at another URL is not this one.
    inputs = StageArguments(prepared_dir=outputs["prepare_data"], teacher_dir=outputs["finetune_teacher"])
    here = stage_target("score_teacher", config, inputs)
    moved = config.model_copy(
        update={"scoring": config.scoring.model_copy(update={"location": f"file://{tmp_path}/elsewhere"})}
    )
    there = stage_target("score_teacher", moved, inputs)
    assert here.current and not there.current and here.fingerprint != there.fingerprint


def test_a_cache_at_a_url_is_read_a_step_ahead_and_hands_over_the_same_teacher(tmp_path):
    ids, labels = _write_cache(tmp_path / "local", "compact")
    url = f"file://{tmp_path}/remote"
    upload_cache(
        tmp_path / "local", read_manifest(tmp_path / "local", CacheManifest), url, log=lambda _: None
    )
    local, remote = CachedTeacher(tmp_path / "local", LossConfig()), CachedTeacher(url, LossConfig())
    assert not local.reads_ahead and remote.reads_ahead
    rows = [[4, 1], [6, 0, 2]]
    batches = [
        {
            "ids": [ids[r] for r in row],
            "labels": labels[row],
            "placements": [Placement(i, 0, 20) for i in range(len(row))],
        }
        for row in rows
    ]
    remote.prefetch(batches)
    assert len(remote._ahead) == 2
    for batch in reversed(batches):  # handed over by batch, whatever the order
        expected = local(batch, batch["labels"][:, 1:])
        got = remote(batch, batch["labels"][:, 1:])
        assert torch.equal(got.topk_logprobs, expected.topk_logprobs) and torch.equal(got.unc, expected.unc)
    assert remote._ahead == []
