"""The DeepSpeed training loop: ZeRO stages, batch-split invariance, launcher, resume, every objective."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atkd_core.data.prepare import prepare_data
from atkd_core.errors import ConfigError, UserError
from atkd_core.manifest import read_manifest
from atkd_core.models.build import load_model, materialize_model
from atkd_core.outputs import CacheManifest
from atkd_core.scoring import run_scoring_stage
from atkd_core.training.checkpoint import SHARED_WARMUPS, CheckpointError
from atkd_core.training.distributed import child_environment, free_port, process_group
from atkd_core.training.job import TrainJob, auto_split_line, distill_job
from atkd_core.training.loop import cleanup, setup
from atkd_core.training.main import run_training
from atkd_core.training.ops import extension_build_directory, needed_op_builders
from infra.launcher import launch_training, remove_shared_memory_buffers
from tests.conftest import REPO_ROOT, tiny_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prepared data, a teacher, its cache (K = V: the exact sparse teacher) and a student init."""
    root = tmp_path_factory.mktemp("training")
    config = tiny_config(root)
    prepare_data(config, root / "prepared", log=lambda _: None)
    tokenizer_dir = root / "prepared" / "tokenizer"
    teacher = Path(
        materialize_model(
            config.teacher.model_copy(update={"preset": "neox-small"}), tokenizer_dir, root / "teacher"
        )
    )
    student = Path(materialize_model(config.student, tokenizer_dir, root / "student"))
    vocab = json.loads((root / "prepared" / "manifest.json").read_text())["vocab_size"]
    run_scoring_stage(
        teacher,
        root / "prepared",
        root / "cache",
        top_k=vocab,
        temperature=1.0,
        # float32: the offline teacher must equal the online one to rounding (top-K = V).
        encoding="float",
        storage_dtype="float32",
        shard_size=64,
        batch_size=16,
        hard_fraction=0.5,
        log=lambda _: None,
    )
    return root, teacher, student


def make_job(
    inputs, tmp_path, *, stage="distill", training=None, loss=None, teacher_source="offline", name="run"
):
    root, teacher, student = inputs
    settings = {
        "zero_stage": 2,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_steps": 4,
        "optim": {"lr": 1e-3},
        "checkpoint_every": 2,
        "eval_every": 100,
        **(training or {}),
    }
    config = tiny_config(
        tmp_path / name,
        finetune={"training": settings},
        distill={"teacher_source": teacher_source, "training": settings},
        loss={"objective": "atkd", **(loss or {})},
    )
    return TrainJob(
        stage=stage,
        config=config,
        prepared_dir=root / "prepared",
        init_dir=teacher if stage == "finetune" else student,
        output_dir=tmp_path / name / "model",
        checkpoint_dir=tmp_path / name / "ckpt",
        cache_dir=root / "cache" if teacher_source == "offline" else None,
        teacher_dir=teacher if teacher_source == "online" else None,
    )


def losses(job):
    return [json.loads(line)["loss"] for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()]


def quiet(_message):
    return None


@pytest.mark.slow
def test_zero_stages_train_alike_in_process(inputs, tmp_path):
    runs = {}
    for zero in (1, 2, 3):
        job = make_job(inputs, tmp_path, stage="finetune", training={"zero_stage": zero}, name=f"zero{zero}")
        manifest = run_training(job, lambda m, s: None, quiet)
        assert manifest.steps == 4
        runs[zero] = losses(job)
    assert runs[1] == pytest.approx(runs[2], rel=1e-5) and runs[3] == pytest.approx(runs[2], rel=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "model")
    assert model.num_parameters() > 0 and (tmp_path / "zero3" / "model" / "README.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        {"objective": "kd"},
        {"objective": "atkd", "split_scope": "threshold", "unc_threshold": 0.9},
        {"objective": "sft"},
    ],
)
def test_gradient_is_the_same_however_the_batch_is_split(inputs, tmp_path, loss):
    whole = make_job(inputs, tmp_path, training={"micro_batch_size": 8}, loss=loss, name="whole")
    split = make_job(inputs, tmp_path, training={"micro_batch_size": 2}, loss=loss, name="split")
    run_training(whole, lambda m, s: None, quiet)
    run_training(split, lambda m, s: None, quiet)
    assert losses(split) == pytest.approx(losses(whole), rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "teacher_source"), [(2, "offline"), (3, "offline"), (3, "online")])
