"""The causal-LM families users bring: saved random-init models with the tokenizers they ship.

Llama-, Mistral- and GPT-2-style tokenizers have no pad token, and their models no spare row for
one. Each pair below runs the whole pipeline (no Prefect, no MLflow): prepare with the teacher's
tokenizer, fine-tune, score, distil, evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from atkd_core.data.preflight import TokenizerMismatch
from atkd_core.pipeline import LocalStages, pipeline_outputs
from infra.launcher import launch_training
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

TEXTS = [f"Instruction: add {a} and {b}. Response: {a + b}" for a in range(40) for b in range(5)]


def _tokenizer(directory: Path, specials: dict[str, str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE saved with only ``specials`` (role -> token), like the family it mimics."""
    model = Tokenizer(models.BPE(unk_token=specials.get("unk_token")))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(dict.fromkeys(specials.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(TEXTS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, **specials)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _save(config, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


def _llama_pair(root: Path) -> tuple[Path, Path, str]:
    """Llama teacher (GQA, untied) and Mistral student (GQA, tied): <unk>, <s>, </s>, no pad."""
    tokenizer = _tokenizer(root / "tok", {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    vocab = len(tokenizer)
    teacher = LlamaConfig(
        vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **SMALL
    )
    student = MistralConfig(
        vocab_size=vocab, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, **SMALL
    )
    return _save(teacher, tokenizer, root / "teacher"), _save(student, tokenizer, root / "student"), "<unk>"


def _gpt2_pair(root: Path) -> tuple[Path, Path, str]:
    """GPT-2 teacher (tied, exactly the tokenizer's rows) and Qwen2 student (GQA, vocabulary padded
    by 64 rows): one special token, <|endoftext|>, as BOS and EOS; no pad, no unk."""
    end = "<|endoftext|>"
    tokenizer = _tokenizer(root / "tok", {"bos_token": end, "eos_token": end})
    vocab = len(tokenizer)
    teacher = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    student = Qwen2Config(
        vocab_size=vocab + 64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **SMALL
    )
    return _save(teacher, tokenizer, root / "teacher"), _save(student, tokenizer, root / "student"), end


@pytest.mark.parametrize("pair", [_llama_pair, _gpt2_pair], ids=["llama-mistral", "gpt2-qwen2"])
def test_a_family_without_a_pad_token_runs_end_to_end(tmp_path, pair):
    teacher, student, pad = pair(tmp_path / "models")
    config = tiny_config(
        tmp_path / "work",
        tokenizer={"source": "teacher"},
        teacher={"path": str(teacher)},
        student={"path": str(student)},
        finetune={"training": {"max_steps": 3, "batch_size": 8}},
        distill={"training": {"max_steps": 3, "batch_size": 8}},
        eval={"limit": 2, "max_new_tokens": 4},
    )
    lines: list[str] = []
    stages = LocalStages(config, train=lambda job: launch_training(job, lambda m, s: None), log=lines.append)
    outputs = pipeline_outputs(config, stages)

    prepared = Path(outputs["prepare_data"])
    saved = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    # Borrowed, not added: the tokenizer keeps its size and the models their vocabularies.
    assert saved.pad_token == pad and len(saved) == len(AutoTokenizer.from_pretrained(teacher))
    assert any(f"padding with {pad!r}" in line for line in lines), lines
    student_out = AutoModelForCausalLM.from_pretrained(outputs["distill_student"])
    original = AutoModelForCausalLM.from_pretrained(student)
    assert student_out.config.vocab_size == original.config.vocab_size
    distill_log = json.loads((Path(outputs["distill_student"]) / "manifest.json").read_text())
    assert distill_log["steps"] == 3
    assert (Path(outputs["evaluate"]) / "summary.md").is_file()


def test_a_model_smaller_than_its_tokenizer_says_what_to_change(tmp_path):
    teacher, _, _ = _llama_pair(tmp_path / "models")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # a pad row the saved model does not have
    tokenizer.save_pretrained(teacher)
    config = tiny_config(
        tmp_path / "work",
        tokenizer={"source": "teacher"},
        teacher={"path": str(teacher)},
        student={"path": str(teacher)},
    )
    stages = LocalStages(
        config, train=lambda job: launch_training(job, lambda m, s: None), log=lambda _: None
    )
    with pytest.raises(
        TokenizerMismatch, match=r"added tokens.*no row in the model.*resize_token_embeddings"
    ):
        stages.prepare_data()


def test_a_llama_teacher_teaches_a_qwen_student_across_tokenizers(tmp_path):
    """Two families, two tokenizers: the teacher's <s>/</s>/<unk> BPE and the student's
    <|endoftext|> BPE of another size, neither with a pad token. The student reads its own tokenizer
    (tokenizer.source: path), the teacher its own (teacher.tokenizer.source: teacher); ATKD runs
    over the aligned spans, from the cache."""
    llama_teacher, _, _ = _llama_pair(tmp_path / "llama")
    _, qwen_student, _ = _gpt2_pair(tmp_path / "gpt2")
    config = tiny_config(
        tmp_path / "work",
        tokenizer={"source": "path", "path": str(qwen_student)},
        teacher={"path": str(llama_teacher), "tokenizer": {"source": "teacher"}},
        student={"path": str(qwen_student)},
        scoring={"top_k": 8},
        finetune={"training": {"max_steps": 2, "batch_size": 8}},
        distill={"training": {"max_steps": 3, "batch_size": 8}},
        eval={"limit": 2, "max_new_tokens": 4},
    )
    lines: list[str] = []
    stages = LocalStages(config, train=lambda job: launch_training(job, lambda m, s: None), log=lines.append)
    outputs = pipeline_outputs(config, stages)
    prepared = Path(outputs["prepare_data"])
    assert AutoTokenizer.from_pretrained(prepared / "teacher" / "tokenizer").eos_token == "</s>"
    assert AutoTokenizer.from_pretrained(prepared / "tokenizer").eos_token == "<|endoftext|>"
    assert any("of the student's in spans of one token each side" in line for line in lines), lines
    distilled = json.loads((Path(outputs["distill_student"]) / "manifest.json").read_text())
    assert distilled["steps"] == 3
    assert AutoModelForCausalLM.from_pretrained(outputs["distill_student"]).config.model_type == "qwen2"
