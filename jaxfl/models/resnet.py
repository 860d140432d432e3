"""DPResNet: the GroupNorm ResNet ("CustomResNet") of the BloodMNIST DP + SecAgg+ paper."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfl.models.conv import conv_general_dilated

# PyTorch's GroupNorm default; flax's default (1e-6) would make outputs drift from the seed.
_GN_EPS = 1e-5
_GN_GROUPS = 32


def _conv(features: int, nd: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """3^nd conv, no bias, explicit padding 1 per side (PyTorch ``padding=1``).

    Explicit padding rather than 'SAME': for stride 2 on even sizes 'SAME' pads (0, 1) while
    PyTorch pads (1, 1), which shifts the sampling grid by one pixel.
    """
    return nn.Conv(
        features,
        kernel_size=(3,) * nd,
        strides=(stride,) * nd,
        padding=((1, 1),) * nd,
        use_bias=False,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _norm(name: str | None = None) -> nn.GroupNorm:
    """GroupNorm(32) with PyTorch's epsilon; works for any channel-last rank."""
    return nn.GroupNorm(num_groups=_GN_GROUPS, epsilon=_GN_EPS, name=name)


class ConvBlock(nn.Module):
    """conv(stride) → GN → ReLU → conv → GN, no final activation: ``[N, *S, C] → [N, *S/s, F]``."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the two-conv block; ``x`` is channel-last with 2 or 3 spatial axes."""
        nd = x.ndim - 2
        x = _conv(self.features, nd, self.stride, name="conv1")(x)
        x = nn.relu(_norm(name="norm1")(x))
        x = _conv(self.features, nd, name="conv2")(x)
        return _norm(name="norm2")(x)


class DPResNet(nn.Module):
    """The seed paper's CustomResNet (4,802,120 params for 3-channel input, 8 classes).

    Input ``[N, H, W, C]`` (or ``[N, D, H, W, C]``) float32; output logits ``[N, num_classes]``.
    A 28×28 input gives 28×28×128 after the stem and res1, 14×14×256 after res2 and 7×7×512
    after res3. GroupNorm (not BatchNorm) keeps it free of batch statistics, as DP needs.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map ``x [N, *spatial, C]`` to logits ``[N, num_classes]``."""
        nd = x.ndim - 2
        if nd not in (2, 3):
            raise ValueError(f"DPResNet expects [N, H, W, C] or [N, D, H, W, C], got {x.shape}")
        x = nn.relu(_norm(name="norm1")(_conv(64, nd, name="conv1")(x)))
        x = nn.relu(_norm(name="norm2")(_conv(128, nd, name="conv2")(x)))
        # Only res1 has a skip connection, and no ReLU follows the addition (as in the seed).
        x = x + ConvBlock(128, name="res1")(x)
        x = ConvBlock(256, stride=2, name="res2")(x)
        x = ConvBlock(512, stride=2, name="res3")(x)
        x = jnp.mean(x, axis=tuple(range(1, 1 + nd)))  # global average pool → [N, 512]
        return nn.Dense(self.num_classes, name="fc")(x)