def test_two_processes_under_the_deepspeed_launcher_match_one(
    inputs, tmp_path, zero, teacher_source, monkeypatch
):
    """Online under ZeRO-3, both output layers are partitioned across the two processes and applied
    inside the loss (the student's by its module's hooks, the teacher's gathered for the loss)."""
    loss = {"objective": "atkd", "split_scope": "threshold", "unc_threshold": 0.9}
    one = make_job(
        inputs,
        tmp_path,
        training={"zero_stage": zero, "micro_batch_size": 4},
        loss=loss,
        teacher_source=teacher_source,
        name="one",
    )
    two = make_job(
        inputs,
        tmp_path,
        training={"zero_stage": zero, "micro_batch_size": 4, "num_processes": 2},
        loss=loss,
        teacher_source=teacher_source,
        name="two",
    )
    run_training(one, lambda m, s: None, quiet)
    seen = []
    ports = []

    def recorded_port() -> int:
        ports.append(free_port())
        return ports[-1]

    monkeypatch.setattr("infra.launcher.free_port", recorded_port)
    manifest = launch_training(two, lambda m, s: seen.append(s), quiet)
    assert manifest.world_size == 2 and seen == [1, 2, 3, 4]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-7)
    # DeepSpeed's CPU allreduce leaves a shared-memory buffer per rank; the launcher removes them.
    assert ports and not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{ports[0]}_*"))


