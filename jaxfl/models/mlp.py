"""A fully connected classifier: DLG's attack setting (smooth activations, every pixel feeds the
first layer) and a fast model for privacy audits."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu, "tanh": nn.tanh}


class MLP(nn.Module):
    """Flatten → [dense ``h`` → ``activation``] per ``hidden`` → dense classes.

    Input ``[N, *spatial, C]`` float32; output logits ``[N, num_classes]``.
    """

    num_classes: int
    hidden: Sequence[int] = (256,)
    activation: str = "sigmoid"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = act(nn.Dense(h)(x))
        return nn.Dense(self.num_classes, name="head")(x)
