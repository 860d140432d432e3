"""DenseNet-BC for 3D volumes (and 2D images): PPPML-HMI's CT classifier, with GroupNorm.

The reference code's ``densenet121_3d`` (PyTorch, ``Net.py``) is this architecture with
``growth_rate=32, block_config=(6, 12, 24, 16)`` and BatchNorm; :func:`densenet121` builds it.

**GroupNorm, not BatchNorm.** BatchNorm normalizes with statistics of the whole batch, so one
example's output (and gradient) depends on the other examples in it: DP-SGD's per-example
clipping then no longer bounds one record's influence. Its running statistics are also
per-client state outside the parameters, which FedAvg cannot average (PPPML-HMI leaves them
un-averaged) and secure aggregation does not see. GroupNorm normalizes each example on its own
and has only parameters, so every jaxfl algorithm, DP mode and aggregator applies unchanged.

Differences from the reference beyond the norm: the classifier's Dropout is left out (jaxfl
models are deterministic functions of parameters and input; DP noise, not dropout, is the
regularizer here), and the head keeps the reference's Linear(features, 20) -> Linear(20,
classes) with no activation between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfl.models.conv import conv_general_dilated

_GN_EPS = 1e-5  # PyTorch's epsilon
_GN_MAX_GROUPS = 32
_GN_MIN_GROUP_SIZE = 8


def norm_groups(
    channels: int, max_groups: int = _GN_MAX_GROUPS, min_group_size: int = _GN_MIN_GROUP_SIZE
) -> int:
    """The most GroupNorm groups that divide ``channels``, at most ``max_groups`` and with at
    least ``min_group_size`` channels each (1 group if none qualifies).

    DenseNet's channel counts are sums of the growth rate and halvings of them (DenseNet-121:
    112, 248, 508, 1020), so a fixed group count would not divide them all. The group-size
    floor matters: one channel per group is instance normalization, which zeroes every
    channel's spatial mean, and the global average pool after the final norm then sees almost
    nothing (measured: the compact network with 16 groups of 1 channel stayed at test AUC
    0.46-0.54 on AdrenalMNIST3D after 4 epochs, where the same network without norms reached
    0.77).
    """
    fits = [
        g
        for g in range(1, min(max_groups, channels) + 1)
        if channels % g == 0 and channels // g >= min_group_size
    ]
    return max(fits, default=1)


NORMS = ("group", "none")


def _norm_relu(x: jax.Array, name: str, norm: str) -> jax.Array:
    if norm == "none":
        return nn.relu(x)
    groups = norm_groups(x.shape[-1])
    return nn.relu(nn.GroupNorm(num_groups=groups, epsilon=_GN_EPS, name=name)(x))


def _conv(features: int, kernel: Sequence[int], name: str, strides=None, padding=None) -> nn.Conv:
    nd = len(kernel)
    return nn.Conv(
        features,
        kernel_size=tuple(kernel),
        strides=tuple(strides or (1,) * nd),
        padding=padding or tuple((k // 2, k // 2) for k in kernel),
        use_bias=False,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class DenseLayer(nn.Module):
    """norm → ReLU → 1^nd conv (bn_size·k) → norm → ReLU → 3^nd conv (k); output ``[.., C + k]``."""

    growth_rate: int
    bn_size: int
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Append ``growth_rate`` new feature maps to ``x [N, *S, C]``."""
        nd = x.ndim - 2
        y = _norm_relu(x, "norm1", self.norm)
        y = _conv(self.bn_size * self.growth_rate, (1,) * nd, "conv1")(y)
        y = _conv(self.growth_rate, (3,) * nd, "conv2")(_norm_relu(y, "norm2", self.norm))
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """norm → ReLU → 1^nd conv to ``features`` → 2^nd average pool, stride 2."""

    features: int
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, *S, C]`` → ``[N, *S // 2, features]``."""
        nd = x.ndim - 2
        x = _conv(self.features, (1,) * nd, "conv")(_norm_relu(x, "norm", self.norm))
        return nn.avg_pool(x, (2,) * nd, strides=(2,) * nd)


class DenseNet(nn.Module):
    """DenseNet-BC: ``[N, D, H, W, C]`` (or ``[N, H, W, C]``) float32 → logits ``[N, classes]``.

    Stem: ``stem_kernel``^nd conv (7, padding 3, as the reference) with stride (1, 2, 2) (3D;
    (2, 2) in 2D) to ``init_features`` → norm → ReLU → 3^nd max-pool, stride 2, padding 1.
    Then one dense block of ``block_config[i]`` :class:`DenseLayer` per entry, with a
    :class:`Transition` halving
    the channels (``compression``) between blocks; final norm → ReLU → global average pool →
    Dense(``hidden``) → Dense(``num_classes``). The default is the compact network that trains
    on 2 CPU cores (see README); :func:`densenet121` is the reference's. ``norm="none"`` drops
    every normalization (a control for tests and ablations).
    """

    num_classes: int
    growth_rate: int = 8
    block_config: Sequence[int] = (2, 2, 2)
    init_features: int = 16
    bn_size: int = 4
    compression: float = 0.5
    hidden: int = 20
    norm: str = "group"
    stem_kernel: int = 7

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map ``x [N, *spatial, C]`` to logits ``[N, num_classes]``."""
        nd = x.ndim - 2
        if nd not in (2, 3):
            raise ValueError(f"DenseNet expects [N, H, W, C] or [N, D, H, W, C], got {x.shape}")
        if not self.block_config or any(int(b) < 1 for b in self.block_config):
            raise ValueError(
                f"DenseNet block_config={tuple(self.block_config)} needs one or more blocks of "
                "at least one layer each, e.g. (6, 12, 24, 16) for DenseNet-121"
            )
        if self.norm not in NORMS:
            raise ValueError(f"DenseNet norm={self.norm!r}; choose one of {NORMS}")
        stride = (1, 2, 2) if nd == 3 else (2, 2)
        k = int(self.stem_kernel)
        x = _conv(self.init_features, (k,) * nd, "stem", stride, ((k // 2, k // 2),) * nd)(x)
        x = _norm_relu(x, "stem_norm", self.norm)
        x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)
        for i, layers in enumerate(self.block_config):
            for j in range(int(layers)):
                layer = DenseLayer(
                    self.growth_rate, self.bn_size, self.norm, name=f"block{i}_layer{j}"
                )
                x = layer(x)
            if i < len(self.block_config) - 1:
                features = math.floor(x.shape[-1] * self.compression)
                x = Transition(features, self.norm, name=f"transition{i}")(x)
        x = _norm_relu(x, "final_norm", self.norm)
        x = jnp.mean(x, axis=tuple(range(1, 1 + nd)))  # global average pool → [N, C]
        x = nn.Dense(self.hidden, name="fc1")(x)
        return nn.Dense(self.num_classes, name="fc2")(x)


def densenet121(num_classes: int, in_channels: int = 1) -> DenseNet:
    """The reference's ``densenet121_3d``: k = 32, blocks (6, 12, 24, 16), 32 stem features for
    one input channel (64 for three)."""
    return DenseNet(
        num_classes=num_classes,
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        init_features=32 if in_channels == 1 else 64,
    )