def test_the_launcher_removes_only_its_own_ranks_shared_memory(tmp_path):
    uid = os.getuid()
    for name in (f"{uid}_127.0.0.1_4242_0", f"{uid}_127.0.0.1_4242_1", f"{uid}_127.0.0.1_4243_0"):
        (tmp_path / f"deepspeed_allreduce_buffer_{name}").write_bytes(b"x")
    assert remove_shared_memory_buffers(4242, tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4243_0"]


@pytest.mark.slow
def test_two_nodes_started_on_their_own_match_one_node_with_two_processes(inputs, tmp_path):
    """2 nodes x 1 process, each node launched separately as Kubernetes or Slurm would (its rank,
    the first node's address; no ssh), here both on the loopback: the same per-step losses as
    1 node x 2 processes."""
    import threading

    from infra.launcher import NodeRole, node_role_from_env

    loss = {"objective": "atkd", "split_scope": "threshold", "unc_threshold": 0.9}
    settings = {"micro_batch_size": 4}
    one_node = make_job(
        inputs, tmp_path, training={**settings, "num_processes": 2}, loss=loss, name="one-node"
    )
    two_nodes = make_job(inputs, tmp_path, training={**settings, "num_nodes": 2}, loss=loss, name="two-nodes")
    launch_training(one_node, lambda m, s: None, quiet)

    port = free_port()
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        try:
            results[rank] = launch_training(
                two_nodes, lambda m, s: None, quiet, node=NodeRole(rank, "127.0.0.1", port)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert results[0].world_size == 2 and results[1] is None
    assert losses(two_nodes) == pytest.approx(losses(one_node), rel=1e-5, abs=1e-7)
    # What each node reads from its environment, and the one line when something is missing.
    training = two_nodes.training
    assert node_role_from_env(training, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}) == NodeRole(
        1, "10.0.0.1", 29500
    )
    assert (
        node_role_from_env(
            training, {"JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "a", "MASTER_PORT": "7"}
        ).rank
        == 0
    )
    with pytest.raises(UserError, match="start the stage on each node with NODE_RANK"):
        node_role_from_env(training, {"MASTER_ADDR": "10.0.0.1"})
    with pytest.raises(UserError, match=r"node rank '2' must be an integer in \[0, 2\)"):
        node_role_from_env(training, {"SLURM_NODEID": "2", "MASTER_ADDR": "a"})


def test_a_failing_rank_fails_the_launch_with_its_error(inputs, tmp_path):
    from infra.launcher import LaunchError

    job = make_job(inputs, tmp_path, training={"num_processes": 2, "micro_batch_size": 4}, name="broken")
    job.prepared_dir = tmp_path / "missing"
    with pytest.raises(LaunchError, match="exited with"):
        launch_training(job, lambda m, s: None, quiet)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "teacher_source"),
    [
        ({"objective": "sft"}, "offline"),
        ({"objective": "kd", "divergence": "forward_kl"}, "offline"),
        ({"objective": "kd", "divergence": "reverse_kl"}, "offline"),
        ({"objective": "kd", "divergence": "generalized_jsd"}, "offline"),
        ({"objective": "kd", "divergence": "tvd"}, "offline"),
        ({"objective": "kd", "divergence": "skew_forward_kl"}, "offline"),
        ({"objective": "kd", "divergence": "skew_reverse_kl"}, "offline"),
        ({"objective": "kd", "divergence": "alpha_beta"}, "offline"),
        ({"objective": "adakd", "divergence": "reverse_kl"}, "offline"),
        ({"objective": "adakd", "divergence": "forward_kl", "ce_weight": 0.5}, "online"),
        ({"objective": "atkd", "setting": "forward"}, "offline"),
        ({"objective": "atkd", "setting": "reverse", "ce_weight": 0.5}, "offline"),
        ({"objective": "atkd", "setting": "forward"}, "online"),
        ({"objective": "kd", "divergence": "forward_kl"}, "online"),
    ],
)
def test_every_objective_lowers_its_loss(inputs, tmp_path, loss, teacher_source):
    job = make_job(
        inputs,
        tmp_path,
        training={"max_steps": 10, "optim": {"lr": 3e-3}},
        loss=loss,
        teacher_source=teacher_source,
    )
    manifest = run_training(job, lambda m, s: None, quiet)
    values = losses(job)
    assert len(values) == 10 and manifest.objective == loss["objective"]
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "zero"), [("student_generated", 2), ("on_policy", 2), ("student_generated", 3)]
)
def test_student_generated_data_trains(inputs, tmp_path, source, zero):
    job = make_job(
        inputs,
        tmp_path,
        training={"max_steps": 6, "zero_stage": zero, "micro_batch_size": 4},
        loss={"objective": "atkd", "setting": "reverse"},
        teacher_source="online",
        name=source,
    )
    job.config.distill.data_source = source
    job.config.distill.generation_max_new_tokens = 6
    job.config.distill.generation_temperature = 1.0
    manifest = run_training(job, lambda m, s: None, quiet)
    records = [json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert manifest.steps == 6 and all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in records)
    assert all(r["num_easy"] + r["num_hard"] > 0 for r in records)


def test_generated_data_needs_the_online_teacher():
    from atkd_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="teacher_source: 'offline' cannot serve data_source 'on_policy'"):
        load_config(None, ["distill.data_source=on_policy"])


def test_offline_and_online_teachers_give_the_same_atkd_losses(inputs, tmp_path):
    offline = make_job(inputs, tmp_path, name="offline")
    online = make_job(inputs, tmp_path, teacher_source="online", name="online")
    run_training(offline, lambda m, s: None, quiet)
    run_training(online, lambda m, s: None, quiet)
    assert losses(offline) == pytest.approx(losses(online), rel=1e-4)


def test_a_finished_stage_is_reused(inputs, tmp_path):
    job = make_job(inputs, tmp_path, name="reuse")
    first = run_training(job, lambda m, s: None, quiet)
    again = run_training(job, lambda m, s: None, quiet)
    # The very manifest the first run wrote, creation time included: nothing was trained again.
    assert again == first


