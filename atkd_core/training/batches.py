"""Which examples each optimizer step trains on, on which rank, and how they become tensors.

A step's global batch is a seeded permutation of the training split per epoch, so a resumed run
needs only the step number; each rank takes its share and cuts it into micro-batches. A
micro-batch is the prepared ground truth, or (ImitKD / GKD) the same prompts answered by the
student itself. See docs/architecture.md, "From a batch to the loss".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor

from atkd_core.config import DistillConfig, TrainingConfig
from atkd_core.data.batching import IGNORE_INDEX, Placement, collate, pack, padded_placements, row_capacity

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Example(TypedDict):
    """One prepared example: its id, token ids and labels (IGNORE_INDEX on the prompt)."""

    id: str
    input_ids: list[int]
    labels: list[int]


class Batch(TypedDict):
    """A micro-batch on the training device: input_ids / labels [R, W]; attention_mask [R, W]
    (padded) or position_ids [R, W] (packed: no mask, positions restart per example); the
    examples' ids (the teacher cache's keys) and where each sits in the rows."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor | None
    ids: list[str]
    placements: list[Placement]


def examples_of(split: Dataset) -> list[Example]:
    """A datasets split as plain examples (Arrow row access per micro-batch costs more than a
    small student's step)."""
    columns = split.select_columns(["id", "input_ids", "labels"]).to_dict()
    return [
        Example(id=example_id, input_ids=input_ids, labels=labels)
        for example_id, input_ids, labels in zip(
            columns["id"], columns["input_ids"], columns["labels"], strict=True
        )
    ]


def label_count(example: Example) -> int:
    """Valid next-token targets of an example (its labels after the first, not ignored)."""
    return sum(1 for token in example["labels"][1:] if token != IGNORE_INDEX)


@dataclass
class BatchPlan:
    """The schedule of examples: global batch per step, this rank's share, micro-batches.

    hard_counts: per example, its hard tokens under a fixed UNC threshold (None when the objective
    does not split by one), so every rank knows the step's easy / hard counts from the data alone.
    """

    train: list[Example]
    training: TrainingConfig
    rank: int
    world_size: int
    hard_counts: list[int] | None = None
    label_counts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.label_counts = [label_count(example) for example in self.train]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training split (a partial last batch is dropped)."""
        return len(self.train) // self.training.batch_size

    def step_indices(self, step: int) -> list[int]:
        """The global batch of ``step``: a seeded permutation per epoch."""
        batch_size, seed = self.training.batch_size, self.training.seed
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.train), generator=generator).tolist()
        return order[position * batch_size : (position + 1) * batch_size]

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This rank's share of the global batch ``indices``, cut into micro-batches."""
        per_rank = len(indices) // self.world_size
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        size = self.training.micro_batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def tokens(self, indices: list[int]) -> int:
        """Valid target tokens of the examples ``indices``."""
        return sum(self.label_counts[i] for i in indices)

    def hard_tokens(self, indices: list[int]) -> int | None:
        """Hard tokens of the examples ``indices`` under the fixed threshold, or None."""
        return None if self.hard_counts is None else sum(self.hard_counts[i] for i in indices)


