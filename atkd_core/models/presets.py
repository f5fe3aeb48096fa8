"""Architecture presets: the sizes of the built-in tiny teachers and student.

A plain table so that config validation can check a preset name without importing transformers.
Sizes are chosen so the whole demo runs on 2 CPU cores in minutes; the vocabulary comes from the
tokenizer at build time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSize:
    """Width and depth of one preset."""

    hidden: int
    layers: int
    heads: int
    max_positions: int = 512


ARCHITECTURES = ("neox", "opt", "llama")

SIZES: dict[str, ArchSize] = {
    # The reproduction's student: small enough that 45 distillation runs fit in an hour on 2 cores.
    "micro": ArchSize(hidden=64, layers=2, heads=2),
    "tiny": ArchSize(hidden=128, layers=2, heads=4),
    "small": ArchSize(hidden=256, layers=4, heads=4),
    "medium": ArchSize(hidden=384, layers=6, heads=6),
    "large": ArchSize(hidden=512, layers=8, heads=8),
    # Pythia-160M's width and heads with 2 of its 12 layers: realistic output-layer shapes
    # (configs/large-vocab.yaml) at a depth 2 CPU cores can step.
    "wide": ArchSize(hidden=768, layers=2, heads=12),
    # The shapes of the paper-scale pair (benchmarks/gpu_check.sh): Pythia-160M and Pythia-1.4B.
    "160m": ArchSize(hidden=768, layers=12, heads=12, max_positions=2048),
    "1.4b": ArchSize(hidden=2048, layers=24, heads=16, max_positions=2048),
}

PRESETS: dict[str, tuple[str, ArchSize]] = {
    f"{arch}-{size}": (arch, dims) for arch in ARCHITECTURES for size, dims in SIZES.items()
}
