"""Padding-free packing: the layout, the model's outputs per example, and one micro-batch's loss and
gradient against the padded batch of the same examples, for SFT, KD and ATKD, offline and online."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atkd_core.config import ModelConfig
from atkd_core.data.batching import IGNORE_INDEX, collate, pack, pack_rows, row_capacity, shift_targets
from atkd_core.losses.objective import StepCounts
from atkd_core.models.build import build_model
from atkd_core.models.presets import ARCHITECTURES
from atkd_core.training.batches import keeps_packed_examples_apart, model_inputs, packed_batch, to_batch
from atkd_core.training.distributed import process_group
from atkd_core.training.loop import _micro_batch_loss, cleanup, setup
from tests.atkd_core.data.test_tokenizer import _tokenizer
from tests.atkd_core.training.test_training import inputs, make_job, quiet  # noqa: F401 (fixture)


def _examples(lengths: list[int], prompt: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 90, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def test_rows_hold_at_most_their_capacity_and_every_example_once():
    lengths = [30, 5, 17, 12, 30, 1, 9, 40, 3]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 or len(row) == 1 for row in rows)
    assert [i for row in rows if len(row) == 1 and lengths[row[0]] > 32 for i in row] == [7]
    assert len(rows) == 5  # first-fit of the longest first: 40 | 30+1 | 30 | 17+12+3 | 9+5
    assert pack_rows(lengths, 32) == rows


def test_the_row_length_leaves_the_least_padding_and_never_more_than_padding():
    uniform = [40, 38, 39, 41]
    # Examples longer than half the limit fill a row each: the rows are as long as the longest.
    assert row_capacity(uniform, 64) == 41
    long_tail = [120, 9, 14, 8, 11, 30, 12, 7]
    capacity = row_capacity(long_tail, 128)
    rows = pack_rows(long_tail, capacity)
    packed_tokens = len(rows) * max(sum(long_tail[i] for i in row) for row in rows)
    assert packed_tokens <= 2 * 128 < len(long_tail) * max(long_tail)
    assert row_capacity([200, 3], 128) == 200


def test_a_packed_batch_keeps_each_examples_positions_and_its_targets_count():
    examples = _examples([7, 12, 3, 9, 5])
    packed, placements = pack(examples, pad_token_id=0, capacity=16)
    padded = collate(examples, pad_token_id=0)
    for index, (example, place) in enumerate(zip(examples, placements, strict=True)):
        n = len(example["input_ids"])
        assert place.end - place.start == n
        assert packed["input_ids"][place.row, place.start : place.end].tolist() == example["input_ids"]
        assert packed["position_ids"][place.row, place.start : place.end].tolist() == list(range(n))
        # The first label is never a target: unpadded it has no position before it, packed it
        # would be predicted from the end of the previous example.
        assert packed["labels"][place.row, place.start] == IGNORE_INDEX
        assert packed["labels"][place.row, place.start + 1 : place.end].tolist() == example["labels"][1:]
        assert padded["labels"][index, 1:n].tolist() == example["labels"][1:]
    targets = lambda labels: int((shift_targets(labels) != IGNORE_INDEX).sum())  # noqa: E731
    assert targets(packed["labels"]) == targets(padded["labels"])
    assert packed["input_ids"].numel() < padded["input_ids"].numel()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_logits_equal_padded_ones_where_the_model_keeps_examples_apart(arch, kernel):
    """Per token, the model's logits of a packed batch equal those of the padded batch; the
    architectures whose attention ignores restarting positions are the ones the probe reports."""
    tokenizer = _tokenizer()
    model = build_model(ModelConfig(preset=f"{arch}-tiny", attn_implementation=kernel), tokenizer).eval()
    model.config._attn_implementation = kernel
    examples = _examples([7, 12, 3, 9, 5, 14])
    padded = to_batch(examples, [str(i) for i in range(6)], 0, torch.device("cpu"))
    packed = packed_batch(examples, [str(i) for i in range(6)], 0, torch.device("cpu"), 16)
    with torch.no_grad():
        padded_logits = model(**model_inputs(padded)).logits
        packed_logits = model(**model_inputs(packed)).logits
    difference = max(
        float((packed_logits[p.row, p.start : p.end] - padded_logits[i, : p.end - p.start]).abs().max())
        for i, p in enumerate(packed["placements"])
    )
    apart = keeps_packed_examples_apart(model, len(tokenizer))
    assert apart == (difference < 1e-5), (arch, kernel, difference)
    # Every built-in architecture but OPT separates packed examples (OPT's mask ignores positions).
    assert apart == (arch != "opt")


def _one_micro_batch(job, packed: bool):
    """Loss, cross-entropy, and the student's gradient on the first micro-batch of step 0."""
    job = dataclasses.replace(
        job,
        config=job.config.model_copy(
            update={
                "distill": job.config.distill.model_copy(
                    update={"training": job.config.distill.training.model_copy(update={"packing": packed})}
                )
            }
        ),
    )
    with process_group("cpu") as (rank, world_size):
        state = setup(job, rank, world_size, "cpu", quiet)
        assert (state.pack_capacity is not None) == packed
        indices = state.plan.micro_batches(state.plan.step_indices(0))[0]
        examples = [state.plan.train[i] for i in indices]
        ids = [e["id"] for e in examples]
        pad = state.tokenizer.pad_token_id
        # Rows of twice the data's max_length, so that every row holds several examples.
        batch = (
            packed_batch(examples, ids, pad, state.device, 96)
            if packed
            else to_batch(examples, ids, pad, state.device)
        )
        if packed:
            assert len(batch["placements"]) >= 2 * batch["input_ids"].shape[0]
        valid = int((shift_targets(batch["labels"]) != IGNORE_INDEX).sum())
        counts = StepCounts(tokens=float(valid), easy=float(valid), hard=float(valid))
        out = _micro_batch_loss(state, state.objective, batch, counts)
        state.engine.module.zero_grad()
        out.loss.backward()
        grads = {
            name: p.grad.detach().clone()
            for name, p in state.engine.module.named_parameters()
            if p.grad is not None
        }
        rows = batch["input_ids"].shape
        cleanup(state)
    return float(out.loss.detach()), out.cross_entropy, grads, valid, rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "teacher_source"),
    [
        ({"objective": "sft"}, "offline"),
        ({"objective": "kd"}, "offline"),
        ({"objective": "atkd"}, "offline"),
        ({"objective": "atkd", "split_scope": "threshold", "unc_threshold": 0.9}, "offline"),
        ({"objective": "kd", "fused_linear": False}, "online"),
        ({"objective": "atkd"}, "online"),
    ],
)
def test_a_packed_micro_batch_has_the_padded_ones_loss_and_gradient(inputs, tmp_path, loss, teacher_source):  # noqa: F811
    job = make_job(inputs, tmp_path, loss=loss, teacher_source=teacher_source)
    loss_packed, ce_packed, grads_packed, tokens_packed, shape_packed = _one_micro_batch(job, packed=True)
    loss_padded, ce_padded, grads_padded, tokens_padded, shape_padded = _one_micro_batch(job, packed=False)
    assert tokens_packed == tokens_padded
    assert shape_packed.numel() <= shape_padded.numel()
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    assert ce_packed == pytest.approx(ce_padded, rel=1e-5)
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_per_sequence_split_is_trained_on_padded_rows(inputs, tmp_path):  # noqa: F811
    job = make_job(inputs, tmp_path, loss={"split_scope": "sequence"})
    assert job.pack_capacity is None
    assert make_job(inputs, tmp_path).pack_capacity == job.config.data.max_length
    assert make_job(inputs, tmp_path, stage="finetune", loss={"split_scope": "sequence"}).pack_capacity


@pytest.mark.slow
def test_packed_and_padded_training_log_the_same_losses(inputs, tmp_path):  # noqa: F811
    from atkd_core.training.main import run_training
    from tests.atkd_core.training.test_training import losses

    runs = {}
    for packed in (True, False):
        job = make_job(
            inputs, tmp_path, training={"packing": packed, "micro_batch_size": 4}, name=f"p{packed}"
        )
        run_training(job, lambda m, s: None, quiet)
        runs[packed] = losses(job)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-7)
