"""One training loop for every objective, under DeepSpeed ZeRO: setup, train, cleanup.

The loss is whatever ``build_objective`` made of the config (cross-entropy for teacher fine-tuning,
a divergence, ATKD); the loop only supplies logits, the teacher and the step's denominators.
Checkpoints and the saved model are in ``checkpoint.py``, batching in ``batches.py``, the teacher
in ``teacher.py``. See docs/architecture.md, "Training".

Normalisation: losses are sums over tokens divided by the global count of valid tokens of the
optimizer step (known on every rank from the data alone), pre-multiplied by the number of
micro-batches so that DeepSpeed's 1/GAS scaling and data-parallel averaging give back exactly
``sum / count``: the gradient does not depend on micro-batch size, accumulation or world size.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from atkd_core.config import TrainingConfig
from atkd_core.data.batching import IGNORE_INDEX, next_token_logits, shift_targets
from atkd_core.devices import compiles_loss
from atkd_core.errors import UserError
from atkd_core.losses.objective import CrossEntropy, Objective, ObjectiveOutput, StepCounts
from atkd_core.progress import Progress
from atkd_core.training.batches import (
    Batch,
    BatchPlan,
    examples_of,
    keeps_packed_examples_apart,
    model_inputs,
    student_answers,
    to_batch,
    uses_student_answers,
)
from atkd_core.training.checkpoint import METRICS_FILE, keep_shared_warmup, resume, save_checkpoint
from atkd_core.training.distributed import all_reduce_sum
from atkd_core.training.ds_config import render_ds_config
from atkd_core.training.heads import OutputLayer
from atkd_core.training.job import MetricsFn, TrainJob, TrainState
from atkd_core.training.teacher import (
    CachedTeacher,
    CrossTokenizerTeacher,
    LiveTeacherRows,
    TeacherRows,
    load_live_teacher,
)

VALIDATION_BATCH = 16


def lr_multiplier(training: TrainingConfig, total_steps: int) -> Callable[[int], float]:
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


def setup(job: TrainJob, rank: int, world_size: int, device: str, log: Callable[[str], None]) -> TrainState:
    """Seed, load data, model and teacher; wrap the model in a DeepSpeed engine; resume.

    Runs inside the stage's process group (``distributed.process_group``) on ``device``.
    """
    import deepspeed
    from datasets import load_from_disk

    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.models.build import load_model

    training = job.training
    if world_size != training.world_size:
        raise UserError(
            f"training.num_processes x num_nodes is {training.num_processes} x {training.num_nodes} but "
            f"{world_size} processes were started"
        )
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    dataset = load_from_disk(str(job.prepared_dir / "dataset"))
    if len(dataset["train"]) < training.batch_size:
        raise UserError(
            f"the training split has {len(dataset['train'])} examples, fewer than training.batch_size "
            f"{training.batch_size}"
        )
    tokenizer = load_tokenizer(job.prepared_dir / "tokenizer")
    trained = job.config.teacher if job.stage == "finetune" else job.config.student
    model = load_model(job.init_dir, attn_implementation=trained.attn_implementation)
    pack_capacity = job.pack_capacity
    if pack_capacity is not None and not keeps_packed_examples_apart(model, len(tokenizer)):
        log(
            f"{job.stage}: batches padded, not packed: {type(model).__name__} lets packed examples attend "
            "to each other (its attention ignores position_ids that restart per example)"
        )
        pack_capacity = None
    if training.gradient_checkpointing:
        # Non-reentrant: it keeps the RNG state and works with inputs that need no gradient.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    plan = BatchPlan(examples_of(dataset["train"]), training, rank, world_size)
    warmup_steps = (
        round(job.config.distill.sft_warmup_epochs * plan.steps_per_epoch) if job.stage == "distill" else 0
    )
    total_steps = warmup_steps + (
        training.max_steps or max(1, math.ceil(training.epochs * plan.steps_per_epoch))
    )
    optimizer = None
    if training.optim.name == "adamw_torch":
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=training.optim.lr,
            betas=training.optim.betas,
            weight_decay=training.optim.weight_decay,
        )
    compiled = compiles_loss(job.config.loss.compile, torch.device(device).type)
    if compiled:
        log(f"{job.stage}: loss chunks compiled with torch.compile (the first steps include compiling)")
    schedule = lr_multiplier(training, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        # A callable: DeepSpeed hands it whichever optimizer it ends up with.
        lr_scheduler=lambda built: torch.optim.lr_scheduler.LambdaLR(built, schedule),
        config=render_ds_config(training, device),
    )
    state = TrainState(
        engine=engine,
        tokenizer=tokenizer,
        plan=plan,
        validation=examples_of(dataset["validation"]),
        objective=job.build_objective(compiled),
        warmup_objective=CrossEntropy(job.config.loss.chunk_size, compiled),
        rank=rank,
        world_size=world_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        output_layer=OutputLayer(engine.module, len(tokenizer)) if job.config.loss.fused_linear else None,
        pack_capacity=pack_capacity,
    )
    _attach_teacher(job, state, log)
    state.start_step = resume(job, state, log)
    return state


def _attach_teacher(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> None:
    """The teacher the objective needs: the cache offline, a live model online."""
    if not state.objective.needs_teacher:
        return
    if job.config.cross_tokenizer:
        _attach_cross_tokenizer_teacher(job, state, log)
        return
    if job.config.distill.teacher_source == "offline":
        if job.cache_dir is None:
            raise UserError("offline distillation needs the teacher cache (run score_teacher first)")
        cached = CachedTeacher(job.cache_dir, job.config.loss)
        if state.objective.hard_threshold is not None:
            state.plan.hard_counts = cached.hard_counts(state.plan.train, state.objective.hard_threshold)
        state.teacher = cached
        log(f"{job.stage}: offline teacher from {job.cache_dir} ({cached.cache.manifest.tokens} tokens)")
        return
    if job.teacher_dir is None:
        raise UserError("online distillation needs the teacher model directory")
    state.teacher = load_live_teacher(
        job.teacher_dir,
        job.training,
        state.device,
        len(state.tokenizer),
        fused=job.config.loss.fused_linear,
        attn_implementation=job.config.teacher.attn_implementation,
        packed=state.pack_capacity is not None,
    )
    if state.pack_capacity is not None and not state.teacher.keeps_packed_examples_apart:
        log(
            f"{job.stage}: batches padded, not packed: the teacher lets packed examples attend to each other "
            "(its attention ignores position_ids that restart per example)"
        )
        state.pack_capacity = None
    log(f"{job.stage}: online teacher {job.teacher_dir}")


def _attach_cross_tokenizer_teacher(job: TrainJob, state: TrainState, log: Callable[[str], None]) -> None:
    """A teacher with its own tokenizer: its rows at its own tokens of each batch's examples (the
    cache, or a live model on its prepared data), joined to the student's by the aligned spans."""
    from datasets import load_from_disk

    from atkd_core.data.alignment import shared_token_pairs
    from atkd_core.data.prepare import teacher_prepared_dir
    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.losses.cross_tokenizer import vocabulary_map

    teacher_dir = teacher_prepared_dir(job.config, job.prepared_dir)
    teacher_tokenizer = load_tokenizer(teacher_dir / "tokenizer")
    columns = load_from_disk(str(job.prepared_dir / "dataset"))["train"].select_columns(
        ["id", "span_teacher_ends", "span_student_ends"]
    )
    span_ends = {
        example_id: (teacher_ends, student_ends)
        for example_id, teacher_ends, student_ends in zip(
            columns["id"], columns["span_teacher_ends"], columns["span_student_ends"], strict=True
        )
    }
    pairs = shared_token_pairs(teacher_tokenizer, state.tokenizer)
    teacher_to_student = vocabulary_map(pairs, len(teacher_tokenizer))
    rows: Callable[[list[str]], TeacherRows]
    if job.config.distill.teacher_source == "offline":
        if job.cache_dir is None:
            raise UserError("offline distillation needs the teacher cache (run score_teacher first)")
        cached = CachedTeacher(job.cache_dir, job.config.loss)
        rows = cached.cache.example_rows
        where = f"the cache {job.cache_dir}"
    else:
        from atkd_core.models.build import load_model

        if job.teacher_dir is None:
            raise UserError("online distillation needs the teacher model directory")
        model = load_model(job.teacher_dir, attn_implementation=job.config.teacher.attn_implementation)
        teacher_examples = examples_of(load_from_disk(str(teacher_dir / "dataset"))["train"])
        rows = LiveTeacherRows(
            model.eval().requires_grad_(False).to(state.device),
            teacher_examples,
            teacher_tokenizer.pad_token_id,
            len(teacher_tokenizer),
            state.device,
        )
        where = f"the live teacher {job.teacher_dir}"
    state.teacher = CrossTokenizerTeacher(rows, span_ends, teacher_to_student)
    log(
        f"{job.stage}: teacher with its own tokenizer ({len(teacher_tokenizer)} tokens, the student's "
        f"{len(state.tokenizer)}; {len(pairs)} spelled alike), from {where}, compared over aligned spans"
    )


