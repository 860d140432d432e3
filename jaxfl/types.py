"""Core pytrees shared across jaxfl.

Arrays with a leading client axis end in ``_c`` or are documented as ``[K, ...]``. Examples are
dicts of features (``{"image": ..., "label": ...}`` for classification, ``{"image": ...,
"mask": ..., "case": ...}`` for segmentation): the engine moves them around without naming a
feature; only a :class:`jaxfl.tasks.Task` and its model know what they mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

Params = Any
PRNGKey = jax.Array
# A batch of examples: feature name -> [B, ...] (the same leading axis for every feature).
Batch = dict[str, Any]

# loss_fn(params, batch, mask [B]) -> (mean loss over real examples, aux) where aux holds
# per-batch SUMS over the real examples: "loss_sum" and the task's metric sums.
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Split(NamedTuple):
    """One centralized classification split: ``images [N, *spatial, C] float32``, ``labels [N]``.

    What the MedMNIST and synthetic loaders return; :meth:`examples` gives the feature dict the
    engine works with.
    """

    images: np.ndarray
    labels: np.ndarray

    def examples(self) -> Batch:
        """``{"image": images, "label": labels}``."""
        return {"image": self.images, "label": self.labels}


class Dataset(NamedTuple):
    """A loaded classification dataset: official train/val/test splits plus metadata."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int


class ClientArrays(NamedTuple):
    """Per-client data stacked and padded to a common length.

    ``examples``: feature name -> ``[K, N, ...]``; ``mask [K, N]`` (1.0 for real examples, 0.0
    for padding; real examples always come first); ``counts [K]`` (number of real examples).
    """

    examples: Batch
    mask: Any
    counts: Any

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])

    def client(self, c: int) -> ClientData:
        """Client ``c``'s padded data (host-side slicing, e.g. for a per-client Python loop)."""
        return ClientData({k: v[c] for k, v in self.examples.items()}, self.mask[c], self.counts[c])


class ClientData(NamedTuple):
    """ONE client's padded data (a slice of :class:`ClientArrays` along the client axis):
    ``examples`` feature -> ``[N, ...]``, ``mask [N]``, ``count []``."""

    examples: Batch
    mask: Any
    count: Any


class FederatedData(NamedTuple):
    """Everything a simulation needs: client train/held-out arrays and the global test split.

    ``test`` is a feature dict ``[N, ...]``; ``num_classes`` is the model's output size.
    """

    train: ClientArrays
    heldout: ClientArrays
    test: Batch
    num_classes: int
    name: str


class LocalResult(NamedTuple):
    """Outcome of local training: final params, metric sums over every local step (``loss_sum``,
    ``num_seen``, the task's sums, DP counts) and the number of steps taken."""

    params: Params
    sums: dict[str, jax.Array]
    num_steps: jax.Array


def take(examples: Batch, idx: Any) -> Batch:
    """Examples ``idx`` (``[B]`` ints) of every feature."""
    return {k: v[idx] for k, v in examples.items()}
