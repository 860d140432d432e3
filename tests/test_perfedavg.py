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
    client_data,
    make_client_arrays,
    max_abs_diff,
    reference_round,
)
from jax.flatten_util import ravel_pytree

from jaxfl.algorithms import classification_loss, fedavg, local_train
from jaxfl.algorithms.local import epoch_permutations
from jaxfl.algorithms.perfedavg import meta_gradient, perfedavg, perfedavg_rule
from jaxfl.personalize import make_personalized_eval
from jaxfl.simulate import Simulator
from jaxfl.tasks import CLASSIFICATION, evaluate_clients, make_stats_fn
from jaxfl.tree import tree_vdot
from jaxfl.types import ClientArrays

COUNTS = [5, 12, 1, 9, 0]
ALL_STRATEGIES = ("vmap", "chunked", "loop")


def _client(counts=(11,), n_slots=16):
    return client_data(make_client_arrays(list(counts), n_slots), 0)


def perfedavg_local_train(loss, params, data, key, *, alpha, beta, variant, **kw):
    """One client's Per-FedAvg local training: the local loop with the meta-step rule."""
    rule = perfedavg_rule(alpha, variant)
    return local_train(loss, optax.sgd(beta), params, data, key, rule=rule, **kw)


@pytest.mark.parametrize(
    "variant, strategies",
    # hf's direction is checked against an explicit Hessian in the default suite.
    [pytest.param("hf", ("vmap", "loop"), marks=pytest.mark.slow)]
    + [("fo", ("vmap", "loop")), ("pppml", ("chunked",))]
    + [pytest.param(v, ALL_STRATEGIES, marks=pytest.mark.slow) for v in ("hf", "fo", "pppml")],
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
    batches = [(client_data(arrays, c).examples, jnp.ones(8)) for c in range(3)]
    alpha = 0.3
    grad = lambda b: lambda p: jax.grad(loss, has_aux=True)(p, *batches[b])
    hvp = lambda p, v: (jax.grad(lambda q: tree_vdot(grad(2)(q)[0], v))(p), {})
    got, _ = meta_gradient(grad(0), grad(1), hvp, tiny_params, alpha)

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
    fo, _ = meta_gradient(grad(0), grad(1), None, tiny_params, alpha)
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
    assert float(per.sums["loss_sum"]) == pytest.approx(float(sgd.sums["loss_sum"]), rel=1e-5)
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
            batch = {k: v[idx] for k, v in data.examples.items()}
            g = jax.grad(lambda q, b=batch, m=m: loss(q, b, m)[0])(p)
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
        examples = {"image": images, "label": labels}
        return ClientArrays(examples, np.ones((k, m), np.float32), np.full(k, m, np.int32))

    return arrays(n), arrays(n_heldout)


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2))])
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
        stats_fn = make_stats_fn(CLASSIFICATION, model.apply)
        per_client = evaluate_clients(CLASSIFICATION, stats_fn, state.params, heldout)
        accuracy[name] = np.mean(per_client["accuracy"])
        personalize = make_personalized_eval(loss, model.apply, adapt_steps=1, adapt_lr=alpha,
                                             batch_size=8, seed=seed)  # fmt: skip
        adapted = personalize(state.params, train, heldout, 0)["accuracy"]
        accuracy[name + "_personalized"] = np.mean(adapted)
    assert accuracy["fedavg"] < 0.5  # the task defeats a single global model
    assert accuracy["perfedavg_personalized"] > accuracy["fedavg"] + 0.25, accuracy


# --------------------------------------------------------------------------- Per-FedAvg + DP


def test_dp_perfedavg_fo_equals_a_loop_of_dp_sgd_draws(tiny_model, tiny_params):
    # Noise off, a tight clip: each inner (D) and outer (D') batch is its own clipped Poisson
    # draw, keyed as dp_oracle documents; the meta-step must be exactly these draws composed.
    from jaxfl.privacy.dp_sgd import DPSGD, dp_sgd_gradient

    loss = classification_loss(tiny_model.apply)
    data = _client(counts=(12,), n_slots=16)
    key = jax.random.key(4)
    alpha, beta, clip, b = 0.3, 0.1, 0.05, 4
    dp = DPSGD(clip_norm=clip, noise_multiplier=0.0, microbatch_size=4)
    res = jax.jit(
        lambda p, d, k: perfedavg_local_train(
            loss, p, d, k, alpha=alpha, beta=beta, variant="fo", batch_size=b, epochs=1, dp=dp
        )
    )(tiny_params, data, key)

    def draw(params, k):
        return dp_sgd_gradient(
            loss, params, data, k, sampling_rate=b / 12, clip_norm=clip, noise_multiplier=0.0,
            expected_batch_size=b, microbatch_size=4,
        )  # fmt: skip

    params, selected = tiny_params, 0.0
    for step in range(3):  # ceil(12 / 4) steps, one epoch
        inner = draw(params, jax.random.fold_in(jax.random.fold_in(key, 1), step))
        temp = jax.tree.map(lambda p, g: p - alpha * g, params, inner.grad)
        outer = draw(temp, jax.random.fold_in(key, step))
        params = jax.tree.map(lambda p, g: p - beta * g, params, outer.grad)
        selected += float(inner.num_selected + outer.num_selected)
    assert int(res.num_steps) == 3
    assert_trees_close(res.params, params, atol=1e-6)
    assert float(res.sums["dp_selected"]) == selected  # both draws of every step counted


