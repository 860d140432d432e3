"""Membership inference and the empirical epsilon audit: the attacks' statistics against
references, negative controls, and jaxfl's DP mechanisms against their accountant."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event

from jaxfl.attacks.audit import audit_dp, clopper_pearson_upper, epsilon_lower_bound
from jaxfl.attacks.membership import (
    attack_summary,
    example_statistics,
    likelihood_ratio_scores,
    loss_threshold_scores,
    roc_auc,
    statistics_fn,
    tpr_at_fpr,
)
from jaxfl.defaults import default_config
from jaxfl.models import MLP
from jaxfl.privacy.accounting import epsilon
from jaxfl.train import load_federated_data


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 5, 40).astype(float)
    n = rng.integers(0, 4, 30).astype(float)
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(m, n)]
    assert roc_auc(m, n) == pytest.approx(np.mean(pairs))
    assert roc_auc(n + 10, n) == 1.0


def test_tpr_at_fpr_flags_at_most_that_fraction_of_non_members():
    non = np.arange(1000.0)
    members = np.array([995.5, 989.5, 5.0, 2000.0])
    # 1% of 1000 non-members may be flagged: the threshold is 989, so 3 of 4 members pass.
    assert tpr_at_fpr(members, non, 0.01) == 0.75
    assert np.mean(non > 989) <= 0.01


def test_clopper_pearson_upper_bound_matches_the_closed_form_at_zero():
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert clopper_pearson_upper(100, 100, 0.05) == 1.0
    # Coverage: the bound covers the true rate in at least 95% of binomial draws.
    rng = np.random.default_rng(1)
    hits = [clopper_pearson_upper(int(k), 200, 0.05) >= 0.1 for k in rng.binomial(200, 0.1, 400)]
    assert np.mean(hits) >= 0.95


def test_epsilon_lower_bound_of_a_gaussian_mechanism_stays_below_its_epsilon():
    rng = np.random.default_rng(2)
    delta = 1e-5
    true_eps = epsilon(dp_event.GaussianDpEvent(1.0), delta)  # sensitivity 1, std 1
    canary, null = rng.normal(1.0, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    bound = epsilon_lower_bound(canary, null, delta)
    assert 0.2 < bound.epsilon < true_eps
    # Negative control: the same distribution in both worlds gives (almost) nothing.
    assert epsilon_lower_bound(rng.normal(0, 1, 4000), null, delta).epsilon < 0.15
    # No noise: perfectly separated, the bound is what 2,000 held-out trials can show.
    assert epsilon_lower_bound(np.ones(4000), np.zeros(4000), delta).epsilon > 6.0


def _audit_config(mode: str):
    c = default_config()
    c.data.image_shape, c.data.n_train, c.data.n_val, c.data.n_test = (8, 8, 1), 64, 8, 16
    c.num_clients, c.partition.name, c.rounds, c.strategy = 2, "iid", 1, "vmap"
    c.model.name, c.model.hidden = "mlp", (16,)
    c.local.optimizer, c.local.learning_rate, c.local.batch_size, c.local.epochs = (
        "sgd", 0.5, 32, 1,
    )  # fmt: skip
    # A clip below the canary's update norm: the audited mechanism runs at its sensitivity.
    # z = 2 claims epsilon ~2.5 for one round, below the ~4 that 200 held-out trials of a
    # noiseless mechanism can show, so switching the noise off must be caught.
    c.dp.mode, c.dp.noise_multiplier, c.dp.clip_norm = mode, 2.0, 0.05
    return c


@pytest.mark.parametrize("mode", ["local_update", pytest.param("record", marks=pytest.mark.slow)])
def test_the_audit_stays_below_the_accountant_and_catches_noise_switched_off(mode):
    config = _audit_config(mode)
    fed = load_federated_data(config)
    honest = audit_dp(config, fed, trials=400, chunk=200)
    assert honest["epsilon_claimed"] > 0
    assert honest["epsilon_empirical"] < honest["epsilon_claimed"]
    broken = audit_dp(config, fed, trials=400, broken=True, chunk=200)
    assert broken["epsilon_claimed"] == honest["epsilon_claimed"]
    assert broken["epsilon_empirical"] > broken["epsilon_claimed"]


@pytest.mark.slow
def test_the_audit_of_user_level_dp_on_the_released_aggregate():
    config = _audit_config("user_level")
    fed = load_federated_data(config)
    honest = audit_dp(config, fed, trials=400, chunk=200)
    assert honest["epsilon_empirical"] < honest["epsilon_claimed"]
    broken = audit_dp(config, fed, trials=400, broken=True, chunk=200)
    assert broken["epsilon_empirical"] > broken["epsilon_claimed"]


def _train(model, params, x, y, steps):
    opt = optax.adam(1e-2)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


@pytest.fixture(scope="module")
def overfit():
    """Random images with random labels: an MLP can only memorize them."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 120, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, (5, 120)))
    model = MLP(num_classes=4, hidden=(64,), activation="relu")
    init = model.init(jax.random.key(0), x[0, :1])["params"]
    # Model i trains on set i; set 4 is never trained on.
    models = [_train(model, init, x[i], y[i], 300) for i in range(4)]
    return model, init, x, y, models