def _step_batches(job: TrainJob, state: TrainState, step: int, indices: list[int]) -> list[Batch]:
    """This rank's micro-batches of ``step``: ground truth, or (some) answered by the student."""
    pad = state.tokenizer.pad_token_id
    batches = []
    for micro, rows in enumerate(state.plan.micro_batches(indices)):
        examples = [state.plan.train[i] for i in rows]
        ids = [example["id"] for example in examples]
        if job.stage == "distill" and uses_student_answers(
            job.config.distill, job.training.seed, step, state.rank, micro
        ):
            examples = student_answers(
                state.engine.module, state.tokenizer, examples, job.config.distill, state.device
            )
        batches.append(to_batch(examples, ids, pad, state.device, state.pack_capacity))
    return batches


def _step_tokens(job: TrainJob, state: TrainState, indices: list[int], batches: list[Batch]) -> int:
    """Valid target tokens of the whole optimizer step, over every rank."""
    if job.stage == "distill" and job.config.distill.data_source in ("student_generated", "on_policy"):
        # Generated lengths are known only now, and differ by rank: count them across ranks.
        local = sum(int((shift_targets(b["labels"]) != IGNORE_INDEX).sum()) for b in batches)
        return round(all_reduce_sum(float(local), state.world_size, state.device))
    return state.plan.tokens(indices)


