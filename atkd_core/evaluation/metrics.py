"""Per-document metrics the generated lm-eval tasks call (``process_results: !function utils.generation``).

ROUGE-L comes from the ``rouge-score`` package (as the KD papers report it), exact match compares
the stripped strings.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure (0..100) of a prediction against one reference."""
    return 100.0 * _scorer().score(reference, prediction)["rougeL"].fmeasure if reference.strip() else 0.0


def generation_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for generate_until tasks: exact_match and rougeL of the greedy output."""
    prediction = results[0].strip()
    reference = str(doc["response"]).strip()
    return {"exact_match": float(prediction == reference), "rougeL": rouge_l(reference, prediction)}


def loglikelihood_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """lm-eval ``process_results`` for the log-likelihood task: per-token perplexity and greedy match.

    ``token_perplexity`` is aggregated by the harness's ``weighted_perplexity``:
    exp(-sum(log-likelihood) / sum(scored tokens)) over the split.
    """
    loglikelihood, is_greedy = results[0]
    return {"token_perplexity": (loglikelihood, int(doc["scored_tokens"])), "acc": float(is_greedy)}
