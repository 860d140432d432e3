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
compiled programs to be reused. Both callables also take ``costs=`` (host, one per slot, e.g.
the client's number of local steps): backends that split slots between devices balance them by
it; the others ignore it. Backends:

- ``vmap``: every slot in one ``jax.vmap`` inside one ``jax.jit``;
- ``chunked``: ``lax.scan`` over chunks of ``chunk_size`` slots, vmapped within a chunk;
- ``scan``: ``lax.scan`` over single clients inside one jit (``chunked`` with chunks of one);
- ``loop``: a Python loop calling one jitted per-client function (skips invalid slots; fastest
  on one small CPU device, where vmapped convolutions become slow grouped convolutions);
- ``shard_map``: client data sharded along K over a 1-D device mesh (axis ``clients``); every
  device runs its own clients with an inner traced backend (``scan`` on CPU, ``chunked`` on
  accelerators) and one ``psum`` combines the sums. Sampled clients are re-packed so every
  device gets ``ceil(n / devices)`` slots, and with ``costs`` so every device gets about the
  same work (longest-first greedy).

Any of them can be wrapped in :class:`StreamingBackend`, which keeps client data on the host
and sends ``chunk`` clients at a time to the device (:func:`choose_placement` decides from a
memory estimate), so data larger than device memory still runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfl.data.lazy import is_lazy
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

        def call(shared, per_client, ids, valid, costs=None):
            del costs  # one device: nothing to balance
            multiple, batch = self._batch_for(len(ids))
            slots = tuple(jnp.asarray(s) for s in _pad_slots(ids, valid, multiple))
            return run(shared, per_client, slots, batch)

        return call

    def sum(self, fn: ClientFn) -> MappedFn:
        return self._runner(fn, traced_sum)

    def map(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_map)

        def call(shared, per_client, ids, valid, costs=None):
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

        def call(shared, per_client, ids, valid, costs=None):
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

        def call(shared, per_client, ids, valid, costs=None):
            outs = [
                one(shared, per_client, jnp.int32(c))
                for c in np.asarray(ids)[np.asarray(valid, bool)]
            ]
            if not outs:
                shape = jax.eval_shape(one, shared, per_client, jnp.int32(0))
                return jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), shape)
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        return call


# A full-participation round stays in place (no gather) unless re-packing cuts the busiest
# device's work by more than this factor.
BALANCE_TOLERANCE = 1.1


def balanced_positions(costs: np.ndarray, devices: int, per_device: int) -> np.ndarray:
    """Where each slot goes in ``[devices * per_device]`` so devices get about equal work.

    Longest first, each to the least-loaded device with a free slot (LPT greedy: within 4/3
    of the best split). Ties keep slot order, so equal costs fill devices in order.
    """
    loads = np.zeros(devices)
    fill = np.zeros(devices, np.int64)
    positions = np.zeros(len(costs), np.int64)
    for i in np.argsort(-np.asarray(costs, np.float64), kind="stable"):
        free = np.flatnonzero(fill < per_device)
        dev = free[np.argmin(loads[free])]
        positions[i] = dev * per_device + fill[dev]
        fill[dev] += 1
        loads[dev] += costs[i]
    return positions