def _train_command(job_path):
    return [sys.executable, "-m", "atkd_core.training.main", "--job", str(job_path)]


# A training process that kills itself (SIGKILL, no clean-up) right after its checkpoint at step
# argv[2]: the kill lands at a known point whatever the machine's speed.
KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from atkd_core.training import loop, main

save_checkpoint = loop.save_checkpoint


def save_then_die(job, state, step):
    save_checkpoint(job, state, step)
    if step >= int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)


loop.save_checkpoint = save_then_die
main.main(["--job", sys.argv[1]])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    # TAID with a large step, so that t runs ahead of its linear floor: a resume that lost t, the
    # previous loss or the momentum would train on another target from the kill on.
    [{}, {"objective": "taid", "taid": {"alpha": 0.5}}],
    ids=["atkd", "taid"],
)
def test_sigkill_and_rerun_matches_an_uninterrupted_run(inputs, tmp_path, loss):
    settings = {"max_steps": 24, "checkpoint_every": 3, "keep_checkpoints": 2}
    reference = make_job(inputs, tmp_path, training=settings, loss=loss, name="reference")
    run_training(reference, lambda m, s: None, quiet)

    job = make_job(inputs, tmp_path, training=settings, loss=loss, name="killed")
    job.checkpoint_dir.mkdir(parents=True)
    job_path = tmp_path / "killed.json"
    job.save(job_path)
    env = {**child_environment(), "DS_ACCELERATOR": "cpu"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, str(job_path), "9"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    metrics = job.checkpoint_dir / "metrics.jsonl"
    done = len(metrics.read_text().splitlines())
    assert 8 <= done < 24, "the run was not killed mid-way"
    assert (job.checkpoint_dir / "latest").is_file()

    subprocess.run(
        _train_command(job_path), cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300
    )
    assert losses(job) == pytest.approx(losses(reference), rel=1e-5, abs=1e-7)
    assert len(sorted(job.checkpoint_dir.glob("step-*"))) == 2
    if loss:
        t = [
            r["taid_t"] for r in map(json.loads, (job.output_dir / "metrics.jsonl").read_text().splitlines())
        ]
        linear = [0.4 + 0.6 * step / 24 for step in range(1, 25)]
        assert all(b >= a for a, b in zip(t, t[1:], strict=False)) and t[-1] == pytest.approx(1.0)
        assert any(value > floor + 0.05 for value, floor in zip(t, linear, strict=True)), t


def test_damaged_checkpoint_is_an_error_unless_resume_is_never(inputs, tmp_path):
    job = make_job(inputs, tmp_path, training={"max_steps": 2, "checkpoint_every": 1}, name="damaged")
    run_training(job, lambda m, s: None, quiet)
    (job.output_dir / "manifest.json").unlink()  # force a re-run, which resumes
    for state in (job.checkpoint_dir / "step-0000002").rglob("*.pt"):
        state.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        run_training(job, lambda m, s: None, quiet)
    job.config.distill.training.resume = "never"
    manifest = run_training(job, lambda m, s: None, quiet)
    assert manifest.steps == 2
    required = make_job(inputs, tmp_path, training={"resume": "require"}, name="required")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run_training(required, lambda m, s: None, quiet)


def test_wrong_process_count_is_refused(inputs, tmp_path):
    job = make_job(inputs, tmp_path, training={"num_processes": 2, "micro_batch_size": 4}, name="count")
    with pytest.raises(UserError, match=r"num_processes x num_nodes is 2 x 1 but 1 processes were started"):
        run_training(job, lambda m, s: None, quiet)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"zero_stage": 2, "offload_optimizer": True},
        {"zero_stage": 2, "optim": {"name": "adamw_deepspeed", "lr": 1e-3}},
        {"zero_stage": 3, "offload_optimizer": True, "optim": {"name": "adamw_deepspeed", "lr": 1e-3}},
    ],
)
def test_optimizer_choices_and_offload_match_torch_adamw(inputs, tmp_path, settings):
    """Also: a lock file that a killed build of an op left behind (as an OOM kill during the
    first compile does) is removed, where torch's loader would wait on it for ever."""
    reference = make_job(inputs, tmp_path, stage="finetune", name="reference")
    other = make_job(inputs, tmp_path, stage="finetune", training=settings, name="other")
    run_training(reference, lambda m, s: None, quiet)
    from deepspeed.accelerator import get_accelerator

    left_behind = []
    for builder in needed_op_builders(other.training, "cpu"):
        lock = extension_build_directory(get_accelerator().create_op_builder(builder).name) / "lock"
        lock.touch()
        os.utime(lock, (0, 0))
        left_behind.append(lock)
    messages = []
    # DeepSpeed's CPU-Adam and FusedAdam are compiled on first use (about 85 s on these machines, once).
    run_training(other, lambda m, s: None, messages.append)
    assert losses(other) == pytest.approx(losses(reference), rel=1e-4)
    assert not any(lock.exists() for lock in left_behind)
    assert sum("an earlier build of this op was stopped" in m for m in messages) == len(left_behind)