def _filled(batch: Batch) -> int:
    """Token slots of ``batch`` that hold an example's tokens."""
    return sum(placement.end - placement.start for placement in batch["placements"])


def _step_counts(tokens: int, hard: int | None, micro_per_step: int) -> StepCounts:
    """The step's denominators, divided by the micro-batches DeepSpeed averages over."""
    if hard is None:
        return StepCounts(tokens=max(tokens, 1) / micro_per_step)
    return StepCounts(
        tokens=max(tokens, 1) / micro_per_step,
        easy=max(tokens - hard, 1) / micro_per_step,
        hard=max(hard, 1) / micro_per_step,
    )


def _micro_batch_loss(
    state: TrainState, objective: Objective, batch: Batch, counts: StepCounts
) -> ObjectiveOutput:
    """The objective on one micro-batch: the student's forward (its output layer inside the loss
    when fused), the teacher's distribution when the objective needs it."""
    engine, targets = state.engine, shift_targets(batch["labels"])
    layer = state.output_layer
    with layer.bypassed() if layer is not None else nullcontext():
        outputs = engine(**model_inputs(batch))
    source = state.teacher if objective.needs_teacher else None
    teacher = source(batch, targets) if source is not None else None
    if layer is None:
        return objective(next_token_logits(outputs.logits, len(state.tokenizer)), teacher, targets, counts)
    with source.loss_context() if source is not None else nullcontext():
        return layer.apply(outputs.logits[:, :-1], lambda head: objective(head, teacher, targets, counts))


