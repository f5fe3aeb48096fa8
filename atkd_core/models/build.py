"""Build preset models and load / save any causal LM with ``from_pretrained`` / ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atkd_core.config import ModelConfig
from atkd_core.errors import ConfigError, UserError, faults_named
from atkd_core.models.presets import PRESETS, ArchSize


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of preset ``name`` with the tokenizer's vocabulary and special ids."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
    arch, dims = PRESETS[name]
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return _ARCH_CONFIGS[arch](dims, special)


def _neox(dims: ArchSize, special: dict) -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        intermediate_size=4 * dims.hidden,
        max_position_embeddings=dims.max_positions,
        use_parallel_residual=True,
        **special,
    )


def _opt(dims: ArchSize, special: dict) -> PretrainedConfig:
    # OPT ties its output embedding by design; keep it that way.
    special = {**special, "tie_word_embeddings": True}
    return OPTConfig(
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        ffn_dim=4 * dims.hidden,
        word_embed_proj_dim=dims.hidden,
        max_position_embeddings=dims.max_positions,
        do_layer_norm_before=True,
        **special,
    )


def _llama(dims: ArchSize, special: dict) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        intermediate_size=int(8 / 3 * dims.hidden) // 16 * 16,
        max_position_embeddings=dims.max_positions,
        **special,
    )


_ARCH_CONFIGS = {"neox": _neox, "opt": _opt, "llama": _llama}


def build_model(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A causal LM from ``spec``: a preset built with seeded random init, or ``from_pretrained``."""
    if spec.path is not None:
        return load_model(spec.path, trust_remote_code=spec.trust_remote_code)
    if spec.preset is None:  # validated at load; a config changed in code can still lack both
        raise ConfigError("model: exactly one of preset and path must be set")
    config = preset_config(spec.preset, tokenizer)
    # Seed a private generator state so building a model never shifts the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return AutoModelForCausalLM.from_config(config)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
) -> PreTrainedModel:
    """Load a causal LM from a hub id or a local ``save_pretrained`` directory (fp32) onto ``device``;
    ``attn_implementation`` other than auto picks the attention kernel (ConfigError where the model
    or this machine cannot run it)."""
    kernel = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, dtype=torch.float32, **kernel
        )
    except (ImportError, ValueError) as exc:
        if not kernel:
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"attn_implementation: {attn_implementation!r} cannot run {path} on this machine ({first_line[:200]}); "
            "use auto, sdpa or eager"
        ) from None
    # transformers types PreTrainedModel.to through a decorator mypy reads as an unbound function.
    return model.to(device)  # type: ignore[arg-type]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save model (safetensors) and tokenizer in Hugging Face format."""
    directory.mkdir(parents=True, exist_ok=True)
    with faults_named(directory):
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def init_fingerprint(spec: ModelConfig, tokenizer_dir: Path) -> str:
    """What a preset's initialisation depends on: the preset, its seed and the tokenizer's files."""
    from atkd_core.manifest import fingerprint, sha256_tree

    return fingerprint(
        {"preset": spec.preset, "init_seed": spec.init_seed, "tokenizer": sha256_tree(tokenizer_dir)}
    )


def materialize_model(spec: ModelConfig, tokenizer_dir: Path, directory: Path) -> str:
    """Where the model lives as a ``save_pretrained`` directory or hub id.

    A model given by path is used as it is; a preset is built (seeded random init) with the
    pipeline's tokenizer and saved to ``directory`` once (reused while preset, seed and tokenizer match).
    """
    if spec.path is not None:
        return spec.path
    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.manifest import run_stage
    from atkd_core.outputs import ModelInitManifest

    identity = init_fingerprint(spec, tokenizer_dir)

    def build(staging: Path) -> dict:
        tokenizer = load_tokenizer(tokenizer_dir)
        model = build_model(spec, tokenizer)
        save_model(model, tokenizer, staging)
        return {"preset": spec.preset, "init_seed": spec.init_seed, "parameters": count_parameters(model)}

    run_stage(
        directory, ModelInitManifest, stage="materialize_model", input_fingerprint=identity, build=build
    )
    return str(directory)


def check_model_paths(models: dict[str, ModelConfig]) -> None:
    """Before a run: every model given by ``path`` (role -> spec, e.g. "teacher") is a local
    directory or a hub id (downloaded when a stage loads it; with HF_HUB_OFFLINE set, it must
    already be in the local Hugging Face cache); UserError naming the field and what to do otherwise."""
    from huggingface_hub import try_to_load_from_cache

    from atkd_core.hub import hub_offline, looks_like_hub_id

    for role, spec in models.items():
        if spec.path is None or Path(spec.path).expanduser().is_dir():
            continue
        if not looks_like_hub_id(spec.path):
            raise UserError(
                f"{role}.path: {spec.path!r} does not exist (a directory saved with save_pretrained, or a hub id "
                "such as EleutherAI/pythia-160m, is expected)"
            )
        if hub_offline() and not isinstance(try_to_load_from_cache(spec.path, "config.json"), str):
            raise UserError(
                f"{role}.path: {spec.path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                "unset it to download the model, or point the path at a directory saved with save_pretrained"
            )
