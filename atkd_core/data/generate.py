"""Stage ``generate_teacher_data`` (SeqKD): the teacher's own responses become the training targets.

The teacher answers every training prompt (greedy, or sampled at ``distill.generation_temperature``);
the result is a prepared-data directory like prepare_data's, with the same tokenizer and the same
validation / test splits, and train responses replaced by the teacher's. KD or ATKD then trains on
it as on ground truth (offline from a cache scored on it, or online).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atkd_core.config import FieldMap, PipelineConfig
from atkd_core.data.encoding import format_prompt
from atkd_core.data.prepare import tokenize_splits
from atkd_core.data.records import read_located_rows
from atkd_core.data.suite import SPLITS
from atkd_core.data.tokenizer import load_tokenizer
from atkd_core.manifest import content_identity, fingerprint, require_manifest, run_stage
from atkd_core.models.build import load_model
from atkd_core.outputs import PreparedManifest
from atkd_core.progress import Progress


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[str]:
    """The model's responses to ``prompts`` (left-padded batches; greedy when temperature is 0)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    responses: list[str] = []
    progress = Progress(len(prompts), log, "generate_teacher_data")
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            # As in training, the prompt's trailing newline belongs to the answer, so the model writes it.
            [p.rstrip() for p in prompts[start : start + batch_size]],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        # Causal LM classes get generate() from GenerationMixin, which PreTrainedModel does not inherit.
        output = model.generate(  # type: ignore[operator]
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        # The separator newline the model writes first, and anything after EOS, are not the answer.
        responses.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens)
        progress.update(len(new_tokens), int(new_tokens.ne(tokenizer.pad_token_id).sum()))
    progress.close()
    tokenizer.padding_side = "right"
    return responses


def generation_fingerprint(config: PipelineConfig, prepared_dir: Path, teacher_dir: Path) -> str:
    """What the teacher's responses depend on: the prompts, the teacher and the sampling settings."""
    distill = config.distill
    return fingerprint(
        {
            "prepared": content_identity(prepared_dir),
            "teacher": content_identity(teacher_dir),
            "max_new_tokens": distill.generation_max_new_tokens,
            "temperature": distill.generation_temperature,
            "seed": distill.training.seed,
        }
    )


def generate_teacher_data(
    config: PipelineConfig,
    prepared_dir: Path,
    teacher_dir: Path,
    output_dir: Path,
    *,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[PreparedManifest, bool]:
    """Write the SeqKD training data into ``output_dir``; return (manifest, reused)."""
    teacher_dir = Path(teacher_dir)
    source = require_manifest(prepared_dir, "prepare_data", PreparedManifest)
    distill = config.distill
    identity = generation_fingerprint(config, prepared_dir, teacher_dir)

    def build(staging: Path) -> dict[str, Any]:
        tokenizer = load_tokenizer(prepared_dir / "tokenizer")
        model = load_model(teacher_dir, device=device).eval()
        rows = {
            split: read_located_rows(prepared_dir / "raw" / f"{split}.jsonl", FieldMap())[0]
            for split in SPLITS
        }
        prompts = [format_prompt(config.data, r["instruction"], r["context"]) for _, r in rows["train"]]
        responses = generate_responses(
            model,
            tokenizer,
            prompts,
            max_new_tokens=distill.generation_max_new_tokens,
            temperature=distill.generation_temperature,
            batch_size=config.scoring.batch_size,
            seed=distill.training.seed,
            log=log,
        )
        rows["train"] = [
            (where, {**row, "response": response})
            for (where, row), response in zip(rows["train"], responses, strict=True)
        ]
        empty = sum(not r["response"] for _, r in rows["train"])
        shutil.copytree(prepared_dir / "tokenizer", staging / "tokenizer")
        (staging / "raw").mkdir()
        for split, split_rows in rows.items():
            (staging / "raw" / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for _, r in split_rows)
            )
        counts, _ = tokenize_splits(config, rows, tokenizer, staging, log)
        return {
            "vocab_size": source.vocab_size,
            "tokenizer_sha256": source.tokenizer_sha256,
            "source": "teacher_generated",
            "teacher": str(teacher_dir),
            "counts": counts,
            "empty_responses": empty,
        }

    return run_stage(
        output_dir, PreparedManifest, stage="generate_teacher_data", input_fingerprint=identity, build=build
    )
