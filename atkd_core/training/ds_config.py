"""The DeepSpeed engine config, rendered from the pydantic training config.

It lives in the library rather than infra/ because the training entry point, started by the
DeepSpeed launcher on every rank, renders it itself from the resolved YAML.
"""

from __future__ import annotations

from typing import Any

import torch

from atkd_core.config import TrainingConfig
from atkd_core.devices import default_device
from atkd_core.errors import ConfigError


def resolve_device(training: TrainingConfig, section: str = "training") -> str:
    """``cuda`` or ``cpu`` for ``training.device`` (auto: cuda when available); ConfigError naming
    ``section`` (e.g. distill.training) when it asks for a device this machine lacks."""
    if training.device == "auto":
        return default_device()
    if training.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{section}.device: 'cuda', but this machine has no CUDA device; use auto or cpu")
    return training.device


def resolve_precision(training: TrainingConfig, device: str, section: str = "training") -> str:
    """fp32 / bf16 / fp16 for ``training.precision`` on ``device`` (auto: fp32 on CPU, bf16 on
    GPU); ConfigError naming ``section`` for fp16 on a CPU, where DeepSpeed has none. Checked here,
    where the device is known, so that a config is valid or not whatever machine reads it."""
    if training.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if training.precision == "fp16" and device == "cpu":
        cause = (
            "device 'auto' found no CUDA device on this machine"
            if training.device == "auto"
            else "device 'cpu'"
        )
        raise ConfigError(
            f"{section}.precision: 'fp16' would run on the CPU ({cause}), where DeepSpeed has no fp16; "
            "use fp32 or bf16, or run on a machine with a CUDA device"
        )
    return training.precision


def render_ds_config(training: TrainingConfig, device: str) -> dict[str, Any]:
    """The DeepSpeed config dict: ZeRO stage, offload, precision, batch sizes, clipping.

    With ``adamw_torch`` the optimizer is a client object passed to ``deepspeed.initialize`` (no op
    compilation); with ``adamw_deepspeed`` DeepSpeed builds it from this dict. The schedule is always
    a client LambdaLR.
    """
    precision = resolve_precision(training, device)
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.zero_stage >= 1 and training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if training.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_batch_size": training.batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accumulation_steps,
        "gradient_clipping": training.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if training.optim.name == "adamw_deepspeed":
        # DeepSpeed builds its own optimizer (CPU-Adam when offloaded or on CPU, FusedAdam on GPU).
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": training.optim.lr,
                "betas": list(training.optim.betas),
                "weight_decay": training.optim.weight_decay,
            },
        }
    elif training.zero_stage >= 1 and training.offload_optimizer:
        # torch AdamW steps the offloaded fp32 states on the CPU (slower than CPU-Adam, no compile).
        config["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config
