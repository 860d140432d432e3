"""Partition a training set among federated clients.

Every partitioner takes the training labels ``[N]`` and returns ``num_clients`` sorted int64
index arrays that are disjoint and together cover ``0..N-1``. Results depend only on the
arguments (the seed included), never on global RNG state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

# Bounded retries for dirichlet before giving up with advice.
DIRICHLET_MAX_TRIES = 100
# create_splits(..., ratio=0.50) in the BloodMNIST paper's code: r is drawn in [0, base * 0.5).
_PAPER_MOVE_RATIO = 0.5


def _check_labels(labels: Any) -> np.ndarray:
    """Labels as a 1-D int64 array (``[N, 1]`` is flattened); errors name the fix."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array [N] of class ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must hold integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be >= 0, got min {arr.min()}")
    return arr.astype(np.int64)


def _check_num_clients(num_clients: Any, n: int) -> int:
    """``num_clients`` as an int in ``[1, n]``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an int, got {num_clients!r}")
    if not 1 <= num_clients <= n:
        raise ValueError(
            f"num_clients must be between 1 and the number of examples ({n}), got {num_clients}; "
            "use fewer clients or more data"
        )
    return int(num_clients)


def _check_min_size(min_size: Any, num_clients: int, n: int) -> int:
    """``min_size`` as an int with ``0 <= min_size * num_clients <= n``."""
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if min_size * num_clients > n:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"examples but there are only {n}; lower min_size or num_clients"
        )
    return int(min_size)


def _finish(groups: list[np.ndarray]) -> list[np.ndarray]:
    """Sorted int64 copies of each client's indices."""
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total`` (Hamilton method)."""
    ideal = weights / weights.sum() * total
    counts = np.floor(ideal).astype(np.int64)
    # Stable order so ties go to the lower index, keeping the result deterministic.
    order = np.argsort(-(ideal - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def iid(labels: Any, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform random split: client sizes differ by at most one, labels iid."""
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    perm = np.random.default_rng(seed).permutation(y.size)
    return _finish(np.array_split(perm, k))


