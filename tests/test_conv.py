"""The loop-friendly convolution equals lax.conv_general_dilated in value and gradient."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import lax

from jaxfl.models.conv import conv3d_impl, conv_general_dilated, im2col_conv

LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


CASES = [
    (2, 12, 3, 1, "SAME"),
    (2, 12, 3, 2, ((1, 1), (1, 1))),
    (2, 13, 3, 2, "SAME"),
    (2, 7, 5, 1, "VALID"),
    (2, 9, 3, 3, ((2, 0), (0, 1))),
    (3, 6, 3, 2, ((1, 1),) * 3),
    (1, 9, 3, 2, ((1, 0),)),
]


# 3D convolutions have two implementations (im2col on CPU, the custom VJP elsewhere): both.
@pytest.mark.parametrize(
    "nd,size,kernel,stride,padding,impl",
    [(*c, "canonical") for c in CASES]
    + [(3, 6, 3, 1, "SAME", "im2col"), (3, 6, 3, 2, ((1, 1),) * 3, "im2col")],
)
def test_value_and_gradients_match_lax(nd, size, kernel, stride, padding, impl):
    with conv3d_impl(impl):
        _check_against_lax(nd, size, kernel, stride, padding)


def _check_against_lax(nd, size, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, *(size,) * nd, 3))
    w = jax.random.normal(jax.random.key(1), (*(kernel,) * nd, 3, 4))
    strides = (stride,) * nd

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=LAYOUTS[nd])
        return (y * jax.numpy.sin(y)).sum()  # a non-trivial cotangent

    ref = jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1))(x, w)
    out = jax.value_and_grad(lambda x, w: loss(conv_general_dilated, x, w), (0, 1))(x, w)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4)
    for a, b in zip(out[1], ref[1], strict=True):
        # float32 sums in another order: the error scales with the gradient's largest entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-4, 1e-5 * np.abs(b).max()))

    # Second order (Per-FedAvg HF): the Hessian-vector product through the kernel gradient.
    v = jax.random.normal(jax.random.key(2), w.shape)

    def hvp(conv):
        def directional(x, w):
            return jax.numpy.vdot(jax.grad(lambda w: loss(conv, x, w))(w), v)

        return jax.grad(directional, (0, 1))(x, w)

    for a, b in zip(hvp(conv_general_dilated), hvp(lax.conv_general_dilated), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-3, 2e-5 * np.abs(b).max()))


def test_uses_custom_vjp_for_simple_convs_and_falls_back_otherwise():
    x = jax.numpy.ones((1, 8, 8, 2))
    w = jax.numpy.ones((3, 3, 2, 2))
    simple = jax.make_jaxpr(
        lambda x: conv_general_dilated(x, w, (1, 1), "SAME", None, None, LAYOUTS[2])
    )
    dilated = jax.make_jaxpr(
        lambda x: conv_general_dilated(x, w, (1, 1), "SAME", None, (2, 2), LAYOUTS[2])
    )
    assert "custom_vjp" in str(simple(x))
    assert "custom_vjp" not in str(dilated(x))
    np.testing.assert_allclose(
        conv_general_dilated(x, w, (1, 1), "SAME", None, (2, 2), LAYOUTS[2]),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", None, (2, 2), LAYOUTS[2]),
    )


def test_im2col_takes_anisotropic_strides_padding_and_kernels():
    # The 3D DenseNet stem's geometry (stride (1, 2, 2), padding 3), with a smaller kernel.
    for shape, kernel, strides, pads in [
        ((2, 9, 10, 11, 1), (3, 5, 7), (1, 2, 2), ((3, 3),) * 3),
        ((1, 5, 6, 7, 3), (2, 3, 1), (2, 1, 3), ((0, 1), (1, 0), (0, 0))),
    ]:
        x = jax.random.normal(jax.random.key(0), shape)
        w = jax.random.normal(jax.random.key(1), (*kernel, shape[-1], 4))
        ref = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=LAYOUTS[3])
        out = jax.jit(im2col_conv, static_argnums=(2, 3))(x, w, strides, pads)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_3d_convs_run_as_im2col_on_cpu_and_2d_convs_do_not():
    x3, w3 = jax.numpy.ones((1, 4, 4, 4, 2)), jax.numpy.ones((3, 3, 3, 2, 2))
    x2, w2 = jax.numpy.ones((1, 4, 4, 2)), jax.numpy.ones((3, 3, 2, 2))

    def conv3(x):  # a fresh function each time: make_jaxpr caches traces per function
        return jax.make_jaxpr(
            lambda x: conv_general_dilated(x, w3, (1,) * 3, "SAME", dimension_numbers=LAYOUTS[3])
        )(x)

    conv2 = jax.make_jaxpr(
        lambda x: conv_general_dilated(x, w2, (1,) * 2, "SAME", dimension_numbers=LAYOUTS[2])
    )
    assert "conv_general_dilated" not in str(conv3(x3)) and "dot_general" in str(conv3(x3))
    assert "custom_vjp" in str(conv2(x2))
    with conv3d_impl("canonical"):
        assert "custom_vjp" in str(conv3(x3))
    with pytest.raises(ValueError, match="choose one of"), conv3d_impl("cudnn"):
        pass
