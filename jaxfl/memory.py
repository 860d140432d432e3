"""How much memory a chunk of clients takes, from XLA's own buffer assignment, and the largest
chunk that fits a cap.

A chunk of ``b`` clients runs the per-client function (a backend's ``fn(shared, client, cid,
valid)``, see :mod:`jaxfl.backends`) vmapped over ``b`` and summed, as the ``chunked`` backend
runs each chunk and :class:`~jaxfl.backends.StreamingBackend` sends one. Compiling that program
with abstract inputs (no data is read) and asking XLA for its
``memory_analysis()`` gives the bytes of its arguments (the broadcast model, the chunk's data),
outputs and temporaries (activations, gradients, optimizer state, im2col buffers). Those grow
linearly in ``b`` for a vmapped program, so two small chunk sizes fit::

    bytes(b) = fixed + per_client * b

``fixed`` is what every chunk pays once (the broadcast model and server-side arguments),
``per_client`` one client's data, parameters, optimizer state and activations.
:func:`largest_chunk` inverts it for a cap. Nothing here allocates device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.backends import ClientFn, device_memory_bytes
from jaxfl.errors import ConfigError

PyTree = Any

# The cap when none is given (config.memory_limit_gb = 0): this fraction of the device's memory
# (jaxfl.backends.device_memory_bytes: the allocator's limit on accelerators, physical RAM on
# CPU). The rest is headroom for what the estimate leaves out: allocator fragmentation, the next
# chunk's host-to-device copy in flight, evaluation programs and, on CPU, the host process.
MEMORY_FRACTION = 0.5
# The two chunk sizes compiled for the fit: small, so compiling them is quick, and different,
# so the per-client slope is measured rather than assumed.
FIT_SIZES = (1, 2)


class MemoryEstimate(NamedTuple):
    """``bytes(b) = fixed_bytes + per_client_bytes * b`` for a chunk of ``b`` clients.

    ``sizes`` are the chunk sizes compiled and ``measured`` XLA's bytes for each (what the line
    was fitted to).
    """

    fixed_bytes: int
    per_client_bytes: int
    sizes: tuple[int, ...]
    measured: tuple[int, ...]

    def bytes_for(self, chunk: int) -> int:
        """Estimated bytes of a chunk of ``chunk`` clients."""
        return self.fixed_bytes + self.per_client_bytes * int(chunk)


def compiled_bytes(compiled: jax.stages.Compiled) -> int:
    """Device bytes a compiled program holds while it runs: arguments + outputs + temporaries,
    less the outputs that alias (reuse) donated arguments (XLA's ``memory_analysis()``)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend's compiler reports no memory analysis")
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def shapes_of(tree: PyTree) -> PyTree:
    """Every array-like leaf (jax, numpy, :class:`~jaxfl.data.lazy.LazyRows`) as a
    ``ShapeDtypeStruct``, so compiling reads no data."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def one_client(per_client: PyTree) -> PyTree:
    """Shapes of one client's slice of ``per_client`` (leaves ``[K, ...]`` -> ``[...]``)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), per_client)


def chunk_bytes(fn: ClientFn, shared: PyTree, client: PyTree, chunk: int) -> int:
    """XLA's bytes for the sum of ``fn`` over a chunk of ``chunk`` clients, vmapped.

    ``shared``: the broadcast pytree (arrays or shapes); ``client``: one client's shapes
    (:func:`one_client`), stacked to ``[chunk, ...]`` here. Compiles, never runs.
    """

    def run(shared, data, cids, valid):
        out = jax.vmap(fn, in_axes=(None, 0, 0, 0))(shared, data, cids, valid)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), out)

    data = jax.tree.map(lambda s: jax.ShapeDtypeStruct((chunk, *s.shape), s.dtype), client)
    cids = jax.ShapeDtypeStruct((chunk,), jnp.int32)
    valid = jax.ShapeDtypeStruct((chunk,), jnp.bool_)
    compiled = jax.jit(run).lower(shapes_of(shared), data, cids, valid).compile()
    return compiled_bytes(compiled)


