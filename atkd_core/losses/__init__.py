"""Distillation losses: token-level divergences, KL's TKD/DKD decomposition and ATKD.

Dense (teacher logits) or sparse (cached top-K) teacher, float32 math, optional token chunking;
the student (and a dense teacher) may be a LinearHead, fused with the loss (no [N, V] logits).

One job per module, read in this order for one ATKD step:
``objective`` (what a training step calls) -> ``atkd`` (the easy / hard loss) ->
``uncertainty`` (UNC and the grouping) and ``decomposition`` (TKD, DKD) -> ``logprobs`` (teacher
and student log-probabilities) -> ``kernels`` (hand-written autograd) -> ``engine`` (the chunked,
optionally fused reduction). ``divergences`` holds the baselines, ``adaptive`` the objectives whose target moves during training
(TAID, AdaKD), ``inputs`` the input types.
"""

from atkd_core.losses.atkd import ATKDOutput, ATKDParams, atkd_loss
from atkd_core.losses.decomposition import KLDecomposition, decompose_kl
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
from atkd_core.losses.inputs import LinearHead, SparseTeacher, Teacher
from atkd_core.losses.uncertainty import (
    UNC_BINS,
    UncStatistics,
    dataset_threshold,
    hard_token_mask,
    otsu_threshold,
    teacher_uncertainty,
    unc_histogram,
)

__all__ = [
    "ATKDOutput",
    "ATKDParams",
    "DIVERGENCE_TERMS",
    "KLDecomposition",
    "LinearHead",
    "SparseTeacher",
    "Teacher",
    "UNC_BINS",
    "UncStatistics",
    "atkd_loss",
    "dataset_threshold",
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
