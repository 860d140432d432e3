"""Gradient inversion: what an unprotected gradient leaks, and what noise hides."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfl.attacks import AttackConfig, invert, match_reconstructions, psnr, recover_labels, ssim

SHAPE = (1, 6, 6, 1)
CLASSES = 3
RANGE = (-1.0, 1.0)


class SigmoidMLP(nn.Module):
    """DLG's setting in miniature: smooth activations, every pixel in the first layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(CLASSES)(x)


MODEL = SigmoidMLP()


def grad_fn(params, images, soft_labels):
    def loss(p):
        logits = MODEL.apply({"params": p}, images)
        return optax.softmax_cross_entropy(logits, soft_labels).mean()

    return jax.grad(loss)(params)


@pytest.fixture(scope="module")
def target():
    params = MODEL.init(jax.random.key(0), jnp.zeros(SHAPE))["params"]
    # A smooth image (a blob on a ramp), in the data range.
    yy, xx = np.mgrid[0:6, 0:6] / 5.0
    image = np.clip(
        0.8 * np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.1) + 0.3 * xx - 0.5, -1, 1
    )
    image = jnp.asarray(image, jnp.float32)[None, ..., None]
    label = jnp.array([2])
    observed = grad_fn(params, image, jax.nn.one_hot(label, CLASSES))
    return params, image, label, observed


def test_idlg_recovers_the_label_and_the_image_from_one_gradient(target):
    params, image, label, observed = target
    out = params["Dense_1"]
    labels = recover_labels(observed["Dense_1"]["kernel"], observed["Dense_1"]["bias"])
    assert labels.tolist() == label.tolist()
    assert out["kernel"].shape == (32, CLASSES)
    config = AttackConfig(method="idlg", steps=150, learning_rate=0.1, restarts=2)
    result = invert(grad_fn, params, observed, jax.random.key(1), SHAPE, CLASSES, config, labels)
    assert float(psnr(image, result["images"], RANGE)[0]) > 30.0
    assert float(ssim(image, result["images"], RANGE)[0]) > 0.99
    # Negative control: a random image of the same range is far from it.
    noise = jax.random.uniform(jax.random.key(9), SHAPE, minval=-1, maxval=1)
    assert float(psnr(image, noise, RANGE)[0]) < 15.0


def test_labels_from_the_sign_of_the_output_layer_gradient_are_always_right():
    params = MODEL.init(jax.random.key(3), jnp.zeros(SHAPE))["params"]
    hits = []
    for i in range(20):
        x = jax.random.uniform(jax.random.key(100 + i), SHAPE, minval=-1, maxval=1)
        y = jnp.array([i % CLASSES])
        g = grad_fn(params, x, jax.nn.one_hot(y, CLASSES))["Dense_1"]
        # With the bias, and from the kernel alone (sigmoid features are positive).
        hits.append(int(recover_labels(g["kernel"], g["bias"])[0]) == int(y[0]))
        hits.append(int(recover_labels(g["kernel"])[0]) == int(y[0]))
    assert all(hits)


def test_large_noise_on_the_gradient_defeats_the_attack(target):
    params, image, label, observed = target
    # Local DP's Gaussian noise, far above the gradient's scale.
    leaves, tree = jax.tree.flatten(observed)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = jax.tree.unflatten(
        tree, [g + 1.0 * jax.random.normal(k, g.shape) for g, k in zip(leaves, keys, strict=True)]
    )
    config = AttackConfig(method="idlg", steps=150, learning_rate=0.1, restarts=2)
    result = invert(grad_fn, params, noisy, jax.random.key(1), SHAPE, CLASSES, config, label)
    assert float(psnr(image, result["images"], RANGE)[0]) < 15.0