def test_loss_threshold_mia_separates_an_overfit_model_and_not_an_unseen_set(overfit):
    model, _, x, y, models = overfit
    fn = statistics_fn(model.apply)
    stats = [example_statistics(fn, models[0], x[i], y[i]) for i in range(5)]
    seen = attack_summary(
        loss_threshold_scores(stats[0]["loss"]), loss_threshold_scores(stats[4]["loss"])
    )
    assert seen["auc"] > 0.9
    assert seen["tpr_at_1pct_fpr"] > 0.03  # chance: 0.01
    # Negative control: two sets the model never saw.
    unseen = roc_auc(
        loss_threshold_scores(stats[3]["loss"]), loss_threshold_scores(stats[4]["loss"])
    )
    assert abs(unseen - 0.5) < 0.12


def test_shadow_free_likelihood_ratio_uses_models_that_did_not_see_the_example(overfit):
    model, init, x, y, models = overfit
    target = models[0]
    fn = statistics_fn(model.apply)
    phi = lambda p, i: example_statistics(fn, p, x[i], y[i])["phi"]  # noqa: E731
    refs_members = np.stack([phi(models[j], 0) for j in (1, 2, 3)])
    refs_non = np.stack([phi(models[j], 4) for j in (1, 2, 3)])
    members = likelihood_ratio_scores(phi(target, 0), refs_members)
    non = likelihood_ratio_scores(phi(target, 4), refs_non)
    assert attack_summary(members, non)["auc"] > 0.9
    # Negative control: the untrained model scored against the same references.
    control = roc_auc(
        likelihood_ratio_scores(phi(init, 0), refs_members),
        likelihood_ratio_scores(phi(init, 4), refs_non),
    )
    assert abs(control - 0.5) < 0.12


def test_membership_statistics_of_a_segmenter_are_means_over_labelled_pixels():
    from jaxfl.tasks.seg_ops import pixel_cross_entropy

    model = MLP(num_classes=3, hidden=(8,), per_pixel=True)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 1))
    params = model.init(jax.random.key(1), x)["params"]
    masks = np.array(jax.random.randint(jax.random.key(2), (4, 5, 5), 0, 3))
    masks[:, 0] = -1  # an ignored (padding) row
    loss, phi = statistics_fn(model.apply)(params, x, jnp.asarray(masks))
    logits = model.apply({"params": params}, x)
    np.testing.assert_allclose(loss, pixel_cross_entropy(logits, jnp.asarray(masks)), rtol=1e-5)
    p = np.asarray(jax.nn.softmax(logits))
    y = np.where(masks >= 0, masks, 0)
    p_y = np.take_along_axis(p, y[..., None], -1)[..., 0]
    ref = np.log(p_y / (1 - p_y))[:, 1:].mean(axis=(1, 2))
    np.testing.assert_allclose(phi, ref, rtol=1e-4)


def test_the_record_canary_of_a_mask_moves_every_labelled_pixel_to_the_next_class():
    from jaxfl.attacks.audit import _with_flipped_label
    from jaxfl.types import ClientArrays

    masks = np.array([[[[0, 1], [-1, 2]], [[2, 2], [0, -1]]]])  # 1 client, 2 slices
    train = ClientArrays({"mask": masks}, np.ones((1, 2)), np.array([2]))
    flipped = _with_flipped_label(train, 0, 3, "mask").examples["mask"]
    np.testing.assert_array_equal(flipped[0, 0], masks[0, 0])
    np.testing.assert_array_equal(flipped[0, 1], [[0, 0], [1, -1]])
