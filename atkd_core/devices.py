"""The device a stage runs on when its config names none, and what runs compiled on it."""

from __future__ import annotations

import importlib.util

import torch


def default_device() -> str:
    """``cuda`` when a CUDA device is available, else ``cpu`` (for stages without a device setting)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compiles_loss(setting: str, device_type: str) -> bool:
    """Whether the loss's chunks run compiled (loss.compile): ``on`` / ``off`` as said; ``auto`` on
    CUDA where Triton is installed (inductor's GPU code generator), never on CPU."""
    if setting != "auto":
        return setting == "on"
    return device_type == "cuda" and importlib.util.find_spec("triton") is not None