def test_sft_warmup_trains_cross_entropy_first_then_distils(inputs, tmp_path):
    """With distill.sft_warmup_epochs, the first steps are SFT's steps exactly (same batches,
    same updates), the distillation loss then takes over, and the budget grows by the warm-up."""
    runs = {}
    for objective in ("sft", "atkd"):
        # Each trains its own warm-up here (the shared one is the next test's).
        shutil.rmtree(inputs[0] / SHARED_WARMUPS, ignore_errors=True)
        job = make_job(inputs, tmp_path, loss={"objective": objective}, name=objective)
        job.config.distill.sft_warmup_epochs = 1.0  # 64 examples / batch 8: 8 warm-up steps
        run_training(job, lambda m, s: None, quiet)
        runs[objective] = [
            json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()
        ]
    sft, atkd = runs["sft"], runs["atkd"]
    assert len(sft) == len(atkd) == 8 + 4
    assert [r["loss"] for r in atkd[:8]] == pytest.approx([r["loss"] for r in sft[:8]], rel=1e-6)
    assert all(r["loss"] == pytest.approx(r["ce"]) and "tkd_hard" not in r for r in atkd[:8])
    assert all("tkd_hard" in r and r["loss"] != pytest.approx(r["ce"]) for r in atkd[8:])


def _without_timings(job):
    records = [json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in records]


@pytest.mark.slow
def test_a_shared_sft_warmup_is_trained_once_and_changes_nothing(inputs, tmp_path):
    """The first distillation keeps the end of its SFT warm-up; the next, with another objective,
    starts from it and ends bit for bit where it ends training its warm-up itself: same losses, same
    weights, its objective's own state (TAID's t) fresh, and every step's metrics logged."""
    shutil.rmtree(inputs[0] / SHARED_WARMUPS, ignore_errors=True)
    taid = {"objective": "taid", "taid": {"alpha": 0.5}}

    def warm_started(loss, name, training=None):
        job = make_job(inputs, tmp_path, loss=loss, training=training, name=name)
        job.config.distill.sft_warmup_epochs = 1.0  # 8 warm-up steps, then 4 of the objective
        return job

    said: dict[str, list[str]] = {"first": [], "second": [], "alone": [], "other_lr": []}
    first = warm_started({"objective": "kd"}, "first")
    run_training(first, lambda m, s: None, said["first"].append)
    second = warm_started(taid, "second")
    logged_steps: list[int] = []
    run_training(second, lambda m, s: logged_steps.append(s), said["second"].append)
    shutil.rmtree(inputs[0] / SHARED_WARMUPS)
    alone = warm_started(taid, "alone")
    run_training(alone, lambda m, s: None, said["alone"].append)
    # Another learning rate is another warm-up: trained, not taken from the one kept.
    other_lr = warm_started(taid, "other_lr", training={"optim": {"lr": 2e-3}})
    run_training(other_lr, lambda m, s: None, said["other_lr"].append)

    kept = [sum("SFT warm-up's end (step 8) kept in" in m for m in said[run]) for run in said]
    reused = [sum("SFT warm-up (steps 1-8) reused from" in m for m in said[run]) for run in said]
    assert kept == [1, 0, 1, 1] and reused == [0, 1, 0, 0]
    assert _without_timings(second) == _without_timings(alone)
    assert _without_timings(second)[:8] == _without_timings(first)[:8]
    assert logged_steps == list(range(1, 13))
    trained, reference = load_model(second.output_dir).state_dict(), load_model(alone.output_dir).state_dict()
    assert all(torch.equal(trained[name], reference[name]) for name in reference)


