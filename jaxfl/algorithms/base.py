"""The federated-algorithm interface, written for ONE client, and the shared local-training loop.

An algorithm never sees a client axis: :mod:`jaxfl.simulate` maps ``client_update`` over clients
(vmap, vmapped chunks or a per-client loop) and aggregates the returned updates with a weighted
mean before calling ``server_update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl.rng import slot_uniforms
from jaxfl.types import ClientData, LocalResult, LossFn, Params, PRNGKey


class ServerState(NamedTuple):
    """Global model, server optimizer state and the number of completed rounds."""

    params: Params
    opt_state: optax.OptState
    round: jax.Array


class ClientOutput(NamedTuple):
    """What one client sends back: an update to average, its weight, and metric sums.

    ``metrics`` values are summed over clients by the simulator (so they must be sums, e.g.
    ``loss_sum`` and ``num_seen``, never means).
    """

    update: Params
    weight: jax.Array
    metrics: dict[str, jax.Array]


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
    """

    name: str
    init: Callable[[Params], ServerState]
    broadcast: Callable[[ServerState], Any]
    client_update: Callable[[Any, ClientData, PRNGKey], ClientOutput]
    server_update: Callable[[ServerState, Params], ServerState]
    aggregate: Callable[[Params, jax.Array, PRNGKey], Params] = weighted_mean


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Masked softmax cross-entropy for a flax ``apply_fn``; padded examples contribute nothing."""

    def loss_fn(params, images, labels, mask):
        logits = apply_fn({"params": params}, images)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        loss_sum = jnp.sum(per_example * mask)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
        mean = loss_sum / jnp.maximum(jnp.sum(mask), 1.0)
        return mean, {"loss_sum": loss_sum, "correct": correct}

    return loss_fn


def epoch_permutations(key: PRNGKey, mask: jax.Array, epochs: int) -> jax.Array:
    """Per-epoch shuffles of one client's slots, real examples first: ``[epochs, N]`` int32.

    Each slot's sort key comes from ``fold_in(key, slot)``, so the order of the real examples
    does not depend on how much padding the client carries.
    """
    return jax.vmap(lambda e: epoch_permutation(key, mask, e))(jnp.arange(epochs))


def epoch_permutation(key: PRNGKey, mask: jax.Array, epoch: jax.Array | int) -> jax.Array:
    """Shuffle number ``epoch`` of one client's slots, real examples first: ``[N]`` int32."""
    u = slot_uniforms(jax.random.fold_in(key, epoch), mask.shape[0])
    return jnp.argsort(jnp.where(mask > 0, u, jnp.inf)).astype(jnp.int32)


def local_train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    batch_size: int,
    epochs: int,
    regularizer: Callable[[Params], jax.Array] | None = None,
) -> LocalResult:
    """Run ``epochs`` epochs of minibatch training on one client's padded data.

    A client with ``n`` real examples takes exactly ``epochs * ceil(n / batch_size)`` steps (the
    last batch of an epoch may be partial), as if it trained alone on unpadded data; padding
    contributes no gradient, no loss and no steps. The optimizer state is created fresh, as
    in the reference systems (a new local optimizer every round).
    """
    n_slots = data.mask.shape[0]
    slots_per_epoch = -(-n_slots // batch_size) * batch_size
    perms = epoch_permutations(key, data.mask, epochs)
    perms = jnp.pad(perms, ((0, 0), (0, slots_per_epoch - n_slots)))
    count = data.count.astype(jnp.int32)
    steps_per_epoch = (count + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch

    def objective(p, x, y, m):
        loss, aux = loss_fn(p, x, y, m)
        if regularizer is not None:
            loss = loss + regularizer(p)
        return loss, aux

    grad_fn = jax.grad(objective, has_aux=True)

    def body(carry):
        step, p, opt_state, loss_sum, correct, seen = carry
        epoch = step // jnp.maximum(steps_per_epoch, 1)
        start = (step % jnp.maximum(steps_per_epoch, 1)) * batch_size
        idx = jax.lax.dynamic_slice(perms[epoch], (start,), (batch_size,))
        m = ((start + jnp.arange(batch_size)) < count).astype(jnp.float32)
        grads, aux = grad_fn(p, data.images[idx], data.labels[idx], m)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return (
            step + 1,
            p,
            opt_state,
            loss_sum + aux["loss_sum"],
            correct + aux["correct"],
            seen + jnp.sum(m),
        )

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((), jnp.int32), params, optimizer.init(params), zero, zero, zero)
    steps, p, _, loss_sum, correct, seen = jax.lax.while_loop(
        lambda c: c[0] < total_steps, body, init
    )
    return LocalResult(p, loss_sum, correct, seen, steps)


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
