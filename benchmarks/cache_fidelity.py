"""How far each cache encoding moves the loss and its gradient from the float32 cache, on real data.

Scores a pipeline's fine-tuned teacher over its prepared training split (the workdir of ``make
demo`` by default) at ``--top-k``, stores the record in every encoding, decodes it, and for each
student in the workdir (the one distillation starts from and the distilled one) compares, against
the float32 record:

- the loss over all the scored tokens (relative error),
- its gradient with respect to the student's logits (relative error of the whole vector),
- the worst single token (absolute error of its per-token forward KL, beside the mean value),
- for ATKD, whether any token changed group (UNC is stored exactly in every encoding).

    .venv/bin/python benchmarks/cache_fidelity.py                       # runs/demo, K = 64
    .venv/bin/python benchmarks/cache_fidelity.py --workdir runs/demo --top-k 32 --examples 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_from_disk
from torch import Tensor

from atkd_core.data.batching import collate, next_token_logits, shift_targets
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.losses import SparseTeacher, atkd_loss, divergence_loss, divergence_per_token
from atkd_core.models.build import load_model
from atkd_core.scoring import TopKCodec, score_batch

# (name shown, encoding, storage dtype, log-prob bits); the first is the reference.
ENCODINGS = (
    ("float, float32", "float", "float32", 8),
    ("float, bfloat16", "float", "bfloat16", 8),
    ("compact, 16-bit", "compact", "float32", 16),
    ("compact, 8-bit", "compact", "float32", 8),
    ("compact, 6-bit", "compact", "float32", 6),
    ("compact, 4-bit", "compact", "float32", 4),
)
OBJECTIVES = ("forward_kl", "reverse_kl", "generalized_jsd", "tvd", "atkd k=0.5")


def objective_loss(
    name: str, logits: Tensor, teacher: SparseTeacher, targets: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The mean loss of objective ``name`` over the valid tokens, and ATKD's hard mask (else None)."""
    if name.startswith("atkd"):
        output = atkd_loss(logits, teacher, targets, hard_fraction=0.5)
        return output.loss, output.hard_mask
    return divergence_loss(name, logits, teacher, targets), None


def encoded_teacher(record: dict[str, Tensor], codec: TopKCodec, targets: Tensor) -> SparseTeacher:
    """The SparseTeacher [B, T] a cache in ``codec`` would hand out for ``record`` (score_batch's)."""
    encoded = codec.encode(record["topk_ids"], record["topk_logprobs"], record["entropy"])
    ids, logprobs = codec.decode(encoded, 0, len(record["targets"]))
    valid = targets != -100
    shape = (*targets.shape, codec.top_k)
    full_ids = torch.zeros(shape, dtype=torch.int32)
    full_logprobs = torch.zeros(shape)
    full_ids[valid], full_logprobs[valid] = ids, logprobs
    scalars = {}
    for name in ("target_logprob", "unc", "log_tail_mass"):
        scalars[name] = torch.zeros(targets.shape)
        scalars[name][valid] = record[name]
    return SparseTeacher(
        scalars["target_logprob"], full_ids, full_logprobs, scalars["log_tail_mass"], scalars["unc"]
    )


def main() -> None:
    """Score, encode, compare; print one table per student."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="a finished pipeline workdir")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--examples", type=int, default=1024, help="training examples compared")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    prepared = args.workdir / "prepared"
    tokenizer = load_tokenizer(prepared / "tokenizer")
    vocab = len(tokenizer)
    train = load_from_disk(str(prepared / "dataset"))["train"]
    train = train.select(range(min(args.examples, len(train))))
    teacher = load_model(args.workdir / "models" / "teacher").eval()
    batches = []
    with torch.no_grad():
        for start in range(0, len(train), args.batch_size):
            batch = collate(
                list(train.select(range(start, min(start + args.batch_size, len(train))))),
                tokenizer.pad_token_id,
            )
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            record = score_batch(logits, batch["labels"], vocab, args.top_k, 1.0)
            batches.append((batch, shift_targets(batch["labels"]), record))
    tokens = sum(len(record["targets"]) for _, _, record in batches)
    print(
        f"{args.workdir}: {len(train)} training examples, {tokens:,} scored tokens, V = {vocab}, K = {args.top_k}"
    )

    for student_name in ("student-init", "student"):
        student = load_model(args.workdir / "models" / student_name).eval()
        with torch.no_grad():
            student_logits = [
                next_token_logits(
                    student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                    vocab,
                )
                for batch, _, _ in batches
            ]
        results: dict[str, dict[str, tuple[float, Tensor, Tensor]]] = {}
        per_token: dict[str, Tensor] = {}
        for name, encoding, dtype, bits in ENCODINGS:
            codec = TopKCodec(encoding, args.top_k, vocab, dtype, bits)  # type: ignore[arg-type]
            teachers = [encoded_teacher(record, codec, targets) for _, targets, record in batches]
            results[name] = {}
            for objective in OBJECTIVES:
                total, gradients, masks = 0.0, [], []
                for logits, sparse, (_, targets, _) in zip(student_logits, teachers, batches, strict=True):
                    leaf = logits.clone().requires_grad_(True)
                    loss, hard = objective_loss(objective, leaf, sparse, targets)
                    loss.backward()
                    weight = int((targets != -100).sum())
                    total += loss.item() * weight
                    gradients.append(leaf.grad.flatten() * weight)
                    masks.append(hard.flatten() if hard is not None else torch.zeros(0, dtype=torch.bool))
                results[name][objective] = (total / tokens, torch.cat(gradients), torch.cat(masks))
            per_token[name] = torch.cat(
                [
                    divergence_per_token("forward_kl", logits, sparse, targets)[targets != -100]
                    for logits, sparse, (_, targets, _) in zip(student_logits, teachers, batches, strict=True)
                ]
            )
        reference, ref_per_token = results[ENCODINGS[0][0]], per_token[ENCODINGS[0][0]]
        print()
        print(f"student {student_name}: against the float32 record")
        print(
            "| encoding | objective | loss | loss rel. error | gradient rel. error | worst token (forward KL) | tokens changing ATKD group |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, _, _, _ in ENCODINGS[1:]:
            worst = (per_token[name] - ref_per_token).abs().max().item()
            for objective in OBJECTIVES:
                loss, gradient, mask = results[name][objective]
                ref_loss, ref_gradient, ref_mask = reference[objective]
                changed = int((mask != ref_mask).sum()) if objective.startswith("atkd") else "-"
                print(
                    f"| {name} | {objective} | {loss:.5f} | {abs(loss - ref_loss) / abs(ref_loss):.2e} | "
                    f"{(gradient - ref_gradient).norm().item() / ref_gradient.norm().item():.2e} | "
                    f"{worst:.2e} (mean {ref_per_token.mean().item():.3f}) | {changed} |"
                )


if __name__ == "__main__":
    main()
