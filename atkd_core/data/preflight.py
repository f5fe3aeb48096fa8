"""Tokenizer preflight: each model must read token ids the way the tokenizer it is given does: the
pipeline's (the student's, and the teacher's unless it has its own: teacher.tokenizer)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedTokenizerBase

from atkd_core.config import ModelConfig
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.errors import TokenizerMismatch


def _choice(name: str) -> str:
    """What a user can do when ``name``'s saved tokenizer is not the one it was given."""
    if name == "teacher":
        return (
            "distil across tokenizers by giving the teacher its own (teacher.tokenizer: {source: teacher}), "
            "or give both models one tokenizer"
        )
    return "make the pipeline's tokenizer the student's own (tokenizer: {source: path, path: <the student>})"


def compare_vocabularies(
    reference: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, name: str
) -> None:
    """Raise TokenizerMismatch naming the first ids whose tokens differ on the shared id range."""
    reference_tokens = reference.convert_ids_to_tokens(list(range(len(reference))))
    other_tokens = other.convert_ids_to_tokens(list(range(min(len(other), len(reference)))))
    if len(other) < len(reference):
        raise TokenizerMismatch(
            f"{name}: its tokenizer has {len(other)} tokens, the pipeline's {len(reference)}; ids "
            f"{len(other)}.. would have no meaning to it; {_choice(name)}"
        )
    mismatches = [
        (i, a, b) for i, (a, b) in enumerate(zip(reference_tokens, other_tokens, strict=False)) if a != b
    ]
    if mismatches:
        shown = ", ".join(f"id {i}: {a!r} vs {b!r}" for i, a, b in mismatches[:5])
        raise TokenizerMismatch(
            f"{name}: its tokenizer differs from the pipeline's at {len(mismatches)} ids (first: {shown}); "
            f"{_choice(name)}"
        )


def preflight(tokenizer: PreTrainedTokenizerBase, models: dict[str, ModelConfig]) -> list[str]:
    """Check every model given by path against ``tokenizer``; return one line per model checked.

    A model may have more output rows than the tokenizer has tokens (vocabularies padded for speed,
    as in Pythia or Qwen): logits are sliced to the tokenizer's size. Fewer rows is an error.
    """
    checked = []
    for name, spec in models.items():
        if spec.path is None:
            checked.append(f"{name}: preset {spec.preset}, built with the pipeline's tokenizer")
            continue
        compare_vocabularies(
            tokenizer, load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code), name
        )
        model_vocab = AutoConfig.from_pretrained(
            spec.path, trust_remote_code=spec.trust_remote_code
        ).vocab_size
        if model_vocab < len(tokenizer):
            added = len(tokenizer) - tokenizer.vocab_size
            cause = (
                f"the tokenizer's {added} added tokens (beyond its base {tokenizer.vocab_size}) have no row "
                "in the model"
                if added > 0 and model_vocab >= tokenizer.vocab_size
                else "the model was saved with a smaller vocabulary than this tokenizer"
            )
            raise TokenizerMismatch(
                f"{name}: the model has {model_vocab} output rows but the tokenizer {len(tokenizer)} tokens: "
                f"{cause}; use the tokenizer the model was saved with (tokenizer.source: teacher or path), "
                "or resize the model's embeddings to the tokenizer (resize_token_embeddings) and save it"
            )
        padded = f" (model pads to {model_vocab}; logits are sliced)" if model_vocab > len(tokenizer) else ""
        checked.append(f"{name}: {spec.path} shares the tokenizer's {len(tokenizer)} tokens{padded}")
    return checked
