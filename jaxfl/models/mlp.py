"""A fully connected network: DLG's attack setting (smooth activations, every pixel feeds the
first layer) and a fast model for privacy audits; per-pixel logits make it a segmenter."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax

ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu, "tanh": nn.tanh}


class MLP(nn.Module):
    """Flatten → [dense ``h`` → ``activation``] per ``hidden`` → dense classes.

    Input ``[N, *spatial, C]`` float32; output logits ``[N, num_classes]``, or with
    ``per_pixel`` ``[N, *spatial, num_classes]`` (one dense output per pixel and class: a
    segmentation model whose every output sees the whole image).
    """

    num_classes: int
    hidden: Sequence[int] = (256,)
    activation: str = "sigmoid"
    per_pixel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        act = ACTIVATIONS[self.activation]
        spatial = x.shape[1:-1]
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = act(nn.Dense(h)(x))
        if not self.per_pixel:
            return nn.Dense(self.num_classes, name="head")(x)
        size = math.prod(spatial) * self.num_classes
        return nn.Dense(size, name="head")(x).reshape(x.shape[0], *spatial, self.num_classes)
