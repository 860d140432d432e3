"""The 3D DenseNet-BC: shapes, parameter counts, GroupNorm's per-example normalization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxfl.models import DenseNet, count_params, densenet121, get_model
from jaxfl.models.densenet import norm_groups


def _shapes(model, shape):
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    return params, jax.eval_shape(model.apply, params, jnp.zeros(shape))


def densenet_param_count(k, blocks, init, bn_size=4, classes=2, hidden=20, in_ch=1, nd=3):
    """DenseNet-BC's parameters counted by hand: bias-free convs, norm scale + bias, 2 denses."""
    total = 7**nd * in_ch * init + 2 * init
    c = init
    for i, layers in enumerate(blocks):
        for _ in range(layers):
            total += 2 * c + c * bn_size * k + 2 * bn_size * k + 3**nd * bn_size * k * k
            c += k
        if i < len(blocks) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * hidden + hidden + hidden * classes + classes


def test_densenet121_3d_parameter_count_and_layout():
    params, out = _shapes(densenet121(num_classes=2), (1, 70, 70, 70, 1))
    assert out.shape == (1, 2)
    assert count_params(params) == densenet_param_count(32, (6, 12, 24, 16), 32) == 11_144_822
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    assert flat["stem/kernel"].shape == (7, 7, 7, 1, 32)
    assert flat["block0_layer0/conv1/kernel"].shape == (1, 1, 1, 32, 128)  # bn_size 4 * k 32
    assert flat["block0_layer0/conv2/kernel"].shape == (3, 3, 3, 128, 32)
    assert flat["transition0/conv/kernel"].shape == (1, 1, 1, 224, 112)  # 32 + 6 * 32, halved
    assert flat["final_norm/scale"].shape == (1020,)  # 508 + 16 * 32
    assert flat["fc1/kernel"].shape == (1020, 20) and flat["fc2/kernel"].shape == (20, 2)
    assert sum(k.endswith("conv2/kernel") for k in flat) == 6 + 12 + 24 + 16


def test_compact_default_counts_and_takes_2d_and_3d():
    params, out = _shapes(DenseNet(num_classes=3), (2, 28, 28, 28, 1))
    assert out.shape == (2, 3)
    assert count_params(params) == densenet_param_count(8, (2, 2, 2), 16, classes=3)
    _, out2d = _shapes(get_model("densenet", 3), (2, 28, 28, 1))
    assert out2d.shape == (2, 3)
    with pytest.raises(ValueError, match="block_config"):
        _shapes(DenseNet(num_classes=2, block_config=()), (1, 8, 8, 8, 1))
    with pytest.raises(ValueError, match="expects"):
        _shapes(DenseNet(num_classes=2), (8, 8))


def test_norm_groups_divide_every_densenet121_width():
    for channels in (16, 32, 112, 128, 224, 248, 508, 1020):
        g = norm_groups(channels)
        assert channels % g == 0 and g <= 32 and channels // g >= 8
    assert norm_groups(508) == 4 and norm_groups(1020) == 30 and norm_groups(256) == 32
    assert norm_groups(16) == 2 and norm_groups(12) == 1  # never instance norm


@pytest.fixture(scope="module")
def tiny_volumes():
    x = jax.random.normal(jax.random.key(1), (3, 4, 8, 8, 1))
    small = dict(num_classes=2, growth_rate=4, block_config=(1, 1), init_features=8, stem_kernel=3)
    model, plain = DenseNet(**small), DenseNet(**small, norm="none")
    return x, model, plain


def test_groupnorm_normalizes_each_example_alone(tiny_volumes):
    x, model, plain = tiny_volumes
    params = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    # The stem conv has no bias, so GroupNorm right after it undoes any positive scale of the
    # input: the logits do not change. Without normalization they do (negative control).
    np.testing.assert_allclose(apply(params, 50.0 * x), apply(params, x), rtol=1e-3, atol=1e-4)
    # The control's weights are the model's own (its tree is the model's minus the norms):
    # tracing its init is enough, compiling a second init costs seconds.
    shapes = traverse_util.flatten_dict(jax.eval_shape(plain.init, jax.random.key(0), x))
    weights = traverse_util.flatten_dict(params)
    plain_params = traverse_util.unflatten_dict({k: weights[k] for k in shapes})
    plain_apply = jax.jit(plain.apply)
    assert not np.allclose(plain_apply(plain_params, 50.0 * x), plain_apply(plain_params, x))
    # One example's logits never depend on the rest of its batch (BatchNorm's would).
    other = x.at[1:].set(jax.random.normal(jax.random.key(2), x[1:].shape) * 3.0)
    np.testing.assert_allclose(apply(params, other)[0], apply(params, x)[0], rtol=1e-5, atol=1e-6)
    assert not any("norm" in k for k in traverse_util.flatten_dict(plain_params["params"]))
