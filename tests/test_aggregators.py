"""Host aggregators: weighted means over the survivors vs numpy, options and errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxfl.secure import (
    AGGREGATORS,
    SecAggAggregator,
    SecAggConfig,
    SecAggError,
    make_host_aggregator,
    quantization_step,
)

K, D = 5, 3000
CKKS_TOL = 1e-6  # CKKS error ~1e-9, plus float32 rounding of the mean (|mean| < 4)


@pytest.fixture(scope="module")
def round_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    updates = rng.normal(0.0, 1.0, (K, D)).astype(np.float32)
    updates[0] += 2.0  # the heaviest client differs, so ignoring weights shows
    weights = np.array([120.0, 7.0, 33.0, 1.0, 60.0])
    return updates, weights


def _weighted_mean(updates: np.ndarray, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    u, w = updates[rows].astype(np.float64), weights[rows]
    return (w[:, None] * u).sum(0) / w.sum()


def _secagg_bound(config: SecAggConfig, weights: np.ndarray, rows, mean, max_weight) -> float:
    """Worst-case error of the dequantized mean: each coordinate of the sum, the ratio sum R
    included, is off by e < n quantization steps, so |error| < e (1 + |mean|) / (R - e); plus
    float32 rounding of the mean."""
    e = len(rows) * quantization_step(config.clip_range, config.quantization_bits)
    ratio_sum = weights[rows].sum() / max_weight
    return e * (1 + np.abs(mean).max()) / (ratio_sum - e) + 1e-6


def test_registry_and_plain():
    assert AGGREGATORS == ("plain", "secagg", "ckks", "ckks_ring")
    assert make_host_aggregator("plain", seed=0) is None
    with pytest.raises(ValueError, match=r"unknown aggregator 'paillier'.*'secagg'"):
        make_host_aggregator("paillier", seed=0)
    with pytest.raises(ValueError, match="takes no options"):
        make_host_aggregator("plain", seed=0, threshold=3)


def test_unknown_and_bad_options_raise():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['treshold'\].*'threshold'"):
        make_host_aggregator("secagg", seed=0, treshold=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sigma'\]"):
        make_host_aggregator("ckks", seed=0, sigma=1.0)
    with pytest.raises(ValueError, match="clip_range"):
        make_host_aggregator("secagg", seed=0, clip_range=-1.0)
    with pytest.raises(ValueError, match="poly_modulus_degree"):
        make_host_aggregator("ckks_ring", seed=0, poly_modulus_degree=1000)
    with pytest.raises(ValueError, match="max_weight"):
        make_host_aggregator("ckks", seed=0, max_weight=0.0)


def test_secagg_weighted_mean_within_the_quantization_bound(round_inputs):
    updates, weights = round_inputs
    aggregator = make_host_aggregator("secagg", seed=4)
    result = aggregator.aggregate(updates, weights, round_idx=2)
    rows = np.arange(K)
    expected = _weighted_mean(updates, weights, rows)
    bound = _secagg_bound(aggregator.config, weights, rows, expected, weights.max())
    assert result.mean.dtype == np.float32 and result.mean.shape == (D,)
    np.testing.assert_array_equal(result.survivors, rows)
    assert np.abs(result.mean - expected).max() < bound
    # Negative control: the unweighted mean is far outside the bound.
    assert np.abs(updates.mean(0) - expected).max() > 100 * bound
    # Same seed and round: bit-identical, although every key is fresh.
    np.testing.assert_array_equal(aggregator.aggregate(updates, weights, 2).mean, result.mean)
    assert result.stats["bytes_per_client"] > result.stats["plain_bytes_per_client"] == 4 * D


def test_secagg_dropouts_leave_numerator_and_denominator(round_inputs):
    updates, weights = round_inputs
    config = SecAggConfig(threshold=3, dropout_probs=(0.15, 0.15, 0.0))
    aggregator = SecAggAggregator(config, seed=1)
    for round_idx in range(50):
        try:
            result = aggregator.aggregate(updates, weights, round_idx)
        except SecAggError:
            continue
        if len(result.survivors) < K:
            break
    else:
        pytest.fail("no round in 50 dropped a client without failing")
    rows = result.survivors
    expected = _weighted_mean(updates, weights, rows)
    bound = _secagg_bound(config, weights, rows, expected, weights.max())
    assert np.abs(result.mean - expected).max() < bound
    everyone = _weighted_mean(updates, weights, np.arange(K))
    assert np.abs(everyone - expected).max() > 100 * bound  # negative control


def test_secagg_max_weight_bounds_the_weights(round_inputs):
    updates, weights = round_inputs
    with pytest.raises(ValueError, match="exceeds max_weight=100"):
        make_host_aggregator("secagg", seed=0, max_weight=100.0).aggregate(updates, weights, 0)
    aggregator = make_host_aggregator("secagg", seed=0, max_weight=150.0)
    result = aggregator.aggregate(updates, weights, 0)
    expected = _weighted_mean(updates, weights, np.arange(K))
    assert np.abs(result.mean - expected).max() < _secagg_bound(
        aggregator.config, weights, np.arange(K), expected, 150.0
    )


@pytest.mark.parametrize("name", ["ckks", "ckks_ring"])
def test_ckks_weighted_mean_within_tolerance(round_inputs, name):
    updates, weights = round_inputs
    aggregator = make_host_aggregator(name, seed=3, coeff_mod_bit_sizes=[60, 60])
    result = aggregator.aggregate(updates, weights, round_idx=6)
    expected = _weighted_mean(updates, weights, np.arange(K))
    np.testing.assert_array_equal(result.survivors, np.arange(K))
    assert np.abs(result.mean - expected).max() < CKKS_TOL
    assert np.abs(updates.mean(0) - expected).max() > 1e3 * CKKS_TOL  # negative control
    assert result.stats["plain_bytes_per_client"] == 4 * D


def test_inputs_are_validated(round_inputs):
    updates, weights = round_inputs
    aggregator = make_host_aggregator("secagg", seed=0)
    with pytest.raises(ValueError, match=r"updates \[K, D\] and weights \[K\]"):
        aggregator.aggregate(updates, weights[:3], 0)
    with pytest.raises(ValueError, match="not all zero"):
        aggregator.aggregate(updates, np.zeros(K), 0)
    bad = updates.copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aggregator.aggregate(bad, weights, 0)
