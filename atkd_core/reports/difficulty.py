"""Token difficulty of a teacher: its UNC histogram, easy/hard shares, UNC by task family, and the
KL terms (TKD, DKD, (1-p_g)·DKD) of a student against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk

from atkd_core.losses.uncertainty import UncStatistics, epsilon_threshold, otsu_threshold
from atkd_core.reports.figures import plot_token_difficulty
from atkd_core.scoring import TeacherCache


def token_difficulty_report(
    cache: TeacherCache,
    prepared_dir: Path,
    hard_fraction: float | str,
    output_dir: Path,
    unc_epsilon: float | None = None,
) -> dict[str, Any]:
    """Write ``unc_histogram.png`` and ``difficulty.json`` into ``output_dir``; return the JSON's content.

    Easy/hard shares use the dataset-wide threshold: the UNC quantile at 1 - hard_fraction, or for
    ``auto`` Otsu's threshold on the UNC histogram, for ``epsilon`` ``unc_epsilon`` (what distillation
    then splits at). The UNC of
    the training tokens is counted example by example (losses.UncStatistics), in memory that does
    not grow with the cache: quantiles and shares are exact to 1 / QUANTILE_BINS of UNC.
    """
    train = load_from_disk(str(prepared_dir / "dataset"))["train"]
    overall = UncStatistics()
    by_family: dict[str, UncStatistics] = {}
    for category, unc in zip(train["category"], cache.fields(train["id"], "unc"), strict=True):
        overall.add(unc)
        by_family.setdefault(category or "(none)", UncStatistics()).add(unc)
    threshold = statistics_threshold(overall, hard_fraction, unc_epsilon)
    families = {
        family: {
            "tokens": statistics.tokens,
            "unc_mean": statistics.mean(),
            "hard_share": statistics.share_at_or_above(threshold),
        }
        for family, statistics in sorted(by_family.items())
    }
    hard_share = overall.share_at_or_above(threshold)
    report = {
        "tokens": overall.tokens,
        "hard_fraction": hard_fraction,
        "unc_threshold": threshold,
        "hard_share": hard_share,
        "easy_share": 1 - hard_share if overall.tokens else float("nan"),
        "families": families,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "difficulty.json").write_text(json.dumps(report, indent=2) + "\n")

    centres, counts = overall.fine_histogram()
    plot_token_difficulty(
        centres.numpy(),
        counts.numpy(),
        threshold,
        hard_fraction,
        hard_share,
        {family: values["unc_mean"] for family, values in families.items()},
        output_dir / "unc_histogram.png",
    )
    return report


def statistics_threshold(
    statistics: UncStatistics, hard_fraction: float | str, unc_epsilon: float | None = None
) -> float:
    """losses.dataset_threshold from accumulated statistics: the UNC quantile at 1 - k for a
    numeric k, Otsu's threshold on the UNC histogram for ``auto``, ``unc_epsilon`` for
    ``epsilon``; NaN when there are no tokens."""
    if not statistics.tokens:
        return float("nan")
    if hard_fraction == "epsilon":
        return epsilon_threshold(unc_epsilon)
    if hard_fraction == "auto":
        return otsu_threshold(statistics.histogram)[0]
    return statistics.quantile(1 - float(hard_fraction))


def cache_unc(cache: TeacherCache, prepared_dir: Path) -> torch.Tensor:
    """Every training token's teacher UNC from a cache, in dataset order. [num_tokens] float64."""
    train = load_from_disk(str(prepared_dir / "dataset"))["train"]
    return torch.cat(list(cache.fields(train["id"], "unc"))).double()


@torch.no_grad()
def kl_decomposition_magnitudes(
    cache: TeacherCache, prepared_dir: Path, student_dir: Path, max_examples: int = 256, batch_size: int = 32
) -> dict[str, float]:
    """Mean per-token forward KL terms of ``student_dir`` against the cached teacher on the first
    ``max_examples`` training examples: TKD, DKD, the UNC-weighted (1 - p_g)·DKD that KD actually
    optimises, and that term's share of the KL. With the same student for every teacher this shows
    how much of the KD signal each teacher's diversity term carries."""
    from atkd_core.data.batching import collate, next_token_logits, shift_targets
    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.losses import decompose_kl
    from atkd_core.models.build import load_model

    tokenizer = load_tokenizer(prepared_dir / "tokenizer")
    model = load_model(student_dir).eval()
    train = load_from_disk(str(prepared_dir / "dataset"))["train"]
    rows = train.select(range(min(max_examples, len(train))))
    totals = {"tkd": 0.0, "dkd": 0.0, "weighted_dkd": 0.0, "kl": 0.0}
    tokens = 0
    for start in range(0, len(rows), batch_size):
        examples = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = collate(examples, tokenizer.pad_token_id)
        logits = next_token_logits(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, len(tokenizer)
        )
        targets = shift_targets(batch["labels"])
        teacher = cache.sparse_teacher([e["id"] for e in examples], targets)
        parts = decompose_kl(logits, teacher, targets)
        valid = targets != -100
        weighted = parts.rest_mass * parts.dkd
        totals["tkd"] += float(parts.tkd[valid].sum())
        totals["dkd"] += float(parts.dkd[valid].sum())
        totals["weighted_dkd"] += float(weighted[valid].sum())
        totals["kl"] += float((parts.tkd + weighted)[valid].sum())
        tokens += int(valid.sum())
    means = {name: value / max(tokens, 1) for name, value in totals.items()}
    means["weighted_dkd_share"] = means["weighted_dkd"] / means["kl"] if means["kl"] > 0 else float("nan")
    return means
