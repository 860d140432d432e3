"""Execution backends: the one place in jaxfl that decides how clients are mapped.

Everything that runs a function once per client (the simulator's rounds, host secure
aggregation, personalized evaluation, local-only training) goes through a backend, the way
fedjax's ``ForEachClientBackend`` separates *what* a client computes from *how* clients are
executed. A per-client function has the signature::

    fn(shared, client, cid, valid) -> pytree

``shared`` is the same for every client (the broadcast model, the round, key streams),
``client`` is one client's slice of a ``per_client`` pytree whose leaves carry a leading client
axis ``[K, ...]``, ``cid`` is the client's id (keys derive from it, so results do not depend on
the backend) and ``valid`` is False for padding slots a backend adds to keep shapes static.
**Contract:** for ``valid=False`` the function must return zeros for everything that is summed
(:mod:`jaxfl.simulate` gives such a client zero examples); map outputs of invalid slots are
dropped.

A backend offers three things:

- ``place(per_client)``: put per-client arrays where the backend wants them (one device, or
  sharded along K over a device mesh);
- ``sum(fn)``: a callable ``(shared, per_client, ids [n], valid [n]) -> sum over valid slots``;
- ``map(fn)``: a callable ``(shared, per_client, ids [n], valid [n]) -> outputs [n_valid, ...]``
  stacked in the order of the valid ``ids``.

``ids`` and ``valid`` are host (numpy) arrays; their length must be the same every call for the
compiled programs to be reused. Backends:

- ``vmap``: every slot in one ``jax.vmap`` inside one ``jax.jit``;
- ``chunked``: ``lax.scan`` over chunks of ``chunk_size`` slots, vmapped within a chunk;
- ``scan``: ``lax.scan`` over single clients inside one jit (``chunked`` with chunks of one);
- ``loop``: a Python loop calling one jitted per-client function (skips invalid slots; fastest
  on one small CPU device, where vmapped convolutions become slow grouped convolutions);
- ``shard_map``: client data sharded along K over a 1-D device mesh (axis ``clients``); every
  device runs its own clients with an inner traced backend (``scan`` on CPU, ``chunked`` on
  accelerators) and one ``psum`` combines the sums. Sampled clients are re-packed so every
  device gets ``ceil(n / devices)`` slots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfl.tree import tree_add

PyTree = Any
ClientFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
MappedFn = Callable[[PyTree, PyTree, np.ndarray, np.ndarray], PyTree]

STRATEGIES = ("vmap", "chunked", "scan", "loop", "shard_map")
AXIS = "clients"


class ClientBackend(Protocol):
    """How clients are executed; see the module docstring for the contract."""

    name: str
    description: str

    def place(self, per_client: PyTree) -> PyTree: ...

    def sum(self, fn: ClientFn) -> MappedFn: ...

    def map(self, fn: ClientFn) -> MappedFn: ...


def _select(per_client: PyTree, row: jax.Array) -> PyTree:
    return jax.tree.map(lambda a: a[row], per_client)


def _one(fn: ClientFn, shared, per_client, slot) -> PyTree:
    row, cid, valid = slot
    return fn(shared, _select(per_client, row), cid, valid)


def traced_sum(fn: ClientFn, shared, per_client, slots, batch: int | None) -> PyTree:
    """Sum of ``fn`` over ``slots = (rows, cids, valid)`` ``[n]`` inside a trace.

    ``batch=None`` runs clients one after another (``lax.scan``); an int vmaps ``batch`` slots at
    a time (``n`` must be a multiple of it; one chunk is a plain ``vmap``).
    """
    one = functools.partial(_one, fn, shared, per_client)
    n = slots[0].shape[0]
    if batch is not None and batch >= n:
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(one)(slots))
    shape = jax.eval_shape(one, jax.tree.map(lambda s: s[0], slots))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    if batch is None:
        step = one
        xs = slots
    else:
        xs = jax.tree.map(lambda s: s.reshape(n // batch, batch), slots)

        def step(chunk):
            return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(one)(chunk))

    acc, _ = jax.lax.scan(lambda acc, x: (tree_add(acc, step(x)), None), zeros, xs)
    return acc


def traced_map(fn: ClientFn, shared, per_client, slots, batch: int | None) -> PyTree:
    """``fn`` of every slot, stacked ``[n, ...]``, inside a trace (``batch`` as in traced_sum)."""
    one = functools.partial(_one, fn, shared, per_client)
    return jax.lax.map(one, slots, batch_size=batch)


def _pad_slots(ids: np.ndarray, valid: np.ndarray, multiple: int):
    """``(rows, cids, valid)`` padded at the end to a multiple of ``multiple`` with invalid
    slots pointing at row 0."""
    n = len(ids)
    size = max(-(-n // multiple), 1) * multiple
    rows = np.zeros(size, np.int32)
    ok = np.zeros(size, bool)
    rows[:n], ok[:n] = ids, valid
    return rows, rows.copy(), ok


def _keep_valid(out: PyTree, valid: np.ndarray) -> PyTree:
    """Rows of ``out`` for the valid slots, in order (a no-op when all of them are valid)."""
    n = len(valid)
    if valid.all():
        return jax.tree.map(lambda x: x if x.shape[0] == n else x[:n], out)
    keep = jnp.asarray(np.flatnonzero(valid))
    return jax.tree.map(lambda x: x[keep], out)


class TracedBackend:
    """``vmap`` (``batch=None`` meaning all slots), ``chunked`` and ``scan`` on one device."""

    def __init__(self, name: str, batch: int | None, sequential: bool = False):
        self.name = name
        self._batch = batch
        self._sequential = sequential
        self.description = f"{name} (chunks of {batch})" if name == "chunked" else name

    def _batch_for(self, n: int) -> tuple[int, int | None]:
        """``(multiple to pad n to, inner batch)`` for ``n`` slots."""
        if self._sequential:
            return 1, None
        b = max(n, 1) if self._batch is None else min(self._batch, max(n, 1))
        return b, b

    def place(self, per_client: PyTree) -> PyTree:
        return jax.tree.map(jnp.asarray, per_client)

    def _runner(self, fn: ClientFn, traced) -> MappedFn:
        """``traced(fn, ...)`` jitted, over ``ids`` padded to a multiple of the inner batch."""

        @functools.partial(jax.jit, static_argnums=3)
        def run(shared, per_client, slots, batch):
            return traced(fn, shared, per_client, slots, batch)

        def call(shared, per_client, ids, valid):
            multiple, batch = self._batch_for(len(ids))
            slots = tuple(jnp.asarray(s) for s in _pad_slots(ids, valid, multiple))
            return run(shared, per_client, slots, batch)

        return call

    def sum(self, fn: ClientFn) -> MappedFn:
        return self._runner(fn, traced_sum)

    def map(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_map)

        def call(shared, per_client, ids, valid):
            out = run(shared, per_client, ids, valid)
            return _keep_valid(out, np.asarray(valid, bool))

        return call


class LoopBackend:
    """A Python loop over the valid slots, one jitted call per client.

    ``sum`` adds each client's output into a donated running sum, so memory stays at one
    client's worth however many clients run.
    """

    name = description = "loop"

    def place(self, per_client: PyTree) -> PyTree:
        return jax.tree.map(jnp.asarray, per_client)

    def sum(self, fn: ClientFn) -> MappedFn:
        def step(acc, shared, per_client, cid):
            return tree_add(acc, _one(fn, shared, per_client, (cid, cid, jnp.bool_(True))))

        step = jax.jit(step, donate_argnums=0)
        shapes = {}

        def call(shared, per_client, ids, valid):
            if "out" not in shapes:  # eval_shape re-traces the client function: do it once
                shapes["out"] = jax.eval_shape(
                    lambda s, p: _one(fn, s, p, (jnp.int32(0),) * 2 + (jnp.bool_(True),)),
                    shared,
                    per_client,
                )
            acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["out"])
            for cid in np.asarray(ids)[np.asarray(valid, bool)]:
                acc = step(acc, shared, per_client, jnp.int32(cid))
            return acc

        return call

    def map(self, fn: ClientFn) -> MappedFn:
        one = jax.jit(
            lambda shared, per_client, cid: _one(
                fn, shared, per_client, (cid, cid, jnp.bool_(True))
            )
        )

        def call(shared, per_client, ids, valid):
            outs = [
                one(shared, per_client, jnp.int32(c))
                for c in np.asarray(ids)[np.asarray(valid, bool)]
            ]
            if not outs:
                shape = jax.eval_shape(one, shared, per_client, jnp.int32(0))
                return jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), shape)
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        return call


class ShardMapBackend:
    """Clients sharded along K over a 1-D mesh of ``devices``; ``inner`` runs within a device.

    ``place`` pads K to a multiple of the device count (padding rows are never selected) and
    shards it, so device ``d`` owns clients ``[d * B, (d + 1) * B)``. A call whose ids give every
    device the same number of its own clients (all clients, or Poisson slots over all of them)
    runs them in place; otherwise the selected clients' rows are gathered into a fresh sharded
    array first, ``ceil(n / devices)`` per device, so no device waits on an overloaded one.
    """

    name = "shard_map"

    def __init__(self, devices: Sequence[jax.Device], inner: TracedBackend):
        self.devices = list(devices)
        self.inner = inner
        self.description = (
            f"shard_map over {len(self.devices)} {self.devices[0].platform} devices, "
            f"{inner.description} within each"
        )
        self.mesh = jax.make_mesh(
            (len(self.devices),),
            (AXIS,),
            axis_types=(jax.sharding.AxisType.Auto,),
            devices=self.devices,
        )
        self._sharded = NamedSharding(self.mesh, P(AXIS))
        self._replicated = NamedSharding(self.mesh, P())
        self._gather = jax.jit(lambda tree, rows: _select(tree, rows), out_shardings=self._sharded)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def place(self, per_client: PyTree) -> PyTree:
        d = self.num_devices

        def put(a):
            a = jnp.asarray(a)
            pad = -a.shape[0] % d
            if pad:
                a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
            return jax.device_put(a, self._sharded)

        return jax.tree.map(put, per_client)

    def _slots_per_device(self, n: int) -> int:
        """``t``: slots per device for ``n`` slots, a multiple of the inner batch."""
        per = max(-(-n // self.num_devices), 1)
        multiple, _ = self.inner._batch_for(per)
        return -(-per // multiple) * multiple

    def _layout(self, per_client, ids: np.ndarray, valid: np.ndarray):
        """``(per_client, slots, positions, t)``: every device's ``t`` slots, ``[d * t]`` in all.

        ``slots = (rows, cids, valid)``; ``rows`` index the device's own block (in place) or the
        gathered array (re-packed); ``positions[i]`` is where slot ``i``'s output lands in the
        ``[d * t]`` result.
        """
        d, n = self.num_devices, len(ids)
        block = jax.tree.leaves(per_client)[0].shape[0] // d
        t = self._slots_per_device(n)
        rows = np.zeros((d, t), np.int32)
        cids = np.zeros((d, t), np.int32)
        ok = np.zeros((d, t), bool)
        # In place when the slots are every client (full participation, Poisson slots: ids
        # 0..n-1 filling the last block), so a run compiles one program; a sampled subset is
        # re-packed even when it happens to be balanced.
        if np.array_equal(ids, np.arange(n)) and -(-n // d) == block:
            owner, row = ids // block, ids % block  # client c is row c % block of its device
            rows[owner, row], cids[owner, row], ok[owner, row] = row, ids, valid
            positions = owner * t + row
        else:  # re-pack: gather the selected rows, t per device
            flat = np.zeros(d * t, np.int32)
            flat[:n] = ids
            per_client = self._gather(per_client, jnp.asarray(flat))
            rows[:] = np.arange(t, dtype=np.int32)
            cids.reshape(-1)[:n], ok.reshape(-1)[:n] = ids, valid
            positions = np.arange(n)
        slots = tuple(jax.device_put(x.reshape(-1), self._sharded) for x in (rows, cids, ok))
        return per_client, slots, positions, t

    def _share(self, shared: PyTree) -> PyTree:
        """``shared`` replicated on the mesh (it may come from a single-device computation)."""
        return jax.device_put(shared, self._replicated)

    def _shard_fn(self, fn: ClientFn, traced, batch, out_spec):
        def body(shared, per_client, slots):
            out = traced(fn, shared, per_client, slots, batch)
            return jax.lax.psum(out, AXIS) if out_spec == P() else out

        return jax.jit(
            jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=(P(), P(AXIS), P(AXIS)),
                out_specs=out_spec,
                check_vma=False,
            )
        )

    def _runner(self, fn: ClientFn, traced, out_spec):
        """``(shared, per_client, ids, valid) -> (out, positions of the valid slots, t)``."""
        compiled = {}

        def run(shared, per_client, ids, valid):
            ids, valid = np.asarray(ids, np.int32), np.asarray(valid, bool)
            per_client, slots, positions, t = self._layout(per_client, ids, valid)
            batch = self.inner._batch_for(t)[1]
            if batch not in compiled:
                compiled[batch] = self._shard_fn(fn, traced, batch, out_spec)
            return compiled[batch](self._share(shared), per_client, slots), positions[valid], t

        return run

    def sum(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_sum, P())

        def call(shared, per_client, ids, valid):
            # The sum is replicated on the mesh; hand it on from the first device, so what
            # follows (the server update) runs there with the state, as on the other backends.
            return jax.device_put(run(shared, per_client, ids, valid)[0], self.devices[0])

        return call

    def map(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_map, P(AXIS))

        def call(shared, per_client, ids, valid):
            out, keep, t = run(shared, per_client, ids, valid)
            if len(keep) == t * self.num_devices and np.array_equal(keep, np.arange(len(keep))):
                return out
            return jax.tree.map(lambda x: x[jnp.asarray(keep)], out)

        return call


def default_strategy(platform: str, device_count: int) -> str:
    """What ``auto`` means: ``shard_map`` over several devices, else ``loop`` on CPU and
    ``chunked`` on accelerators (see README's performance section for the measurements)."""
    if device_count > 1:
        return "shard_map"
    return "loop" if platform == "cpu" else "chunked"


def resolve_strategy(strategy: str, devices: Sequence[jax.Device] | None = None) -> str:
    """Map ``auto`` to a concrete strategy for ``devices`` (default: the default backend's)."""
    if strategy in STRATEGIES:
        return strategy
    if strategy != "auto":
        raise ValueError(
            f"Unknown client-execution strategy {strategy!r}; choose one of "
            f"{('auto',) + STRATEGIES}."
        )
    devices = list(devices) if devices is not None else jax.devices()
    return default_strategy(devices[0].platform, len(devices))


def make_backend(
    strategy: str = "auto",
    *,
    chunk_size: int = 64,
    devices: Sequence[jax.Device] | None = None,
    inner: str = "auto",
) -> ClientBackend:
    """The backend for ``strategy`` (``auto`` resolved with :func:`resolve_strategy`).

    ``devices`` (default: all devices of the default backend) is the mesh of ``shard_map``;
    ``inner`` is how each device runs its clients there (``auto``: ``scan`` on CPU,
    ``chunked`` on accelerators).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    devices = list(devices) if devices is not None else jax.devices()
    name = resolve_strategy(strategy, devices)
    if name == "vmap":
        return TracedBackend("vmap", None)
    if name == "chunked":
        return TracedBackend("chunked", chunk_size)
    if name == "scan":
        return TracedBackend("scan", None, sequential=True)
    if name == "loop":
        return LoopBackend()
    if inner == "auto":
        inner = "scan" if devices[0].platform == "cpu" else "chunked"
    if inner not in ("vmap", "chunked", "scan"):
        raise ValueError(
            f"shard_map runs each device's clients with vmap, chunked or scan, not {inner!r}."
        )
    inner_backend = make_backend(inner, chunk_size=chunk_size, devices=devices[:1])
    return ShardMapBackend(devices, inner_backend)
