"""Per-FedAvg: equals a per-client loop, exact Hessian-vector products, FedAvg limit, learning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    TinyMLP,
    assert_trees_close,
    make_client_arrays,
    max_abs_diff,
    reference_round,
)
from jax.flatten_util import ravel_pytree

from jaxfl.algorithms import classification_loss, fedavg, local_train
from jaxfl.algorithms.base import epoch_permutations
from jaxfl.algorithms.perfedavg import meta_gradient, perfedavg, perfedavg_local_train
from jaxfl.evaluate import evaluate_clients, make_predict_fn
from jaxfl.personalize import make_personalized_eval
from jaxfl.simulate import Simulator
from jaxfl.types import ClientArrays, ClientData

COUNTS = [5, 12, 1, 9, 0]
ALL_STRATEGIES = ("vmap", "chunked", "loop")


def _client(counts=(11,), n_slots=16):
    return ClientData(*(jnp.asarray(a[0]) for a in make_client_arrays(list(counts), n_slots)))


@pytest.mark.parametrize(
    "variant, strategies",
    [("hf", ALL_STRATEGIES), ("fo", ("vmap", "loop")), ("pppml", ("chunked",))]
    + [
        pytest.param(v, ("vmap", "chunked", "loop"), marks=pytest.mark.slow)
        for v in ("fo", "pppml")
    ],
)
def test_every_strategy_matches_a_python_loop_over_unpadded_clients(
    tiny_model, tiny_params, variant, strategies
):
    loss = classification_loss(tiny_model.apply)
    algorithm = perfedavg(loss, optax.sgd(1.0), batch_size=4, epochs=2, alpha=0.1, beta=0.05,
                          variant=variant)  # fmt: skip
    arrays = make_client_arrays(COUNTS, n_slots=16)
    ref = reference_round(algorithm, tiny_params, arrays, range(4), 3, 0)  # client 4 is empty
    for strategy in strategies:
        sim = Simulator(algorithm, arrays, seed=3, strategy=strategy, chunk_size=2)
        state, metrics = sim.run_round(sim.init(tiny_params), 0)
        assert_trees_close(state.params, ref.params)
        assert np.isfinite(metrics["train_loss"])
    assert max_abs_diff(state.params, tiny_params) > 1e-4  # the round did something


def test_hessian_free_direction_matches_an_explicit_hessian(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    arrays = make_client_arrays([8, 8, 8], shape=(4, 4, 1))
    batches = [(jnp.asarray(arrays.images[c]), jnp.asarray(arrays.labels[c]), jnp.ones(8))
               for c in range(3)]  # fmt: skip
    alpha = 0.3
    got, _ = meta_gradient(loss, tiny_params, batches[0], batches[1], batches[2], alpha)

    flat, unravel = ravel_pytree(tiny_params)

    def f(w, batch):
        return loss(unravel(w), *batch)[0]

    temp = flat - alpha * jax.grad(f)(flat, batches[0])
    g = jax.grad(f)(temp, batches[1])
    hessian = jax.hessian(f)(flat, batches[2])  # explicit [P, P]
    assert hessian.shape == (flat.size, flat.size)
    expected = g - alpha * hessian @ g
    np.testing.assert_allclose(ravel_pytree(got)[0], expected, atol=1e-5, rtol=1e-4)
    # Negative control: the first-order direction is measurably different.
    fo, _ = meta_gradient(loss, tiny_params, batches[0], batches[1], None, alpha)
    assert np.abs(ravel_pytree(fo)[0] - expected).max() > 1e-3


def test_first_order_with_alpha_zero_is_local_sgd_with_beta(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client()
    key = jax.random.key(7)
    kw = dict(batch_size=4, epochs=3)
    per = perfedavg_local_train(loss, tiny_params, data, key, alpha=0.0, beta=0.05,
                                variant="fo", **kw)  # fmt: skip
    sgd = local_train(loss, optax.sgd(0.05), tiny_params, data, key, **kw)
    assert_trees_close(per.params, sgd.params, atol=1e-6)
    assert int(per.num_steps) == int(sgd.num_steps) == 3 * 3
    assert float(per.loss_sum) == pytest.approx(float(sgd.loss_sum), rel=1e-5)
    # With alpha > 0 the result moves away from plain SGD.
    other = perfedavg_local_train(loss, tiny_params, data, key, alpha=0.5, beta=0.05,
                                  variant="fo", **kw)  # fmt: skip
    assert max_abs_diff(other.params, sgd.params) > 1e-4


def test_pppml_variant_uses_consecutive_batch_pairs(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client(counts=(10,))  # 3 batches of 4: pairs (0, 1) and (2, 0) each epoch
    key = jax.random.key(1)
    res = perfedavg_local_train(loss, tiny_params, data, key, batch_size=4, epochs=2,
                                alpha=0.0, beta=0.05, variant="pppml")  # fmt: skip
    assert int(res.num_steps) == 2 * 2
    # With alpha = 0 a step is SGD on the *second* batch of each pair: batches 1 and 0.
    perms = np.asarray(epoch_permutations(key, data.mask, 2))
    p = tiny_params
    for epoch in range(2):
        for b in (1, 0):
            idx = perms[epoch, 4 * b : 4 * b + 4]
            m = jnp.asarray((4 * b + np.arange(4)) < 10, jnp.float32)
            idx = np.where(np.asarray(m) > 0, idx, 0)
            g = jax.grad(lambda q, i=idx, m=m: loss(q, data.images[i], data.labels[i], m)[0])(p)
            p = jax.tree.map(lambda w, d: w - 0.05 * d, p, g)
    assert_trees_close(res.params, p, atol=1e-6)


def test_bad_variant_and_rates_are_refused(tiny_model):
    loss = classification_loss(tiny_model.apply)
    with pytest.raises(ValueError, match="choose one of"):
        perfedavg(loss, optax.sgd(1.0), batch_size=4, epochs=1, variant="so")
    with pytest.raises(ValueError, match="beta > 0"):
        perfedavg(loss, optax.sgd(1.0), batch_size=4, epochs=1, beta=0.0)


def _permuted_label_task(seed, k=6, n=48, n_heldout=24, classes=3, dim=8):
    """Shared class clusters, but client c names class y as (y + c) mod 3: no single model fits
    every client (a global model is near chance), while one adaptation step can."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 2.0

    def arrays(m):
        images = np.zeros((k, m, dim, 1, 1), np.float32)
        labels = np.zeros((k, m), np.int32)
        for c in range(k):
            y = rng.integers(0, classes, m)
            images[c] = (centers[y] + rng.normal(size=(m, dim)))[..., None, None]
            labels[c] = (y + c) % classes
        return ClientArrays(images, labels, np.ones((k, m), np.float32), np.full(k, m, np.int32))

    return arrays(n), arrays(n_heldout)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_personalization_beats_the_global_model_when_clients_disagree(seed):
    train, heldout = _permuted_label_task(seed)
    model = TinyMLP(num_classes=3, hidden=16)
    loss = classification_loss(model.apply)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 1, 1)))["params"]
    alpha, beta = 0.5, 0.1
    kw = dict(batch_size=8, epochs=2)
    accuracy = {}
    for name, algorithm in [
        ("fedavg", fedavg(loss, optax.sgd(beta), optax.sgd(1.0), **kw)),
        ("perfedavg", perfedavg(loss, optax.sgd(1.0), alpha=alpha, beta=beta, **kw)),
    ]:
        sim = Simulator(algorithm, train, seed=seed, strategy="vmap")
        state = sim.init(params)
        for r in range(25):
            state, _ = sim.run_round(state, r)
        accuracy[name] = np.mean(evaluate_clients(make_predict_fn(model.apply), state.params,
                                                  heldout))  # fmt: skip
        personalize = make_personalized_eval(loss, model.apply, adapt_steps=1, adapt_lr=alpha,
                                             batch_size=8, seed=seed)  # fmt: skip
        accuracy[name + "_personalized"] = np.mean(personalize(state.params, train, heldout, 0))
    assert accuracy["fedavg"] < 0.5  # the task defeats a single global model
    assert accuracy["perfedavg_personalized"] > accuracy["fedavg"] + 0.25, accuracy
