"""The federated round: sampling, client updates through an execution backend, aggregation.

A round is a pure function of (server state, client data, round index). How the sampled clients'
``client_update`` calls are executed is the job of a :mod:`jaxfl.backends` backend (``vmap``,
``chunked``, ``scan``, ``loop``, ``shard_map``; ``auto`` picks one for the visible devices),
invisible to algorithms. All backends compute the same weighted mean (up to float summation
order) because every client's key is ``fold_in(fold_in(client_stream, round), client_id)``.

With a ``host_aggregator`` (secure aggregation), the backend maps clients to their flattened
updates ``[K, D]`` instead of summing them; the host protects and aggregates them (numpy in,
numpy out, :mod:`jaxfl.secure`) and a jitted server update applies the mean.

A stateful algorithm's clients (:attr:`FederatedAlgorithm.stateful`) carry state across rounds:
the backend maps each sampled client's ``(data, state)`` row to its output and new state, the
outputs are summed (or sent to the host aggregator) and the new states are written back into
their rows of ``ServerState.clients`` (``[K, ...]``, placed like the client data).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from jaxfl import distributed
from jaxfl.algorithms.base import ClientOutput, FederatedAlgorithm, ServerState, weighted_mean
from jaxfl.backends import ClientBackend, make_backend, put_global
from jaxfl.rng import os_key
from jaxfl.runtime import tune_cpu_malloc
from jaxfl.secure.entropy import os_uniform
from jaxfl.secure.secagg import SecAggError
from jaxfl.tasks import CLASSIFICATION, Task
from jaxfl.tree import tree_scale
from jaxfl.types import ClientArrays, ClientData, Params

if TYPE_CHECKING:
    from jaxfl.secure.aggregators import HostAggregator

# Named RNG streams, folded into the root key derived from the seed (PERSONALIZE_STREAM:
# the adaptation batches of jaxfl.personalize's evaluation).
INIT_STREAM, SAMPLE_STREAM, CLIENT_STREAM, SERVER_STREAM, PERSONALIZE_STREAM = 0, 1, 2, 3, 4


def num_sampled_clients(spec: int | float | None, num_clients: int) -> int:
    """Clients per round: ``None``/``0`` = all, an int = that many, a float in (0, 1] = fraction."""
    if spec is None or spec == 0:
        return num_clients
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise ValueError(
                f"client_fraction={spec} must be in (0, 1] (a fraction of the clients); "
                "use clients_per_round for a count."
            )
        return max(1, int(round(spec * num_clients)))
    if not 1 <= int(spec) <= num_clients:
        raise ValueError(
            f"clients_per_round={spec} but there are {num_clients} clients; use a count in "
            f"[1, {num_clients}], a fraction in (0, 1], or 0 for all clients."
        )
    return int(spec)


def client_key(client_stream: jax.Array, round_idx: jax.Array, client_id: jax.Array) -> jax.Array:
    """The key of one client in one round, independent of how clients are batched."""
    return jax.random.fold_in(jax.random.fold_in(client_stream, round_idx), client_id)


class Aggregate(NamedTuple):
    """Running sums over clients: ``sum_c w_c * update_c``, ``sum_c w_c`` and metric sums."""

    weighted_update: Params
    weight: jax.Array
    metrics: dict[str, jax.Array]


def client_rows(arrays: ClientArrays) -> ClientData:
    """The client arrays as a :class:`ClientData` pytree with a leading client axis ``[K, ...]``
    (what backends map over: one client's slice is its ``ClientData``)."""
    return ClientData(arrays.examples, arrays.mask, arrays.counts)


def _client_update(
    algorithm: FederatedAlgorithm, shared: tuple, data: ClientData, cid: jax.Array, valid, *state
) -> ClientOutput:
    """One client's ``client_update`` (``shared = (broadcast, client stream, round)``, ``state``:
    the client's own state for a stateful algorithm); an invalid (padding) slot runs as a client
    with zero examples."""
    broadcast, client_stream, round_idx = shared
    data = data._replace(mask=data.mask * valid, count=jnp.where(valid, data.count, 0))
    key = client_key(client_stream, round_idx, cid)
    return algorithm.client_update(broadcast, data, key, *state)


def _stateful_update(
    algorithm: FederatedAlgorithm, shared: tuple, client: tuple, cid: jax.Array, valid
) -> ClientOutput:
    """One stateful client's output, new state included, from its ``(data, state)`` row."""
    data, state = client
    return _client_update(algorithm, shared, data, cid, valid, state)


def _sum_outputs(outputs: ClientOutput, xp=jnp) -> Aggregate:
    """The :class:`Aggregate` of stacked client outputs ``[S, ...]``, with ``xp`` (``jnp``
    traced, or ``np`` for outputs a streaming backend left on the host)."""
    w = outputs.weight
    weighted = jax.tree.map(lambda u: xp.tensordot(w, u, axes=1).astype(u.dtype), outputs.update)
    metrics = jax.tree.map(lambda m: xp.sum(m, axis=0), outputs.metrics)
    return Aggregate(weighted, xp.sum(w), metrics)


def _flat_outputs(outputs: ClientOutput, xp=jnp) -> tuple[jax.Array, jax.Array]:
    """Stacked client outputs as ``(flat updates [S, D], weights [S])`` for host aggregation
    (``ravel_pytree``'s order: the leaves flattened and concatenated)."""
    leaves = jax.tree.leaves(outputs.update)
    n = outputs.weight.shape[0]
    return xp.concatenate([u.reshape(n, -1) for u in leaves], axis=1), outputs.weight


def _on_host_or_jit(fn):
    """``fn(outputs)`` in numpy when every leaf of ``outputs`` is a host array (a streaming
    backend's outputs: sending all of them back to the device would undo its memory bound),
    else jitted."""
    jitted = jax.jit(fn)

    def call(outputs):
        if all(isinstance(a, np.ndarray) for a in jax.tree.leaves(outputs)):
            return fn(outputs, np)
        return jitted(outputs)

    return call


def _write_rows(clients, ids: jax.Array, new):
    """``clients [K, ...]`` with rows ``ids [S]`` replaced by ``new [S, ...]``."""
    return jax.tree.map(lambda a, b: a.at[ids].set(b.astype(a.dtype)), clients, new)


def _contribution(
    algorithm: FederatedAlgorithm, shared: tuple, data: ClientData, cid: jax.Array, valid
) -> Aggregate:
    """One client's weighted contribution to the aggregate; zeros for an invalid slot, as the
    backend contract requires."""
    out = _client_update(algorithm, shared, data, cid, valid)
    return Aggregate(tree_scale(out.update, out.weight), out.weight, out.metrics)


def client_contribution(algorithm: FederatedAlgorithm):
    """The per-client function a round runs through its backend (``shared = (broadcast, client
    stream, round)``), what :mod:`jaxfl.memory` compiles to size chunks: ``fn(shared, data, cid,
    valid) -> Aggregate``, or for a stateful algorithm ``fn(shared, (data, state), cid, valid)
    -> ClientOutput`` (new state included)."""
    if algorithm.stateful:
        return functools.partial(_stateful_update, algorithm)
    return functools.partial(_contribution, algorithm)


def _client_output(algorithm: FederatedAlgorithm, shared: tuple, data, cid, valid):
    """One client's ``(flat update [D], weight)`` for host aggregation."""
    out = _client_update(algorithm, shared, data, cid, valid)
    return ravel_pytree(out.update)[0], out.weight


def _trial_outputs(algorithm, client_stream, broadcast, data, rounds, valid):
    """``_client_output`` of every client ``[K]`` in every round of ``rounds [R]``."""
    ids = jnp.arange(valid.shape[0], dtype=jnp.int32)

    def one_round(r):
        shared = (broadcast, client_stream, r)
        return jax.vmap(lambda d, c, v: _client_output(algorithm, shared, d, c, v))(
            data, ids, valid
        )

    return jax.vmap(one_round)(rounds)


def _release(algorithm: FederatedAlgorithm, server_stream, total, weight, round_idx):
    """The algorithm's aggregate of the weighted sum ``total``: the round's released mean
    (with its own noise, central DP, drawn from ``fold_in(server_stream, round)``)."""
    return algorithm.aggregate(total, weight, jax.random.fold_in(server_stream, round_idx))


def _finish(
    algorithm: FederatedAlgorithm,
    server_stream: jax.Array,
    state: ServerState,
    agg: Aggregate,
    round_idx: jax.Array,
):
    """The algorithm's aggregate of the summed updates, then its server update."""
    key = jax.random.fold_in(server_stream, round_idx)
    update = algorithm.aggregate(agg.weighted_update, agg.weight, key)
    return algorithm.server_update(state, update), agg.metrics


class Simulator:
    """Runs federated rounds of ``algorithm`` over ``train`` client arrays.

    ``train`` holds ``K`` clients (``[K, N, ...]``); each round samples ``clients_per_round`` of
    them (static shape) and runs them through ``backend`` (default: :func:`make_backend` of
    ``strategy``, ``chunk_size`` and ``devices``). ``task`` turns the summed training metrics
    into the logged rates.
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        train: ClientArrays,
        *,
        seed: int = 0,
        strategy: str = "auto",
        chunk_size: int = 64,
        clients_per_round: int | float | None = None,
        poisson_rate: float | None = None,
        host_aggregator: HostAggregator | None = None,
        secure_randomness: bool = False,
        backend: ClientBackend | None = None,
        devices: Sequence[jax.Device] | None = None,
        task: Task = CLASSIFICATION,
    ):
        chex.assert_equal_shape_prefix(jax.tree.leaves(train), 1)
        if host_aggregator is not None and algorithm.aggregate is not weighted_mean:
            fix = (
                "secure.aggregator='plain' (SCAFFOLD divides its control-variate sum by the "
                "number of clients on the server)"
                if algorithm.name == "scaffold"
                else "secure.aggregator='plain', or dp.mode='local_update' or 'record' for DP "
                "with secure aggregation (central DP adds its noise to the sum on the server)"
            )
            raise ValueError(
                f"{algorithm.name} aggregates with its own server-side rule, which host secure "
                f"aggregation would bypass; use {fix}."
            )
        if poisson_rate is not None and not 0 < poisson_rate <= 1:
            raise ValueError(f"poisson_rate must be in (0, 1], got {poisson_rate}.")
        self.algorithm = algorithm
        self.task = task
        self.num_clients = train.num_clients
        # Poisson sampling (each client independently with probability q, as user-level DP
        # accounting assumes) overrides the fixed-size clients_per_round.
        self.poisson_rate = poisson_rate
        self.per_round = (
            self.num_clients
            if poisson_rate is not None
            else num_sampled_clients(clients_per_round, self.num_clients)
        )
        # More devices than clients per round would only run padding slots.
        devices = list(devices if devices is not None else jax.devices())[: self.per_round]
        self.backend = backend or make_backend(strategy, chunk_size=chunk_size, devices=devices)
        self.strategy = self.backend.name
        self._train_c = self.backend.place(client_rows(train))
        # A client's work grows with its examples: backends spread devices' loads by it.
        self._costs = np.asarray(train.counts, np.float64)
        # The placed arrays when they are the clients' (no padding rows), so the data is on the
        # device once; personalized evaluation maps over ``self.train`` through the backend too.
        placed = ClientArrays(*self._train_c)
        self.train = placed if placed.num_clients == self.num_clients else train
        root = jax.random.key(seed)
        self.secure_randomness = secure_randomness
        self.sample_stream = jax.random.fold_in(root, SAMPLE_STREAM)
        self.client_stream = jax.random.fold_in(root, CLIENT_STREAM)
        self.server_stream = jax.random.fold_in(root, SERVER_STREAM)
        self._sum = self.backend.sum(functools.partial(_contribution, algorithm))
        self._outputs = self.backend.map(functools.partial(_client_output, algorithm))
        self._finish = jax.jit(functools.partial(_finish, algorithm))
        self.host_aggregator = host_aggregator
        self._unravel_fn = None
        self._releases = None
        self._server_update = jax.jit(algorithm.server_update)
        if algorithm.stateful:
            self._stateful = self.backend.map(functools.partial(_stateful_update, algorithm))
            self._sum_outputs = _on_host_or_jit(_sum_outputs)
            self._flat_outputs = _on_host_or_jit(_flat_outputs)
            self._write_rows = jax.jit(_write_rows)
        self._aggregate = jax.jit(functools.partial(_release, algorithm))
        self._trials = jax.jit(functools.partial(_trial_outputs, algorithm, self.client_stream))
        if jax.default_backend() == "cpu" and self.strategy in ("loop", "scan", "shard_map"):
            tune_cpu_malloc()

    def init(self, params: Params) -> ServerState:
        """The algorithm's initial server state for global ``params`` (with every client's
        initial state, placed like the client data, for a stateful algorithm)."""
        state = self.algorithm.init(params)
        if not self.algorithm.stateful:
            return state
        one = self.algorithm.client_init(params)
        k = self.num_clients
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (k, *x.shape)), one)
        return state._replace(clients=self.backend.place(jax.tree.map(np.array, stacked)))

    def checkpoint_state(self, state: ServerState) -> ServerState:
        """``state`` as a checkpoint holds it: every client's state as host rows ``[K, ...]``,
        free of the backend's layout (padding to a multiple of the devices, sharding over
        processes), so a run resumes under another device or process count."""
        if state.clients is None:
            return state
        k = self.num_clients
        return state._replace(
            clients=jax.tree.map(lambda a: distributed.to_host(a)[:k], state.clients)
        )

    def restore_state(self, state: ServerState) -> ServerState:
        """:meth:`checkpoint_state` undone: the client rows placed as this backend places them."""
        if state.clients is None:
            return state
        host = jax.tree.map(np.asarray, state.clients)
        return state._replace(clients=self.backend.place(host))

    def sample_clients(self, round_idx: int) -> np.ndarray:
        """Sorted ids of the clients taking part in ``round_idx``."""
        if self.poisson_rate is not None:
            if self.secure_randomness:
                u = distributed.from_primary(os_uniform, self.num_clients)
            else:
                key = jax.random.fold_in(self.sample_stream, round_idx)
                u = np.asarray(jax.random.uniform(key, (self.num_clients,)))
            return np.flatnonzero(u < self.poisson_rate).astype(np.int32)
        if self.per_round == self.num_clients:
            return np.arange(self.num_clients, dtype=np.int32)
        if self.secure_randomness:
            u = distributed.from_primary(os_uniform, self.num_clients)
            ranks = np.argsort(u)[: self.per_round]
            return np.sort(ranks.astype(np.int32))
        key = jax.random.fold_in(self.sample_stream, round_idx)
        ids = jax.random.choice(key, self.num_clients, (self.per_round,), replace=False)
        return np.sort(np.asarray(ids, dtype=np.int32))

    def _require_stateless(self, what: str) -> None:
        """Refuse the privacy-audit entry points for stateful algorithms, whose clients'
        outputs depend on state the audit would have to replay."""
        if self.algorithm.stateful:
            raise ValueError(
                f"{what} replays one round from the server state alone; {self.algorithm.name} "
                "clients also carry their own state, which the privacy audit does not replay "
                "yet. Audit fedavg, fedprox or perfedavg instead."
            )

    def round_streams(self) -> tuple[jax.Array, jax.Array]:
        """``(client_stream, server_stream)`` for a round: the seed's, or with
        ``secure_randomness`` fresh keys from the OS CSPRNG (never stored or logged), so the DP
        noise, Poisson samples and shuffles of a round cannot be recomputed from the seed."""
        if not self.secure_randomness:
            return self.client_stream, self.server_stream
        # Every process of a multi-process run uses the same fresh keys: process 0 draws them.
        client, server = distributed.from_primary(_fresh_key_data)
        return jax.random.wrap_key_data(client), jax.random.wrap_key_data(server)

    def _round_inputs(self, state: ServerState, round_idx: int):
        """``(shared, slots, selected, server_stream)`` of a round: what the backend maps."""
        ids = self.sample_clients(round_idx)
        client_stream, server_stream = self.round_streams()
        # A Poisson sample has a random size: backends keep their static shapes by running
        # every client slot with the unsampled ones marked invalid (weight 0, no steps).
        slots = np.arange(self.num_clients, dtype=np.int32) if self.poisson_rate else ids
        selected = np.isin(slots, ids)
        shared = (self.algorithm.broadcast(state), client_stream, jnp.int32(round_idx))
        return shared, slots, selected, server_stream

    def run_round(self, state: ServerState, round_idx: int) -> tuple[ServerState, dict[str, float]]:
        """One federated round; returns the new server state and host-side round metrics."""
        shared, slots, selected, server_stream = self._round_inputs(state, round_idx)
        if self.algorithm.stateful:
            return self._run_round_stateful(
                state, round_idx, shared, slots, selected, server_stream
            )
        if self.host_aggregator is not None:
            flat, weights = self._host_outputs(shared, slots, selected)
            unravel, size = self._unravel(shared)
            return self._host_round(state, flat, weights, (unravel, size), round_idx, selected)
        agg = self._sum(shared, self._train_c, slots, selected, costs=self._costs[slots])
        state, sums = self._finish(server_stream, state, agg, shared[2])
        return state, round_metrics(self.task, sums, int(selected.sum()))

    def _run_round_stateful(self, state, round_idx, shared, slots, selected, server_stream):
        """A round of a stateful algorithm: the sampled clients' outputs and new states, the
        server update from their aggregate, the new states written back into their rows."""
        outputs = self._stateful(
            shared, (self._train_c, state.clients), slots, selected, costs=self._costs[slots]
        )
        clients = self._write_clients(state.clients, slots[selected], outputs.state)
        server = state._replace(clients=None)
        if self.host_aggregator is not None:
            flat, weights = (np.asarray(x) for x in self._flat_outputs(outputs))
            if self._unravel_fn is None:  # the update's shapes do not change between rounds
                one = jax.tree.map(
                    lambda u: jax.ShapeDtypeStruct(u.shape[1:], u.dtype), outputs.update
                )
                self._unravel_fn = _unravel_like(one)
            server, metrics = self._host_round(
                server, flat, weights, self._unravel_fn, round_idx, selected
            )
        else:
            # The outputs may be sharded over a mesh; the sum goes where the server state is.
            home = jax.tree.leaves(server.params)[0].sharding
            agg = jax.device_put(self._sum_outputs(outputs), home)
            server, sums = self._finish(server_stream, server, agg, shared[2])
            metrics = round_metrics(self.task, sums, int(selected.sum()))
        return server._replace(clients=clients), metrics

    def _write_clients(self, clients, ids: np.ndarray, new):
        """``clients`` with rows ``ids`` replaced by ``new``: on the device, or on the host
        (numpy, a copy) when the backend keeps client data there (streaming)."""
        if all(isinstance(a, jax.Array) for a in jax.tree.leaves(clients)):
            ids = jnp.asarray(ids)
            sharding = jax.tree.leaves(clients)[0].sharding
            if not sharding.is_fully_addressable:  # the rows span processes (jax.distributed)
                replicated = NamedSharding(sharding.mesh, PartitionSpec())
                ids, new = put_global((ids, new), replicated)
            return self._write_rows(clients, ids, new)

        def write(a, b):
            a = np.array(a)
            a[ids] = np.asarray(b)
            return a

        return jax.tree.map(write, clients, new)

    def _host_outputs(self, shared, slots, selected) -> tuple[np.ndarray, np.ndarray]:
        """Every slot's ``(flat update [S, D], weight [S])`` on the host."""
        out = self._outputs(shared, self._train_c, slots, selected, costs=self._costs[slots])
        return tuple(np.asarray(x) for x in out)

    def client_outputs(self, state: ServerState, round_idx: int) -> dict[str, np.ndarray]:
        """What the clients of ``round_idx`` send at the aggregation boundary, exactly as
        :meth:`run_round` computes it (DP noise included): ``clients [S]`` ids, ``updates
        [S, D]`` flat (``ravel_pytree`` order) and ``weights [S]``. This is what a host
        aggregator receives, and what an attacker at an unprotected server sees."""
        self._require_stateless("client_outputs")
        shared, slots, selected, _ = self._round_inputs(state, round_idx)
        flat, weights = self._host_outputs(shared, slots, selected)
        # Backends return the valid slots' rows only, so the outputs are already [S, ...].
        return {"clients": slots[selected], "updates": flat, "weights": weights}

    def released_update(self, state: ServerState, round_idx: int) -> np.ndarray:
        """The mean update ``[D]`` that ``round_idx`` applies to the global model: the secure
        aggregator's output, or the algorithm's aggregate (central DP noise included). This is
        what an observer of the global model, or a server behind secure aggregation, sees."""
        self._require_stateless("released_update")
        shared, slots, selected, server_stream = self._round_inputs(state, round_idx)
        flat, weights = self._host_outputs(shared, slots, selected)
        if self.host_aggregator is not None:
            return np.asarray(self.host_aggregator.aggregate(flat, weights, round_idx).mean)
        unravel, _ = self._unravel(shared)
        total = unravel(jnp.asarray(weights @ flat, jnp.float32))
        mean = self._aggregate(server_stream, total, jnp.float32(weights.sum()), shared[2])
        return np.asarray(ravel_pytree(mean)[0])

    def trial_outputs(
        self,
        state: ServerState,
        rounds: np.ndarray,
        valid: np.ndarray | None = None,
        train: ClientArrays | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Every client's ``(flat update [R, K, D], weight [R, K])`` as sent in each of
        ``rounds`` from the same ``state``: fresh local-training and DP draws per round, the
        pipeline's own client function, vmapped over clients and rounds on one device (for
        privacy audits of few small clients). ``valid [K]``: clients taking part (default all);
        ``train``: other client arrays shaped like the simulator's (a neighbouring dataset)."""
        self._require_stateless("trial_outputs")
        valid = np.ones(self.num_clients, bool) if valid is None else np.asarray(valid, bool)
        data = client_rows(self.train if train is None else train)
        broadcast = self.algorithm.broadcast(state)
        return self._trials(broadcast, data, jnp.asarray(rounds, jnp.int32), jnp.asarray(valid))

    def trial_releases(
        self,
        state: ServerState,
        rounds: np.ndarray,
        valid: np.ndarray | None = None,
        train: ClientArrays | None = None,
    ) -> jax.Array:
        """The released mean update ``[R, D]`` of each of ``rounds`` from the same ``state``,
        with only ``valid [K]`` clients (of ``train``, default the simulator's) taking part: the
        aggregate's own noise (central DP) drawn per round. Host (secure) aggregation is not
        vmapped: use :meth:`released_update`."""
        if self.host_aggregator is not None:
            raise ValueError(
                "trial_releases runs the aggregate on the device; with a host aggregator call "
                "released_update once per round instead."
            )
        flat, weights = self.trial_outputs(state, rounds, valid, train)
        if self._releases is None:
            shared = (self.algorithm.broadcast(state), self.client_stream, jnp.int32(0))
            unravel, _ = self._unravel(shared)

            def one(f, w, r):
                mean = _release(self.algorithm, self.server_stream, unravel(w @ f), w.sum(), r)
                return ravel_pytree(mean)[0]

            self._releases = jax.jit(jax.vmap(one))
        return self._releases(flat, weights, jnp.asarray(rounds, jnp.int32))

    def _host_round(self, state, flat, weights, unravel, round_idx, selected):
        """The server side of a round aggregated on the host (secure aggregation) from the
        ``selected`` clients' ``flat [S, D]`` updates and ``weights [S]``; ``unravel = (fn,
        D)`` maps a flat mean back to an update pytree."""
        unravel, size = unravel
        # Only the protocol's output leaves the clients: per-client training sums (loss,
        # accuracy, examples, steps, clipping) would travel in the clear, so none is reported.
        out = {"clients": int(selected.sum())}
        if len(weights) == 0 or not np.any(weights > 0):  # nobody to aggregate: no update
            mean = np.zeros(size, np.float32)
        else:
            try:
                # Encryption and masking draw from the OS: process 0's result is the round's.
                result = distributed.from_primary(
                    self.host_aggregator.aggregate, flat, weights, round_idx
                )
            except SecAggError as e:
                # Too many simulated dropouts to unmask: like a real deployment, the round
                # fails and the global model stays as it was (logged and in the metrics).
                logging.warning(
                    "round %d: secure aggregation failed, no update: %s", round_idx + 1, e
                )
                out["secure_failed"] = 1.0
                return state, out
            mean = result.mean
            out["secure_failed"] = 0.0
            out["secure_survivors"] = len(result.survivors)
            out.update({f"secure_{k}": float(v) for k, v in result.stats.items()})
        state = self._server_update(state, unravel(jnp.asarray(mean, jnp.float32)))
        return state, out

    def _unravel(self, shared: tuple):
        """``(unravel, D)``: the map from a flat ``[D]`` vector to an update pytree."""
        if self._unravel_fn is None:  # eval_shape re-traces client_update: do it once
            one = jax.tree.map(lambda a: a[0], client_rows(self.train))
            shapes = jax.eval_shape(
                functools.partial(_contribution, self.algorithm),
                shared,
                one,
                jnp.int32(0),
                jnp.bool_(True),
            )
            self._unravel_fn = _unravel_like(shapes.weighted_update)
        return self._unravel_fn