def test_vmapped_restarts_equal_a_loop_of_single_restarts(target):
    params, _, label, observed = target
    config = AttackConfig(method="inverting", steps=20, learning_rate=0.1, restarts=2)
    key = jax.random.key(5)
    batch = invert(grad_fn, params, observed, key, SHAPE, CLASSES, config, label)
    one = AttackConfig(method="inverting", steps=20, learning_rate=0.1, restarts=1)
    for r in range(2):
        single = invert(grad_fn, params, observed, key, SHAPE, CLASSES, one, label, first_restart=r)
        np.testing.assert_allclose(single["losses"][0], batch["losses"][r], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(single["images"], batch["all_images"][r], rtol=1e-4, atol=1e-5)
    assert int(np.argmin(batch["losses"])) == int(np.argmin([float(x) for x in batch["losses"]]))


def test_dlg_optimizes_soft_labels_and_idlg_needs_labels(target):
    params, _, label, observed = target
    config = AttackConfig(method="dlg", steps=200, learning_rate=0.1)
    result = invert(grad_fn, params, observed, jax.random.key(2), SHAPE, CLASSES, config)
    assert result["label_probs"].shape == (1, CLASSES)
    assert int(jnp.argmax(result["label_probs"][0])) == int(label[0])
    with pytest.raises(ValueError, match="recover_labels"):
        invert(grad_fn, params, observed, jax.random.key(2), SHAPE, CLASSES, AttackConfig())
    with pytest.raises(ValueError, match="choose one of"):
        AttackConfig(method="gan")


def test_each_original_is_matched_to_its_best_reconstruction():
    rng = np.random.default_rng(0)
    originals = jnp.asarray(rng.uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
    noisy = originals + 0.05 * jnp.asarray(rng.normal(size=originals.shape), jnp.float32)
    shuffled = noisy[jnp.array([2, 0, 1])]
    match = match_reconstructions(originals, shuffled, RANGE)
    assert match["index"].tolist() == [1, 2, 0]
    np.testing.assert_allclose(match["psnr"], psnr(originals, noisy, RANGE), rtol=1e-6)
    assert np.all(np.asarray(match["ssim"]) > 0.9)
    # SSIM of unrelated images is near zero; of an image with itself, one.
    assert float(ssim(originals[:1], originals[1:2], RANGE)[0]) < 0.3
    np.testing.assert_allclose(ssim(originals, originals, RANGE), 1.0, rtol=1e-5)


def test_many_targets_in_one_call_equal_one_call_each(target):
    from jaxfl.attacks import invert_many

    params, image, label, _ = target
    images = jnp.concatenate([image, -image, jnp.flip(image, 1)])[:, None]  # 3 targets, batch 1
    labels = jnp.array([[2], [0], [1]])
    observed = jax.vmap(lambda x, y: grad_fn(params, x, jax.nn.one_hot(y, CLASSES)))(images, labels)
    keys = jax.random.split(jax.random.key(4), 3)
    config = AttackConfig(method="idlg", steps=20, restarts=2)
    many = invert_many(grad_fn, params, observed, keys, SHAPE, CLASSES, config, labels)
    for t in range(3):
        obs = jax.tree.map(lambda g, t=t: g[t], observed)
        one = invert(grad_fn, params, obs, keys[t], SHAPE, CLASSES, config, labels[t])
        np.testing.assert_allclose(many["images"][t], one["images"], rtol=1e-4, atol=1e-5)


def test_a_multi_step_fedavg_update_still_leaks_the_image(target):
    from jaxfl.attacks import local_update_fn

    params, image, label, _ = target
    update = local_update_fn(grad_fn, learning_rate=0.5, steps=3)
    observed = update(params, image, jax.nn.one_hot(label, CLASSES))
    config = AttackConfig(
        method="inverting", steps=300, learning_rate=0.1, tv_weight=0.0, restarts=2
    )
    result = invert(update, params, observed, jax.random.key(1), SHAPE, CLASSES, config, label)
    assert float(psnr(image, result["images"], RANGE)[0]) > 25.0


def _overridden(c, overrides):
    """``c`` with ``section__field=value`` overrides set."""
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def _pipeline_config(**overrides):
    """8 clients of one synthetic 8x8 image each, a sigmoid MLP, one SGD step: iDLG's setting
    through jaxfl's own round."""
    from jaxfl.defaults import default_config

    c = default_config()
    c.data.image_shape, c.data.n_train, c.data.n_val, c.data.n_test = (8, 8, 1), 64, 8, 16
    c.num_clients, c.partition.name, c.partition.heldout_fraction = 8, "iid", 0.0
    c.model.name, c.model.hidden, c.strategy, c.rounds = "mlp", (32,), "vmap", 1
    c.local.optimizer, c.local.learning_rate, c.local.batch_size, c.local.epochs = (
        "sgd", 0.1, 1, 1,
    )  # fmt: skip
    return _overridden(c, overrides)


PIPELINE_ATTACK = AttackConfig(method="idlg", steps=200, learning_rate=0.1, restarts=2)


@pytest.fixture(scope="module")
def pipeline_fed():
    from jaxfl.train import load_federated_data

    return load_federated_data(_pipeline_config())


def test_idlg_through_the_pipeline_recovers_a_clients_image_from_what_it_sends(pipeline_fed):
    from jaxfl.attacks.threats import invert_round

    out = invert_round(_pipeline_config(), pipeline_fed, "client_update", PIPELINE_ATTACK)
    assert out["label_accuracy"] == 1.0
    assert out["psnr"] > 30.0
    # A 3-step FedAvg update (the algorithm's own local training, matched exactly).
    multi = invert_round(
        _pipeline_config(local__epochs=3), pipeline_fed, "client_update", PIPELINE_ATTACK
    )
    assert multi["psnr"] > 30.0


def test_large_local_dp_noise_defeats_the_attack(pipeline_fed):
    from jaxfl.attacks.threats import invert_round

    config = _pipeline_config(dp__mode="local_update", dp__noise_multiplier=1.0, dp__clip_norm=1.0)
    out = invert_round(config, pipeline_fed, "client_update", PIPELINE_ATTACK)
    assert out["psnr"] < 15.0


@pytest.mark.parametrize("aggregator", ["secagg", "ckks"])
def test_a_secure_aggregate_of_8_clients_gives_no_more_than_the_dataset_mean(
    pipeline_fed, aggregator
):
    from jaxfl.attacks.threats import invert_round

    config = _pipeline_config(secure__aggregator=aggregator)
    out = invert_round(config, pipeline_fed, "aggregate", PIPELINE_ATTACK)
    assert out["clients_aggregated"] == 8
    assert out["psnr"] < out["mean_image_psnr"] + 1.0
    with pytest.raises(ValueError, match="no single client's update"):
        invert_round(config, pipeline_fed, "client_update", PIPELINE_ATTACK)


def test_a_client_with_a_static_count_trains_exactly_like_a_traced_one():
    """The attacker's replica (a numpy count: a scan) equals the pipeline's while_loop."""
    from jaxfl.algorithms.local import local_train
    from jaxfl.types import ClientData

    params = MODEL.init(jax.random.key(0), jnp.zeros(SHAPE))["params"]
    x = jax.random.uniform(jax.random.key(1), (5, 6, 6, 1))
    batch = {"image": x, "label": jnp.array([0, 1, 2, 0, 1])}

    def loss_fn(p, b, mask):
        logits = MODEL.apply({"params": p}, b["image"])
        per = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])
        return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0), {"loss_sum": jnp.sum(per * mask)}

    def train(count):
        data = ClientData(batch, jnp.ones(5), count)
        kw = dict(batch_size=2, epochs=2)
        return local_train(loss_fn, optax.sgd(0.1), params, data, jax.random.key(2), **kw)

    static, traced = train(np.int32(5)), jax.jit(train)(jnp.int32(5))
    assert int(static.num_steps) == int(traced.num_steps) == 6
    for a, b in zip(jax.tree.leaves(static.params), jax.tree.leaves(traced.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_attack_launcher_writes_the_table_and_the_figure(tmp_path):
    """``experiments.attack`` on a tiny synthetic config: a row per protection, in order."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    overrides = [
        "--config.data.source=synthetic",
        "--config.data.image_shape=(8,8,1)",
        "--config.data.n_train=64",
        "--config.data.n_test=32",
        "--config.model.hidden=(16,)",
        "--config.attack.protections=('none','secagg','broken_dp')",
        "--config.attack.steps=60",
        "--config.attack.restarts=1",
        "--config.attack.audit_trials=100",
        "--config.attack.mia_rounds=1",
    ]
    cmd = [sys.executable, "-m", "experiments.attack", "--config=configs/attack_idlg.py",
           f"--workdir={tmp_path}", *overrides]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["protection"] for r in rows] == ["none", "secagg", "broken_dp"]
    assert rows[0]["threat"] == "client_update" and rows[1]["threat"] == "aggregate"
    assert rows[2]["epsilon_empirical"] > 0 and "mia_auc_global" in rows[0]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| secagg | aggregate |" in table
    assert (tmp_path / "reconstructions.png").stat().st_size > 5000


class DenseSegmenter(nn.Module):
    """Per-pixel logits from a dense layer: position-specific weights, so a gradient pins both
    the image and its mask (a fully convolutional net's shared kernels leak far less)."""

    @nn.compact
    def __call__(self, x):
        n, h, w = x.shape[:3]
        z = nn.sigmoid(nn.Dense(64)(x.reshape(n, -1)))
        return nn.Dense(h * w * 2)(z).reshape(n, h, w, 2)


def test_dlg_reconstructs_a_segmentation_mask_with_its_image():
    model = DenseSegmenter()

    def seg_grad(p, x, soft_masks):
        loss = lambda q: optax.softmax_cross_entropy(model.apply({"params": q}, x), soft_masks)  # noqa: E731
        return jax.grad(lambda q: loss(q).mean())(p)

    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    blob = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08)
    image = jnp.asarray(np.clip(0.8 * blob + 0.2 * xx, 0, 1) * 2 - 1, jnp.float32)[None, ..., None]
    mask = jnp.asarray(((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.06).astype(np.int32))[None]
    observed = seg_grad(params, image, jax.nn.one_hot(mask, 2))
    config = AttackConfig(method="dlg", steps=300, learning_rate=0.1, restarts=4)
    out = invert(seg_grad, params, observed, jax.random.key(1), image.shape, 2, config,
                 label_shape=mask.shape)  # fmt: skip
    assert out["label_probs"].shape == (1, 8, 8, 2)
    assert float(jnp.mean(jnp.argmax(out["label_probs"], -1) == mask)) == 1.0
    assert float(psnr(image, out["images"], RANGE)[0]) > 30.0
    # Negative control: the mask's majority class alone gets the background only.
    assert float(jnp.mean(mask == 0)) < 0.9


def test_dlg_through_the_pipeline_reconstructs_the_label_it_is_not_told(pipeline_fed):
    """The pipeline's loss takes soft labels as they are, so DLG's label logits get gradients."""
    from jaxfl.attacks.threats import invert_round

    dlg = AttackConfig(method="dlg", steps=300, learning_rate=0.1, restarts=2)
    out = invert_round(_pipeline_config(), pipeline_fed, "client_update", dlg)
    assert out["label_accuracy"] == 1.0
    assert out["psnr"] > 30.0


def _ct_attack_config(**overrides):
    """configs/attack_dlg_ct.py in miniature: 8 simulated scanners, 16x16 lung slices."""
    from configs import attack_dlg_ct

    c = attack_dlg_ct.get_config()
    c.data.ct.phantom_size, c.data.ct.num_slices, c.model.hidden = (16, 16), 2, (32,)
    return _overridden(c, overrides)


@pytest.fixture(scope="module")
def ct_fed():
    from jaxfl.train import load_federated_data

    return load_federated_data(_ct_attack_config())


def test_a_segmentation_clients_update_leaks_its_slice_and_its_mask(ct_fed):
    """DLG through a segmentation run's own client_update: the mask comes back pixel for
    pixel; the secure aggregate of 8 clients gives the mean slice and not the mask."""
    from jaxfl.attacks.threats import invert_round

    dlg = AttackConfig(method="dlg", steps=300, learning_rate=0.1, restarts=2)
    config = _ct_attack_config()
    first = np.asarray(ct_fed.train.examples["mask"])[:, 0]
    target = int(np.flatnonzero((first == 1).any(axis=(1, 2)))[0])  # a slice with a lesion
    out = invert_round(config, ct_fed, "client_update", dlg, target=target)
    true = out["original_masks"]
    assert true.shape == (1, 16, 16) and 0 < (true == 1).sum() < true.size
    assert out["label_accuracy"] == 1.0 and out["mask_dice"] == 1.0
    assert out["psnr"] > 30.0
    secure = invert_round(
        _ct_attack_config(secure__aggregator="secagg"), ct_fed, "aggregate", dlg, target=target
    )
    assert secure["psnr"] < secure["mean_image_psnr"] + 1.0
    assert secure["mask_dice"] < 0.8
    with pytest.raises(ValueError, match="one per pixel: use attack.method='dlg'"):
        invert_round(config, ct_fed, "client_update", PIPELINE_ATTACK)


def test_gradient_matching_recovers_a_batch_of_two_from_one_clients_update(pipeline_fed):
    """Threat (a) with batch k = 2: one full-batch step over two images (labels known to the
    attacker, L2 matching); each original is matched to its reconstruction."""
    from jaxfl.attacks.threats import invert_round

    attack = AttackConfig(method="idlg", steps=400, learning_rate=0.1, restarts=2)
    config = _pipeline_config(local__batch_size=2)
    out = invert_round(config, pipeline_fed, "client_update", attack, batch=2)
    assert out["originals"].shape == out["reconstructions"].shape == (2, 8, 8, 1)
    assert out["psnr"] > 20.0 and out["psnr"] > out["mean_image_psnr"] + 5.0


def test_membership_without_test_examples_is_skipped_with_a_warning(pipeline_fed, caplog):
    """One patient leaves no test split: no non-members, so no membership row (not a crash)."""
    from jaxfl.attacks.report import membership

    empty = {k: np.asarray(v)[:0] for k, v in pipeline_fed.test.items()}
    with caplog.at_level("WARNING"):
        assert membership(_pipeline_config(), pipeline_fed._replace(test=empty)) == {}
    assert "No test examples" in caplog.text