def device_loads(positions: np.ndarray, costs: np.ndarray, devices: int, per_device: int):
    """Each device's summed ``costs`` when slot ``i`` sits at ``positions[i]``."""
    return np.bincount(positions // per_device, weights=costs, minlength=devices)


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
        # Slot capacity factor for cost balancing: sequential devices take twice the even
        # share (empty slots cost nothing there); vmapped ones would compute the extra slots.
        self._spare = 2 if inner._sequential else 1
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
        # False when the mesh spans other processes' devices (jax.distributed): arrays cross
        # the boundary as host values every process holds alike (see put_global).
        self._local = self._sharded.is_fully_addressable

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def place(self, per_client: PyTree) -> PyTree:
        d = self.num_devices

        def put(a):
            if isinstance(a, jax.Array) and a.sharding == self._sharded and a.shape[0] % d == 0:
                return a  # placed here already (e.g. client states)
            if not self._local:  # each process builds only its own devices' shards
                return put_global(_pad_rows(np.asarray(a), d), self._sharded)
            a = jnp.asarray(a)
            pad = -a.shape[0] % d
            if pad:
                a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
            return jax.device_put(a, self._sharded)

        return jax.tree.map(put, per_client)

    def _slots_per_device(self, n: int) -> int:
        """``t``: slots per device for ``n`` slots (``ceil(n / d)``), a multiple of the inner
        batch."""
        per = max(-(-n // self.num_devices), 1)
        multiple, _ = self.inner._batch_for(per)
        return -(-per // multiple) * multiple

    def _layout(self, per_client, ids: np.ndarray, valid: np.ndarray, costs=None):
        """``(per_client, slots, positions, t)``: every device's ``t`` slots, ``[d * t]`` in all.

        ``slots = (rows, cids, valid)``; ``rows`` index the device's own block (in place) or the
        gathered array (re-packed); ``positions[i]`` is where slot ``i``'s output lands in the
        ``[d * t]`` result.
        """
        d, n = self.num_devices, len(ids)
        block = jax.tree.leaves(per_client)[0].shape[0] // d
        t = self._slots_per_device(n)
        # In place when the slots are every client (full participation, Poisson slots: ids
        # 0..n-1 filling the last block), so a run compiles one program, unless costs say a
        # re-pack balances the devices better; a sampled subset is always re-packed.
        in_place = np.array_equal(ids, np.arange(n)) and -(-n // d) == block
        positions = None  # re-packed in slot order, unless costs call for balancing
        if costs is not None and d > 1:
            work = np.where(valid, np.asarray(costs, np.float64), 0.0)
            # In place: the clients' own layout; re-packed: balanced within t slots per device.
            current = (
                (ids // block) * t + ids % block if in_place else balanced_positions(work, d, t)
            )
            positions = None if in_place else current
            # A device running its clients one by one can take extra (empty) slots for free,
            # so balancing may give it more clients than the others; that changes the program's
            # shape, so it is taken only when it clearly pays.
            t_balanced = self._slots_per_device(n * self._spare)
            balanced = balanced_positions(work, d, t_balanced)
            now = device_loads(current, work, d, t).max()
            if now > BALANCE_TOLERANCE * device_loads(balanced, work, d, t_balanced).max():
                in_place, t, positions = False, t_balanced, balanced
        rows = np.zeros((d, t), np.int32)
        cids = np.zeros((d, t), np.int32)
        ok = np.zeros((d, t), bool)
        if in_place:
            owner, row = ids // block, ids % block  # client c is row c % block of its device
            rows[owner, row], cids[owner, row], ok[owner, row] = row, ids, valid
            positions = owner * t + row
        else:  # re-pack: gather the selected rows, t per device
            positions = np.arange(n) if positions is None else positions
            flat = np.zeros(d * t, np.int32)
            flat[positions] = ids
            per_client = self._gather(per_client, jnp.asarray(flat))
            rows[:] = np.arange(t, dtype=np.int32)
            cids.reshape(-1)[positions], ok.reshape(-1)[positions] = ids, valid
        slots = tuple(jax.device_put(x.reshape(-1), self._sharded) for x in (rows, cids, ok))
        return per_client, slots, positions, t

    def _share(self, shared: PyTree) -> PyTree:
        """``shared`` replicated on the mesh (it may come from a single-device computation)."""
        if not self._local:
            return put_global(shared, self._replicated)
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

        def run(shared, per_client, ids, valid, costs=None):
            ids, valid = np.asarray(ids, np.int32), np.asarray(valid, bool)
            per_client, slots, positions, t = self._layout(per_client, ids, valid, costs)
            batch = self.inner._batch_for(t)[1]
            if batch not in compiled:
                compiled[batch] = self._shard_fn(fn, traced, batch, out_spec)
            return compiled[batch](self._share(shared), per_client, slots), positions[valid], t

        return run

    def sum(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_sum, P())

        def call(shared, per_client, ids, valid, costs=None):
            # The sum is replicated on the mesh; hand it on from the first device, so what
            # follows (the server update) runs there with the state, as on the other backends.
            out = run(shared, per_client, ids, valid, costs)[0]
            if not self._local:  # every process holds the replicated sum: take its own copy
                return jax.tree.map(lambda x: x.addressable_data(0), out)
            return jax.device_put(out, self.devices[0])

        return call

    def map(self, fn: ClientFn) -> MappedFn:
        run = self._runner(fn, traced_map, P(AXIS))

        def call(shared, per_client, ids, valid, costs=None):
            out, keep, t = run(shared, per_client, ids, valid, costs)
            if not self._local:  # every process gets every client's output, as one process does
                out = jax.tree.map(jnp.asarray, multihost_utils.process_allgather(out, tiled=True))
            if len(keep) == t * self.num_devices and np.array_equal(keep, np.arange(len(keep))):
                return out
            return jax.tree.map(lambda x: x[jnp.asarray(keep)], out)

        return call


def _take(leaf, rows: np.ndarray):
    """Rows of one per-client leaf: a host gather for numpy (memory maps read only these rows)
    and for lazy rows (:class:`~jaxfl.data.lazy.LazyRows`, read now), a device gather for
    arrays already on a device (per-client parameters)."""
    if isinstance(leaf, jax.Array):
        return leaf[jnp.asarray(rows)]
    if is_lazy(leaf):
        return leaf.take_clients(rows)
    return np.take(leaf, rows, axis=0)


def _take_padded(leaf, rows: np.ndarray, size: int):
    """``_take(leaf, rows)`` padded with zero rows to ``size`` (a last, partial chunk): the
    padding slots are invalid, so they are zeros rather than another read of some client."""
    out = _take(leaf, rows)
    pad = size - len(rows)
    if not pad:
        return out
    xp = jnp if isinstance(out, jax.Array) else np
    return xp.concatenate([out, xp.zeros((pad, *out.shape[1:]), out.dtype)])


class StreamingBackend:
    """Client data stays on the host; each call sends ``chunk`` clients at a time to ``inner``.

    ``place`` leaves numpy arrays (and memory maps) where they are. ``sum`` / ``map`` walk the
    valid ids ``chunk`` at a time: gather those clients' rows on the host, ``inner.place``
    them, and run ``inner`` on the chunk, passing the real client ids through ``shared`` so
    keys, and hence results, are those of device-resident data (sums are added chunk by
    chunk: equal up to float summation order). Device memory holds one chunk; JAX's
    asynchronous dispatch overlaps the host gather of the next chunk with the current one.
    ``map`` returns host (numpy) arrays, each chunk's outputs fetched as the next one runs.
    """

    def __init__(self, inner: ClientBackend, chunk: int):
        if chunk < 1:
            raise ValueError(f"StreamingBackend chunk must be >= 1, got {chunk}")
        self.inner = inner
        # A chunk smaller than a sharded inner backend's device count leaves devices idle; it
        # is still the user's bound on memory, so it is kept.
        self.chunk = int(chunk)
        self.name = inner.name
        self.description = f"{inner.description}, streaming {chunk} clients at a time from host"

    def place(self, per_client: PyTree) -> PyTree:
        keep = lambda a: isinstance(a, jax.Array) or is_lazy(a)  # noqa: E731
        return jax.tree.map(lambda a: a if keep(a) else np.asarray(a), per_client)

    @staticmethod
    def _wrap(fn: ClientFn) -> ClientFn:
        def on_chunk(shared, client, local, valid):
            inner_shared, cids = shared
            return fn(inner_shared, client, cids[local], valid)

        return on_chunk

    def _chunks(self, per_client, ids: np.ndarray, valid: np.ndarray, costs=None):
        """``(chunk data, ids [chunk], local slots, valid, costs)`` per chunk of valid ids."""
        keep = np.asarray(valid, bool)
        chosen = np.asarray(ids, np.int32)[keep]
        chosen_costs = None if costs is None else np.asarray(costs)[keep]
        local = np.arange(self.chunk, dtype=np.int32)
        for start in range(0, len(chosen), self.chunk):
            part = chosen[start : start + self.chunk]
            rows = np.zeros(self.chunk, np.int32)
            rows[: len(part)] = part
            ok = local < len(part)
            cost = None
            if chosen_costs is not None:
                cost = np.zeros(self.chunk)
                cost[: len(part)] = chosen_costs[start : start + self.chunk]
            data = self.inner.place(
                jax.tree.map(lambda a, p=part: _take_padded(a, p, self.chunk), per_client)
            )
            yield data, jnp.asarray(rows), local, ok, cost

    @staticmethod
    def _out_shape(fn: ClientFn, shared, per_client):
        """The shape of one client's output (for calls with no valid client)."""
        one = jax.tree.map(lambda a: _take(a, np.zeros(1, np.int32))[0], per_client)
        return jax.eval_shape(fn, shared, one, jnp.int32(0), jnp.bool_(True))

    def sum(self, fn: ClientFn) -> MappedFn:
        run = self.inner.sum(self._wrap(fn))

        def call(shared, per_client, ids, valid, costs=None):
            acc = None
            for data, cids, local, ok, cost in self._chunks(per_client, ids, valid, costs):
                part = run((shared, cids), data, local, ok, costs=cost)
                acc = part if acc is None else tree_add(acc, part)
            if acc is None:  # no valid client: zeros of the output's shape
                shape = self._out_shape(fn, shared, per_client)
                acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
            return acc

        return call

    def map(self, fn: ClientFn) -> MappedFn:
        run = self.inner.map(self._wrap(fn))

        def call(shared, per_client, ids, valid, costs=None):
            # Each chunk's outputs come back to the host while the next chunk runs, so the
            # device holds two chunks' outputs at most, however many clients there are.
            outs, pending = [], None
            for data, cids, local, ok, cost in self._chunks(per_client, ids, valid, costs):
                out = run((shared, cids), data, local, ok, costs=cost)
                if pending is not None:
                    outs.append(jax.tree.map(np.asarray, pending))
                pending = out
            if pending is None:
                shape = self._out_shape(fn, shared, per_client)
                return jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), shape)
            outs.append(jax.tree.map(np.asarray, pending))
            return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

        return call


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
    """``a`` with zero rows appended to a multiple of ``multiple`` rows."""
    pad = -a.shape[0] % multiple
    return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a


def put_global(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """``tree`` placed with a ``sharding`` that may span other processes' devices
    (``jax.distributed``): every process passes the same host value and builds its own
    devices' shards of it (``jax.make_array_from_callback``; a local array is read back to the
    host first, which ``jax.device_put`` refuses to do across processes). PRNG keys travel as
    their key data."""

    def put(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(a)), impl=jax.random.key_impl(a)
            )
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def tree_nbytes(tree: PyTree) -> int:
    """Bytes of every array leaf of ``tree``."""
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in leaves)


def device_memory_bytes(device: jax.Device) -> int | None:
    """What ``device`` can hold: its allocator limit (accelerators), the host's physical memory
    for CPU devices, or None when unknown."""
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


# Data may fill this fraction of device memory and stay resident; the rest is for parameters,
# optimizer state and activations.
RESIDENT_FRACTION = 0.5
PLACEMENTS = ("auto", "device", "stream")


def choose_placement(placement: str, data_bytes: int, devices: Sequence[jax.Device]) -> str:
    """``"device"`` or ``"stream"``: ``auto`` streams when the client data would take more than
    :data:`RESIDENT_FRACTION` of the devices' memory (their sum under ``shard_map``)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}; choose one of {PLACEMENTS}")
    if placement != "auto":
        return placement
    sizes = [device_memory_bytes(d) for d in devices]
    if any(s is None for s in sizes):
        return "device"
    capacity = sizes[0] if devices[0].platform == "cpu" else sum(sizes)
    return "stream" if data_bytes > RESIDENT_FRACTION * capacity else "device"


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
