"""A convolution whose gradients stay fast inside XLA:CPU loops.

Measured on XLA:CPU (jax 0.10): a conv's *kernel gradient* inside a ``while``/``scan`` body or a
``cond`` branch is 5-6x slower than the same op at top level (SmallCNN, batch 32: 190 ms vs
33 ms per step). XLA rewrites top-level convolutions into its canonical
``b01f_01io->b01f`` form (explicit transposes + a fast Eigen/oneDNN kernel), but leaves the
``f01b_i01o->01bf`` convolutions that JAX's transpose rule emits untouched inside nested
computations, where they fall to a slow generic loop. Local training runs its steps in a
``while_loop``, so every model trained by jaxfl hits this.

:func:`conv_general_dilated` computes the same values and gradients as
``lax.conv_general_dilated`` for channel-last convolutions without dilation or groups, but its
custom VJP writes both gradient convolutions in canonical form with explicit transposes, which
XLA:CPU runs on the fast path wherever they are. Pass it to ``flax.linen.Conv`` via
``conv_general_dilated=``. Other configurations fall back to ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax import lax


def _dims(nd: int) -> lax.ConvDimensionNumbers:
    """Channel-last dimension numbers (NHWC / HWIO / NHWC and the 3D analogue)."""
    spatial = "".join("DHW"[3 - nd :])
    return lax.conv_dimension_numbers(
        (1,) * (nd + 2), (1,) * (nd + 2), (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, w, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]):
    """``x [N, *S, Ci]`` conv ``w [*K, Ci, Co]`` with ``strides`` and explicit ``padding``."""
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_dims(x.ndim - 2))


def _fwd(x, w, strides, padding):
    return _canonical_conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, g):
    x, w = res
    nd = x.ndim - 2
    dims = _dims(nd)
    in_sp, k_sp, out_sp = x.shape[1:-1], w.shape[:nd], g.shape[1:-1]
    # dx: full correlation of the (stride-dilated) output gradient with the flipped kernel.
    w_t = lax.rev(w, tuple(range(nd))).swapaxes(-1, -2)  # [*K, Co, Ci]
    pad_x = []
    for i in range(nd):
        before = k_sp[i] - 1 - padding[i][0]
        after = in_sp[i] + k_sp[i] - 1 - ((out_sp[i] - 1) * strides[i] + 1) - before
        pad_x.append((before, after))
    # With unit strides both gradients are plain canonical convolutions: route them through
    # this custom VJP again, so second derivatives (Per-FedAvg HF's Hessian-vector products)
    # stay on XLA:CPU's fast path too.
    unit = all(s == 1 for s in strides)
    if unit:
        dx = _canonical_conv(g, w_t, strides, tuple(pad_x))
    else:
        dx = lax.conv_general_dilated(
            g, w_t, (1,) * nd, pad_x, lhs_dilation=strides, dimension_numbers=dims
        )
    # dw: treat input channels as the batch and examples as features, so the contraction over
    # examples is an ordinary canonical convolution (what XLA does to top-level convs).
    perm = (x.ndim - 1, *range(1, nd + 1), 0)
    x_t = x.transpose(perm)  # [Ci, *S, N]
    g_t = g.transpose(*range(1, nd + 1), 0, x.ndim - 1)  # [*O, N, Co]
    pad_w = []
    for i in range(nd):
        after = (out_sp[i] - 1) * strides[i] + 1 - in_sp[i] + k_sp[i] - padding[i][0] - 1
        pad_w.append((padding[i][0], after))
    if unit:
        dw = _canonical_conv(x_t, g_t, strides, tuple(pad_w))  # [Ci, *K, Co]
    else:
        dw = lax.conv_general_dilated(
            x_t, g_t, (1,) * nd, pad_w, rhs_dilation=strides, dimension_numbers=dims
        )
    dw = dw.transpose(*range(1, nd + 1), 0, x.ndim - 1)
    return dx, dw


_canonical_conv.defvjp(_fwd, _bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    **kwargs,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (as flax's ``nn.Conv`` calls it).

    Uses the loop-friendly VJP for channel-last, undilated, ungrouped convolutions.
    """
    nd = lhs.ndim - 2
    simple = (
        nd in (1, 2, 3)
        and not kwargs.get("batch_group_count", 1) > 1
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1,) * nd))
        and all(d == 1 for d in (rhs_dilation or (1,) * nd))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _dims(nd)
    )
    if not simple:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            **kwargs,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:nd], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in np.asarray(padding).reshape(nd, 2))
    return _canonical_conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
