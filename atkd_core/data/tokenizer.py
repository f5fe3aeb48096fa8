"""A byte-level BPE tokenizer trained locally on the data, saved in Hugging Face format."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|padding|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; digits are split one by one so arithmetic stays learnable.

    Pad, EOS and BOS are distinct special tokens of the trained vocabulary.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def pad_vocabulary(tokenizer: PreTrainedTokenizerBase, size: int) -> PreTrainedTokenizerBase:
    """Add unused tokens (``<|unused_N|>``, never in the data) until the vocabulary has ``size``
    entries: the logits and output layer then have a real vocabulary's shape."""
    tokenizer.add_tokens([f"<|unused_{index}|>" for index in range(len(tokenizer), size)])
    return tokenizer


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory or hub id, with a pad token: its own, else ``<unk>``, else EOS.

    Families such as Llama, Mistral and GPT-2 ship no pad token and no spare embedding rows. The
    pipeline never needs a new token to pad: wherever it pads, the attention mask hides the padding
    and the labels carry IGNORE_INDEX there (the EOS a response ends with is a label of its own), so
    borrowing an existing token leaves the model's vocabulary, and its weights, untouched.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; the pipeline needs one to end responses")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def padding_note(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A line saying which existing token pads, when the tokenizer borrows one (see load_tokenizer)."""
    if tokenizer.pad_token not in (tokenizer.unk_token, tokenizer.eos_token):
        return None
    return (
        f"padding with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), an existing token: the "
        "tokenizer has no pad token of its own; padding is masked out of attention and loss, and the "
        "model needs no new row"
    )
