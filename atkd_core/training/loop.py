"""One training loop for every objective, under DeepSpeed ZeRO: setup, train, save_checkpoint, cleanup.

Objectives: ``sft`` (cross-entropy: teacher fine-tuning, the no-KD baseline), ``kd`` (any divergence
of atkd_core.losses) and ``atkd`` (forward or reverse setting), optionally plus ``ce_weight`` x CE.
The teacher comes from the scoring cache (offline, no teacher in memory) or runs in the loop
(online, no grad). Data are the prepared ground-truth responses (Supervised KD).

Normalisation: losses are sums over tokens divided by the global count of valid tokens of the
optimizer step (known on every rank from the data alone), pre-multiplied by the number of
micro-batches so that DeepSpeed's 1/GAS scaling and data-parallel averaging give back exactly
``sum / count``: the gradient does not depend on micro-batch size, accumulation or world size.
ATKD's split is taken per micro-batch as in the paper (``split_scope`` batch / sequence), or by a
fixed UNC threshold with step-wide group counts (``threshold``), which is invariant too.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from atkd_core.config import PipelineConfig, TrainingConfig
from atkd_core.data.batching import IGNORE_INDEX, collate, next_token_logits, shift_targets
from atkd_core.errors import UserError
from atkd_core.losses import atkd_loss, divergence_loss
from atkd_core.manifest import fingerprint, read_manifest
from atkd_core.progress import Progress
from atkd_core.training.ds_config import render_ds_config, resolve_device, resolve_precision

MetricsFn = Callable[[dict[str, float], int], None]


# Beside the checkpoints: the fingerprint of the job that made them (TrainJob.fingerprint).
CHECKPOINT_FINGERPRINT = "job_fingerprint"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed (and the config says not to start clean)."""


@dataclass
class TrainJob:
    """What one training stage reads and writes.

    stage: ``finetune`` (teacher SFT) or ``distill`` (student). init_dir: the model to start from.
    cache_dir: the teacher cache (offline distillation). teacher_dir: the teacher (online).
    output_dir: the final Hugging Face model; checkpoint_dir: DeepSpeed checkpoints (resume).
    """

    stage: Literal["finetune", "distill"]
    config: PipelineConfig
    prepared_dir: Path
    init_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    cache_dir: Path | None = None
    teacher_dir: Path | None = None

    @property
    def training(self) -> TrainingConfig:
        """The stage's training settings."""
        return self.config.finetune.training if self.stage == "finetune" else self.config.distill.training

    @property
    def objective(self) -> str:
        """sft for fine-tuning, else the configured loss objective."""
        return "sft" if self.stage == "finetune" else self.config.loss.objective

    def fingerprint(self) -> str:
        """What the trained model depends on: its settings and its inputs' manifests."""
        sections = ["finetune"] if self.stage == "finetune" else ["loss", "distill"]
        inputs = [self.prepared_dir, self.init_dir, self.cache_dir, self.teacher_dir]
        return fingerprint(
            {
                "stage": self.stage,
                "config": self.config.section_hash(*sections),
                "inputs": [
                    None if p is None else (read_manifest(p) or {}).get("content_sha256", str(p))
                    for p in inputs
                ],
            }
        )


