"""The one place where clients are mapped: execution strategies and the federated round.

A round is a pure function of (server state, client data, round index). How the sampled clients'
``client_update`` calls are executed is a *strategy*, invisible to algorithms:

- ``vmap``: every sampled client in one ``jax.vmap`` inside one ``jax.jit`` (the accelerator
  design target);
- ``chunked``: ``lax.scan`` over chunks of ``chunk_size`` clients, vmapped within a chunk and
  accumulating the weighted sum, so memory is bounded by the chunk, still one jit per round;
- ``loop``: a Python loop calling one jitted per-client step that adds the client's weighted
  update into a running sum (fastest on a small CPU, where vmapped convolutions become slow
  grouped convolutions); it also applies :func:`jaxfl.runtime.tune_cpu_malloc`;
- ``auto``: ``loop`` on CPU, ``chunked`` elsewhere (see README's performance section).

All strategies compute the same weighted mean (up to float summation order) because every
client's key is ``fold_in(fold_in(client_stream, round), client_id)``.

With a ``host_aggregator`` (secure aggregation), the strategy's jitted step returns every
client's flattened update ``[K, D]`` instead of their sum; the host protects and aggregates them
(numpy in, numpy out, :mod:`jaxfl.secure`) and a jitted server update applies the mean.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxfl.algorithms.base import FederatedAlgorithm, ServerState, weighted_mean
from jaxfl.rng import os_key
from jaxfl.runtime import tune_cpu_malloc
from jaxfl.secure.entropy import os_uniform
from jaxfl.secure.secagg import SecAggError
from jaxfl.tree import tree_add, tree_scale, tree_sum_axis0
from jaxfl.types import ClientArrays, ClientData, Params

if TYPE_CHECKING:
    from jaxfl.secure.aggregators import HostAggregator

STRATEGIES = ("vmap", "chunked", "loop")

# Named RNG streams, folded into the root key derived from the seed (PERSONALIZE_STREAM:
# the adaptation batches of jaxfl.personalize's evaluation).
INIT_STREAM, SAMPLE_STREAM, CLIENT_STREAM, SERVER_STREAM, PERSONALIZE_STREAM = 0, 1, 2, 3, 4


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
    """Map ``auto`` to a concrete strategy for ``backend`` (default: JAX's default backend)."""
    if strategy in STRATEGIES:
        return strategy
    if strategy != "auto":
        raise ValueError(
            f"Unknown client-execution strategy {strategy!r}; choose one of "
            f"{('auto',) + STRATEGIES}."
        )
    backend = backend or jax.default_backend()
    return "loop" if backend == "cpu" else "chunked"


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


def _select_client(arrays: ClientArrays, cid: jax.Array, valid: jax.Array) -> ClientData:
    """One client's data; an invalid (padding) slot becomes a client with zero examples."""
    data = ClientData(arrays.images[cid], arrays.labels[cid], arrays.mask[cid], arrays.counts[cid])
    return data._replace(mask=data.mask * valid, count=jnp.where(valid, data.count, 0))


def _contribution(
    algorithm: FederatedAlgorithm,
    broadcast: Any,
    arrays: ClientArrays,
    cid: jax.Array,
    valid: jax.Array,
    client_stream: jax.Array,
    round_idx: jax.Array,
) -> Aggregate:
    """Run one client's update and return its weighted contribution to the aggregate."""
    out = algorithm.client_update(
        broadcast, _select_client(arrays, cid, valid), client_key(client_stream, round_idx, cid)
    )
    return Aggregate(tree_scale(out.update, out.weight), out.weight, out.metrics)


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


def _chunked(slots: np.ndarray, selected: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ids and their validity padded to whole chunks: ``[n_chunks, size]`` each.

    Padding slots point at client 0 and are invalid (they run as clients without data).
    """
    n_chunks = -(-len(slots) // size)
    ids = np.zeros(n_chunks * size, np.int32)
    valid = np.zeros(n_chunks * size, bool)
    ids[: len(slots)], valid[: len(slots)] = slots, selected
    return ids.reshape(n_chunks, size), valid.reshape(n_chunks, size)


class Simulator:
    """Runs federated rounds of ``algorithm`` over ``train`` client arrays.

    ``train`` holds ``K`` clients (``[K, N, ...]``); each round samples ``clients_per_round`` of
    them (static shape) and runs them with the chosen strategy.
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
    ):
        chex.assert_equal_shape_prefix(tuple(train), 1)
        if host_aggregator is not None and algorithm.aggregate is not weighted_mean:
            raise ValueError(
                f"{algorithm.name} aggregates with its own server-side rule (central DP adds "
                "noise to the sum), which host secure aggregation would bypass; use "
                "dp.mode='local_update' or 'record' with secure aggregation."
            )
        if poisson_rate is not None and not 0 < poisson_rate <= 1:
            raise ValueError(f"poisson_rate must be in (0, 1], got {poisson_rate}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.algorithm = algorithm
        self.train = ClientArrays(*(jnp.asarray(a) for a in train))
        self.num_clients = train.num_clients
        # Poisson sampling (each client independently with probability q, as user-level DP
        # accounting assumes) overrides the fixed-size clients_per_round.
        self.poisson_rate = poisson_rate
        self.per_round = (
            self.num_clients
            if poisson_rate is not None
            else num_sampled_clients(clients_per_round, self.num_clients)
        )
        self.strategy = resolve_strategy(strategy)
        self.chunk_size = min(chunk_size, self.per_round)
        root = jax.random.key(seed)
        self.secure_randomness = secure_randomness
        self.sample_stream = jax.random.fold_in(root, SAMPLE_STREAM)
        self.client_stream = jax.random.fold_in(root, CLIENT_STREAM)
        self.server_stream = jax.random.fold_in(root, SERVER_STREAM)
        self._round_vmap = jax.jit(self._round_vmap_impl)
        self._round_chunked = jax.jit(self._round_chunked_impl)
        self._loop_step = jax.jit(self._loop_step_impl, donate_argnums=0)
        self._loop_finish = jax.jit(functools.partial(_finish, algorithm))
        self._aggregate_shapes = None
        self.host_aggregator = host_aggregator
        self._unravel_fn = None
        self._outputs_vmap = jax.jit(self._outputs_vmap_impl)
        self._output_one = jax.jit(self._output_one_impl)
        self._server_update = jax.jit(algorithm.server_update)
        if self.strategy == "loop" and jax.default_backend() == "cpu":
            tune_cpu_malloc()

    def init(self, params: Params) -> ServerState:
        """The algorithm's initial server state for global ``params``."""
        return self.algorithm.init(params)

    def sample_clients(self, round_idx: int) -> np.ndarray:
        """Sorted ids of the clients taking part in ``round_idx``."""
        if self.poisson_rate is not None:
            if self.secure_randomness:
                u = os_uniform(self.num_clients)
            else:
                key = jax.random.fold_in(self.sample_stream, round_idx)
                u = np.asarray(jax.random.uniform(key, (self.num_clients,)))
            return np.flatnonzero(u < self.poisson_rate).astype(np.int32)
        if self.per_round == self.num_clients:
            return np.arange(self.num_clients, dtype=np.int32)
        if self.secure_randomness:
            ranks = np.argsort(os_uniform(self.num_clients))[: self.per_round]
            return np.sort(ranks.astype(np.int32))
        key = jax.random.fold_in(self.sample_stream, round_idx)
        ids = jax.random.choice(key, self.num_clients, (self.per_round,), replace=False)
        return np.sort(np.asarray(ids, dtype=np.int32))

    def round_streams(self) -> tuple[jax.Array, jax.Array]:
        """``(client_stream, server_stream)`` for a round: the seed's, or with
        ``secure_randomness`` fresh keys from the OS CSPRNG (never stored or logged), so the DP
        noise, Poisson samples and shuffles of a round cannot be recomputed from the seed."""
        if not self.secure_randomness:
            return self.client_stream, self.server_stream
        return os_key(), os_key()

    def run_round(self, state: ServerState, round_idx: int) -> tuple[ServerState, dict[str, float]]:
        """One federated round; returns the new server state and host-side round metrics."""
        ids = self.sample_clients(round_idx)
        r = jnp.asarray(round_idx, jnp.int32)
        streams = self.round_streams()
        # A Poisson sample has a random size: vmap/chunked keep their static shape by running
        # every client with the unsampled ones masked out (weight 0, no steps).
        slots = np.arange(self.num_clients, dtype=np.int32) if self.poisson_rate else ids
        selected = np.isin(slots, ids)
        if self.host_aggregator is not None:
            return self._run_round_host(state, ids, slots, selected, round_idx, streams[0])
        if self.strategy == "vmap":
            state, sums = self._round_vmap(
                state, self.train, jnp.asarray(slots), jnp.asarray(selected), r, streams
            )
        elif self.strategy == "chunked":
            chunks, valid = _chunked(slots, selected, self.chunk_size)
            state, sums = self._round_chunked(
                state, self.train, jnp.asarray(chunks), jnp.asarray(valid), r, streams
            )
        else:
            broadcast = self.algorithm.broadcast(state)
            agg = self._zero_aggregate(broadcast)
            for cid in ids:
                agg = self._loop_step(agg, broadcast, self.train, jnp.int32(cid), r, streams[0])
            state, sums = self._loop_finish(streams[1], state, agg, r)
        return state, self._round_metrics(sums, len(ids))

    def _run_round_host(self, state, ids, slots, selected, round_idx, client_stream):
        """A round whose aggregation runs on the host (secure aggregation)."""
        r = jnp.asarray(round_idx, jnp.int32)
        broadcast = self.algorithm.broadcast(state)
        if self.strategy == "loop":
            outs = [
                self._output_one(broadcast, self.train, jnp.int32(c), r, client_stream) for c in ids
            ]
            flat = np.stack([np.asarray(o[0]) for o in outs]) if outs else np.zeros((0, 0))
            weights = np.asarray([float(o[1]) for o in outs])
        else:
            # vmap: one call over the round's slots; chunked: one call per chunk (same shapes).
            size = len(slots) if self.strategy == "vmap" else self.chunk_size
            parts = []
            for chunk, valid in zip(*_chunked(slots, selected, size), strict=True):
                out = self._outputs_vmap(
                    state, self.train, jnp.asarray(chunk), jnp.asarray(valid), r, client_stream
                )
                parts.append([np.asarray(x)[valid] for x in out])
            flat, weights = (np.concatenate([p[i] for p in parts]) for i in range(2))
        unravel, size = self._unravel(broadcast)
        # Only the protocol's output leaves the clients: per-client training sums (loss,
        # accuracy, examples, steps, clipping) would travel in the clear, so none is reported.
        out = {"clients": len(ids)}
        if len(ids) == 0 or not np.any(weights > 0):  # nobody to aggregate: no update
            mean = np.zeros(size, np.float32)
        else:
            try:
                result = self.host_aggregator.aggregate(flat, weights, round_idx)
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

    def _unravel(self, broadcast: Any):
        """``(unravel, D)``: the map from a flat ``[D]`` vector to an update pytree."""
        if self._unravel_fn is None:
            flat, unravel = ravel_pytree(self._zero_aggregate(broadcast).weighted_update)
            self._unravel_fn = (unravel, flat.size)
        return self._unravel_fn

    def _client_output(self, broadcast, arrays, cid, valid, round_idx, client_stream):
        """One client's ``(flat update [D], weight)`` for host aggregation."""
        out = self.algorithm.client_update(
            broadcast,
            _select_client(arrays, cid, valid),
            client_key(client_stream, round_idx, cid),
        )
        return ravel_pytree(out.update)[0], out.weight

    def _outputs_vmap_impl(self, state, arrays, ids, valid, round_idx, client_stream):
        broadcast = self.algorithm.broadcast(state)
        return jax.vmap(self._client_output, in_axes=(None, None, 0, 0, None, None))(
            broadcast, arrays, ids, valid, round_idx, client_stream
        )

    def _output_one_impl(self, broadcast, arrays, cid, round_idx, client_stream):
        return self._client_output(
            broadcast, arrays, cid, jnp.bool_(True), round_idx, client_stream
        )

    def _zero_aggregate(self, broadcast: Any) -> Aggregate:
        """Zeros shaped like one client's contribution (and so like any sum of them)."""
        if self._aggregate_shapes is None:  # eval_shape re-traces client_update: do it once
            self._aggregate_shapes = jax.eval_shape(
                functools.partial(_contribution, self.algorithm),
                broadcast,
                self.train,
                jnp.int32(0),
                jnp.bool_(True),
                self.client_stream,
                jnp.int32(0),
            )
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._aggregate_shapes)

    def _round_vmap_impl(self, state, arrays, ids, valid, round_idx, streams):
        client_stream, server_stream = streams
        broadcast = self.algorithm.broadcast(state)
        contrib = jax.vmap(
            functools.partial(_contribution, self.algorithm),
            in_axes=(None, None, 0, 0, None, None),
        )(broadcast, arrays, ids, valid, client_stream, round_idx)
        return _finish(self.algorithm, server_stream, state, tree_sum_axis0(contrib), round_idx)

    def _round_chunked_impl(self, state, arrays, ids_chunks, valid_chunks, round_idx, streams):
        client_stream, server_stream = streams
        broadcast = self.algorithm.broadcast(state)
        run_chunk = jax.vmap(
            functools.partial(_contribution, self.algorithm),
            in_axes=(None, None, 0, 0, None, None),
        )

        def body(acc, chunk):
            ids, valid = chunk
            contrib = run_chunk(broadcast, arrays, ids, valid, client_stream, round_idx)
            return tree_add(acc, tree_sum_axis0(contrib)), None

        init = self._zero_aggregate(broadcast)
        agg, _ = jax.lax.scan(body, init, (ids_chunks, valid_chunks))
        return _finish(self.algorithm, server_stream, state, agg, round_idx)

    def _loop_step_impl(self, agg, broadcast, arrays, cid, round_idx, client_stream):
        contrib = _contribution(
            self.algorithm, broadcast, arrays, cid, jnp.bool_(True), client_stream, round_idx
        )
        return tree_add(agg, contrib)

    @staticmethod
    def _round_metrics(sums: dict[str, jax.Array], num_clients: int) -> dict[str, float]:
        sums = {k: float(v) for k, v in sums.items()}
        seen = max(sums.get("num_seen", 0.0), 1.0)
        metrics = {"clients": num_clients, "examples_seen": sums.get("num_seen", 0.0)}
        if "loss_sum" in sums:
            metrics["train_loss"] = sums["loss_sum"] / seen
        if "correct" in sums:
            metrics["train_accuracy"] = sums["correct"] / seen
        if "dp_clipped" in sums:
            metrics["dp_clipped_fraction"] = sums["dp_clipped"] / seen
        if "update_clipped" in sums:
            metrics["update_clipped_fraction"] = sums["update_clipped"] / max(num_clients, 1)
        if "num_steps" in sums:
            metrics["local_steps_mean"] = sums["num_steps"] / max(num_clients, 1)
        return metrics
