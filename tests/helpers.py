"""Test helpers: a tiny model and random padded client arrays that compile in seconds."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from jaxfl.types import ClientArrays


class TinyMLP(nn.Module):
    """A two-layer MLP on flattened images: compiles fast, enough to test the engine."""

    num_classes: int = 3
    hidden: int = 8

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def make_client_arrays(counts, n_slots=None, shape=(4, 4, 1), num_classes=3, seed=0):
    """Random client arrays with the given real-example counts, padded to ``n_slots``."""
    rng = np.random.default_rng(seed)
    n_slots = n_slots or max(counts)
    k = len(counts)
    images = np.zeros((k, n_slots, *shape), np.float32)
    labels = np.zeros((k, n_slots), np.int32)
    mask = np.zeros((k, n_slots), np.float32)
    for c, n in enumerate(counts):
        images[c, :n] = rng.normal(size=(n, *shape))
        labels[c, :n] = rng.integers(0, num_classes, size=n)
        mask[c, :n] = 1.0
    return ClientArrays(images, labels, mask, np.asarray(counts, np.int32))
