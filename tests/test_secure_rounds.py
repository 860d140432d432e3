"""Secure aggregation inside federated rounds: every aggregator and strategy matches `plain`."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from helpers import assert_trees_close, make_client_arrays, max_abs_diff

from configs import bloodmnist_fedavg, debug
from jaxfl.algorithms import classification_loss, fedavg
from jaxfl.factories import build_host_aggregator
from jaxfl.privacy.update_dp import UpdateDP
from jaxfl.secure.aggregators import make_host_aggregator
from jaxfl.simulate import Simulator
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate
from jaxfl.validate import ConfigError, validate_config

COUNTS = [5, 12, 3, 9, 7]
# Max abs error of the averaged update: SecAgg+ quantizes +-8 to 2^22 levels (stochastic
# rounding: < 4e-6 per coordinate); CKKS at scale 2^40 is far below; the ring's mask R
# (sigma 1e4) is added and removed, which costs about 1e4 * 2^-40 per value.
TOLERANCE = {"secagg": 2e-5, "ckks": 1e-6, "ckks_ring": 1e-5}


def _round(model, params, aggregator, strategy, rounds=2, arrays=None):
    algorithm = fedavg(classification_loss(model.apply), optax.sgd(0.1), optax.sgd(1.0),
                       batch_size=4, epochs=1)  # fmt: skip
    host = None if aggregator == "plain" else make_host_aggregator(aggregator, seed=0)
    arrays = arrays or make_client_arrays(COUNTS, n_slots=12)
    sim = Simulator(algorithm, arrays, seed=1, strategy=strategy, chunk_size=2,
                    clients_per_round=4, host_aggregator=host)  # fmt: skip
    state = sim.init(params)
    for r in range(rounds):
        state, metrics = sim.run_round(state, r)
    return state.params, metrics


@pytest.mark.parametrize("aggregator", ["secagg", "ckks", "ckks_ring"])
def test_secure_rounds_match_the_plain_weighted_mean_under_every_strategy(
    tiny_model, tiny_params, aggregator
):
    plain, _ = _round(tiny_model, tiny_params, "plain", "vmap")
    assert max_abs_diff(plain, tiny_params) > 1e-3  # the rounds moved the model
    for strategy in ("vmap", "chunked", "loop"):
        params, metrics = _round(tiny_model, tiny_params, aggregator, strategy)
        assert_trees_close(params, plain, atol=TOLERANCE[aggregator])
        assert metrics["secure_survivors"] == 4
        assert metrics["secure_bytes_per_client"] > 0


def test_central_dp_cannot_be_combined_with_host_aggregation(tiny_model):
    algorithm = fedavg(classification_loss(tiny_model.apply), optax.sgd(0.1), optax.sgd(1.0),
                       batch_size=4, epochs=1,
                       update_dp=UpdateDP("central", 1.0, 1.0, expected_clients=2))  # fmt: skip
    with pytest.raises(ValueError, match="local_update"):
        Simulator(algorithm, make_client_arrays(COUNTS),
                  host_aggregator=make_host_aggregator("secagg", seed=0))  # fmt: skip


def _config(**overrides):
    base = {"rounds": 2, "num_clients": 5, "data.n_train": 300, "data.n_test": 100,
            "local.epochs": 1, "checkpoint_every": 0}  # fmt: skip
    return apply_overrides(debug.get_config(), {**base, **overrides})


def test_bad_secure_settings_are_reported_before_training():
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**{"secure.aggregator": "paillier"}))
    assert "config.secure.aggregator='paillier' is not known" in str(e.value)
    with pytest.raises(ConfigError, match="use dp.mode='local_update' or 'record'"):
        validate_config(_config(**{"secure.aggregator": "secagg", "dp.mode": "user_level"}))
    with pytest.raises(ConfigError, match=r"config.secure \(secagg\)"):
        validate_config(_config(**{"secure.aggregator": "secagg",
                                   "secure.secagg.quantization_bits": 40}))  # fmt: skip


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return train_and_evaluate(_config(), tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("aggregator", ["secagg", "ckks", "ckks_ring"])
def test_end_to_end_run_with_each_aggregator_matches_plain(plain_run, tmp_path, aggregator):
    final = train_and_evaluate(_config(**{"secure.aggregator": aggregator}), tmp_path)
    assert abs(final["test_accuracy"] - plain_run["test_accuracy"]) <= 0.02
    assert final["secure_plain_bytes_per_client"] > 0


def test_the_papers_secagg_settings_build_from_the_config():
    config = bloodmnist_fedavg.get_config()
    config.secure.aggregator = "secagg"
    aggregator = build_host_aggregator(config, np.full(10, 900))
    assert (aggregator.config.threshold, aggregator.config.neighbours) == (4, 4)
    assert aggregator.config.max_weight == 10000.0


def test_a_round_that_cannot_be_unmasked_fails_loudly(tiny_model, tiny_params, caplog):
    algorithm = fedavg(classification_loss(tiny_model.apply), optax.sgd(0.1), optax.sgd(1.0),
                       batch_size=4, epochs=1)  # fmt: skip
    host = make_host_aggregator("secagg", seed=0, dropout_probs=(0.0, 0.0, 0.95))
    sim = Simulator(algorithm, make_client_arrays(COUNTS), strategy="loop", host_aggregator=host)
    state = sim.init(tiny_params)
    with caplog.at_level("WARNING"):
        new_state, metrics = sim.run_round(state, 0)
    assert metrics["secure_failed"] == 1.0 and "secure aggregation failed" in caplog.text
    assert "round 1: secure" in caplog.text  # rounds count from 1, as the progress does
    assert max_abs_diff(new_state.params, tiny_params) == 0.0