@pytest.mark.parametrize(
    "variant", ["hf", *(pytest.param(v, marks=pytest.mark.slow) for v in ("fo", "pppml"))]
)
def test_dp_perfedavg_clips_every_draw_and_noise_moves_it(tiny_model, tiny_params, variant):
    from jaxfl.privacy.dp_sgd import DPSGD

    loss = classification_loss(tiny_model.apply)
    data = _client(counts=(12,), n_slots=16)
    kw = dict(alpha=0.3, beta=0.1, variant=variant, batch_size=4, epochs=1)
    quiet = DPSGD(clip_norm=1e-6, noise_multiplier=0.0, microbatch_size=4)
    res = perfedavg_local_train(loss, tiny_params, data, jax.random.key(0), dp=quiet, **kw)
    # Clipped to ~0: the model barely moves, whatever the data.
    assert max_abs_diff(res.params, tiny_params) < 1e-6
    clipped, selected = float(res.sums["dp_clipped"]), float(res.sums["dp_selected"])
    if variant == "hf":  # H v with a tiny v can fall under the clip: only the gradients must
        assert 0 < clipped <= selected
    else:
        assert clipped == selected > 0
    noisy = DPSGD(clip_norm=1e-6, noise_multiplier=1e5, microbatch_size=4)
    moved = perfedavg_local_train(loss, tiny_params, data, jax.random.key(0), dp=noisy, **kw)
    assert max_abs_diff(moved.params, tiny_params) > 1e-3  # negative control: noise is added


def test_accountant_counts_two_draws_per_fo_step_and_three_per_hf_step():
    from jaxfl.algorithms.local import SGD, dp_draws_per_round
    from jaxfl.privacy import accounting

    n, b, e = 12, 4, 2
    draws = {
        "sgd": dp_draws_per_round(SGD, n, b, e),
        "fo": dp_draws_per_round(perfedavg_rule(0.1, "fo"), n, b, e),
        "hf": dp_draws_per_round(perfedavg_rule(0.1, "hf"), n, b, e),
        "pppml": dp_draws_per_round(perfedavg_rule(0.1, "pppml"), n, b, e),
    }
    assert draws == {"sgd": 6, "fo": 12, "hf": 18, "pppml": 8}  # pppml: 2 steps of 2 batches
    eps = {
        name: accounting.record_level_epsilons_per_client(
            1.0, [n], b, e, 5, 1e-5, draws_per_round=lambda _n, d=d: d
        )[0]
        for name, d in draws.items()
    }
    assert eps["sgd"] < eps["pppml"] < eps["fo"] < eps["hf"]
    # Default (no draws_per_round) is FedAvg's count.
    assert accounting.record_level_epsilons_per_client(1.0, [n], b, e, 5, 1e-5)[0] == eps["sgd"]


def test_plan_privacy_composes_perfedavg_draws():
    from configs import bloodmnist_dp
    from jaxfl.privacy.plan import plan_privacy
    from jaxfl.sweep import apply_overrides

    sizes = np.array([300, 800, 1200])
    base = {"num_clients": 3, "dp.mode": "record", "dp.target_epsilon": 0.0}
    eps = {}
    for name in ("fedavg", "perfedavg_fo", "perfedavg_hf"):
        config = apply_overrides(bloodmnist_dp.get_config(), {**base, "algorithm.name": name})
        config.dp.noise_multiplier = 1.2
        eps[name] = plan_privacy(config, sizes, 3).epsilon_metrics(5)["epsilon"]
    assert eps["fedavg"] < eps["perfedavg_fo"] < eps["perfedavg_hf"]