def _fresh_key_data() -> tuple[np.ndarray, np.ndarray]:
    """Two fresh keys' data from the OS CSPRNG (:func:`jaxfl.rng.os_key`), as host arrays."""
    return tuple(np.asarray(jax.random.key_data(os_key())) for _ in range(2))


def _unravel_like(update) -> tuple:
    """``(unravel, D)`` for updates shaped like ``update`` (arrays or shape structs)."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update)
    flat, unravel = ravel_pytree(zeros)
    return unravel, flat.size


def round_metrics(task: Task, sums: dict[str, jax.Array], num_clients: int) -> dict[str, float]:
    """A round's host-side metrics from the summed client metrics: the task's training rates
    plus the engine's counts (examples, DP clipping, local steps)."""
    sums = {k: float(v) for k, v in sums.items()}
    metrics = {"clients": num_clients, "examples_seen": sums.get("num_seen", 0.0)}
    metrics.update(task.train_metrics(sums))
    if "dp_clipped" in sums:
        metrics["dp_clipped_fraction"] = sums["dp_clipped"] / max(sums.get("dp_selected", 0), 1.0)
    if "update_clipped" in sums:
        metrics["update_clipped_fraction"] = sums["update_clipped"] / max(num_clients, 1)
    if "num_steps" in sums:
        metrics["local_steps_mean"] = sums["num_steps"] / max(num_clients, 1)
    return metrics
