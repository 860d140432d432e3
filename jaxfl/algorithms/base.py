"""The federated-algorithm interface, written for ONE client (local training: ``local.py``).

An algorithm never sees a client axis: :mod:`jaxfl.simulate` maps ``client_update`` over clients
(vmap, vmapped chunks or a per-client loop) and aggregates the returned updates with a weighted
mean before calling ``server_update``.

A *stateful* algorithm (SCAFFOLD's control variates, Ditto's personal models) also keeps state on
every client across rounds: it defines ``client_init``, its ``client_update`` takes the client's
state as a fourth argument and returns the new one in ``ClientOutput.state``. The simulator holds
every client's state stacked ``[K, ...]`` in ``ServerState.clients``, placed like the client data,
updates the sampled clients' rows and checkpoints it with the server state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl.tasks import CLASSIFICATION, make_loss
from jaxfl.types import LossFn, Params, PRNGKey


class ServerState(NamedTuple):
    """Global model, server optimizer state, the number of completed rounds and, for stateful
    algorithms, every client's state stacked ``[K, ...]`` (None otherwise).

    In a deployment each client would hold its own row of ``clients``; the simulation keeps
    them together so one checkpoint restores the whole federation.
    """

    params: Params
    opt_state: optax.OptState
    round: jax.Array
    clients: Any = None


class ClientOutput(NamedTuple):
    """What one client sends back: an update to average, its weight, and metric sums.

    ``metrics`` values are summed over clients by the simulator (so they must be sums, e.g.
    ``loss_sum`` and ``num_seen``, never means).
    """

    update: Params
    weight: jax.Array
    metrics: dict[str, jax.Array]
    state: Any = None  # the client's new state (stateful algorithms only)


def weighted_mean(weighted_sum: Params, weight_sum: jax.Array, key: PRNGKey) -> Params:
    """``sum_c w_c u_c / sum_c w_c`` (zero if no client had weight); ``key`` is unused."""
    del key
    return jax.tree.map(lambda x: x / jnp.maximum(weight_sum, 1e-12), weighted_sum)


class FederatedAlgorithm(NamedTuple):
    """Pure functions defining a federated algorithm for a single client.

    - ``init(params) -> ServerState``
    - ``broadcast(server_state) -> B``: what the server sends to every client this round.
    - ``client_update(b, data: ClientData, key) -> ClientOutput``: one client's local work.
    - ``server_update(server_state, mean_update) -> ServerState``: apply the aggregated update.
    - ``aggregate(sum_c w_c u_c, sum_c w_c, server_key) -> update``: how the server combines
      the summed updates (weighted mean by default; central DP adds noise here).
    - ``client_init(params) -> client state`` (stateful algorithms only; None otherwise): one
      client's state before its first round, from the initial global params. ``client_update``
      then takes ``(b, data, key, client_state)`` and returns ``ClientOutput.state``.
    - ``personal_params(client_state) -> params`` (None if the state holds no model): the
      client's personalized model, evaluated on its held-out split (Ditto).
    """

    name: str
    init: Callable[[Params], ServerState]
    broadcast: Callable[[ServerState], Any]
    client_update: Callable[..., ClientOutput]
    server_update: Callable[[ServerState, Params], ServerState]
    aggregate: Callable[[Params, jax.Array, PRNGKey], Params] = weighted_mean
    client_init: Callable[[Params], Any] | None = None
    personal_params: Callable[[Any], Params] | None = None

    @property
    def stateful(self) -> bool:
        """Whether every client keeps state across rounds."""
        return self.client_init is not None


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Masked softmax cross-entropy for a flax ``apply_fn`` (the classification task's loss)."""
    return make_loss(CLASSIFICATION, apply_fn)


def fedopt_server(
    server_optimizer: optax.GradientTransformation,
) -> tuple[
    Callable[[Params], ServerState],
    Callable[[ServerState], Params],
    Callable[[ServerState, Params], ServerState],
]:
    """``(init, broadcast, server_update)`` of a FedOpt server, shared by FedAvg-style algorithms.

    The server sends its global params and applies the mean update with ``server_optimizer``
    (see :func:`server_apply`).
    """

    def init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def broadcast(state: ServerState) -> Params:
        return state.params

    def server_update(state: ServerState, mean_update: Params) -> ServerState:
        return server_apply(server_optimizer, state, mean_update)

    return init, broadcast, server_update


def server_apply(
    server_optimizer: optax.GradientTransformation, state: ServerState, mean_update: Params
) -> ServerState:
    """Treat ``-mean_update`` as a pseudo-gradient for the server optimizer (FedOpt).

    With ``optax.sgd(1.0)`` this is exactly FedAvg: ``params + mean_update``.
    """
    pseudo_grad = jax.tree.map(jnp.negative, mean_update)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ServerState(params, opt_state, state.round + 1)
