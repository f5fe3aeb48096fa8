"""Checkpoints (save, resume only this job's) and the trained model in Hugging Face format.

A checkpoint directory holds DeepSpeed's ``step-NNNNNNN`` tags, ``latest``, the fingerprint of the
job that made them (``job_fingerprint``) and ``metrics.jsonl``. The end of a distillation's SFT
warm-up is also kept once beside the training data, for every distillation that passes through the
same warm-up (``shared_warmup_dir``). See docs/architecture.md, "Checkpoints and outputs".
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atkd_core.errors import UserError, faults_named
from atkd_core.training.distributed import all_reduce_sum, barrier
from atkd_core.training.job import TrainJob, TrainState

# Beside the checkpoints: the fingerprint of the job that made them (TrainJob.fingerprint).
CHECKPOINT_FINGERPRINT = "job_fingerprint"
METRICS_FILE = "metrics.jsonl"
# Beside the prepared training data: the ends of SFT warm-ups, one directory per warm-up fingerprint.
SHARED_WARMUPS = "sft-warmups"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed (and the config says not to start clean)."""


def _tag(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(job: TrainJob, state: TrainState, step: int) -> None:
    """A DeepSpeed checkpoint (model, optimizer, scheduler, step, RNG, the objective's state) on every
    rank; keep the newest M."""
    client_state = {
        **_position(step),
        # What an adaptive objective learnt along the way (TAID's t, AdaKD's share).
        "objective_state": state.objective.state_dict(),
    }
    state.engine.save_checkpoint(str(job.checkpoint_dir), tag=_tag(step), client_state=client_state)
    if state.rank == 0:
        tags = sorted(p for p in job.checkpoint_dir.glob("step-*") if p.is_dir())
        for old in tags[: -job.training.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def resume(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> int:
    """The step to start from: 0, or the newest checkpoint's step (per ``training.resume``).

    Only checkpoints made by this job (same settings and inputs, recorded beside them) are resumed:
    a checkpoint of other settings in the same directory would otherwise be continued as if it were
    this run's, silently giving the other run's model.
    """
    mode = job.training.resume
    latest = job.checkpoint_dir / "latest"
    recorded = job.checkpoint_dir / CHECKPOINT_FINGERPRINT
    foreign = latest.is_file() and (
        not recorded.is_file() or recorded.read_text().strip() != job.fingerprint()
    )
    barrier()  # every rank has decided before rank 0 may clear the directory
    if foreign:
        if mode == "require":
            raise CheckpointError(
                f"training.resume is 'require' but the checkpoints in {job.checkpoint_dir} were made with "
                "other settings or inputs than this run's; delete them or set training.resume: auto"
            )
        if mode == "auto":
            log(
                f"{job.stage}: checkpoints in {job.checkpoint_dir} are from other settings or inputs; starting clean"
            )
    if mode == "never" or not latest.is_file() or foreign:
        if mode == "require" and not latest.is_file():
            raise CheckpointError(
                f"training.resume is 'require' but {job.checkpoint_dir} holds no checkpoint"
            )
        if (mode == "never" or foreign) and job.checkpoint_dir.exists() and state.rank == 0:
            shutil.rmtree(job.checkpoint_dir)
        job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if state.rank == 0:
            (job.checkpoint_dir / METRICS_FILE).unlink(missing_ok=True)
            recorded.write_text(job.fingerprint() + "\n")
        barrier()  # the directory is clean before any rank writes into it
        return _reuse_shared_warmup(job, state, log) if state.warmup_steps > 0 else 0
    tag, client_state = _load_latest(
        state, job.checkpoint_dir, "checkpoint", "delete it, or set training.resume: never to start clean"
    )
    state.objective.load_state_dict(client_state.get("objective_state", {}))
    step = int(client_state["step"])
    if state.rank == 0:
        state.history = truncate_metrics(job.checkpoint_dir / METRICS_FILE, step)
    log(f"{job.stage}: resumed from {tag} (step {step} of {state.total_steps})")
    return step


def _position(step: int) -> dict[str, Any]:
    """What a checkpoint's client state needs to continue at ``step``: the step and the RNG states."""
    return {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def _load_latest(state: TrainState, directory: Path, what: str, remedy: str) -> tuple[str, dict[str, Any]]:
    """Load ``directory``'s newest tag into the engine and restore the RNG states; return the tag
    and the client state. ``what`` names the checkpoint in errors, ``remedy`` says what to do."""
    tag = (directory / "latest").read_text().strip()
    try:
        path, client_state = state.engine.load_checkpoint(str(directory), tag=tag)
    except Exception as exc:  # DeepSpeed raises many kinds for a damaged checkpoint
        raise CheckpointError(
            f"{what} {directory / tag} cannot be loaded ({type(exc).__name__}: {exc}); {remedy}"
        ) from None
    if path is None or client_state is None:
        raise CheckpointError(f"{what} {directory / tag} is incomplete; {remedy}")
    torch.set_rng_state(client_state["torch_rng"])
    random.setstate(client_state["python_rng"])
    return tag, client_state


def shared_warmup_dir(job: TrainJob) -> Path:
    """Where the end of ``job``'s SFT warm-up is kept for every distillation with the same warm-up
    fingerprint (``TrainJob.warmup_fingerprint``): beside its training data, so that the cells of a
    comparison and later runs on the same data find it."""
    return job.prepared_dir.parent / SHARED_WARMUPS / job.warmup_fingerprint()


def keep_shared_warmup(job: TrainJob, state: TrainState, step: int, log: Callable[[str], None]) -> None:
    """At the end of the SFT warm-up (``step``), keep a checkpoint of it for the distillations that
    share it, unless one is kept already. Every rank calls it: DeepSpeed's save is collective.

    Written into a sibling named after this job and renamed in one step, so a reader never sees half
    of one; when two runs race, the first rename wins and the other drops its copy.
    """
    target = shared_warmup_dir(job)
    # One decision for every rank, or a rank that saw another run's copy appear would skip the save.
    if all_reduce_sum(float(target.is_dir()), state.world_size, state.device) > 0:
        return
    partial = target.with_name(f".{target.name}.{job.fingerprint()[:12]}.partial")
    if state.rank == 0 and partial.exists():
        shutil.rmtree(partial)
    barrier()
    state.engine.save_checkpoint(str(partial), tag=_tag(step), client_state=_position(step))
    barrier()
    if state.rank == 0:
        (partial / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in state.history[:step]))
        try:
            partial.rename(target)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
        log(
            f"{job.stage}: the SFT warm-up's end (step {step}) kept in {target} for distillations that share it"
        )
    barrier()


def _reuse_shared_warmup(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> int:
    """The step to start a fresh run from: the end of its SFT warm-up when another distillation kept
    it (``keep_shared_warmup``), else 0. The objective's own state stays fresh: the warm-up trained
    cross-entropy, which never moved it."""
    source = shared_warmup_dir(job)
    if not (source / "latest").is_file():
        return 0
    remedy = "delete that directory and the run trains its warm-up again"
    _, client_state = _load_latest(state, source, "the shared SFT warm-up", remedy)
    if int(client_state["step"]) != state.warmup_steps:
        raise CheckpointError(
            f"the shared SFT warm-up {source} ends at step {client_state['step']}, not at this run's "
            f"{state.warmup_steps}; {remedy}"
        )
    if state.rank == 0:
        records = (source / METRICS_FILE).read_text()
        (job.checkpoint_dir / METRICS_FILE).write_text(records)
        state.history = [json.loads(line) for line in records.splitlines() if line]
        log(
            f"{job.stage}: SFT warm-up (steps 1-{state.warmup_steps}) reused from {source}, where another "
            "distillation of the same student, data and training settings kept it"
        )
    state.warmup_reused = True
    return state.warmup_steps


def truncate_metrics(path: Path, step: int) -> list[dict[str, float]]:
    """Keep the metric records up to ``step`` (later ones are redone); return them."""
    if not path.is_file():
        return []
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def save_model(job: TrainJob, state: TrainState, card: str, directory: Path | None) -> None:
    """The trained model in Hugging Face format (safetensors, tokenizer, generation config, card)
    into ``directory`` on rank 0 (None on the other ranks). Every rank calls it: under ZeRO-3 the
    partitioned weights are gathered, which takes them all."""
    engine = state.engine
    if job.training.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if directory is not None:
                _write_model(engine.module, state, directory, card)
    elif directory is not None:
        _write_model(engine.module, state, directory, card)


def _write_model(module: torch.nn.Module, state: TrainState, staging: Path, card: str) -> None:
    from transformers import GenerationConfig

    with faults_named(staging):
        module.save_pretrained(staging, safe_serialization=True)  # type: ignore[operator]
    state.tokenizer.save_pretrained(staging)
    GenerationConfig(
        eos_token_id=state.tokenizer.eos_token_id,
        pad_token_id=state.tokenizer.pad_token_id,
        bos_token_id=state.tokenizer.bos_token_id,
        do_sample=False,
    ).save_pretrained(staging)
    (staging / "README.md").write_text(card)