@pytest.mark.slow
def test_a_shared_sft_warmup_is_kept_and_reused_by_two_processes(inputs, tmp_path):
    """Under the launcher every rank saves its part of the warm-up and loads it back."""
    shutil.rmtree(inputs[0] / SHARED_WARMUPS, ignore_errors=True)
    settings = {"micro_batch_size": 4, "num_processes": 2}
    jobs = {}
    for name, loss, training in [
        ("first", {"objective": "kd"}, settings),
        ("second", {"objective": "taid"}, settings),
        ("alone", {"objective": "taid"}, {"micro_batch_size": 4}),
    ]:
        jobs[name] = make_job(inputs, tmp_path, loss=loss, training=training, name=name)
        jobs[name].config.distill.sft_warmup_epochs = 1.0
    said: list[str] = []
    launch_training(jobs["first"], lambda m, s: None, said.append)
    assert sum("SFT warm-up's end (step 8) kept in" in m for m in said) == 1
    said.clear()
    seen: list[int] = []
    launch_training(jobs["second"], lambda m, s: seen.append(s), said.append)
    assert sum("SFT warm-up (steps 1-8) reused from" in m for m in said) == 1 and seen == list(range(1, 13))
    run_training(jobs["alone"], lambda m, s: None, quiet)
    assert losses(jobs["second"]) == pytest.approx(losses(jobs["alone"]), rel=1e-5, abs=1e-7)


def test_sft_warmup_refuses_generated_responses():
    with pytest.raises(ValueError, match="sft_warmup_epochs: 1.0 needs fixed responses"):
        tiny_config(
            Path("unused"),
            distill={
                "sft_warmup_epochs": 1.0,
                "data_source": "student_generated",
                "teacher_source": "online",
            },
        )


def test_checkpoints_of_other_settings_are_not_resumed(inputs, tmp_path):
    """Same directories, a different lam: the old run's finished checkpoint must not be continued
    (it would hand back the other run's model); auto starts clean, require refuses."""
    first = make_job(inputs, tmp_path, loss={"lam": 0.2}, name="shared")
    run_training(first, lambda m, s: None, quiet)
    first_losses = losses(first)
    messages = []
    changed = make_job(inputs, tmp_path, loss={"lam": 0.9}, name="shared")
    run_training(changed, lambda m, s: None, messages.append)
    assert any("from other settings or inputs; starting clean" in m for m in messages)
    fresh = make_job(inputs, tmp_path, loss={"lam": 0.9}, name="fresh")
    run_training(fresh, lambda m, s: None, quiet)
    assert losses(changed) == pytest.approx(losses(fresh), rel=1e-6)
    assert losses(changed) != pytest.approx(first_losses, rel=1e-3)

    again = make_job(inputs, tmp_path, loss={"lam": 0.5}, training={"resume": "require"}, name="shared")
    with pytest.raises(CheckpointError, match="made with other settings or inputs than this run's"):
        run_training(again, lambda m, s: None, quiet)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "teacher_source", "zero"),
    [
        ({"objective": "atkd"}, "offline", 2),
        ({"objective": "atkd", "setting": "reverse", "ce_weight": 0.5}, "online", 2),
        ({"objective": "kd", "divergence": "generalized_jsd"}, "offline", 3),
        ({"objective": "atkd", "split_scope": "threshold", "unc_threshold": 0.9}, "online", 3),
    ],
)
def test_fused_and_unfused_output_layers_train_alike(inputs, tmp_path, loss, teacher_source, zero):
    """The output layer inside the loss (the default) or plain logits: the same per-step losses,
    under ZeRO-2 and ZeRO-3 (where the layer's weight is partitioned), offline and online."""
    runs = {}
    for fused in (True, False):
        job = make_job(
            inputs,
            tmp_path,
            training={"zero_stage": zero, "micro_batch_size": 4},
            loss={**loss, "fused_linear": fused, "chunk_size": 16},
            teacher_source=teacher_source,
            name=f"fused-{fused}",
        )
        run_training(job, lambda m, s: None, quiet)
        runs[fused] = losses(job)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-7)


