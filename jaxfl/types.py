"""Core pytrees shared across jaxfl.

Arrays with a leading client axis end in ``_c`` or are documented as ``[K, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

Params = Any
PRNGKey = jax.Array

# loss_fn(params, images [B, ...], labels [B], mask [B]) -> (mean loss over real examples, aux)
# where aux holds per-batch sums: {"loss_sum": ..., "correct": ...}.
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Split(NamedTuple):
    """One centralized split: ``images [N, *spatial, C] float32``, ``labels [N] int32``."""

    images: np.ndarray
    labels: np.ndarray


class Dataset(NamedTuple):
    """A loaded dataset: official train/val/test splits plus metadata."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int


class ClientArrays(NamedTuple):
    """Per-client data stacked and padded to a common length.

    images ``[K, N, *spatial, C]``, labels ``[K, N]``, mask ``[K, N]`` (1.0 for real examples,
    0.0 for padding; real examples always come first), counts ``[K]`` (number of real examples).
    """

    images: Any
    labels: Any
    mask: Any
    counts: Any

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])


class ClientData(NamedTuple):
    """ONE client's padded data (a slice of :class:`ClientArrays` along the client axis)."""

    images: Any
    labels: Any
    mask: Any
    count: Any


class FederatedData(NamedTuple):
    """Everything a simulation needs: client train/held-out arrays and the global test split."""

    train: ClientArrays
    heldout: ClientArrays
    test: Split
    num_classes: int
    name: str


class LocalResult(NamedTuple):
    """Outcome of :func:`local_train`: final params and sums over every local step."""

    params: Params
    loss_sum: jax.Array
    correct: jax.Array
    num_seen: jax.Array
    num_steps: jax.Array
