"""The engine: strategies agree with a plain Python loop; padding, chunking and keys are inert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, client_data, make_client_arrays, reference_round

from jaxfl.algorithms import classification_loss, fedavg, fedprox
from jaxfl.simulate import Simulator, client_key, num_sampled_clients

COUNTS = [5, 12, 1, 9, 7]


def _algorithms(model):
    loss = classification_loss(model.apply)
    kw = dict(batch_size=4, epochs=2)
    return {
        "fedavg": fedavg(loss, optax.sgd(0.1), optax.sgd(1.0), **kw),
        "fedprox": fedprox(loss, optax.adam(1e-2), optax.sgd(1.0), mu=0.5, **kw),
        "fedadam": fedavg(loss, optax.sgd(0.1), optax.adam(1e-2), **kw),
    }


@pytest.mark.parametrize("name", ["fedadam"])  # FedAvg, FedProx: tests/test_backends.py
def test_round_matches_python_loop_reference(tiny_model, tiny_params, name):
    algorithm = _algorithms(tiny_model)[name]
    arrays = make_client_arrays(COUNTS, n_slots=16)
    ref = reference_round(algorithm, tiny_params, arrays, range(len(COUNTS)), 3, 0)
    for strategy in ("vmap", "chunked", "loop"):
        sim = Simulator(algorithm, arrays, seed=3, strategy=strategy, chunk_size=2)
        state, metrics = sim.run_round(algorithm.init(tiny_params), 0)
        assert_trees_close(state.params, ref.params)
        assert metrics["clients"] == len(COUNTS)
        assert np.isfinite(metrics["train_loss"])


def test_strategies_agree_over_rounds_with_sampling(tiny_model, tiny_params):
    algorithm = _algorithms(tiny_model)["fedavg"]
    arrays = make_client_arrays(COUNTS * 2, n_slots=13)
    finals = {}
    for strategy, chunk in [("vmap", 64), ("chunked", 3), ("chunked", 4), ("loop", 1)]:
        sim = Simulator(
            algorithm, arrays, seed=1, strategy=strategy, chunk_size=chunk, clients_per_round=0.5
        )
        state = algorithm.init(tiny_params)
        for r in range(3):
            state, _ = sim.run_round(state, r)
        finals[(strategy, chunk)] = state.params
    ref = finals[("vmap", 64)]
    for params in finals.values():
        assert_trees_close(params, ref)


def test_padding_does_not_change_results(tiny_model, tiny_params):
    algorithm = _algorithms(tiny_model)["fedprox"]
    small = make_client_arrays(COUNTS, n_slots=12)
    big = make_client_arrays(COUNTS, n_slots=40)
    out = []
    for arrays in (small, big):
        sim = Simulator(algorithm, arrays, seed=0, strategy="vmap")
        state, metrics = sim.run_round(algorithm.init(tiny_params), 0)
        out.append((state.params, metrics))
    assert_trees_close(out[0][0], out[1][0])
    assert out[0][1]["train_loss"] == pytest.approx(out[1][1]["train_loss"], rel=1e-5)


def test_padded_examples_are_ignored_even_if_garbage(tiny_model, tiny_params):
    algorithm = _algorithms(tiny_model)["fedavg"]
    clean = make_client_arrays(COUNTS, n_slots=14)
    dirty = clean._replace(examples={k: v.copy() for k, v in clean.examples.items()})
    for c, n in enumerate(COUNTS):
        dirty.examples["image"][c, n:] = 1e6
        dirty.examples["label"][c, n:] = 2
    results = []
    for arrays in (clean, dirty):
        sim = Simulator(algorithm, arrays, seed=0, strategy="loop")
        results.append(sim.run_round(algorithm.init(tiny_params), 0)[0].params)
    assert_trees_close(results[0], results[1])


def test_local_steps_follow_real_client_size(tiny_model, tiny_params):
    algorithm = _algorithms(tiny_model)["fedavg"]  # batch 4, 2 epochs
    arrays = make_client_arrays(COUNTS, n_slots=16)
    c = 1
    data = client_data(arrays, c)
    out = jax.jit(algorithm.client_update)(tiny_params, data, jax.random.key(0))
    assert float(out.metrics["num_steps"]) == 2 * np.ceil(COUNTS[c] / 4)
    assert float(out.metrics["num_seen"]) == 2 * COUNTS[c]
    assert float(out.weight) == COUNTS[c]


def test_client_keys_depend_on_round_and_id_only():
    stream = jax.random.key(0)
    k1 = client_key(stream, jnp.int32(2), jnp.int32(7))
    k2 = jax.vmap(lambda c: client_key(stream, jnp.int32(2), c))(jnp.arange(10))[7]
    assert np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))


def test_sampling_is_static_and_deterministic(tiny_model):
    algorithm = _algorithms(tiny_model)["fedavg"]
    arrays = make_client_arrays([3] * 10)
    sim = Simulator(algorithm, arrays, clients_per_round=4, seed=5)
    a, b = sim.sample_clients(3), sim.sample_clients(3)
    assert len(a) == 4 and np.array_equal(a, b) and len(set(a.tolist())) == 4
    assert not all(np.array_equal(sim.sample_clients(r), a) for r in range(4, 10))


def test_num_sampled_clients_and_errors():
    assert num_sampled_clients(None, 10) == 10
    assert num_sampled_clients(0, 10) == 10
    assert num_sampled_clients(3, 10) == 3
    assert num_sampled_clients(0.25, 10) == 2
    assert num_sampled_clients(1.0, 10) == 10
    with pytest.raises(ValueError, match="client_fraction"):
        num_sampled_clients(1.5, 10)
    with pytest.raises(ValueError, match="there are 10 clients"):
        num_sampled_clients(11, 10)


def test_fedprox_rejects_negative_mu(tiny_model):
    with pytest.raises(ValueError, match="mu"):
        fedprox(
            classification_loss(tiny_model.apply),
            optax.sgd(0.1),
            optax.sgd(1.0),
            batch_size=2,
            epochs=1,
            mu=-1.0,
        )


def test_poisson_client_sampling_is_random_sized_and_strategy_independent(tiny_model, tiny_params):
    algorithm = _algorithms(tiny_model)["fedavg"]
    arrays = make_client_arrays(COUNTS * 4, n_slots=13)
    sims = {
        s: Simulator(algorithm, arrays, seed=4, strategy=s, chunk_size=6, poisson_rate=0.4)
        for s in ("vmap", "chunked", "loop")
    }
    sizes = {len(sims["loop"].sample_clients(r)) for r in range(20)}
    assert len(sizes) > 1  # the number of clients varies from round to round
    assert np.array_equal(sims["loop"].sample_clients(3), sims["vmap"].sample_clients(3))
    finals = []
    for sim in sims.values():
        state, metrics = sim.run_round(algorithm.init(tiny_params), 3)
        finals.append(state.params)
        assert metrics["clients"] == len(sim.sample_clients(3))
    for params in finals[1:]:
        assert_trees_close(params, finals[0])
    with pytest.raises(ValueError, match="poisson_rate"):
        Simulator(algorithm, arrays, poisson_rate=1.5)


def test_client_outputs_of_a_poisson_round_are_the_sampled_clients(tiny_model, tiny_params):
    # Regression: the sampled rows were indexed a second time with a [K] mask (IndexError).
    algorithm = _algorithms(tiny_model)["fedavg"]
    arrays = make_client_arrays(COUNTS * 2, n_slots=13)
    sim = Simulator(algorithm, arrays, seed=4, strategy="loop", poisson_rate=0.5)
    state = algorithm.init(tiny_params)
    out = sim.client_outputs(state, 2)
    ids = sim.sample_clients(2)
    assert 0 < len(ids) < len(COUNTS) * 2
    np.testing.assert_array_equal(out["clients"], ids)
    assert out["updates"].shape[0] == out["weights"].shape[0] == len(ids)
    np.testing.assert_allclose(out["weights"], np.asarray(COUNTS * 2)[ids])
    mean = out["weights"] @ out["updates"] / out["weights"].sum()
    np.testing.assert_allclose(sim.released_update(state, 2), mean, rtol=1e-5, atol=1e-7)
