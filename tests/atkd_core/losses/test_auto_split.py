"""loss.hard_fraction auto (Otsu's threshold on the teacher's UNC histogram) and epsilon (easy only
below a fixed small UNC)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from atkd_core.auto_split import resolve_split
from atkd_core.config import LossConfig
from atkd_core.errors import CacheError
from atkd_core.losses import otsu_threshold, unc_histogram
from atkd_core.losses.uncertainty import dataset_threshold, histogram_share_at_or_above
from atkd_core.outputs import CacheManifest


def _bimodal(easy_share: float, seed: int = 0) -> torch.Tensor:
    """Near-certain tokens around UNC 0.1 and uncertain ones around 0.7 (sd 0.05): the valley is at 0.4."""
    generator = torch.Generator().manual_seed(seed)
    n = 20_000
    easy = int(n * easy_share)
    confident = 0.1 + 0.05 * torch.randn(easy, generator=generator)
    uncertain = 0.7 + 0.05 * torch.randn(n - easy, generator=generator)
    return torch.cat([confident, uncertain]).clamp(0, 1)


@pytest.mark.parametrize("easy_share", [0.3, 0.6, 0.8])
def test_otsu_recovers_the_valley_of_a_bimodal_unc_distribution(easy_share):
    threshold, hard_share = otsu_threshold(unc_histogram(_bimodal(easy_share)))
    assert abs(threshold - 0.4) < 0.03
    assert hard_share == pytest.approx(1 - easy_share, abs=0.005)


def test_the_histogram_counts_every_token_in_its_bin():
    counts = unc_histogram(torch.tensor([0.0, 0.0049, 0.0051, 0.5, 1.0]), bins=200)
    assert sum(counts) == 5 and counts[0] == 2 and counts[1] == 1 and counts[100] == 1 and counts[199] == 1


def test_a_histogram_without_a_valley_has_no_threshold():
    assert all(math.isnan(v) for v in otsu_threshold([0] * 200))
    assert all(math.isnan(v) for v in otsu_threshold([0] * 50 + [7] + [0] * 149))


def test_dataset_threshold_is_the_quantile_or_otsus():
    unc = _bimodal(0.6)
    assert dataset_threshold(unc, 0.4) == pytest.approx(float(torch.quantile(unc.double(), 0.6)))
    assert dataset_threshold(unc, "auto") == otsu_threshold(unc_histogram(unc))[0]
    assert dataset_threshold(unc, "epsilon", 0.03) == 0.03
    with pytest.raises(ValueError, match="needs unc_epsilon"):
        dataset_threshold(unc, "epsilon")


def test_the_share_above_a_threshold_is_exact_at_bin_edges_and_proportional_inside():
    counts = [4, 0, 2, 6]  # bins of 0.25
    assert histogram_share_at_or_above(counts, 0.5) == pytest.approx(8 / 12)
    assert histogram_share_at_or_above(counts, 0.625) == pytest.approx((1 + 6) / 12)
    assert histogram_share_at_or_above(counts, 0.0) == 1.0 and histogram_share_at_or_above(counts, 1.0) == 0.0
    assert math.isnan(histogram_share_at_or_above([0, 0], 0.5))


def _cache_manifest(**fields) -> CacheManifest:
    """A teacher cache's manifest with the given auto-split fields (the rest made up)."""
    made_up = {
        "stage": "score_teacher",
        "input_fingerprint": "f",
        "content_sha256": "c",
        "created_unix": 0.0,
        "spec": {},
        "num_examples": 1,
        "num_shards": 1,
        "tokens": 1,
        "shards": {},
        "shard_bytes": {},
        "cache_bytes": 0,
        "unc_quantiles": {},
        "unc_mean": 0.5,
        "hard_fraction": "auto",
        "unc_threshold_at_hard_fraction": None,
        "unc_histogram": [1],
    }
    return CacheManifest(**{**made_up, **fields})


def test_resolving_auto_gives_a_fixed_threshold_split():
    manifest = _cache_manifest(unc_auto_threshold=0.42, unc_auto_hard_fraction=0.37)
    resolved = resolve_split(LossConfig(hard_fraction="auto"), manifest)
    assert (resolved.split_scope, resolved.unc_threshold, resolved.hard_fraction) == ("threshold", 0.42, 0.37)
    numeric = LossConfig(hard_fraction=0.7)
    assert resolve_split(numeric, manifest) is numeric
    # A cache manifest without the split's record cannot exist: it reads as no cache at all.
    with pytest.raises(ValidationError, match="unc_auto_threshold"):
        _cache_manifest(unc_auto_hard_fraction=0.37)
    valleyless = _cache_manifest(unc_auto_threshold=float("nan"), unc_auto_hard_fraction=float("nan"))
    with pytest.raises(CacheError, match="no valley"):
        resolve_split(LossConfig(hard_fraction="auto"), valleyless)


def test_resolving_epsilon_splits_at_epsilon_with_the_caches_share_above_it():
    unc = _bimodal(0.6)
    histogram = unc_histogram(unc)
    manifest = _cache_manifest(unc_histogram=histogram, unc_auto_threshold=0.4, unc_auto_hard_fraction=0.4)
    resolved = resolve_split(LossConfig(hard_fraction="epsilon", unc_epsilon=0.05), manifest)
    # 0.05 is a bin edge of the 200-bin histogram: the share is exact.
    exact = float((unc >= 0.05).double().mean())
    assert (resolved.split_scope, resolved.unc_threshold) == ("threshold", 0.05)
    assert resolved.hard_fraction == pytest.approx(exact, abs=1e-12)
    assert resolved.hard_fraction > 0.4  # more hard tokens than Otsu's split on the same teacher


@pytest.mark.parametrize("rule", ["auto", "epsilon"])
def test_a_derived_split_cannot_be_combined_with_a_given_threshold(rule):
    with pytest.raises(ValueError, match=f"{rule} chooses the UNC threshold itself"):
        LossConfig(hard_fraction=rule, split_scope="threshold", unc_threshold=0.5)
    with pytest.raises(ValueError, match="must be a number in \\(0, 1\\), auto or epsilon"):
        LossConfig(hard_fraction="half")
    with pytest.raises(ValueError, match="unc_epsilon"):
        LossConfig(hard_fraction="epsilon", unc_epsilon=0.0)
