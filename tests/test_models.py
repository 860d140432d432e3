"""Tests for jaxfl.models (SmallCNN, DPResNet, registry) and jaxfl.metrics."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxfl.factories import init_params
from jaxfl.metrics import accuracy, binary_auc, macro_auc_ovr, softmax
from jaxfl.models import MODELS, DPResNet, SmallCNN, count_params, get_model
from jaxfl.models.resnet import _conv

KEY = jax.random.PRNGKey(0)


def _param_shapes(model, shape):
    """Parameter ShapeDtypeStructs of ``model`` for input ``shape``, without running init."""
    return jax.eval_shape(model.init, KEY, jnp.zeros(shape, jnp.float32))["params"]


def _init(model, shape):
    """Cheap stand-in for ``model.init``: N(0, 0.05) numpy params of the right shapes.

    Real init compiles a random draw per kernel on CPU (seconds for DPResNet); the tests only
    need shapes and a numerically sane forward pass.
    """
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
        _param_shapes(model, shape),
    )


@pytest.fixture(scope="module")
def dpresnet_params():
    return _param_shapes(DPResNet(num_classes=8), (1, 28, 28, 3))


# --------------------------------------------------------------------------- models


def test_dpresnet_param_count_matches_seed(dpresnet_params):
    assert count_params(dpresnet_params) == 4_802_120


def test_count_params_on_real_init():
    params = jax.jit(SmallCNN(num_classes=3).init)(KEY, jnp.zeros((1, 8, 8, 1)))["params"]
    # conv 1→32, conv 32→64, dense 2·2·64→128, dense 128→3 (kernels + biases).
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (256 * 128 + 128) + (128 * 3 + 3)
    assert count_params(params) == expected


def test_init_params_equals_flax_eager_init_bit_for_bit():
    """``factories.init_params`` compiles init once (at a lower LLVM level on CPU) for speed;
    the parameters must be exactly flax's eager ``model.init``, or seeded runs would change."""
    model = SmallCNN(num_classes=3)
    images = jnp.zeros((5, 12, 12, 2), jnp.float32)
    key = jax.random.key(7)
    eager = model.init(key, jnp.zeros((1, 12, 12, 2), jnp.float32))["params"]
    fast = init_params(model, images, key)
    assert jax.tree.structure(fast) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Negative control: another key gives other parameters, so the comparison can fail.
    other = init_params(model, images, jax.random.key(8))
    assert not np.array_equal(
        np.asarray(other["Conv_0"]["kernel"]), np.asarray(eager["Conv_0"]["kernel"])
    )


def test_dpresnet_convs_are_3x3_without_bias(dpresnet_params):
    flat = traverse_util.flatten_dict(dpresnet_params, sep="/")
    conv_kernels = {k: v for k, v in flat.items() if "conv" in k}
    assert len(conv_kernels) == 8  # stem 2 + 3 blocks × 2
    for name, kernel in conv_kernels.items():
        assert name.endswith("kernel"), name  # no conv bias
        assert kernel.shape[:2] == (3, 3), name
    assert flat["res2/conv1/kernel"].shape == (3, 3, 128, 256)
    assert flat["res3/conv1/kernel"].shape == (3, 3, 256, 512)
    assert flat["fc/kernel"].shape == (512, 8) and flat["fc/bias"].shape == (8,)


def test_dpresnet_groupnorm_32_groups_and_eps():
    norms = []

    def record_groupnorms(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.GroupNorm):
            norms.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_groupnorms):
        _param_shapes(DPResNet(8), (1, 28, 28, 3))
    assert len(norms) == 8
    assert all(n.num_groups == 32 and n.epsilon == 1e-5 for n in norms)


def test_dpresnet_forward_is_finite():
    model = DPResNet(8)
    x = jax.random.normal(KEY, (2, 28, 28, 3))
    logits = jax.jit(model.apply)({"params": _init(model, x.shape)}, x)
    assert logits.shape == (2, 8) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_dpresnet_shapes_and_stride2_feature_maps(dpresnet_params):
    x = jnp.zeros((2, 28, 28, 3))
    apply = functools.partial(
        DPResNet(8).apply,
        capture_intermediates=lambda mdl, _: mdl.name in ("res1", "res2", "res3"),
        mutable=["intermediates"],
    )
    logits, state = jax.eval_shape(apply, {"params": dpresnet_params}, x)
    assert logits.shape == (2, 8)
    inter = state["intermediates"]
    assert inter["res1"]["__call__"][0].shape == (2, 28, 28, 128)
    assert inter["res2"]["__call__"][0].shape == (2, 14, 14, 256)
    assert inter["res3"]["__call__"][0].shape == (2, 7, 7, 512)