def train(
    job: TrainJob, state: TrainState, log_metrics: MetricsFn, log: Callable[[str], None]
) -> list[dict[str, float]]:
    """Run the optimizer steps from ``state.start_step``; checkpoint every N steps and at the end."""
    training, engine = job.training, state.engine
    micro_per_step = training.grad_accumulation_steps * state.world_size
    progress = (
        Progress(state.total_steps - state.start_step, log, job.stage, unit="steps")
        if state.rank == 0
        else None
    )
    if state.warmup_reused and progress is not None:
        # This run's record is whole: the warm-up's steps, trained by the run that kept them.
        for record in state.history:
            log_metrics({k: v for k, v in record.items() if k != "step"}, int(record["step"]))
    upcoming: list[Batch] | None = None
    for step in range(state.start_step, state.total_steps):
        started = time.perf_counter()
        indices = state.plan.step_indices(step)
        batches = upcoming if upcoming is not None else _step_batches(job, state, step, indices)
        upcoming = None
        if state.teacher is not None and state.teacher.reads_ahead and step + 1 < state.total_steps:
            # Only a cache reads ahead, and a cache means offline distillation, whose batches never
            # hold the student's own answers: the next step's batches are known now.
            upcoming = _step_batches(job, state, step + 1, state.plan.step_indices(step + 1))
            state.teacher.prefetch(upcoming)
        tokens = _step_tokens(job, state, indices, batches)
        counts = _step_counts(tokens, state.plan.hard_tokens(indices), micro_per_step)
        objective = state.warmup_objective if step < state.warmup_steps else state.objective
        step_loss = step_ce = 0.0
        diagnostics: dict[str, list[float]] = {}
        for batch in batches:
            out = _micro_batch_loss(state, objective, batch, counts)
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / micro_per_step
            step_ce += out.cross_entropy / micro_per_step
            for key, value in out.diagnostics.items():
                diagnostics.setdefault(key, []).append(value)
        record = {
            "step": step + 1,
            "loss": all_reduce_sum(step_loss, state.world_size, state.device),
            "ce": all_reduce_sum(step_ce, state.world_size, state.device),
            "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tokens / (time.perf_counter() - started),
            # Of the token slots the forward passes computed, the share that held no example.
            "padding_share": 1
            - sum(_filled(b) for b in batches) / sum(b["input_ids"].numel() for b in batches),
            **{key: sum(values) / len(values) for key, values in diagnostics.items()},
        }
        if objective.monitored is not None:
            record.update(_end_step(state, objective, record[objective.monitored], step + 1))
        if (step + 1) % training.eval_every == 0 or step + 1 == state.total_steps:
            record["val_loss"] = validation_loss(state)
        if progress is not None:  # rank 0 keeps the records
            state.history.append(record)
            with (job.checkpoint_dir / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log_metrics({k: v for k, v in record.items() if k != "step"}, step + 1)
            progress.update(1, tokens, f"loss {record['loss']:.4f}")
        if (step + 1) % training.checkpoint_every == 0 or step + 1 == state.total_steps:
            save_checkpoint(job, state, step + 1)
        if step + 1 == state.warmup_steps:
            keep_shared_warmup(job, state, step + 1, log)
    if progress is not None:
        progress.close()
    return state.history


def _end_step(
    state: TrainState, objective: Objective, local_value: float, steps_done: int
) -> dict[str, float]:
    """An adaptive objective's step end: its monitored value averaged over the ranks (so every rank
    moves its state alike), and the share of its own steps (after the SFT warm-up) done."""
    value = all_reduce_sum(local_value, state.world_size, state.device) / state.world_size
    progress = (steps_done - state.warmup_steps) / max(1, state.total_steps - state.warmup_steps)
    return objective.end_step(value, progress)


@torch.no_grad()
def validation_loss(state: TrainState, max_examples: int = 256) -> float:
    """Mean cross-entropy of the model on (up to ``max_examples`` of) the validation split."""
    state.engine.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(state.validation), max_examples), VALIDATION_BATCH):
        examples = state.validation[start : start + VALIDATION_BATCH]
        batch = to_batch(
            examples,
            [e["id"] for e in examples],
            state.tokenizer.pad_token_id,
            state.device,
            state.pack_capacity,
        )
        # A denominator of 1 makes the logged cross-entropy the sum over the batch's tokens.
        total += _micro_batch_loss(state, state.warmup_objective, batch, StepCounts(tokens=1.0)).cross_entropy
        count += int((shift_targets(batch["labels"]) != IGNORE_INDEX).sum())
    state.engine.train()
    return total / max(count, 1)


def cleanup(state: TrainState) -> None:
    """Release the engine; leave the process group for the next stage in this process."""
    if hasattr(state.engine, "destroy"):
        state.engine.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