def to_batch(
    examples: list[Example], ids: list[str], pad_token_id: int, device: torch.device, limit: int | None = None
) -> Batch:
    """``examples`` as tensors on ``device``: packed into rows of at most ``limit`` tokens, at the row
    length that leaves the least padding (data.batching.row_capacity), or right-padded (collate)
    when ``limit`` is None; ``ids`` name them in the teacher cache."""
    if limit is None:
        padded = collate(examples, pad_token_id)
        return Batch(
            input_ids=padded["input_ids"].to(device),
            labels=padded["labels"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            position_ids=None,
            ids=ids,
            placements=padded_placements(examples),
        )
    capacity = row_capacity([len(example["input_ids"]) for example in examples], limit)
    return packed_batch(examples, ids, pad_token_id, device, capacity)


def packed_batch(
    examples: list[Example], ids: list[str], pad_token_id: int, device: torch.device, capacity: int
) -> Batch:
    """``examples`` packed into rows of ``capacity`` tokens (data.batching.pack), on ``device``."""
    packed, placements = pack(examples, pad_token_id, capacity)
    return Batch(
        input_ids=packed["input_ids"].to(device),
        labels=packed["labels"].to(device),
        attention_mask=None,
        position_ids=packed["position_ids"].to(device),
        ids=ids,
        placements=placements,
    )


def model_inputs(batch: Batch) -> dict[str, Tensor | bool]:
    """The keyword arguments of a causal LM's training forward for ``batch``: no attention mask when
    packed (transformers then separates the examples by their restarting position_ids, which it
    does only without a KV cache), and no KV cache in any case (training never decodes)."""
    if batch["position_ids"] is not None:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    assert batch["attention_mask"] is not None, "a padded batch has an attention mask"
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


@torch.no_grad()
def keeps_packed_examples_apart(model: torch.nn.Module, vocab_size: int) -> bool:
    """Whether ``model`` keeps packed examples apart: the logits of two short examples packed in
    one row equal their logits alone. Models whose attention ignores restarting position_ids (in
    transformers 5.x, OPT among the built-in ones) would let each example see the one before it.

    Runs three forwards of at most 8 tokens in eval mode (each example alone, then both packed).
    """
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in (5, 3)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = [
            model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
            for ids in examples
        ]
        packed, placements = pack(
            [{"input_ids": ids, "labels": ids} for ids in examples], pad_token_id=0, capacity=8
        )
        logits = model(
            input_ids=packed["input_ids"].to(device),
            position_ids=packed["position_ids"].to(device),
            use_cache=False,
        ).logits.float()
    finally:
        model.train(was_training)
    for own, placement in zip(alone, placements, strict=True):
        together = logits[placement.row, placement.start : placement.end]
        if float((together - own).abs().max()) > 1e-3 * (float(own.abs().max()) + 1e-6):
            return False
    return True


@torch.no_grad()
def student_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    distill: DistillConfig,
    device: torch.device,
) -> list[Example]:
    """The examples' prompts answered by ``model`` (ImitKD / GKD): prompt + sampled response.

    Labels cover the generated tokens (up to and including EOS when it comes); the teacher then
    grades the student's own tokens, online.
    """
    prompts = []
    for example in examples:
        labels = example["labels"]
        start = next((j for j, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        prompts.append(example["input_ids"][:start])
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding: generation continues every row at the end
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    model.eval()
    sampling = (
        {"do_sample": True, "temperature": distill.generation_temperature}
        if distill.generation_temperature > 0
        else {"do_sample": False}
    )
    # Causal LM classes get generate() from GenerationMixin, which PreTrainedModel does not inherit.
    output = model.generate(  # type: ignore[operator]
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=distill.generation_max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    model.train()
    answered = []
    for row, (example, prompt) in enumerate(zip(examples, prompts, strict=True)):
        generated = output[row, width:].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        else:
            generated = [t for t in generated if t != tokenizer.pad_token_id]
        answered.append(
            Example(
                id=example["id"],
                input_ids=prompt + generated,
                labels=[IGNORE_INDEX] * len(prompt) + generated,
            )
        )
    return answered


def uses_student_answers(distill: DistillConfig, seed: int, step: int, rank: int, micro: int) -> bool:
    """Whether micro-batch ``micro`` of ``step`` on ``rank`` is answered by the student.

    GKD's choice is seeded by (seed, step, rank, micro-batch), so a resumed run makes the same choices.
    """
    if distill.data_source == "student_generated":
        return True
    if distill.data_source != "on_policy":
        return False
    return random.Random(f"{seed}:{step}:{rank}:{micro}").random() < distill.on_policy_ratio
