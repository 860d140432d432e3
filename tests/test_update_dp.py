"""Update-level DP: local (client-side noise) and central (DP-FedAvg) modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import client_data, make_client_arrays

from jaxfl.algorithms import classification_loss, fedavg
from jaxfl.privacy.accounting import seed_as_coded_noise_std
from jaxfl.privacy.update_dp import UpdateDP, add_gaussian_noise, clip_update
from jaxfl.simulate import Simulator, client_key

COUNTS = [6, 11, 3]


def _norm(tree):
    return float(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(tree))))


def _alg(model, update_dp=None):
    loss = classification_loss(model.apply)
    return fedavg(loss, optax.sgd(0.5), optax.sgd(1.0), batch_size=4, epochs=1, update_dp=update_dp)


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    tree = {"a": jnp.full((10,), 3.0), "b": jnp.full((2, 2), -4.0)}
    clipped, norm = clip_update(tree, 1.5)
    assert _norm(clipped) == pytest.approx(1.5, rel=1e-6)
    assert float(norm) == pytest.approx(_norm(tree), rel=1e-6)
    same, _ = clip_update(tree, 1e3)
    np.testing.assert_allclose(same["a"], tree["a"])


def test_local_mode_clips_then_noises_each_client(tiny_model, tiny_params):
    arrays = make_client_arrays(COUNTS, n_slots=12)
    data = client_data(arrays, 1)
    key = jax.random.key(4)
    clip = 0.05
    quiet = _alg(tiny_model, UpdateDP("local", clip, 0.0)).client_update(tiny_params, data, key)
    assert _norm(quiet.update) <= clip * (1 + 1e-5)
    noisy = _alg(tiny_model, UpdateDP("local", clip, 0.3)).client_update(tiny_params, data, key)
    diff = jax.tree.map(jnp.subtract, noisy.update, quiet.update)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(diff)])
    assert np.std(flat) == pytest.approx(0.3, rel=0.15)
    assert float(noisy.weight) == COUNTS[1]


def test_noise_std_ks_test_with_negative_control():
    stats = pytest.importorskip("scipy.stats")
    zeros = {"w": jnp.zeros((20_000,))}
    noise = np.asarray(add_gaussian_noise(zeros, 0.7, jax.random.key(0))["w"])
    assert stats.kstest(noise, "norm", args=(0, 0.7)).pvalue > 1e-3
    assert stats.kstest(noise, "norm", args=(0, 0.8)).pvalue < 1e-6


def test_central_mode_is_the_noised_uniform_mean_of_clipped_updates(tiny_model, tiny_params):
    arrays = make_client_arrays(COUNTS, n_slots=12)
    clip = 0.05
    dp_alg = _alg(tiny_model, UpdateDP("central", clip, 0.0, expected_clients=len(COUNTS)))
    sim = Simulator(dp_alg, arrays, seed=1, strategy="loop")
    state, metrics = sim.run_round(dp_alg.init(tiny_params), 0)
    # Reference: each client's unclipped update under the same key, clipped by hand, uniform mean.
    ref = jax.tree.map(jnp.zeros_like, tiny_params)
    for c in range(len(COUNTS)):
        data = client_data(arrays, c)
        key = client_key(sim.client_stream, jnp.int32(0), jnp.int32(c))
        out = _alg(tiny_model, UpdateDP("central", 1e9, 0.0)).client_update(tiny_params, data, key)
        clipped, _ = clip_update(out.update, clip)
        ref = jax.tree.map(lambda r, u: r + u / len(COUNTS), ref, clipped)
    expected = jax.tree.map(jnp.add, tiny_params, ref)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert metrics["update_clipped_fraction"] == 1.0


def test_central_noise_is_added_once_to_the_sum(tiny_model, tiny_params):
    arrays = make_client_arrays(COUNTS, n_slots=12)
    outs = []
    for std in (0.0, 2.0):
        alg = _alg(tiny_model, UpdateDP("central", 0.05, std, expected_clients=3))
        sim = Simulator(alg, arrays, seed=1, strategy="vmap")
        outs.append(sim.run_round(alg.init(tiny_params), 0)[0].params)
    diff = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(jax.tree.leaves(outs[1]), jax.tree.leaves(outs[0]), strict=True)
        ]
    )
    assert np.std(diff) == pytest.approx(2.0 / 3, rel=0.15)


def test_flower_local_dp_formula():
    # Flower LocalDpMod: std = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon.
    assert seed_as_coded_noise_std(1.0, 6.0, 1.9e-4) == pytest.approx(0.6996, abs=1e-3)
