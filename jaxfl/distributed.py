"""One simulation over several processes (``jax.distributed``): one per host, or several on one.

Every process runs the same program (JAX's multi-controller model): it loads the same data,
draws the same seeded samples, and the ``shard_map`` backend's mesh spans every process's
devices, so each process trains the clients its own devices hold and one ``psum`` joins the
round's aggregate. What follows a round (server update, evaluation) runs on every process on
identical values. What is not determined by the seed (OS CSPRNG draws, the host aggregators'
encryption and masking randomness) runs on process 0 and is sent to the others
(:func:`from_primary`), so the processes never drift apart. Process 0 alone writes the
workdir's files; every process takes part in orbax checkpoints, as orbax requires.

``config.distributed.enabled = True`` turns it on. With the other fields left empty JAX finds
the cluster itself (SLURM, Open MPI, Cloud TPU: ``jax.distributed.initialize()``); on machines
it cannot detect, set ``coordinator_address``, ``num_processes`` and ``process_id`` (one
process per id, the same address everywhere). See README, "Scale: ... several processes".
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxfl.backends import put_global
from jaxfl.errors import ConfigError

T = TypeVar("T")
PyTree = Any


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Join the processes of ``config.distributed`` (no-op when not enabled or already joined);
    returns whether this run spans more than one process. Must run before JAX computes."""
    d = config.get("distributed")
    if d is None or not d.enabled:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs: dict[str, Any] = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes:
        kwargs["num_processes"] = int(d.num_processes)
    if d.process_id >= 0:
        kwargs["process_id"] = int(d.process_id)
    # XLA:CPU has no cross-process collectives unless told to use gloo's (accelerators
    # bring their own: NCCL, ICI); the setting is ignored by the other backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise ConfigError(
            f"config.distributed: cannot start jax.distributed ({e}). Call it before anything "
            "runs on JAX (a fresh process), and outside a cluster JAX detects (SLURM, Open MPI, "
            "TPU) set distributed.coordinator_address, num_processes and process_id."
        ) from e
    except ValueError as e:
        raise ConfigError(
            f"config.distributed: {e}. Outside a cluster JAX detects (SLURM, Open MPI, TPU) "
            "set distributed.coordinator_address='HOST:PORT', num_processes and process_id."
        ) from e
    logging.info(
        "jax.distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def localhost_commands(command: Sequence[str], processes: int, port: int) -> list[list[str]]:
    """``command`` (an ``experiments.run`` command line) as the ``processes`` processes of one
    job on this machine, coordinated at ``localhost:port``; one process: ``[command]``."""
    if processes == 1:
        return [list(command)]
    return [
        [
            *command,
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=localhost:{port}",
            f"--config.distributed.num_processes={processes}",
            f"--config.distributed.process_id={i}",
        ]
        for i in range(processes)
    ]


def multi_process() -> bool:
    """Whether this simulation spans several processes."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always in a single process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in one process)."""
    if multi_process():
        multihost_utils.sync_global_devices(name)


def from_primary(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` as process 0 computes it, on every process (pickled and broadcast; one
    process: just ``fn(*args)``). For host values the processes must agree on that the seed
    does not fix: OS CSPRNG draws, a host aggregator's result."""
    if not multi_process():
        return fn(*args)
    blob = b""
    if is_primary():
        # An error on process 0 is raised on every process: none may wait for the others.
        try:
            blob = pickle.dumps((True, fn(*args)))
        except Exception as e:  # noqa: BLE001 - handed on to every process below
            blob = pickle.dumps((False, e if _picklable(e) else RuntimeError(repr(e))))
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob))))
    data = np.frombuffer(blob, np.uint8) if is_primary() else np.zeros(size, np.uint8)
    ok, value = pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())
    if not ok:
        raise value
    return value


def _picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001
        return False
    return True


def to_host(a: Any) -> np.ndarray:
    """The whole value of ``a`` on this process's host, also when it is sharded over other
    processes' devices (gathered: every process must call it)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def _replicated() -> NamedSharding:
    mesh = jax.make_mesh((jax.device_count(),), ("all",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, PartitionSpec())


def _local_leaf(a: Any) -> bool:
    return isinstance(a, jax.Array) and a.is_fully_addressable


def to_global(tree: PyTree) -> PyTree:
    """``tree`` with its process-local arrays (equal on every process) replicated over every
    process's devices, as orbax saves them; arrays already global stay. Identity in one
    process."""
    if not multi_process():
        return tree
    rep = _replicated()
    return jax.tree.map(lambda a: put_global(a, rep) if _local_leaf(a) else a, tree)


def global_like(tree: PyTree) -> PyTree:
    """Shapes and shardings of :func:`to_global` ``(tree)`` (jax arrays; host arrays keep no
    sharding): the target orbax restores a multi-process checkpoint into."""
    rep = _replicated()

    def like(a):
        if not isinstance(a, jax.Array):
            return jax.ShapeDtypeStruct(np.shape(a), a.dtype)
        sharding = rep if _local_leaf(a) else a.sharding
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(like, tree)


def to_local(tree: PyTree, like: PyTree) -> PyTree:
    """Undo :func:`to_global`: the leaves that are process-local in ``like`` become this
    process's own copy again. Identity in one process."""
    if not multi_process():
        return tree
    return jax.tree.map(lambda a, b: a.addressable_data(0) if _local_leaf(b) else a, tree, like)