def dirichlet(
    labels: Any, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Label skew: per class, client shares ~ Dir(alpha); small alpha = strongly non-iid.

    Redraws (up to ``DIRICHLET_MAX_TRIES`` times) until every client has >= ``min_size``.
    """
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    if not (isinstance(alpha, (int, float, np.floating, np.integer)) and alpha > 0):
        raise ValueError(
            f"alpha must be a positive number (e.g. 0.1 skewed, 100 ~iid), got {alpha!r}"
        )
    min_size = _check_min_size(min_size, k, y.size)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    smallest = 0
    for _ in range(DIRICHLET_MAX_TRIES):
        groups: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                groups[client].append(part)
        sizes = [sum(p.size for p in g) for g in groups]
        smallest = min(sizes)
        if smallest >= min_size:
            return _finish([np.concatenate(g) for g in groups])
    raise ValueError(
        f"dirichlet: after {DIRICHLET_MAX_TRIES} draws some client still had fewer than "
        f"{min_size} example(s) (best smallest client: {smallest}) with alpha={alpha}, "
        f"num_clients={k}, N={y.size}; use a larger alpha or fewer clients"
        + (" or a smaller min_size" if min_size > 1 else "")
    )


def quantity_skew(
    labels: Any, num_clients: int, seed: int = 0, sigma: float = 1.0, min_size: int = 1
) -> list[np.ndarray]:
    """Size skew: client sizes ~ lognormal(0, sigma) shares of a random shuffle; labels iid."""
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    if not (isinstance(sigma, (int, float, np.floating, np.integer)) and sigma >= 0):
        raise ValueError(f"sigma must be a number >= 0 (0 gives equal sizes), got {sigma!r}")
    min_size = _check_min_size(min_size, k, y.size)
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, float(sigma), size=k)
    # Guarantee min_size first, then share the rest in proportion to the lognormal weights.
    sizes = min_size + _largest_remainder(weights, y.size - min_size * k)
    perm = rng.permutation(y.size)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def pathological(
    labels: Any, num_clients: int, classes_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """McMahan et al. (2017) shards: sort by label, cut ``num_clients * k`` shards, deal k each.

    Unlike a plain cut of the sorted array, shards never straddle a class boundary (each class
    is cut into its own shards, as evenly sized as possible), so every client holds at most
    ``classes_per_client`` classes. Needs ``num_clients * k >= number of classes present``.
    """
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    cpc = classes_per_client
    if isinstance(cpc, bool) or not isinstance(cpc, (int, np.integer)) or cpc < 1:
        raise ValueError(f"classes_per_client must be an int >= 1, got {cpc!r}")
    num_shards = k * int(cpc)
    classes, class_counts = np.unique(y, return_counts=True)
    if num_shards < classes.size:
        raise ValueError(
            f"pathological: num_clients * classes_per_client = {num_shards} shards cannot cover "
            f"{classes.size} classes without mixing classes in a shard; raise classes_per_client "
            "or num_clients"
        )
    if num_shards > y.size:
        raise ValueError(
            f"pathological: {num_shards} shards need at least that many examples, got {y.size}; "
            "lower classes_per_client or num_clients"
        )
    # One shard per class, then repeatedly split the class whose shards are largest, so shard
    # sizes come out as equal as the class sizes allow.
    shards_per_class = np.ones(classes.size, dtype=np.int64)
    for _ in range(num_shards - classes.size):
        shards_per_class[np.argmax(class_counts / shards_per_class)] += 1

    rng = np.random.default_rng(seed)
    shards: list[np.ndarray] = []
    for c, m in zip(classes, shards_per_class, strict=True):
        # Shuffle within the class so which examples share a shard depends on the seed.
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), m))
    deal = rng.permutation(num_shards).reshape(k, int(cpc))
    return _finish([np.concatenate([shards[s] for s in row]) for row in deal])


def bloodmnist_paper(labels: Any, num_clients: int, seed: int = 42) -> list[np.ndarray]:
    """Fares & Saad (2024) split: contiguous shards in file order, pairs trade a random tail.

    Reimplements ``create_splits`` + the ``Subset(range(...))`` loop of ``create_datasets`` in
    github.com/mohres/federated-dp-sec_agg-flower, ``src/task.py``: shard sizes ``N // n``
    (the last ``N % n`` shards one larger); then for each pair (0,1), (2,3), ... in order,
    ``r = np.random.randint(low=0, high=(N // n) * 0.50)`` after ``np.random.seed(42)``, and
    the last ``r`` examples of the first shard move to the front of the second. Only the
    number of examples per client is skewed; labels are whatever lies in each range.
    """
    y = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    n = y.size
    base = n // k
    sizes = [base + 1 if (n % k != 0 and i >= k - n % k) else base for i in range(k)]
    # Their np.random.randint(high=float) truncates the float bound; int() does the same.
    high = int(base * _PAPER_MOVE_RATIO)
    if k >= 2 and high < 1:
        raise ValueError(
            f"bloodmnist_paper needs at least 2 examples per client (len(labels) // num_clients "
            f">= 2, here {n} // {k} = {base}); their create_splits would crash on randint(0, "
            f"{base * _PAPER_MOVE_RATIO}). Use fewer clients"
        )
    # A private RandomState(seed) draws the same MT19937 stream as np.random.seed(seed) followed
    # by np.random.randint, without touching numpy's global RNG.
    rs = np.random.RandomState(seed)
    for s in range(0, k - k % 2, 2):
        r = int(rs.randint(low=0, high=high))
        sizes[s] -= r
        sizes[s + 1] += r
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(k)]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "quantity_skew": quantity_skew,
    "pathological": pathological,
    "bloodmnist_paper": bloodmnist_paper,
}


def partition(
    name: str, labels: Any, num_clients: int, seed: int | None, **kwargs: Any
) -> list[np.ndarray]:
    """Dispatch to ``PARTITIONERS[name]``; extra keyword arguments go to the partitioner.

    ``seed=None`` uses the partitioner's own default (42 for ``bloodmnist_paper``, which is
    the seed that reproduces the paper's split; 0 for the others).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PARTITIONERS:
        raise ValueError(f"Unknown partitioner {name!r}; valid names: {', '.join(PARTITIONERS)}")
    fn = PARTITIONERS[key]
    if seed is not None:
        kwargs = {**kwargs, "seed": seed}
    try:
        inspect.signature(fn).bind(labels, num_clients, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(fn).parameters if p not in ("labels", "num_clients")]
        raise ValueError(
            f"partition({key!r}, ...): {err}; its keyword arguments are {params}"
        ) from None
    return fn(labels, num_clients, **kwargs)
