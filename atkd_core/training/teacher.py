"""Where a distillation step gets the teacher's distribution: the scoring cache or a live teacher.

Offline, the sparse teacher (top-K + tail) of each micro-batch is read from the verified cache and
no teacher is in memory. Online, the teacher runs a no-grad forward on the same batch (needed when
the student generates its own data), partitioned like the student under ZeRO-3; with fused-linear
losses its output layer is applied inside the loss, where under ZeRO-3 its weight is gathered whole
for the loss's duration (as the teacher's own forward would gather it for its logits).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atkd_core.config import LossConfig, TrainingConfig
from atkd_core.data.batching import IGNORE_INDEX, next_token_logits, shift_targets
from atkd_core.errors import UserError
from atkd_core.losses import SparseTeacher, Teacher
from atkd_core.losses.cross_tokenizer import CrossTeacher, SpanBatch
from atkd_core.scoring import TeacherCache
from atkd_core.storage import Location, is_url
from atkd_core.training.batches import Batch, Example, keeps_packed_examples_apart, model_inputs, to_batch
from atkd_core.training.ds_config import resolve_precision
from atkd_core.training.heads import OutputLayer


class TeacherSource(ABC):
    """The teacher's distribution over the next token for a micro-batch."""

    @abstractmethod
    def __call__(self, batch: Batch, targets: Tensor) -> Teacher | CrossTeacher:
        """batch: the micro-batch [B, T]; targets: its shifted labels [B, T-1].

        Returns dense logits [B, T-1, V], a LinearHead over the teacher's hidden states [B, T-1, H],
        or a SparseTeacher aligned with ``targets``; a CrossTeacher for a teacher that tokenizes
        differently.
        """

    def loss_context(self) -> AbstractContextManager[Any]:
        """What the loss runs inside so that the teacher it was handed is usable: nothing, except
        for a partitioned teacher whose output layer the loss applies (LiveTeacher)."""
        return nullcontext()

    # Whether the loop should hand over each step's batches a step early (prefetch).
    reads_ahead = False

    def prefetch(self, batches: list[Batch]) -> None:
        """Start on the teachers of ``batches``, the next step's, while this step computes; a
        source that gains nothing from it ignores the call."""
        return None


class CachedTeacher(TeacherSource):
    """The teacher of the scoring cache (offline distillation). A cache at a URL is read a step
    ahead on a background thread, so its round trips overlap the step that is computing."""

    def __init__(self, cache_dir: Location, loss: LossConfig) -> None:
        self.cache = TeacherCache(cache_dir)
        self.reads_ahead = is_url(cache_dir)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="cache-reader") if self.reads_ahead else None
        self._ahead: list[tuple[Batch, Future[SparseTeacher]]] = []
        scored_at = self.cache.spec["temperature"]
        if not math.isclose(scored_at, loss.temperature):
            raise UserError(
                f"the teacher cache was scored at temperature {scored_at}, "
                f"but loss.temperature is {loss.temperature}; re-run score_teacher"
            )

    def __call__(self, batch: Batch, targets: Tensor) -> Teacher:
        """See TeacherSource."""
        for index, (pending, future) in enumerate(self._ahead):
            if pending is batch:
                del self._ahead[index]
                return future.result()
        return self.cache.sparse_teacher(batch["ids"], targets, batch["placements"])

    def prefetch(self, batches: list[Batch]) -> None:
        """See TeacherSource: read on the background thread, when the cache is at a URL."""
        if self._reader is None:
            return
        for batch in batches:
            future = self._reader.submit(
                self.cache.sparse_teacher, batch["ids"], shift_targets(batch["labels"]), batch["placements"]
            )
            self._ahead.append((batch, future))

    def hard_counts(self, examples: list[Example], threshold: float) -> list[int]:
        """Per example, the tokens whose cached teacher UNC is at or above ``threshold``."""
        ids = [example["id"] for example in examples]
        return [int((unc >= threshold).sum()) for unc in self.cache.fields(ids, "unc")]


