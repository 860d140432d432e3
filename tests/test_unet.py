"""Tests for jaxfl.models.unet: UpConv == transposed conv, UNet shapes / size / errors, overfit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import numpy_init

from jaxfl.data.phantoms import phantom_slices
from jaxfl.models import count_params
from jaxfl.models.unet import UNet, UpConv
from jaxfl.tasks.seg_ops import dice_stats, per_case_dice, segmentation_loss


def _param_shapes(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))["params"]


_init = numpy_init


def _upconv_problem(c=3, f=5, h=4, w=6):
    """Random input ``[2, h, w, c]`` (h != w to catch row/column mix-ups) and UpConv params."""
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (2, h, w, c))
    params = {
        "conv": {"kernel": jax.random.normal(ks[1], (1, 1, c, 4 * f))},
        "bias": jax.random.normal(ks[2], (f,)),
    }
    # The init'd tree has exactly this structure.
    init = _param_shapes(UpConv(f), x.shape)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    return x, params


def _direct_kernel(params, c, f):
    """UpConv's 1x1 kernel ``[1, 1, C, 4F]`` as the per-sub-pixel kernel ``k [2, 2, C, F]``.

    UpConv splits its 4F output channels as ``(a, b, f)`` (row offset, column offset, feature),
    so ``k[a, b] = kernel[0, 0, :, (2a + b) F : (2a + b + 1) F]`` and output pixel
    ``(2i + a, 2j + b) = x[i, j] @ k[a, b] + bias``.
    """
    return np.asarray(params["conv"]["kernel"])[0, 0].reshape(c, 2, 2, f).transpose(1, 2, 0, 3)


def test_upconv_matches_direct_formula():
    c, f = 3, 5
    x, params = _upconv_problem(c, f)
    y = np.asarray(UpConv(f).apply({"params": params}, x))
    k, bias, xn = _direct_kernel(params, c, f), np.asarray(params["bias"]), np.asarray(x)
    n, h, w, _ = xn.shape
    ref = np.zeros((n, 2 * h, 2 * w, f), np.float32)
    for i in range(h):
        for j in range(w):
            for a in range(2):
                for b in range(2):
                    ref[:, 2 * i + a, 2 * j + b] = xn[:, i, j] @ k[a, b] + bias
    assert y.shape == (n, 2 * h, 2 * w, f)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_upconv_equals_conv_transpose():
    """UpConv is a 2x2 stride-2 transposed convolution, given the right kernel mapping.

    Found numerically and explained: ``nn.ConvTranspose`` (default ``transpose_kernel=False``)
    runs ``lax.conv_transpose``, i.e. a correlation of the stride-dilated, (k-1)-padded input
    with the kernel *as stored*; output row ``2i + a`` then meets ``x[i]`` at kernel row
    ``1 - a``. So its kernel ``[2, 2, C, F]`` is the direct kernel flipped in both spatial
    axes, ``k[::-1, ::-1]``. With ``transpose_kernel=True`` (the gradient-of-conv / PyTorch
    ``ConvTranspose2d`` convention) flax flips it back and swaps in/out channels, so the
    kernel is ``k`` itself, stored as ``[2, 2, F, C]``. The unflipped kernel with the default
    convention does *not* match (checked below, so the flip is really needed).
    """
    c, f = 3, 5
    x, params = _upconv_problem(c, f)
    y = UpConv(f).apply({"params": params}, x)
    k, bias = _direct_kernel(params, c, f), params["bias"]

    def conv_t(kernel, transpose_kernel=False):
        mod = nn.ConvTranspose(
            f, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=transpose_kernel
        )
        return mod.apply({"params": {"kernel": jnp.asarray(kernel), "bias": bias}}, x)

    assert conv_t(k[::-1, ::-1]).shape == y.shape
    np.testing.assert_allclose(conv_t(k[::-1, ::-1]), y, atol=1e-5)
    np.testing.assert_allclose(conv_t(k.transpose(0, 1, 3, 2), True), y, atol=1e-5)
    assert np.abs(np.asarray(conv_t(k)) - np.asarray(y)).max() > 1e-2
    # The same through lax directly (HWIO kernel, no flip requested).
    lax_y = jax.lax.conv_transpose(
        x, jnp.asarray(k[::-1, ::-1]), (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(lax_y + bias, y, atol=1e-5)


def test_upconv_gradients_match_conv_transpose():
    # Same function => same input gradient (UpConv runs through jaxfl's custom-VJP conv).
    c, f = 3, 5
    x, params = _upconv_problem(c, f)
    k = _direct_kernel(params, c, f)
    ct = nn.ConvTranspose(f, (2, 2), strides=(2, 2), padding="VALID")
    ct_params = {"kernel": jnp.asarray(k[::-1, ::-1]), "bias": params["bias"]}
    g_up = jax.grad(lambda x: jnp.sum(jnp.sin(UpConv(f).apply({"params": params}, x))))(x)
    g_ct = jax.grad(lambda x: jnp.sum(jnp.sin(ct.apply({"params": ct_params}, x))))(x)
    np.testing.assert_allclose(g_up, g_ct, atol=1e-4)


def _unet_param_count(num_classes, in_ch, base, depth):
    """Hand count: bias-free 3x3 convs + GroupNorm (scale, bias); UpConv 1x1 to 4F + F bias."""
    widths = [base * 2**i for i in range(depth + 1)]

    def double_conv(cin, cout):
        return 9 * cin * cout + 9 * cout * cout + 2 * (2 * cout)

    total, cin = 0, in_ch
    for w in widths:  # down levels and the bottleneck
        total += double_conv(cin, w)
        cin = w
    for i in reversed(range(depth)):
        w = widths[i]
        total += widths[i + 1] * 4 * w + w  # UpConv
        total += double_conv(2 * w, w)  # after concatenating the skip
    return total + widths[0] * num_classes + num_classes  # 1x1 head with bias


def test_unet_parameter_count():
    n = count_params(_param_shapes(UNet(2), (1, 16, 16, 1)))
    assert n == _unet_param_count(2, 1, 16, 4) == 1_942_306
    # NB: UNet's docstring claims 1,944,674 for this configuration; the architecture as written
    # (and as described there) has 1,942,306. Other configurations follow the same formula:
    for kw, in_ch in (({"base_features": 8, "depth": 2, "groups": 4}, 3), ({"depth": 3}, 1)):
        n = count_params(_param_shapes(UNet(3, **kw), (1, 16, 16, in_ch)))
        assert n == _unet_param_count(3, in_ch, kw.get("base_features", 16), kw["depth"])


def test_unet_output_shape():
    model = UNet(3, base_features=8, depth=2, groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 16, 24, 1))
    params = _init(model, x.shape)
    y = jax.jit(model.apply)({"params": params}, x)
    assert y.shape == (2, 16, 24, 3)
    assert y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    # Default depth 4 on a non-square input (shape only).
    out = jax.eval_shape(
        lambda x: UNet(2).init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 32, 48, 1))
    )
    assert out.shape == (1, 32, 48, 2)


def test_unet_errors():
    x = jnp.zeros((1, 20, 16, 1))
    with pytest.raises(ValueError, match=r"needs H and W divisible by 2\*\*3 = 8.*H=20, W=16"):
        UNet(2, depth=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"e\.g\. 24×16"):
        UNet(2, depth=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"groups=8 must divide every channel width"):
        UNet(2, base_features=12, groups=8).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"does not divide \[4\]"):
        UNet(2, base_features=4, depth=1, groups=8).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"expects input \[N, H, W, C\]"):
        UNet(2).init(jax.random.key(0), jnp.zeros((16, 16, 1)))
    with pytest.raises(ValueError, match="num_classes=0"):
        UNet(0).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def test_tiny_unet_overfits_phantom_lesions():
    """A tiny U-Net memorises the lesions of a handful of phantom slices: Dice > 0.9."""
    s = phantom_slices(num_sites=1, patients_per_site=1, num_slices=20, size=(32, 32))
    keep = s.mask.reshape(s.num_slices, -1).any(axis=1)
    x, y = jnp.asarray(s.image[keep]), jnp.asarray(s.mask[keep])
    assert 6 <= x.shape[0] <= 12 and x.shape[1:] == (32, 32, 1)
    assert int(y.sum()) >= 50

    model = UNet(2, base_features=8, depth=2, groups=4)
    params = _init(model, x.shape)
    loss_fn = segmentation_loss("ce+dice")
    opt = optax.adam(3e-3)

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(
                lambda p: loss_fn(model.apply({"params": p}, x), y).mean()
            )(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, (params, opt_state), None, length=300)

    (params, _), losses = train(params, opt.init(params))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.2 * losses[0]

    pred = np.asarray(jnp.argmax(model.apply({"params": params}, x), axis=-1))
    truth = np.asarray(y)
    # Independent Dice of the foreground over all kept slices ...
    dice = 2 * np.sum((pred == 1) & (truth == 1)) / (np.sum(pred == 1) + np.sum(truth == 1))
    assert dice > 0.9, f"foreground Dice {dice:.3f} after 300 steps, losses {losses[::50]}"
    # ... agrees with the module's volume-level Dice of this single case.
    _, case_dice = per_case_dice(dice_stats(jnp.asarray(pred), y, 2), s.patient[keep])
    np.testing.assert_allclose(case_dice, [[dice]])
