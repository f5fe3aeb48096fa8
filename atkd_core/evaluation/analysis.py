"""The measurement the paper's analysis is about: student vs teacher on easy and hard tokens.

On the validation split, tokens are split by the teacher's UNC (the ``hard_fraction`` with the
highest UNC are hard); per group the student's forward KL to the teacher and top-1 agreement.
Also each model's per-token negative log-likelihood and perplexity of the reference responses
(EOS included), pooled over the split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk

from atkd_core.data.batching import IGNORE_INDEX, collate, next_token_logits, shift_targets
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.losses import divergence_per_token, teacher_uncertainty
from atkd_core.losses.uncertainty import dataset_threshold
from atkd_core.models.build import load_model


@torch.no_grad()
def easy_hard_agreement(
    student_dir: Path,
    teacher_dir: Path,
    prepared_dir: Path,
    hard_fraction: float | str,
    *,
    unc_epsilon: float | None = None,
    batch_size: int = 16,
    max_examples: int = 512,
) -> dict[str, Any]:
    """{easy|hard: {tokens, forward_kl, top1_agreement, teacher_unc}} and the UNC threshold used."""
    tokenizer = load_tokenizer(prepared_dir / "tokenizer")
    validation = load_from_disk(str(prepared_dir / "dataset"))["validation"]
    rows = validation.select(range(min(len(validation), max_examples)))
    student, teacher = load_model(student_dir).eval(), load_model(teacher_dir).eval()
    vocab = len(tokenizer)
    kls, agreements, uncs = [], [], []
    nll = {"student": 0.0, "teacher": 0.0}
    for start in range(0, len(rows), batch_size):
        batch = collate(
            list(rows.select(range(start, min(start + batch_size, len(rows))))), tokenizer.pad_token_id
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits = next_token_logits(student(**inputs).logits, vocab)
        teacher_logits = next_token_logits(teacher(**inputs).logits, vocab)
        targets = shift_targets(batch["labels"])
        valid = targets != IGNORE_INDEX
        for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
            nll[name] += float(
                torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, vocab),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
        kls.append(divergence_per_token("forward_kl", student_logits, teacher_logits, targets)[valid])
        agreements.append((student_logits.argmax(-1) == teacher_logits.argmax(-1))[valid].float())
        uncs.append(teacher_uncertainty(teacher_logits, targets)[valid])
    kl, agreement, unc = torch.cat(kls), torch.cat(agreements), torch.cat(uncs)
    threshold = dataset_threshold(unc, hard_fraction, unc_epsilon)
    hard = unc >= threshold
    report: dict[str, Any] = {"unc_threshold": threshold, "hard_fraction": hard_fraction}
    for name, total in nll.items():
        per_token = total / max(unc.numel(), 1)
        report[f"{name}_validation_nll"] = per_token
        report[f"{name}_validation_perplexity"] = math.exp(per_token)
    for name, mask in (("easy", ~hard), ("hard", hard)):
        count = int(mask.sum())
        report[name] = {
            "tokens": count,
            "forward_kl": float(kl[mask].mean()) if count else float("nan"),
            "top1_agreement": float(agreement[mask].mean()) if count else float("nan"),
            "teacher_unc": float(unc[mask].mean()) if count else float("nan"),
        }
    return report