class LiveTeacher(TeacherSource):
    """A teacher model run in the loop, without gradients (online distillation).

    With ``output_layer`` (loss.fused_linear) it returns its hidden states and output layer, whose
    logits the loss makes chunk by chunk. ``partitioned``: the model is a ZeRO-3 engine, whose
    output layer's weight is whole only while gathered (loss_context). ``keeps_packed_examples_apart``:
    whether packed batches may be given to it (batches.keeps_packed_examples_apart).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        vocab_size: int,
        output_layer: OutputLayer | None = None,
        partitioned: bool = False,
        keeps_packed_examples_apart: bool = True,
    ) -> None:
        self.model, self.vocab_size, self.output_layer = model, vocab_size, output_layer
        self.partitioned = partitioned
        self.keeps_packed_examples_apart = keeps_packed_examples_apart

    def loss_context(self) -> AbstractContextManager[Any]:
        """Under ZeRO-3 with the output layer in the loss: that layer's parameters gathered whole on
        every rank (read-only) while inside; they are partitioned again on leaving."""
        if not (self.partitioned and self.output_layer is not None):
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            list(self.output_layer.module.parameters()), modifier_rank=None
        )

    @torch.no_grad()
    def __call__(self, batch: Batch, targets: Tensor) -> Teacher:
        """See TeacherSource."""
        layer = self.output_layer
        with layer.bypassed() if layer is not None else nullcontext():
            outputs = self.model(**model_inputs(batch))
        if layer is None:
            return next_token_logits(outputs.logits, self.vocab_size)
        return layer.head(outputs.logits[:, :-1])


def load_live_teacher(
    teacher_dir: Path,
    training: TrainingConfig,
    device: torch.device,
    vocab_size: int,
    fused: bool,
    attn_implementation: str = "auto",
    packed: bool = False,
) -> LiveTeacher:
    """The teacher at ``teacher_dir`` in eval mode without gradients, on the student's device, or
    partitioned like the student under ZeRO-3 (every rank runs its forward); with ``fused``, its
    output layer is left to the loss (gathered for it under ZeRO-3: LiveTeacher.loss_context).
    ``packed``: the batches will be packed, so whether the teacher keeps packed examples apart is
    checked (LiveTeacher.keeps_packed_examples_apart)."""
    from atkd_core.models.build import load_model

    teacher = load_model(teacher_dir, attn_implementation=attn_implementation).eval().requires_grad_(False)
    packs = keeps_packed_examples_apart(teacher, vocab_size) if packed else True
    if training.zero_stage != 3:
        return LiveTeacher(
            teacher.to(device),
            vocab_size,
            OutputLayer(teacher, vocab_size) if fused else None,
            keeps_packed_examples_apart=packs,
        )
    import deepspeed

    inference: dict[str, object] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "zero_optimization": {"stage": 3},
    }
    if resolve_precision(training, torch.device(device).type) == "bf16":
        inference["bf16"] = {"enabled": True}
    output_layer = OutputLayer(teacher, vocab_size) if fused else None
    engine = deepspeed.initialize(model=teacher, config=inference)[0]
    return LiveTeacher(engine, vocab_size, output_layer, partitioned=True, keeps_packed_examples_apart=packs)


# The teacher's rows at its own label tokens for a list of example ids: (dense logits [M, Vt] or
# a SparseTeacher of M rows, its token ids there [M], each example's token count).
TeacherRows = tuple[Tensor | SparseTeacher, Tensor, list[int]]


class LiveTeacherRows:
    """A teacher model run on its own tokens of the batch's examples, without gradients: the rows
    of CrossTokenizerTeacher for online distillation across tokenizers."""

    def __init__(
        self,
        model: Callable[..., Any],
        examples: list[Example],
        pad_token_id: int,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.pad_token_id, self.vocab_size, self.device = model, pad_token_id, vocab_size, device
        self.examples = {example["id"]: example for example in examples}

    @torch.no_grad()
    def __call__(self, example_ids: list[str]) -> TeacherRows:
        """See TeacherRows."""
        missing = [example_id for example_id in example_ids if example_id not in self.examples]
        if missing:
            raise UserError(
                f"example {missing[0]!r} is not in the teacher's prepared data; prepare the data again"
            )
        batch = to_batch([self.examples[i] for i in example_ids], example_ids, self.pad_token_id, self.device)
        logits = next_token_logits(self.model(**model_inputs(batch)).logits, self.vocab_size)
        targets = shift_targets(batch["labels"])
        valid = targets != IGNORE_INDEX
        return logits[valid], targets[valid], [int(count) for count in valid.sum(-1)]


class CrossTokenizerTeacher(TeacherSource):
    """A teacher that tokenizes differently from the student (``teacher.tokenizer``).

    For each micro-batch, the teacher's rows at its own label tokens of the same examples (from the
    cache, or a live model: ``rows``), and the spans that join them to the student's rows
    (``span_ends``: per example id, the teacher's and the student's token index where each aligned
    span ends, as prepared data stores them), handed to the objective as a CrossTeacher.
    """

    def __init__(
        self,
        rows: Callable[[list[str]], TeacherRows],
        span_ends: dict[str, tuple[list[int], list[int]]],
        teacher_to_student: Tensor,
    ) -> None:
        self.rows, self.span_ends, self.teacher_to_student = rows, span_ends, teacher_to_student

    def __call__(self, batch: Batch, targets: Tensor) -> CrossTeacher:
        """See TeacherSource; ``batch`` must be padded (one example a row), not packed."""
        ids = list(batch["ids"])
        teacher_rows, teacher_targets, counts = self.rows(ids)
        width = targets.shape[1]
        student_starts, teacher_starts, ends = [], [], []
        offset = 0
        for example_id, placement, count in zip(ids, batch["placements"], counts, strict=True):
            label_columns = (targets[placement.row] != IGNORE_INDEX).nonzero().squeeze(-1)
            teacher_ends, student_ends = self.span_ends[example_id]
            if student_ends and (student_ends[-1] > label_columns.numel() or teacher_ends[-1] > count):
                raise UserError(
                    f"example {example_id!r}: its aligned spans reach past its label tokens "
                    f"({student_ends[-1]} student of {label_columns.numel()}, {teacher_ends[-1]} teacher "
                    f"of {count}); the teacher's data or cache was made from other prepared data"
                )
            first = int(label_columns[0]) if label_columns.numel() else 0
            student_starts.append(placement.row * width + first)
            teacher_starts.append(offset)
            ends.append((teacher_ends, student_ends))
            offset += count
        spans = SpanBatch.from_examples(ends, student_starts, teacher_starts, targets.numel(), offset)
        device = targets.device
        return CrossTeacher(
            rows=teacher_rows.to(device)
            if isinstance(teacher_rows, Tensor)
            else _sparse_to(teacher_rows, device),
            targets=teacher_targets.to(device),
            spans=spans.to(device),
            teacher_to_student=self.teacher_to_student.to(device),
        )


def _sparse_to(record: SparseTeacher, device: torch.device) -> SparseTeacher:
    """``record`` with every tensor on ``device``."""
    return SparseTeacher(
        target_logprob=record.target_logprob.to(device),
        topk_ids=record.topk_ids.to(device),
        topk_logprobs=record.topk_logprobs.to(device),
        log_tail_mass=None if record.log_tail_mass is None else record.log_tail_mass.to(device),
        unc=None if record.unc is None else record.unc.to(device),
    )
