"""The device a stage runs on when its config names none."""

from __future__ import annotations

import torch


def default_device() -> str:
    """``cuda`` when a CUDA device is available, else ``cpu`` (for stages without a device setting)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
