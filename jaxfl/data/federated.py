"""Turn a Dataset plus client index lists into padded, stacked per-client arrays."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxfl.data.lazy import LazyRows, is_lazy, release_pages
from jaxfl.types import ClientArrays, Dataset, FederatedData, Split

# Guards floor(f * n) against float error, e.g. 0.3 * 10 = 2.9999999999999996.
_EPS = 1e-9


def _check_indices(client_indices: Sequence[Any], n: int) -> list[np.ndarray]:
    """Each client's indices as a 1-D int64 array inside ``[0, n)``."""
    out = []
    for c, idx in enumerate(client_indices):
        arr = np.asarray(idx)
        if arr.size == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"client_indices[{c}] must be a 1-D integer array, got shape {arr.shape} "
                f"dtype {arr.dtype}"
            )
        if arr.min() < 0 or arr.max() >= n:
            raise ValueError(
                f"client_indices[{c}] has indices outside [0, {n}) (min {arr.min()}, max "
                f"{arr.max()}); were they computed on another split?"
            )
        out.append(arr.astype(np.int64))
    if not out:
        raise ValueError("client_indices is empty; pass one index array per client")
    return out


def stack_clients(
    examples: Mapping[str, np.ndarray],
    client_indices: Sequence[Any],
    pad_multiple: int = 1,
    lazy: bool = False,
) -> ClientArrays:
    """Gather each client's examples: every feature ``[N, ...]`` becomes ``[K, L, ...]``, plus
    ``mask [K, L]`` and ``counts [K]``.

    ``L`` is the largest client size rounded up to ``pad_multiple`` (at least one slot, so
    all-empty splits keep a valid shape); padding is zeros with mask 0 after the real examples.
    ``lazy``: features are :class:`~jaxfl.data.lazy.LazyRows` that read their rows from
    ``examples`` when indexed (no ``[K, L, ...]`` copy; a feature that is itself lazy, e.g. a
    memory-mapped volume split, is read through to its source).
    """
    examples = {k: v if is_lazy(v) else np.asarray(v) for k, v in examples.items()}
    sizes = {k: v.shape[0] for k, v in examples.items()}
    if not sizes:
        raise ValueError(
            "examples is empty; pass a dict of features, e.g. {'image': ..., 'label': ...}"
        )
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"features have different numbers of examples {sizes}; pass arrays from the same split"
        )
    if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, (int, np.integer)):
        raise ValueError(f"pad_multiple must be an int >= 1, got {pad_multiple!r}")
    if pad_multiple < 1:
        raise ValueError(
            f"pad_multiple must be an int >= 1 (e.g. the batch size), got {pad_multiple}"
        )
    idx = _check_indices(client_indices, next(iter(sizes.values())))
    counts = np.array([i.size for i in idx], dtype=np.int32)
    length = max(1, int(counts.max()))
    length = -(-length // int(pad_multiple)) * int(pad_multiple)

    k = len(idx)
    table = np.full((k, length), -1, np.int64)
    for c, ix in enumerate(idx):
        table[c, : ix.size] = ix
    mask = (table >= 0).astype(np.float32)
    if lazy:
        out = {name: _lazy_stack(v, table) for name, v in examples.items()}
    else:
        out = {name: np.zeros((k, length, *v.shape[1:]), v.dtype) for name, v in examples.items()}
        for c, ix in enumerate(idx):
            for name, v in examples.items():
                out[name][c, : ix.size] = v[ix]
        for v in examples.values():  # a memory-mapped source's pages: in `out` now
            release_pages(v)
    return ClientArrays(examples=out, mask=mask, counts=counts)


def materialize(arrays: ClientArrays) -> ClientArrays:
    """``arrays`` with every lazy feature read into a numpy array ``[K, L, ...]``."""
    examples = {k: np.asarray(v) if is_lazy(v) else v for k, v in arrays.examples.items()}
    return arrays._replace(examples=examples)


def _lazy_stack(feature: Any, table: np.ndarray) -> LazyRows:
    """``feature [N, ...]`` as per-client rows ``table [K, L]`` (-1 = padding), reading through a
    lazy 1-D view to its source."""
    if is_lazy(feature) and feature.index.ndim == 1 and not feature.transforms:
        composed = np.where(table >= 0, feature.index[np.maximum(table, 0)], -1)
        return LazyRows(feature.source, composed, dtype=feature.dtype)
    return LazyRows(feature, table)


def split_heldout(
    indices: Any, heldout_fraction: float = 0.2, seed: int = 0, client_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle one client's indices with ``(seed, client_id)``; split into (train, held-out).

    Train is the first ``ceil((1 - f) * n)`` (at least 1 when n >= 1); held-out is the rest.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1) (e.g. 0.2), got {heldout_fraction!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = idx.size
    # Seeding with (seed, client_id) makes each client's shuffle independent of the others.
    perm = np.random.default_rng([int(seed), int(client_id)]).permutation(idx)
    # n - floor(f * n) == ceil((1 - f) * n) exactly, without the float error of (1 - f) * n.
    n_train = n - math.floor(heldout_fraction * n + _EPS)
    n_train = max(n_train, 1) if n else 0
    return perm[:n_train], perm[n_train:]


def _classification_examples(split: Split) -> dict[str, np.ndarray]:
    """A classification split's features; labels as int32 ``[N]`` (MedMNIST stores ``[N, 1]``).
    Lazy images (a volume cache's rows) stay lazy."""
    images = split.images if is_lazy(split.images) else np.asarray(split.images)
    return {"image": images, "label": np.asarray(split.labels).astype(np.int32)}


def build_federated(
    dataset: Dataset,
    client_indices: Sequence[Any],
    heldout_fraction: float = 0.2,
    seed: int = 0,
    pad_multiple: int = 1,
    lazy: bool = False,
) -> FederatedData:
    """Per-client train/held-out ClientArrays from ``dataset.train``; test = ``dataset.test``.

    ``lazy``: client features are read on demand (:func:`stack_clients`), for streaming."""
    idx = _check_indices(client_indices, dataset.train.labels.shape[0])
    pairs = [split_heldout(ix, heldout_fraction, seed, c) for c, ix in enumerate(idx)]
    train_idx = [p[0] for p in pairs]
    heldout_idx = [p[1] for p in pairs]
    examples = _classification_examples(dataset.train)
    return FederatedData(
        train=stack_clients(examples, train_idx, pad_multiple, lazy),
        heldout=stack_clients(examples, heldout_idx, pad_multiple, lazy),
        test={k: np.asarray(v) for k, v in _classification_examples(dataset.test).items()},
        num_classes=dataset.num_classes,
        name=dataset.name,
    )
