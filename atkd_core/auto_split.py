"""``loss.hard_fraction: auto`` and ``epsilon``: what a teacher cache records for them, and how a
loss is made concrete from that record.

Scoring writes the record (the UNC histogram of every cached token and Otsu's threshold on it);
training reads it. Both import this module, so neither needs the other.
"""

from __future__ import annotations

import math
from typing import Any

from atkd_core.config import LossConfig
from atkd_core.errors import CacheError
from atkd_core.losses import otsu_threshold
from atkd_core.losses.uncertainty import histogram_share_at_or_above
from atkd_core.outputs import CacheManifest


def auto_split_fields(histogram: list[int]) -> dict[str, Any]:
    """What ``loss.hard_fraction: auto`` splits at, for a cache manifest: the UNC histogram over
    [0, 1] of every cached token (``histogram``: UNC_BINS counts, unc_histogram summed over the
    shards) and Otsu's threshold on it with its hard share."""
    threshold, share = otsu_threshold(histogram)
    return {"unc_histogram": histogram, "unc_auto_threshold": threshold, "unc_auto_hard_fraction": share}


def resolve_split(loss: LossConfig, cache_manifest: CacheManifest) -> LossConfig:
    """``loss`` with a split derived from the teacher made concrete from a cache's UNC histogram:
    a fixed threshold (``split_scope: threshold``) and the share of the cache's tokens it makes
    hard. ``auto``: Otsu's threshold; ``epsilon``: ``loss.unc_epsilon`` (the share within one
    histogram bin, 0.005, unless the threshold is a bin edge). Any other loss is returned unchanged."""
    if loss.hard_fraction == "epsilon":
        threshold = loss.unc_epsilon
        share = histogram_share_at_or_above(cache_manifest.unc_histogram, threshold)
    elif loss.hard_fraction == "auto":
        threshold, share = cache_manifest.unc_auto_threshold, cache_manifest.unc_auto_hard_fraction
    else:
        return loss
    if math.isnan(threshold):
        raise CacheError(
            "loss.hard_fraction auto: the teacher's UNC histogram has no valley (every token in one bin); "
            "set a numeric loss.hard_fraction"
        )
    return loss.model_copy(
        update={"hard_fraction": share, "split_scope": "threshold", "unc_threshold": threshold}
    )
