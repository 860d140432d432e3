"""Test helpers: a tiny model and random padded client arrays that compile in seconds."""

from __future__ import annotations

import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.simulate import CLIENT_STREAM, client_key
from jaxfl.types import ClientArrays, ClientData


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
    return ClientArrays({"image": images, "label": labels}, mask, np.asarray(counts, np.int32))


def client_data(arrays, c: int, n: int | None = None) -> ClientData:
    """Client ``c`` of ``arrays`` as a :class:`ClientData` (its first ``n`` slots if given)."""
    end = arrays.mask.shape[1] if n is None else n
    return ClientData(
        {k: jnp.asarray(v[c, :end]) for k, v in arrays.examples.items()},
        jnp.asarray(arrays.mask[c, :end]),
        jnp.int32(arrays.counts[c] if n is None else n),
    )


def reference_round(algorithm, params, arrays, ids, seed, round_idx):
    """Plain Python loop over clients on UNPADDED data, numpy weighted mean, then server update."""
    state = algorithm.init(params)
    stream = jax.random.fold_in(jax.random.key(seed), CLIENT_STREAM)
    updates, weights = [], []
    for c in ids:
        data = client_data(arrays, c, int(arrays.counts[c]))
        out = jax.jit(algorithm.client_update)(
            params, data, client_key(stream, jnp.int32(round_idx), jnp.int32(c))
        )
        updates.append(jax.tree.map(np.asarray, out.update))
        weights.append(float(out.weight))
    w = np.asarray(weights) / sum(weights)
    mean = jax.tree.map(lambda *u: sum(wi * ui for wi, ui in zip(w, u, strict=True)), *updates)
    return algorithm.server_update(state, mean)


def assert_trees_close(a, b, atol=1e-5):
    """Leafwise allclose of two pytrees."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def max_abs_diff(a, b) -> float:
    """The largest leafwise absolute difference between two pytrees."""
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def clipped_sum_reference(loss, params, data: ClientData, selected, clip: float):
    """Sum over ``selected`` examples of each one's own gradient clipped to norm ``clip``,
    one example at a time: the DP-SGD reference, written as plainly as possible."""
    ref = jax.tree.map(jnp.zeros_like, params)
    # One compiled single-example gradient (eager autodiff of a U-Net per example is slow).
    grad = jax.jit(jax.grad(lambda p, one: loss(p, one, jnp.ones(1))[0]))
    for i in selected:
        g = grad(params, {k: v[i : i + 1] for k, v in data.examples.items()})
        norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g)))
        ref = jax.tree.map(lambda r, x, n=norm: r + x * min(1.0, clip / n), ref, g)
    return ref


def numpy_init(model, shape, seed=0):
    """Numpy stand-in for ``model.init``: LeCun-normal kernels, GroupNorm scale 1, biases 0.

    Flax's real init compiles a truncated-normal draw per kernel shape, ~1.5 s each on a
    2-core CPU (over 10 s for a tiny U-Net); this has the same shapes and scales, instantly.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))

    def leaf(path, sds):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(sds.shape[:-1]))
            return (rng.standard_normal(sds.shape) / np.sqrt(fan_in)).astype(np.float32)
        return np.full(sds.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


RADCHEST_FINDINGS = ("nodule*left_lung", "nodule*right_lung", "mass*left_lung")
# RAD-ChestCT's layout in small: per table (site), scan ids and their three finding columns.
RADCHEST_LABELS = {
    "train": [("trn00001", 0, 0, 0), ("trn00002", 1, 0, 0), ("trn00003", 0, 0, 1)],
    "valid": [("val00001", 0, 1, 0), ("val00002", 0, 0, 0)],
    "test": [("tst00001", 0, 0, 1), ("tst00002", 0, 0, 0)],
}


def fake_ct_scan(rng, shape=(12, 20, 18), lesion: bool = False):
    """A fake chest CT in HU, int16 as RAD-ChestCT stores it: air outside, soft tissue inside
    (and with ``lesion`` a dense block in it)."""
    hu = np.full(shape, -1000, np.int16)
    d, h, w = shape
    hu[2:-2, 4:-4, 3:-3] = rng.integers(-100, 100, (d - 4, h - 8, w - 6))
    if lesion:
        hu[d // 4 : 3 * d // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 400
    return hu


def write_radchest(root, labels=None, shape=(12, 20, 18), seed=0):
    """Write RAD-ChestCT label tables under ``root/tables`` and ``.npz`` scans (array ``ct``)
    under ``root/images``; scans whose row has a finding get a lesion. Returns ``root``."""
    from jaxfl.data.volumes import RADCHEST_TABLES

    rng = np.random.default_rng(seed)
    (root / "tables").mkdir(exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for split, rows in (labels or RADCHEST_LABELS).items():
        with open(root / "tables" / RADCHEST_TABLES[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["NoteAcc_DEID", *RADCHEST_FINDINGS])
            w.writerows(rows)
        for i, row in enumerate(rows):
            size = (shape[0] + i % 3, *shape[1:])
            scan = fake_ct_scan(rng, size, lesion=any(row[1:]))
            np.savez_compressed(root / "images" / f"{row[0]}.npz", ct=scan)
    return root