def test_a_model_that_transforms_its_logits_is_refused_for_fused_losses():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from atkd_core.training.heads import OutputLayer

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(
        UserError, match=r"GPTNeoXForCausalLM transforms its logits .*final_logit_softcapping"
    ):
        OutputLayer(model, 100)


def test_bypassing_the_output_layer_restores_a_forward_a_wrapper_had_set():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from atkd_core.training.heads import OutputLayer

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    layer = OutputLayer(model, 50)
    wrapped = layer.module.forward  # as a wrapper (e.g. accelerate's hooks) sets on the instance
    layer.module.forward = wrapped
    with layer.bypassed():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 32  # hidden states, not logits
    assert layer.module.__dict__["forward"] is wrapped
    del layer.module.forward
    with layer.bypassed():
        pass
    assert "forward" not in layer.module.__dict__


def test_a_checkpoint_is_tied_to_its_caches_contents_not_its_path(tmp_path):
    """An old checkpoint must not resume against a new cache written to the same directory."""
    cache = tmp_path / "teacher_cache"
    cache.mkdir()

    def job_fingerprint(content: str) -> str:
        (cache / "manifest.json").write_text(
            json.dumps(
                {
                    "stage": "score_teacher",
                    "input_fingerprint": "f",
                    "content_sha256": content,
                    "created_unix": 0,
                }
            )
        )
        return TrainJob(
            stage="distill",
            config=tiny_config(tmp_path),
            prepared_dir=tmp_path / "prepared",
            init_dir=tmp_path / "init",
            output_dir=tmp_path / "out",
            checkpoint_dir=tmp_path / "ckpt",
            cache_dir=cache,
            teacher_dir=tmp_path / "teacher",
        ).fingerprint()

    assert job_fingerprint("old") != job_fingerprint("new") == job_fingerprint("new")


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["auto", "epsilon"])
def test_the_derived_split_is_the_caches_threshold_whatever_the_batching(inputs, tmp_path, rule):
    """hard_fraction auto / epsilon: distill_job fixes the split at the cache's Otsu threshold or at
    unc_epsilon, so splitting the batch into micro-batches changes nothing (a per-batch k would)."""
    root, teacher, student = inputs
    manifest = read_manifest(root / "cache", CacheManifest)
    runs = {}
    for micro in (8, 2):
        config = make_job(
            inputs,
            tmp_path,
            training={"micro_batch_size": micro},
            # The untrained test teacher is unsure everywhere: its median UNC splits its tokens.
            loss={"hard_fraction": rule, "unc_epsilon": manifest.unc_quantiles["0.5"]},
            name=f"m{micro}",
        ).config
        job = distill_job(config, root / "prepared", student, root / "cache", teacher)
        assert job.config.loss.split_scope == "threshold"
        if rule == "auto":
            assert job.config.loss.unc_threshold == manifest.unc_auto_threshold
            assert job.config.loss.hard_fraction == manifest.unc_auto_hard_fraction
        else:
            assert job.config.loss.unc_threshold == manifest.unc_quantiles["0.5"]
            assert job.config.loss.hard_fraction == pytest.approx(0.5, abs=0.05)
        assert f"loss.hard_fraction {rule}: hard if teacher UNC >= " in (auto_split_line(config, job) or "")
        run_training(job, lambda m, s: None, quiet)
        runs[micro] = losses(job)
    assert runs[2] == pytest.approx(runs[8], rel=1e-5, abs=1e-7)