@dataclass
class TrainState:
    """Everything the loop needs between stages."""

    engine: Any
    tokenizer: Any
    train: Any
    validation: Any
    rank: int
    world_size: int
    device: str
    total_steps: int
    steps_per_epoch: int
    # Leading steps trained on cross-entropy alone (distill.sft_warmup_epochs), inside total_steps.
    warmup_steps: int
    label_counts: list[int]
    hard_counts: list[int] | None
    cache: Any = None
    teacher: Any = None
    start_step: int = 0
    generates: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def _rows(split: Any) -> list[dict[str, Any]]:
    """A datasets split as a list of {id, input_ids, labels} dicts."""
    columns = split.select_columns(["id", "input_ids", "labels"]).to_dict()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _init_distributed(device: str) -> tuple[int, int]:
    """Join (or, for one process, create) the process group; return (rank, world_size)."""
    import deepspeed

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _schedule(training: TrainingConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine / linear decay to 0, or constant."""
    warmup = round(training.optim.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if training.optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if training.optim.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return multiplier


def setup(job: TrainJob, log: Callable[[str], None]) -> TrainState:
    """Seed, join the process group, load data, model, teacher; wrap in a DeepSpeed engine; resume."""
    training = job.training
    device = resolve_device(training)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from datasets import load_from_disk

    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.models.build import load_model

    rank, world_size = _init_distributed(device)
    if world_size != training.num_processes:
        raise UserError(
            f"training.num_processes is {training.num_processes} but {world_size} processes were started"
        )
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    dataset = load_from_disk(str(job.prepared_dir / "dataset"))
    train, validation = dataset["train"], dataset["validation"]
    if len(train) < training.batch_size:
        raise UserError(
            f"the training split has {len(train)} examples, fewer than training.batch_size {training.batch_size}"
        )
    tokenizer = load_tokenizer(job.prepared_dir / "tokenizer")
    model = load_model(job.init_dir)
    steps_per_epoch = len(train) // training.batch_size
    warmup_steps = (
        round(job.config.distill.sft_warmup_epochs * steps_per_epoch) if job.stage == "distill" else 0
    )
    total_steps = warmup_steps + (training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch)))
    schedule = _schedule(training, total_steps)
    optimizer = None
    if training.optim.name == "adamw_torch":
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=training.optim.lr,
            betas=training.optim.betas,
            weight_decay=training.optim.weight_decay,
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        # A callable: DeepSpeed hands it whichever optimizer it ends up with.
        lr_scheduler=lambda built: torch.optim.lr_scheduler.LambdaLR(built, schedule),
        config=render_ds_config(training, device),
    )
    # Rows as plain lists once: Arrow row access per micro-batch costs more than a small student's step.
    train, validation = _rows(train), _rows(validation)
    label_counts = [sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX) for row in train]
    state = TrainState(
        engine=engine,
        tokenizer=tokenizer,
        train=train,
        validation=validation,
        rank=rank,
        world_size=world_size,
        device=str(engine.device),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        label_counts=label_counts,
        hard_counts=None,
    )
    state.generates = job.stage == "distill" and job.config.distill.data_source in (
        "student_generated",
        "on_policy",
    )
    _attach_teacher(job, state, log)
    state.start_step = _resume(job, state, log)
    return state


def _attach_teacher(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> None:
    if job.objective == "sft":
        return
    loss = job.config.loss
    if job.config.distill.teacher_source == "offline":
        from atkd_core.scoring import TeacherCache

        if job.cache_dir is None:
            raise UserError("offline distillation needs the teacher cache (run score_teacher first)")
        state.cache = TeacherCache(job.cache_dir)
        if not math.isclose(state.cache.spec["temperature"], loss.temperature):
            raise UserError(
                f"the teacher cache was scored at temperature {state.cache.spec['temperature']}, "
                f"but loss.temperature is {loss.temperature}; re-run score_teacher"
            )
        if job.objective == "atkd" and loss.split_scope == "threshold":
            state.hard_counts = [
                int((state.cache.field(example_id, "unc") >= loss.unc_threshold).sum())
                for example_id in (row["id"] for row in state.train)
            ]
        log(f"{job.stage}: offline teacher from {job.cache_dir} ({state.cache.manifest['tokens']} tokens)")
        return
    from atkd_core.models.build import load_model

    if job.teacher_dir is None:
        raise UserError("online distillation needs the teacher model directory")
    teacher = load_model(job.teacher_dir).eval().requires_grad_(False)
    if job.training.zero_stage == 3:
        import deepspeed

        # Partitioned like the student, forward on every rank.
        inference = {
            "train_micro_batch_size_per_gpu": job.training.micro_batch_size,
            "zero_optimization": {"stage": 3},
        }
        if resolve_precision(job.training, state.device.split(":")[0]) == "bf16":
            inference["bf16"] = {"enabled": True}
        teacher = deepspeed.initialize(model=teacher, config=inference)[0]
    else:
        teacher = teacher.to(state.device)
    state.teacher = teacher
    log(f"{job.stage}: online teacher {job.teacher_dir}")


def _step_indices(state: TrainState, training: TrainingConfig, step: int) -> list[int]:
    """The global batch of ``step``: a seeded permutation per epoch, so resuming needs only the step."""
    batch_size, seed = training.batch_size, training.seed
    epoch, position = divmod(step, state.steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(state.train), generator=generator).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def _micro_batches(state: TrainState, job: TrainJob, indices: list[int]) -> list[list[int]]:
    """This rank's share of the global batch, cut into micro-batches."""
    per_rank = len(indices) // state.world_size
    mine = indices[state.rank * per_rank : (state.rank + 1) * per_rank]
    size = job.training.micro_batch_size
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def _ground_truth_batch(state: TrainState, rows: list[int]) -> dict[str, Any]:
    """The prepared examples ``rows`` as a padded batch on the engine's device, with their ids."""
    examples = [state.train[i] for i in rows]
    batch = {k: v.to(state.engine.device) for k, v in collate(examples, state.tokenizer.pad_token_id).items()}
    return {**batch, "ids": [e["id"] for e in examples]}


@torch.no_grad()
def _student_generated_batch(job: TrainJob, state: TrainState, rows: list[int]) -> dict[str, Any]:
    """The same prompts answered by the student itself (ImitKD / GKD): prompt + sampled response.

    Labels cover the generated tokens (up to and including EOS when it comes); the teacher then
    grades the student's own tokens, online.
    """
    tokenizer, distill = state.tokenizer, job.config.distill
    prompts = []
    for i in rows:
        labels = state.train[i]["labels"]
        start = next((j for j, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        prompts.append(state.train[i]["input_ids"][:start])
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding: generation continues every row at the end
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    module = state.engine.module
    module.eval()
    sampling = (
        {"do_sample": True, "temperature": distill.generation_temperature}
        if distill.generation_temperature > 0
        else {"do_sample": False}
    )
    output = module.generate(
        input_ids=input_ids.to(state.engine.device),
        attention_mask=attention_mask.to(state.engine.device),
        max_new_tokens=distill.generation_max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    module.train()
    examples = []
    for row, prompt in enumerate(prompts):
        generated = output[row, width:].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        else:
            generated = [t for t in generated if t != tokenizer.pad_token_id]
        examples.append({"input_ids": prompt + generated, "labels": [IGNORE_INDEX] * len(prompt) + generated})
    batch = {k: v.to(state.engine.device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    return {**batch, "ids": [state.train[i]["id"] for i in rows]}


def _step_batches(job: TrainJob, state: TrainState, step: int, indices: list[int]) -> list[dict[str, Any]]:
    """This rank's micro-batches of ``step``: ground truth, or (some) answered by the student.

    GKD's choice of on-policy micro-batches is seeded by (seed, step, rank, micro-batch), so a
    resumed run makes the same choices.
    """
    source = job.config.distill.data_source if job.stage == "distill" else "ground_truth"
    batches = []
    for micro, rows in enumerate(_micro_batches(state, job, indices)):
        chooser = random.Random(f"{job.training.seed}:{step}:{state.rank}:{micro}")
        on_policy = source == "student_generated" or (
            source == "on_policy" and chooser.random() < job.config.distill.on_policy_ratio
        )
        batches.append(
            _student_generated_batch(job, state, rows) if on_policy else _ground_truth_batch(state, rows)
        )
    return batches


def _micro_loss(
    job: TrainJob,
    state: TrainState,
    batch: dict[str, Any],
    denominators: dict[str, float],
    cross_entropy_only: bool = False,
) -> tuple[Tensor, float, dict[str, float]]:
    """(loss, its cross-entropy part, diagnostics) of one micro-batch, scaled for the step-wide
    normalisation; the cross-entropy alone for sft and during the SFT warm-up of a distillation."""
    outputs = state.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    vocab = len(state.tokenizer)
    logits = next_token_logits(outputs.logits, vocab)
    targets = shift_targets(batch["labels"])
    loss_config = job.config.loss
    ce = F.cross_entropy(
        logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    ce = ce / denominators["tokens"]
    if job.objective == "sft" or cross_entropy_only:
        return ce, ce.item(), {}
    if state.cache is not None:
        teacher = state.cache.sparse_teacher(batch["ids"], targets)
    else:
        with torch.no_grad():
            teacher_out = state.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        teacher = next_token_logits(teacher_out.logits, vocab)
    diagnostics: dict[str, float] = {}
    if job.objective == "kd":
        params = {
            "generalized_jsd": {"beta": loss_config.jsd_beta},
            "skew_forward_kl": {"alpha": loss_config.skew_alpha},
            "skew_reverse_kl": {"alpha": loss_config.skew_alpha},
        }.get(loss_config.divergence, {})
        kd = divergence_loss(
            loss_config.divergence,
            logits,
            teacher,
            targets,
            temperature=loss_config.temperature,
            chunk_size=loss_config.chunk_size,
            num_tokens=denominators["tokens"],
            **params,
        )
    else:
        group_counts = (denominators["easy"], denominators["hard"]) if "hard" in denominators else None
        out = atkd_loss(
            logits,
            teacher,
            targets,
            hard_fraction=loss_config.hard_fraction,
            lam=loss_config.lam,
            setting=loss_config.setting,
            temperature=loss_config.temperature,
            split_scope=loss_config.split_scope,
            unc_threshold=loss_config.unc_threshold,
            chunk_size=loss_config.chunk_size,
            group_counts=group_counts,
        )
        # Without step-wide group counts (batch / sequence scope, or a threshold with an online
        # teacher): a per-micro-batch mean, which DeepSpeed's averaging over micro-batches and
        # ranks turns into their mean (the paper's micro-batch split).
        kd = out.loss
        diagnostics = {
            "tkd_easy": float(out.tkd_easy),
            "dkd_easy": float(out.dkd_easy),
            "tkd_hard": float(out.tkd_hard),
            "dkd_hard": float(out.dkd_hard),
            "num_easy": out.num_easy,
            "num_hard": out.num_hard,
        }
    return kd + loss_config.ce_weight * ce, ce.item(), diagnostics


def train(
    job: TrainJob, state: TrainState, log_metrics: MetricsFn, log: Callable[[str], None]
) -> list[dict[str, float]]:
    """Run the optimizer steps from ``state.start_step``; checkpoint every N steps and at the end."""
    training = job.training
    engine = state.engine
    micro_per_step = training.grad_accumulation_steps * state.world_size
    progress = (
        Progress(state.total_steps - state.start_step, log, job.stage, unit="steps")
        if state.rank == 0
        else None
    )
    metrics_path = job.checkpoint_dir / "metrics.jsonl"
    for step in range(state.start_step, state.total_steps):
        started = time.perf_counter()
        indices = _step_indices(state, training, step)
        batches = _step_batches(job, state, step, indices)
        if state.generates:
            # Generated lengths are known only now, and differ by rank: count them across ranks.
            local = sum(int((shift_targets(b["labels"]) != IGNORE_INDEX).sum()) for b in batches)
            tokens = round(_all_reduce_sum(float(local), state))
        else:
            tokens = sum(state.label_counts[i] for i in indices)
        denominators = {"tokens": max(tokens, 1) / micro_per_step}
        if state.hard_counts is not None:
            hard = sum(state.hard_counts[i] for i in indices)
            denominators["hard"] = max(hard, 1) / micro_per_step
            denominators["easy"] = max(tokens - hard, 1) / micro_per_step
        step_loss = step_ce = 0.0
        diagnostics: dict[str, list[float]] = {}
        for batch in batches:
            loss, ce, micro_diagnostics = _micro_loss(
                job, state, batch, denominators, cross_entropy_only=step < state.warmup_steps
            )
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / micro_per_step
            step_ce += ce / micro_per_step
            for key, value in micro_diagnostics.items():
                diagnostics.setdefault(key, []).append(value)
        step_loss, step_ce = _all_reduce_sum(step_loss, state), _all_reduce_sum(step_ce, state)
        record = {
            "step": step + 1,
            "loss": step_loss,
            "ce": step_ce,
            "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tokens / (time.perf_counter() - started),
            **{key: sum(values) / len(values) for key, values in diagnostics.items()},
        }
        if (step + 1) % training.eval_every == 0 or step + 1 == state.total_steps:
            record["val_loss"] = validation_loss(state)
        if state.rank == 0:
            state.history.append(record)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log_metrics({k: v for k, v in record.items() if k != "step"}, step + 1)
            progress.update(1, tokens, f"loss {step_loss:.4f}")
        if (step + 1) % training.checkpoint_every == 0 or step + 1 == state.total_steps:
            save_checkpoint(job, state, step + 1)
    if progress is not None:
        progress.close()
    return state.history


def _all_reduce_sum(value: float, state: TrainState) -> float:
    if state.world_size == 1:
        return value
    import deepspeed.comm as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=state.engine.device)
    dist.all_reduce(tensor)
    return float(tensor)


@torch.no_grad()
def validation_loss(state: TrainState, max_examples: int = 256) -> float:
    """Mean cross-entropy of the model on (up to ``max_examples`` of) the validation split."""
    engine, vocab = state.engine, len(state.tokenizer)
    engine.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(state.validation), max_examples), 16):
        batch = collate(state.validation[start : start + 16], state.tokenizer.pad_token_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = next_token_logits(
            engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, vocab
        )
        targets = shift_targets(batch["labels"])
        total += float(
            F.cross_entropy(
                logits.float().reshape(-1, vocab),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((targets != IGNORE_INDEX).sum())
    engine.train()
    return total / max(count, 1)


def _tag(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(job: TrainJob, state: TrainState, step: int) -> None:
    """A DeepSpeed checkpoint (model, optimizer, scheduler, step, RNG) on every rank; keep the newest M."""
    client_state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    state.engine.save_checkpoint(str(job.checkpoint_dir), tag=_tag(step), client_state=client_state)
    if state.rank == 0:
        tags = sorted(p for p in job.checkpoint_dir.glob("step-*") if p.is_dir())
        for old in tags[: -job.training.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _resume(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> int:
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
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has decided before rank 0 may clear the directory
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
            (job.checkpoint_dir / "metrics.jsonl").unlink(missing_ok=True)
            recorded.write_text(job.fingerprint() + "\n")
        return 0
    tag = latest.read_text().strip()
    try:
        path, client_state = state.engine.load_checkpoint(str(job.checkpoint_dir), tag=tag)
    except Exception as exc:  # DeepSpeed raises many kinds for a damaged checkpoint
        raise CheckpointError(
            f"checkpoint {job.checkpoint_dir / tag} cannot be loaded ({type(exc).__name__}: {exc}); "
            "delete it, or set training.resume: never to start clean"
        ) from None
    if path is None or client_state is None:
        raise CheckpointError(
            f"checkpoint {job.checkpoint_dir / tag} is incomplete; delete it or set training.resume: never"
        )
    torch.set_rng_state(client_state["torch_rng"])
    random.setstate(client_state["python_rng"])
    step = int(client_state["step"])
    _truncate_metrics(job.checkpoint_dir / "metrics.jsonl", step, state)
    log(f"{job.stage}: resumed from {tag} (step {step} of {state.total_steps})")
    return step


def _truncate_metrics(path: Path, step: int, state: TrainState) -> None:
    """Keep metric records up to the checkpoint's step (later ones are redone)."""
    if state.rank != 0 or not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    state.history = [json.loads(line) for line in kept]


def save_model(job: TrainJob, state: TrainState, card: str) -> None:
    """The trained model in Hugging Face format (safetensors, tokenizer, generation config, card) on rank 0."""
    engine = state.engine
    if job.training.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if state.rank == 0:
                _write_model(engine.module, state, job.output_dir, card)
    elif state.rank == 0:
        _write_model(engine.module, state, job.output_dir, card)


def _write_model(module: torch.nn.Module, state: TrainState, output_dir: Path, card: str) -> None:
    from transformers import GenerationConfig

    staging = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    module.save_pretrained(staging, safe_serialization=True)
    state.tokenizer.save_pretrained(staging)
    GenerationConfig(
        eos_token_id=state.tokenizer.eos_token_id,
        pad_token_id=state.tokenizer.pad_token_id,
        bos_token_id=state.tokenizer.bos_token_id,
        do_sample=False,
    ).save_pretrained(staging)
    (staging / "README.md").write_text(card)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


def cleanup(state: TrainState) -> None:
    """Release the engine; leave the process group for the next stage in this process."""
    if hasattr(state.engine, "destroy"):
        state.engine.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finetune_job(config: PipelineConfig, prepared_dir: Path, teacher_init: Path) -> TrainJob:
    """The teacher fine-tuning stage in the run's standard layout under ``workdir``."""
    return TrainJob(
        stage="finetune",
        config=config,
        prepared_dir=prepared_dir,
        init_dir=teacher_init,
        output_dir=config.layout.teacher,
        checkpoint_dir=config.layout.checkpoints("finetune"),
    )


def distill_job(
    config: PipelineConfig, prepared_dir: Path, student_init: Path, cache_dir: Path, teacher_dir: Path
) -> TrainJob:
    """The distillation stage in the run's standard layout; the cache offline, the teacher online."""
    offline = config.distill.teacher_source == "offline"
    return TrainJob(
        stage="distill",
        config=config,
        prepared_dir=prepared_dir,
        init_dir=student_init,
        output_dir=config.layout.student,
        checkpoint_dir=config.layout.checkpoints("distill"),
        cache_dir=cache_dir if offline else None,
        teacher_dir=None if offline else teacher_dir,
    )
