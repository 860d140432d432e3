"""SecAgg+: exact unmasked sums, dropouts at each stage, threshold errors, hiding, Shamir."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from jaxfl.secure.quantize import dequantize, quantization_rng, quantization_step, quantize
from jaxfl.secure.secagg import (
    SHAMIR_PRIME,
    STAGES,
    SecAggConfig,
    SecAggError,
    graph_parameters,
    neighbour_sets,
    secagg_sum,
    secagg_sum_quantized,
    shamir_reconstruct,
    shamir_split,
)

K, D = 6, 2000
SEED, ROUND = 3, 7


def _vectors(num_clients: int = K, size: int = D) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 2.0, (num_clients, size))


def _quantized(x: np.ndarray, config: SecAggConfig, round_idx: int = ROUND) -> np.ndarray:
    return np.stack([
        quantize(row, config.clip_range, config.quantization_bits,
                 quantization_rng(SEED, round_idx, i))
        for i, row in enumerate(x)
    ])  # fmt: skip


def test_sum_equals_the_plaintext_quantized_sum_exactly():
    config = SecAggConfig()
    x = _vectors()
    q = _quantized(x, config)
    total, survivors, stats = secagg_sum(x, config, seed=SEED, round_idx=ROUND)
    np.testing.assert_array_equal(survivors, np.arange(K))
    np.testing.assert_array_equal(total, dequantize(q.sum(0), 8.0, 22, K))
    assert np.abs(total - x.sum(0)).max() <= K * quantization_step(8.0, 22)
    # Negative control: another round's stochastic rounding gives other integers.
    assert not np.array_equal(q, _quantized(x, config, ROUND + 1))
    assert stats["plain_bytes_per_client"] == 4 * D
    assert stats["bytes_per_client"] > 4 * D  # the masked uint32 vector plus keys and shares


def test_integer_protocol_recovers_the_exact_integer_sum():
    config = SecAggConfig()
    q = _quantized(_vectors(), config)
    total, _, _ = secagg_sum_quantized(q, config, seed=SEED, round_idx=ROUND)
    assert total.dtype == np.int64
    np.testing.assert_array_equal(total, q.sum(0))


def test_result_is_reproducible_although_keys_are_fresh():
    x = _vectors()

    def run() -> tuple[np.ndarray, np.ndarray]:
        masked = {}
        total = secagg_sum(
            x, SecAggConfig(), seed=SEED, round_idx=ROUND,
            server_view=lambda j, y: masked.update({j: y.copy()}),
        )[0]  # fmt: skip
        return total, masked[0]

    (total_a, masked_a), (total_b, masked_b) = run(), run()
    np.testing.assert_array_equal(total_a, total_b)
    # The masks come from fresh keys, so what the server sees differs between runs.
    assert not np.array_equal(masked_a, masked_b)


@pytest.mark.parametrize("stage", range(3))
def test_survives_n_minus_t_dropouts_at_each_stage(stage):
    config = SecAggConfig(threshold=4)  # complete graph: 6 shares per secret, any 4 recover it
    q = _quantized(_vectors(), config)
    dropouts = [set(), set(), set()]
    dropouts[stage] = {1, 4}
    total, survivors, stats = secagg_sum_quantized(
        q, config, seed=SEED, round_idx=ROUND, dropouts=dropouts
    )
    # Clients dropping after sending their masked input are still in the sum.
    expected = np.arange(K) if stage == 2 else np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(survivors, expected)
    np.testing.assert_array_equal(total, q[expected].sum(0))
    assert stats[f"dropped_after_{STAGES[stage]}"] == 2


@pytest.mark.parametrize("stage", range(3))
def test_one_dropout_beyond_n_minus_t_raises(stage):
    config = SecAggConfig(threshold=4)
    q = _quantized(_vectors(), config)
    dropouts = [set(), set(), set()]
    dropouts[stage] = {1, 3, 4}
    with pytest.raises(SecAggError, match=r"only 3 .*threshold"):
        secagg_sum_quantized(q, config, seed=SEED, round_idx=ROUND, dropouts=dropouts)


def test_sparse_graph_is_regular_and_sums_exactly_with_a_dropout():
    num_clients = 9
    config = SecAggConfig(threshold=3, neighbours=4)  # 5 shares per secret
    graph = neighbour_sets(num_clients, 4, SEED, ROUND)
    assert all(len(n) == 4 and i not in n for i, n in enumerate(graph))
    assert all(i in graph[j] for i, n in enumerate(graph) for j in n)  # symmetric
    redrawn = neighbour_sets(num_clients, 4, SEED, ROUND + 1)
    assert any(not np.array_equal(a, b) for a, b in zip(graph, redrawn, strict=True))
    q = _quantized(_vectors(num_clients), config)
    total, survivors, _ = secagg_sum_quantized(
        q, config, seed=SEED, round_idx=ROUND, dropouts=[set(), {0}, set()]
    )
    np.testing.assert_array_equal(survivors, np.arange(1, num_clients))
    np.testing.assert_array_equal(total, q[1:].sum(0))


def test_sparse_graph_raises_when_a_dropped_clients_key_holders_are_gone():
    num_clients, k, t = 12, 6, 4
    config = SecAggConfig(threshold=t, neighbours=k)  # 7 shares per secret
    graph = neighbour_sets(num_clients, k, SEED, ROUND)
    q = _quantized(_vectors(num_clients), config)

    def holders_left(j: int, gone: set[int]) -> int:
        return len({j, *graph[j].tolist()} - gone)

    # Client 0 drops before masking, after 3 of its neighbours left before sharing keys: only
    # 3 holders of its mask key remain (t = 4). Pick the 3 so every survivor keeps >= t
    # holders of its self-mask seed, isolating the failure to client 0.
    early = next(
        set(c) for c in itertools.combinations(graph[0].tolist(), 3)
        if all(holders_left(j, {0, *c}) >= t for j in range(1, num_clients) if j not in c)
    )  # fmt: skip
    with pytest.raises(SecAggError, match=r"client 0's mask key: only 3 of its 7 shares"):
        secagg_sum_quantized(q, config, seed=SEED, round_idx=ROUND, dropouts=[early, {0}, set()])
    # Control: with one of the 3 back, the round succeeds without client 0.
    fewer = set(sorted(early)[:2])
    total, survivors, _ = secagg_sum_quantized(
        q, config, seed=SEED, round_idx=ROUND, dropouts=[fewer, {0}, set()]
    )
    np.testing.assert_array_equal(total, q[survivors].sum(0))
    assert 0 not in survivors


def test_masked_inputs_look_nothing_like_the_inputs():
    config = SecAggConfig()
    x = np.tile(np.linspace(-3.0, 3.0, 5000), (K, 1))  # structured, identical inputs
    q = _quantized(x, config)
    seen = {}
    secagg_sum_quantized(
        q, config, seed=SEED, round_idx=ROUND, server_view=lambda j, y: seen.update({j: y.copy()})
    )

    def looks_like_input(y: np.ndarray, row: np.ndarray) -> bool:
        corr = abs(np.corrcoef(y.astype(np.float64), row)[0, 1])
        in_input_range = np.mean(y <= 2**config.quantization_bits)  # ~2^-10 if uniform
        return corr > 0.08 or in_input_range > 0.01

    assert sorted(seen) == list(range(K))
    assert not any(looks_like_input(seen[j], q[j]) for j in range(K))
    # Negative control: the unmasked integers fail the same check.
    assert all(looks_like_input(q[j].astype(np.uint32), q[j]) for j in range(K))


def test_modulus_too_small_for_the_sum_raises():
    x = _vectors()
    with pytest.raises(ValueError, match=r"modulus_bits=24 is too small.*modulus_bits >= 25"):
        secagg_sum(x, SecAggConfig(modulus_bits=24), seed=SEED, round_idx=ROUND)
    total, _, _ = secagg_sum(x, SecAggConfig(modulus_bits=25), seed=SEED, round_idx=ROUND)
    np.testing.assert_array_equal(
        total, secagg_sum(x, SecAggConfig(), seed=SEED, round_idx=ROUND)[0]
    )


def test_modulus_above_32_bits_uses_wider_words():
    config = SecAggConfig(quantization_bits=30, modulus_bits=40)
    q = _quantized(_vectors(), config)
    assert q.max() > 2**29
    np.testing.assert_array_equal(
        secagg_sum_quantized(q, config, seed=SEED, round_idx=ROUND)[0], q.sum(0)
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (SecAggConfig(threshold=3), r"threshold t=3 must satisfy 3 < t <= 6"),
        (SecAggConfig(threshold=0.4), r"fractional SecAggConfig.threshold"),
        (SecAggConfig(neighbours=3), r"neighbours=3 must be even"),
        (SecAggConfig(quantization_bits=40, modulus_bits=32), r"quantization_bits < modulus_bits"),
        (SecAggConfig(dropout_probs=(0.1, 1.0, 0.0)), r"dropout_probs"),
        (SecAggConfig(clip_range=0.0), r"clip_range"),
    ],
)
def test_bad_configs_raise_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        graph_parameters(config, K)


def test_fractional_threshold_counts_the_kept_share():
    assert graph_parameters(SecAggConfig(threshold=0.66), K) == (5, 4)
    assert graph_parameters(SecAggConfig(threshold=0.66, neighbours=4), 9) == (4, 4)
    assert graph_parameters(SecAggConfig(threshold=0.56), 25) == (24, 14)  # 0.56*25 > 14 in fp


def test_drawn_dropouts_are_deterministic_per_round():
    config = SecAggConfig(threshold=6, dropout_probs=(0.1, 0.1, 0.1))
    num_clients = 10
    q = _quantized(_vectors(num_clients, 300), config)
    results = [
        secagg_sum_quantized(q, config, seed=SEED, round_idx=r)[:2]
        for r in range(8) for _ in range(2)
    ]  # fmt: skip
    for (total_a, surv_a), (total_b, surv_b) in zip(results[::2], results[1::2], strict=True):
        np.testing.assert_array_equal(surv_a, surv_b)
        np.testing.assert_array_equal(total_a, total_b)
        np.testing.assert_array_equal(total_a, q[surv_a].sum(0))
    assert any(len(s) < num_clients for _, s in results)  # some rounds do drop clients


def test_explicit_dropouts_are_validated():
    q = _quantized(_vectors(), SecAggConfig())
    with pytest.raises(ValueError, match="one per stage"):
        secagg_sum_quantized(q, SecAggConfig(), seed=SEED, round_idx=ROUND, dropouts=[{1}])
    with pytest.raises(ValueError, match=r"dropout ids \[9\]"):
        secagg_sum_quantized(
            q, SecAggConfig(), seed=SEED, round_idx=ROUND, dropouts=[{9}, set(), set()]
        )


def test_shamir_any_t_shares_recover_the_secret_and_t_minus_1_do_not():
    secret = int.from_bytes(secrets.token_bytes(32), "big")
    xs = list(range(1, 7))
    shares = list(zip(xs, shamir_split(secret, 4, xs), strict=True))
    for subset in itertools.combinations(shares, 4):
        assert shamir_reconstruct(subset) == secret
    for subset in itertools.combinations(shares, 3):
        assert shamir_reconstruct(subset) != secret
    assert shamir_reconstruct(shares) == secret  # more than t shares also work


def test_shamir_rejects_bad_inputs():
    with pytest.raises(ValueError, match="distinct"):
        shamir_split(5, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(5, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="secret"):
        shamir_split(SHAMIR_PRIME, 2, [1, 2])


def _ring_positions(graph_order_seed: int, num_clients: int) -> np.ndarray:
    """Client ids in the order neighbour_sets puts them on its ring (its seeded permutation)."""
    return np.random.default_rng([graph_order_seed, ROUND, 0x4752]).permutation(num_clients)


@pytest.mark.parametrize(
    ("num_clients", "k", "t", "gaps"),
    [
        (10, 4, 3, ([0, 1], [5, 6])),  # Harary H(4, 10): two gaps of 2 split it in two
        (14, 6, 4, ([0, 1, 2], [7, 8, 9])),  # H(6, 14): two gaps of 3
        (16, 4, 3, ([0, 1], [5, 6], [10, 11])),  # three groups
    ],
)
def test_dropouts_that_split_the_survivors_fail_the_round(num_clients, k, t, gaps):
    """Regression (issue 12.4): the server learned each group's sum exactly."""
    config = SecAggConfig(threshold=t, neighbours=k)
    order = _ring_positions(SEED, num_clients)
    dropped = {int(order[p]) for gap in gaps for p in gap}
    graph = neighbour_sets(num_clients, k, SEED, ROUND)
    survivors = sorted(set(range(num_clients)) - dropped)
    # Every dropped client keeps t surviving key holders: unmasking itself would succeed.
    assert all(len(set(graph[i].tolist()) - dropped) >= t for i in dropped)
    q = _quantized(_vectors(num_clients), config)
    with pytest.raises(SecAggError, match=rf"into {len(gaps)} groups"):
        secagg_sum_quantized(
            q, config, seed=SEED, round_idx=ROUND, dropouts=[set(), dropped, set()]
        )
    # Control: every gap but one refilled by one client, the survivors stay connected.
    back = dropped - {int(order[gap[0]]) for gap in gaps[1:]}
    total, alive, _ = secagg_sum_quantized(
        q, config, seed=SEED, round_idx=ROUND, dropouts=[set(), back, set()]
    )
    np.testing.assert_array_equal(total, q[alive].sum(0))
    assert len(survivors) < len(alive)


def test_a_ring_of_two_neighbours_is_refused():
    """Regression (issue 12.4): K = 8, k = 2, t = 2 split after two non-adjacent dropouts."""
    with pytest.raises(ValueError, match=r"neighbours=2 is too sparse for 8 clients"):
        graph_parameters(SecAggConfig(threshold=2, neighbours=2), 8)
    assert graph_parameters(SecAggConfig(threshold=2, neighbours=2), 3) == (2, 2)  # complete