def test_an_epsilon_below_every_tokens_unc_makes_all_hard_and_says_so(inputs, tmp_path):
    root, teacher, student = inputs
    config = make_job(inputs, tmp_path, loss={"hard_fraction": "epsilon", "unc_epsilon": 1e-4}).config
    job = distill_job(config, root / "prepared", student, root / "cache", teacher)
    assert job.config.loss.hard_fraction == 1.0
    assert "the easy group is empty" in (auto_split_line(config, job) or "")
    # The resolved job travels to launched ranks as JSON and is validated again there.
    job.save(tmp_path / "job.json")
    assert TrainJob.load(tmp_path / "job.json").config.loss == job.config.loss


def _with_student_attention(job: TrainJob, kernel: str) -> TrainJob:
    student = job.config.student.model_copy(update={"attn_implementation": kernel})
    return dataclasses.replace(job, config=job.config.model_copy(update={"student": student}))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "atkd"])
def test_activation_checkpointing_and_the_attention_kernel_train_alike(inputs, tmp_path, objective):
    """gradient_checkpointing and attn_implementation change how a step is computed, not its
    losses; each is checked to have taken effect on the model that trained."""
    loss = {"objective": objective}
    jobs = {
        "reference": make_job(inputs, tmp_path, loss=loss, name="reference"),
        "checkpointed": make_job(
            inputs, tmp_path, loss=loss, training={"gradient_checkpointing": True}, name="checkpointed"
        ),
        "eager": _with_student_attention(make_job(inputs, tmp_path, loss=loss, name="eager"), "eager"),
        "sdpa": _with_student_attention(make_job(inputs, tmp_path, loss=loss, name="sdpa"), "sdpa"),
    }
    seen = {}
    for name, job in jobs.items():
        with process_group("cpu") as (rank, world_size):
            state = setup(job, rank, world_size, "cpu", quiet)
            model = state.engine.module
            seen[name] = (model.is_activation_checkpointing, model.config._attn_implementation)
            cleanup(state)
        run_training(job, lambda m, s: None, quiet)
    assert seen["checkpointed"][0] and not seen["reference"][0]
    assert seen["eager"][1] == "eager" and seen["sdpa"][1] == "sdpa"
    for name in ("checkpointed", "eager", "sdpa"):
        assert losses(jobs[name]) == pytest.approx(losses(jobs["reference"]), rel=1e-5, abs=1e-7), name


def test_an_attention_kernel_the_machine_cannot_run_is_one_line(inputs):
    _, _, student = inputs
    with pytest.raises(ConfigError, match="attn_implementation: 'flash_attention_2' cannot run"):
        load_model(student, attn_implementation="flash_attention_2")


@pytest.mark.slow
def test_compiled_loss_chunks_train_alike(inputs, tmp_path):
    """loss.compile on (inductor's CPU backend here) trains with the eager per-step losses."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in ("on", "off"):
        job = make_job(
            inputs, tmp_path, loss={"compile": compiled, "chunk_size": 16}, name=f"compile-{compiled}"
        )
        torch._dynamo.reset()
        counters.clear()
        run_training(job, lambda m, s: None, quiet)
        runs[compiled] = losses(job)
        assert (counters["stats"]["unique_graphs"] > 0) == (compiled == "on")
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-5, abs=1e-7)