def test_dpresnet_stride2_padding_matches_pytorch():
    # With PyTorch's (1, 1) padding the first stride-2 output pixel is centred on input pixel 0,
    # so its 3x3 window sees only the bottom-right 2x2 of the image corner; 'SAME' would differ.
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = 1.0
    conv = _conv(1, nd=2, stride=2)
    kernel = np.arange(9, dtype=np.float32).reshape(3, 3, 1, 1)
    y = conv.apply({"params": {"kernel": kernel}}, x)
    assert y.shape == (1, 2, 2, 1)
    assert float(y[0, 0, 0, 0]) == kernel[1, 1, 0, 0]


def test_dpresnet_3d_volume():
    model = DPResNet(2)
    x = jnp.zeros((1, 8, 8, 8, 1))
    params = _param_shapes(model, x.shape)
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 1, 64)
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (1, 2)


@pytest.mark.parametrize(
    "shape", [(2, 28, 28, 1), (2, 28, 28, 3), (2, 16, 16, 16, 1)], ids=["gray", "rgb", "3d"]
)
def test_small_cnn_output_shapes(shape):
    model = SmallCNN(num_classes=5)
    x = jax.random.normal(KEY, shape)
    params = _init(model, shape)
    out = jax.jit(model.apply)({"params": params}, x)
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    kernel = params["Conv_0"]["kernel"]
    assert kernel.shape[:-2] == (3,) * (len(shape) - 2)


def test_registry_and_unknown_name():
    assert set(MODELS) == {"cnn", "densenet", "dpresnet", "mlp", "unet"}
    assert isinstance(get_model("dpresnet", 8), DPResNet)
    assert get_model("cnn", 3, hidden=16).hidden == 16
    assert get_model("mlp", 3, hidden=(8,), activation="relu").activation == "relu"
    with pytest.raises(ValueError, match="model.activation='gelu'"):
        get_model("mlp", 3, activation="gelu").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="cnn, densenet, dpresnet"):
        get_model("vgg", 10)


def test_a_per_pixel_mlp_gives_logits_for_every_pixel():
    model = get_model("mlp", 3, hidden=(8,), per_pixel=True)
    x = jax.random.normal(KEY, (2, 5, 4, 1))
    params = _init(model, x.shape)
    out = model.apply({"params": params}, x)
    assert out.shape == (2, 5, 4, 3)
    assert params["head"]["kernel"].shape == (8, 5 * 4 * 3)


# --------------------------------------------------------------------------- metrics


def test_accuracy_hand_example():
    labels = np.array([0, 1, 2, 1])
    logits = np.array([[2.0, 1, 0], [0, 3, 1], [1, 0, 0], [0, 5, 4]])
    assert accuracy(labels, logits) == pytest.approx(0.75)
    assert accuracy(labels[:, None], softmax(logits)) == pytest.approx(0.75)


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))
    assert np.allclose(p.sum(-1), 1.0) and np.allclose(p[0], 0.5)


def test_binary_auc_hand_example():
    # Positives 0.8, 0.4 vs negatives 0.4, 0.1: pairs win 1 + 1 + 0.5 (tie) + 1 of 4.
    assert binary_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)


def _tied_scores(rng, n, c):
    """Probabilities [n, c] from integer logits in {0, 1, 2}, so many scores tie exactly."""
    return softmax(rng.integers(0, 3, size=(n, c)).astype(np.float64))


def test_macro_auc_binary_matches_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = _tied_scores(rng, 200, 2)
    assert macro_auc_ovr(y, p) == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert macro_auc_ovr(y, p[:, 1]) == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)


def test_macro_auc_multiclass_matches_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    p = _tied_scores(rng, 300, 5)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(5)])
    assert macro_auc_ovr(y, p) == pytest.approx(expected, abs=1e-12)
    # For [N, C] scores sklearn's own macro OvR is the same quantity.
    assert macro_auc_ovr(y, p) == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12
    )


def test_macro_auc_skips_missing_class():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(2)
    y = rng.choice([0, 1, 3], 100)  # class 2 never appears
    p = _tied_scores(rng, 100, 4)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1, 3)])
    assert macro_auc_ovr(y, p) == pytest.approx(expected, abs=1e-12)


def test_macro_auc_single_class_is_nan():
    rng = np.random.default_rng(3)
    assert np.isnan(macro_auc_ovr(np.full(10, 2), rng.random((10, 4))))
    assert np.isnan(macro_auc_ovr(np.ones(10, int), rng.random((10, 2))))
