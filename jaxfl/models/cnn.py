"""A small two-block CNN for 2D images and 3D volumes."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfl.models.conv import conv_general_dilated


class SmallCNN(nn.Module):
    """[conv3 → ReLU → maxpool2] per ``features`` → dense ``hidden`` → ReLU → dense classes.

    Input ``[N, H, W, C]`` or ``[N, D, H, W, C]`` float32 (channel-last); output logits
    ``[N, num_classes]``. Kernel and pool windows get one entry per spatial axis, so the same
    module serves 2D slices and 3D volumes.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map ``x [N, *spatial, C]`` to logits ``[N, num_classes]``."""
        nd = x.ndim - 2  # spatial rank: batch and channel axes excluded
        if nd not in (2, 3):
            raise ValueError(f"SmallCNN expects [N, H, W, C] or [N, D, H, W, C], got {x.shape}")
        window = (2,) * nd
        for f in self.features:
            x = nn.Conv(
                f,
                kernel_size=(3,) * nd,
                padding="SAME",
                conv_general_dilated=conv_general_dilated,
            )(x)
            x = nn.relu(x)
            x = nn.max_pool(x, window_shape=window, strides=window)
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)