def fit_line(sizes: Sequence[int], measured: Sequence[int]) -> tuple[int, int]:
    """``(fixed, per_client)`` of the least-squares line through ``(sizes, measured)``, the
    slope rounded up and the intercept clamped at 0 (an estimate should not undercount)."""
    x = np.asarray(sizes, np.float64)
    y = np.asarray(measured, np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    return max(int(np.floor(intercept)), 0), int(np.ceil(slope))


def estimate_client_memory(
    fn: ClientFn, shared: PyTree, client: PyTree, sizes: Sequence[int] = FIT_SIZES
) -> MemoryEstimate:
    """Fixed and per-client bytes of ``fn`` vmapped over chunks, fitted to XLA's numbers at
    ``sizes`` (two or more distinct chunk sizes)."""
    sizes = tuple(int(s) for s in sizes)
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must hold two or more distinct chunk sizes >= 1, got {sizes}")
    measured = tuple(chunk_bytes(fn, shared, client, b) for b in sizes)
    fixed, per_client = fit_line(sizes, measured)
    return MemoryEstimate(fixed, max(per_client, 1), sizes, measured)


def largest_chunk(estimate: MemoryEstimate, cap_bytes: int, limit: int | None = None) -> int:
    """The largest ``b`` with ``estimate.bytes_for(b) <= cap_bytes`` (at most ``limit``, e.g.
    the clients per round: a bigger chunk would only run padding); 0 when not even one fits."""
    room = int(cap_bytes) - estimate.fixed_bytes
    b = max(room // estimate.per_client_bytes, 0)
    return int(b if limit is None else min(b, limit))


def memory_cap_bytes(limit_gb: float, device: jax.Device) -> int:
    """The cap in bytes: ``limit_gb`` GiB, or for 0 :data:`MEMORY_FRACTION` of ``device``'s
    memory (:func:`~jaxfl.backends.device_memory_bytes`)."""
    if limit_gb < 0:
        raise ConfigError(f"config.memory_limit_gb={limit_gb} must be >= 0 (0 = automatic).")
    if limit_gb > 0:
        return int(limit_gb * 2**30)
    total = device_memory_bytes(device)
    if total is None:
        raise ConfigError(
            f"config.chunk_size=0 (automatic) but {device.platform} device {device} reports no "
            "memory size; set config.memory_limit_gb to the memory a chunk may use."
        )
    return int(MEMORY_FRACTION * total)


def auto_chunk_size(
    fn: ClientFn,
    shared: PyTree,
    per_client: PyTree,
    cap_bytes: int,
    *,
    limit: int | None = None,
    resident_bytes: int = 0,
    estimate: MemoryEstimate | None = None,
) -> tuple[int, MemoryEstimate]:
    """``(chunk, estimate)``: the largest chunk of clients of ``per_client`` (leaves
    ``[K, ...]``, arrays, memory maps or lazy rows: only shapes are read) whose estimate, plus
    ``resident_bytes`` (client data that stays on the device anyway), fits ``cap_bytes``.

    Raises :class:`~jaxfl.errors.ConfigError` naming the fields to change when not even one
    client fits. Logs what it chose and why.
    """
    if estimate is None:
        estimate = estimate_client_memory(fn, shared, one_client(per_client))
    room = int(cap_bytes) - int(resident_bytes)
    chunk = largest_chunk(estimate, room, limit)
    gib = lambda b: b / 2**30  # noqa: E731
    if chunk < 1:
        raise ConfigError(
            f"config.chunk_size=0 (automatic): not even one client fits the memory cap of "
            f"{gib(cap_bytes):.3f} GiB (config.memory_limit_gb; 0 = {MEMORY_FRACTION:g} of the "
            f"device's memory): one client needs {gib(estimate.bytes_for(1)):.3f} GiB "
            f"({gib(estimate.per_client_bytes):.3f} GiB per client + "
            f"{gib(estimate.fixed_bytes):.3f} GiB fixed"
            + (f", {gib(resident_bytes):.3f} GiB of resident client data" if resident_bytes else "")
            + "). Raise config.memory_limit_gb, lower config.local.batch_size or use a smaller "
            "config.model"
            + (
                "; config.placement='stream' keeps client data on the host"
                if resident_bytes
                else ""
            )
            + "."
        )
    logging.info(
        "Automatic chunk size %d: XLA estimates %.1f MiB per client + %.1f MiB fixed "
        "(compiled at chunks of %s: %s MiB)%s, cap %.1f MiB -> %.1f MiB for the chunk",
        chunk,
        estimate.per_client_bytes / 2**20,
        estimate.fixed_bytes / 2**20,
        "/".join(str(s) for s in estimate.sizes),
        "/".join(f"{m / 2**20:.1f}" for m in estimate.measured),
        f" + {resident_bytes / 2**20:.1f} MiB resident data" if resident_bytes else "",
        cap_bytes / 2**20,
        estimate.bytes_for(chunk) / 2**20,
    )
    return chunk, estimate


def per_device_chunk(chunk: int, devices: Sequence[jax.Device], sharded: bool) -> int:
    """A streaming chunk for ``devices``: a sharded backend on accelerators splits the chunk
    between them, so each holds ``chunk`` clients when the chunk is ``chunk * devices``; CPU
    devices share the host's memory, so the chunk stays ``chunk``."""
    if sharded and devices and devices[0].platform != "cpu":
        return chunk * len(devices)
    return chunk
