"""The loop-friendly convolution equals lax.conv_general_dilated in value and gradient."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import lax

from jaxfl.models.conv import conv_general_dilated

LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


@pytest.mark.parametrize(
    "nd,size,kernel,stride,padding",
    [
        (2, 12, 3, 1, "SAME"),
        (2, 12, 3, 2, ((1, 1), (1, 1))),
        (2, 13, 3, 2, "SAME"),
        (2, 7, 5, 1, "VALID"),
        (2, 9, 3, 3, ((2, 0), (0, 1))),
        (3, 6, 3, 2, ((1, 1),) * 3),
        (1, 9, 3, 2, ((1, 0),)),
    ],
)
def test_value_and_gradients_match_lax(nd, size, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, *(size,) * nd, 3))
    w = jax.random.normal(jax.random.key(1), (*(kernel,) * nd, 3, 4))
    strides = (stride,) * nd

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=LAYOUTS[nd])
        return (y * jax.numpy.sin(y)).sum()  # a non-trivial cotangent

    ref = jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1))(x, w)
    out = jax.value_and_grad(lambda x, w: loss(conv_general_dilated, x, w), (0, 1))(x, w)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    for a, b in zip(out[1], ref[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # Second order (Per-FedAvg HF): the Hessian-vector product through the kernel gradient.
    v = jax.random.normal(jax.random.key(2), w.shape)

    def hvp(conv):
        def directional(x, w):
            return jax.numpy.vdot(jax.grad(lambda w: loss(conv, x, w))(w), v)

        return jax.grad(directional, (0, 1))(x, w)

    for a, b in zip(hvp(conv_general_dilated), hvp(lax.conv_general_dilated), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


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
