"""Record-level DP-SGD: matches a per-example reference loop, clips, masks, noises correctly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import client_data, clipped_sum_reference, make_client_arrays

from jaxfl.algorithms import classification_loss, local_train
from jaxfl.privacy.dp_sgd import (
    DPSGD,
    clip_and_sum,
    dp_sgd_gradient,
    per_example_grads,
    poisson_order,
)

CLIP = 0.5


def _client(counts=(20,), n_slots=24, c=0):
    arrays = make_client_arrays(list(counts), n_slots=n_slots)
    return client_data(arrays, c)


def _step(loss, params, data, key, noise=0.0, rate=0.5, micro=4, per_example="auto"):
    return dp_sgd_gradient(
        loss,
        params,
        data,
        key,
        sampling_rate=rate,
        clip_norm=CLIP,
        noise_multiplier=noise,
        expected_batch_size=8.0,
        microbatch_size=micro,
        per_example=per_example,
    )


@pytest.mark.parametrize("per_example", ["vmap", "scan"])
def test_noiseless_step_equals_per_example_reference_loop(tiny_model, tiny_params, per_example):
    loss = classification_loss(tiny_model.apply)
    data = _client()
    key = jax.random.key(3)
    step = jax.jit(lambda p, d, k: _step(loss, p, d, k, per_example=per_example))
    out = step(tiny_params, data, key)
    order, count = poisson_order(jax.random.split(key)[0], data.mask, 0.5)
    selected = np.asarray(order)[: int(count)]
    assert 0 < len(selected) < int(data.count)
    ref = clipped_sum_reference(loss, tiny_params, data, selected, CLIP)
    for a, b in zip(jax.tree.leaves(out.grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) / 8.0, atol=1e-6, rtol=1e-5)
    assert int(out.num_selected) == len(selected)
    assert float(out.sensitivity) == CLIP


def test_scan_and_vmap_per_example_paths_agree_on_every_output(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client()
    outs = [
        _step(loss, tiny_params, data, jax.random.key(5), noise=0.3, rate=0.7, per_example=mode)
        for mode in ("vmap", "scan")
    ]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert float(outs[0].num_clipped) > 0  # the clipping branch was exercised


def test_unknown_per_example_mode_is_refused(tiny_model, tiny_params):
    with pytest.raises(ValueError, match="per_example must be one of"):
        _step(classification_loss(tiny_model.apply), tiny_params, _client(), jax.random.key(0),
              per_example="loop")  # fmt: skip


def test_clipped_per_example_gradients_have_norm_at_most_c(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client()
    _, grads = per_example_grads(loss, tiny_params, {k: v[:20] for k, v in data.examples.items()})
    for i in range(20):
        one = jax.tree.map(lambda g, i=i: g[i : i + 1], grads)
        mask = jnp.ones(1)
        clipped, _ = clip_and_sum(one, mask, 0.01)
        norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(clipped)))
        assert norm <= 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("per_example", ["vmap", "scan"])
def test_padding_and_garbage_in_padding_change_nothing(tiny_model, tiny_params, per_example):
    loss = classification_loss(tiny_model.apply)
    small = _client(n_slots=20)
    big = _client(n_slots=40)
    ex = big.examples
    garbage = {"image": ex["image"].at[20:].set(1e6), "label": ex["label"].at[20:].set(2)}
    big = big._replace(examples=garbage)
    key = jax.random.key(0)
    a = _step(loss, tiny_params, small, key, noise=1.0, per_example=per_example)
    b = _step(loss, tiny_params, big, key, noise=1.0, per_example=per_example)
    for x, y in zip(jax.tree.leaves(a.grad), jax.tree.leaves(b.grad), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_microbatch_size_does_not_change_the_gradient(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client()
    outs = [_step(loss, tiny_params, data, jax.random.key(1), noise=0.7, micro=m) for m in (3, 64)]
    for x, y in zip(jax.tree.leaves(outs[0].grad), jax.tree.leaves(outs[1].grad), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_noise_has_the_intended_std_with_negative_control(tiny_model, tiny_params):
    stats = pytest.importorskip("scipy.stats")
    loss = classification_loss(tiny_model.apply)
    empty = _client()._replace(mask=jnp.zeros(24), count=jnp.int32(0))  # no data: pure noise
    z = 1.3
    step = jax.jit(lambda k: _step(loss, tiny_params, empty, k, noise=z))
    outs = [step(jax.random.key(k)) for k in range(30)]
    noise = np.concatenate([np.ravel(x) * 8.0 for o in outs for x in jax.tree.leaves(o.grad)])
    assert noise.size > 4000
    out = outs[0]
    assert stats.kstest(noise, "norm", args=(0, z * CLIP)).pvalue > 1e-3
    assert stats.kstest(noise, "norm", args=(0, 1.2 * z * CLIP)).pvalue < 1e-6  # wrong std
    assert float(out.noise_std) == pytest.approx(z * CLIP)


def test_local_train_dp_steps_and_noiseless_learning(tiny_model, tiny_params):
    loss = classification_loss(tiny_model.apply)
    data = _client(counts=(5, 20), c=1)
    dp = DPSGD(clip_norm=10.0, noise_multiplier=0.0, microbatch_size=8)
    fn = jax.jit(
        lambda p, d, k: local_train(loss, optax.sgd(0.1), p, d, k, batch_size=8, epochs=2, dp=dp)
    )
    res = fn(tiny_params, data, jax.random.key(0))
    assert int(res.num_steps) == 2 * 3  # epochs * ceil(20 / 8)
    assert 0 < float(res.sums["num_seen"]) <= 2 * 20 * 1.8  # Poisson: about 2 * 20 on average
    assert float(res.sums["dp_selected"]) == float(res.sums["num_seen"])
    before, after = jax.tree.leaves(tiny_params), jax.tree.leaves(res.params)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_dp_fedavg_round_is_the_same_under_every_strategy(tiny_model, tiny_params):
    from jaxfl.algorithms import fedavg
    from jaxfl.simulate import Simulator

    dp = DPSGD(clip_norm=0.3, noise_multiplier=1.1, microbatch_size=4)
    algorithm = fedavg(
        classification_loss(tiny_model.apply), optax.sgd(0.1), optax.sgd(1.0),
        batch_size=4, epochs=1, dp=dp,
    )  # fmt: skip
    arrays = make_client_arrays([5, 12, 1, 9], n_slots=14)
    results = []
    for strategy in ("vmap", "chunked", "loop"):
        sim = Simulator(algorithm, arrays, seed=2, strategy=strategy, chunk_size=3)
        state, metrics = sim.run_round(algorithm.init(tiny_params), 0)
        results.append(state.params)
        assert 0.0 <= metrics["dp_clipped_fraction"] <= 1.0
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
