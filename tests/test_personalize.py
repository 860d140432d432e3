"""Adapt-then-test evaluation and the local-only baseline against plain references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, client_data, make_client_arrays, max_abs_diff

from jaxfl.algorithms import classification_loss, local_train
from jaxfl.backends import make_backend
from jaxfl.personalize import LocalOnly, adapt_params, make_personalized_eval
from jaxfl.simulate import CLIENT_STREAM, client_key
from jaxfl.tasks import CLASSIFICATION, evaluate_clients, make_stats_fn

COUNTS = [6, 11, 3, 8]


def _eval(model, steps, strategy="loop", lr=0.2):
    loss = classification_loss(model.apply)
    evaluate = make_personalized_eval(loss, model.apply, adapt_steps=steps, adapt_lr=lr,
                                      batch_size=4, seed=0,
                                      backend=make_backend(strategy, chunk_size=2))  # fmt: skip
    return lambda *args: evaluate(*args)["accuracy"]


def _global_accuracy(model, params, heldout):
    stats_fn = make_stats_fn(CLASSIFICATION, model.apply)
    return evaluate_clients(CLASSIFICATION, stats_fn, params, heldout)["accuracy"]


def test_adapt_params_is_sgd_over_fresh_shuffles(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = client_data(make_client_arrays(COUNTS, n_slots=12), 1)
    key = jax.random.key(4)
    adapted = adapt_params(loss, tiny_params, data, key, steps=2 * 3, lr=0.1, batch_size=4)
    ref = local_train(loss, optax.sgd(0.1), tiny_params, data, key, batch_size=4, epochs=2)
    assert_trees_close(adapted, ref.params, atol=1e-6)  # 11 examples: 3 batches per pass


def test_zero_adapt_steps_is_the_global_model_on_held_out_data(tiny_model, tiny_params):
    train = make_client_arrays(COUNTS, n_slots=12, seed=1)
    heldout = make_client_arrays([4, 0, 2, 5], n_slots=6, seed=2)
    got = _eval(tiny_model, 0)(tiny_params, train, heldout, 0)
    want = _global_accuracy(tiny_model, tiny_params, heldout)
    np.testing.assert_allclose(got, want)
    assert np.isnan(got[1])  # a client without held-out data has no accuracy


def test_personalized_accuracy_is_independent_of_client_batching(tiny_model, tiny_params):
    train = make_client_arrays(COUNTS, n_slots=12, seed=1)
    heldout = make_client_arrays([4, 3, 2, 5], n_slots=6, seed=2)
    one_by_one = _eval(tiny_model, 3)(tiny_params, train, heldout, 5)
    vmapped = _eval(tiny_model, 3, "chunked")(tiny_params, train, heldout, 5)
    np.testing.assert_allclose(one_by_one, vmapped)
    global_only = _eval(tiny_model, 0)(tiny_params, train, heldout, 5)
    strong = _eval(tiny_model, 20, lr=1.0)(tiny_params, train, heldout, 5)
    assert not np.allclose(strong, global_only)  # adaptation does change the outcome


def test_bad_adaptation_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="adapt_lr > 0"):
        _eval(tiny_model, 2, lr=0.0)


def test_local_only_trains_each_client_alone(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    train = make_client_arrays(COUNTS, n_slots=12, seed=1)
    runner = LocalOnly(loss, optax.sgd(0.1), train, batch_size=4, epochs=2, seed=3)
    state = runner.init(tiny_params)
    for r in range(2):
        state, metrics = runner.run_round(state, r)
    assert metrics["clients"] == len(COUNTS)
    stream = jax.random.fold_in(jax.random.key(3), CLIENT_STREAM)
    for c, n in enumerate(COUNTS):
        data = client_data(train, c, n)
        p = tiny_params
        for r in range(2):
            key = client_key(stream, jnp.int32(r), jnp.int32(c))
            p = local_train(loss, optax.sgd(0.1), p, data, key, batch_size=4, epochs=2).params
        assert_trees_close(jax.tree.map(lambda x, c=c: x[c], state.params), p)
    # Clients really differ: nothing was averaged.
    first = jax.tree.map(lambda x: x[0], state.params)
    assert max_abs_diff(first, jax.tree.map(lambda x: x[1], state.params)) > 1e-4

    heldout = make_client_arrays([4, 3, 2, 5], n_slots=6, seed=2)
    acc = runner.evaluate(state, heldout, tiny_model.apply)["accuracy"]
    own = _global_accuracy(tiny_model, first, heldout)
    assert acc[0] == own[0]
