"""Distillation losses: token-level divergences, KL's TKD/DKD decomposition and ATKD.

Dense (teacher logits) or sparse (cached top-K) teacher, float32 math, optional token chunking;
the student (and a dense teacher) may be a LinearHead, fused with the loss (no [N, V] logits).
"""

from atkd_core.losses.atkd import (
    ATKDOutput,
    KLDecomposition,
    atkd_loss,
    decompose_kl,
    hard_token_mask,
    otsu_threshold,
    teacher_uncertainty,
    unc_histogram,
)
from atkd_core.losses.distributions import LinearHead, SparseTeacher, Teacher
from atkd_core.losses.divergences import (
    DIVERGENCE_TERMS,
    divergence_loss,
    divergence_per_token,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

__all__ = [
    "ATKDOutput",
    "DIVERGENCE_TERMS",
    "KLDecomposition",
    "LinearHead",
    "SparseTeacher",
    "Teacher",
    "atkd_loss",
    "decompose_kl",
    "divergence_loss",
    "divergence_per_token",
    "forward_kl",
    "generalized_jsd",
    "hard_token_mask",
    "otsu_threshold",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "teacher_uncertainty",
    "unc_histogram",
    "tvd",
]
