"""Per-client data that is gathered when read, so host memory holds what is being used.

:class:`LazyRows` is an array-like ``[*index.shape, ...]`` whose rows are ``source[index]``
(``-1`` = a zero row), read only when indexed. :func:`jaxfl.data.stack_clients` with
``lazy=True`` returns features of this kind; the streaming backend
(:class:`jaxfl.backends.StreamingBackend`) then reads one chunk of clients per call, from RAM
or from a memory-mapped volume cache, and host memory holds the source plus one chunk, not the
padded ``[K, L, ...]`` copy. Acquisition shifts stay lazy too (:meth:`LazyRows.map_clients`).
Anything else that reads it (``np.asarray``, ``jnp.asarray``, indexing) gets a numpy array.
numpy only, like the loaders.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

# fn(client id, that client's real rows [n, ...]) -> rows [n, ...]
ClientTransform = Callable[[int, np.ndarray], np.ndarray]


def _mapping(source: Any) -> mmap.mmap | None:
    """The ``mmap`` under a memory-mapped array (a view's base chain), else None."""
    base = source
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release_pages(source: Any) -> None:
    """Drop ``source``'s memory-mapped file pages from this process (no-op for RAM arrays).

    Reading rows of a mapping leaves their pages resident, and counted in the process's RSS,
    until the kernel needs them: after a full pass the whole file would look resident. The
    pages stay in the page cache; a later read maps them back.
    """
    mm = _mapping(source)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class LazyRows:
    """Rows ``source[index]`` of ``source [N, ...]``, shape ``(*index.shape, *source.shape[1:])``.

    ``index`` holds row numbers, ``-1`` for a zero row (padding; in a per-client index
    ``[K, L]`` real rows come first). ``transforms`` (per-client index only) map each client's
    real rows when read, in order. Reads return numpy arrays.
    """

    def __init__(
        self,
        source: Any,
        index: np.ndarray,
        transforms: tuple[ClientTransform, ...] = (),
        dtype: Any = None,
    ):
        index = np.asarray(index, np.int64)
        if transforms and index.ndim != 2:
            raise ValueError(f"per-client transforms need a [K, L] index, got {index.shape}")
        if index.size and index.max() >= len(source):
            raise ValueError(f"index reaches row {index.max()} of a source with {len(source)}")
        self.source = source
        self.index = index
        self.transforms = tuple(transforms)
        self.dtype = np.dtype(dtype if dtype is not None else source.dtype)
        self.shape = (*index.shape, *source.shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"LazyRows(shape={self.shape}, dtype={self.dtype}, transforms={len(self.transforms)})"
        )

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """``source`` rows for ``index`` (any shape; -1 -> zeros) as one array."""
        flat = index.reshape(-1)
        out = np.zeros((flat.size, *self.shape[self.index.ndim :]), self.dtype)
        real = flat >= 0
        if real.any():
            out[real] = np.asarray(self.source[flat[real]], dtype=self.dtype)
            release_pages(self.source)
        return out.reshape(*index.shape, *out.shape[1:])

    def take_clients(self, ids: Any) -> np.ndarray:
        """Clients ``ids``' rows ``[len(ids), L, ...]``, transformed (a per-client index)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not self.transforms:
            return self._gather(self.index[ids])
        out = np.zeros((ids.size, *self.shape[1:]), self.dtype)
        for j, c in enumerate(ids):
            rows = self.index[c]
            n = int((rows >= 0).sum())
            if n == 0:
                continue
            x = self._gather(rows[:n])
            for fn in self.transforms:
                x = fn(int(c), x)
            out[j, :n] = x
        return out

    def flat_clients(self) -> FlatClients:
        """These per-client rows ``[K, L, ...]`` as ``[K * L, ...]``, read by slices."""
        return FlatClients(self)

    def map_clients(self, fn: ClientTransform, dtype: Any = None) -> LazyRows:
        """These rows with ``fn`` applied to each client's real rows when read."""
        return LazyRows(self.source, self.index, (*self.transforms, fn), dtype or self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:at] + fill + key[at + 1 :]
        if self.transforms:  # a client's rows are transformed together: read whole clients
            ids = np.arange(self.shape[0])[key[0]]
            rows = self.take_clients(np.atleast_1d(ids))
            rows = rows[0] if np.ndim(ids) == 0 else rows
            picked, rest = np.ndim(ids), key[1:]
        else:  # only the rows the key names
            d = self.index.ndim
            sub = self.index[key[:d]]
            rows, picked, rest = self._gather(sub), sub.ndim, key[d:]
        return rows[(slice(None),) * picked + rest] if rest else rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


class FlatClients:
    """A per-client :class:`LazyRows` ``[K, L, ...]`` seen as ``[K * L, ...]``: a slice reads
    only the clients it spans (with their transforms), for evaluation in batches."""

    def __init__(self, rows: LazyRows):
        if rows.index.ndim != 2:
            raise ValueError(f"flat_clients needs a [K, L] index, got {rows.index.shape}")
        self.rows = rows
        self.shape = (rows.shape[0] * rows.shape[1], *rows.shape[2:])
        self.dtype = rows.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"FlatClients reads contiguous slices, got {key!r}")
        start, stop, _ = key.indices(len(self))
        stop = max(stop, start)
        per = self.rows.shape[1]
        first, last = start // per, -(-stop // per)
        clients = self.rows.take_clients(np.arange(first, last)).reshape(-1, *self.shape[1:])
        return clients[start - first * per : stop - first * per]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def is_lazy(leaf: Any) -> bool:
    """Whether ``leaf`` is read on demand (a :class:`LazyRows`)."""
    return isinstance(leaf, LazyRows)
