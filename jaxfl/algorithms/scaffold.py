"""SCAFFOLD (Karimireddy et al. 2020), written for ONE client: control variates against drift.

Every client ``i`` keeps a control variate ``c_i`` (its state, zeros at first) and the server
keeps ``c``, an estimate of the mean of the ``c_i``. A sampled client starts from the global
``x`` and takes ``K`` SGD steps of size ``eta_l`` on its minibatches with the corrected gradient
``g_i(y) - c_i + c``, so each client follows the global direction instead of drifting towards
its own optimum. Then (the paper's option II)::

    c_i+ = c_i - c + (x - y) / (K eta_l)
    sends (dy, dc) = (y - x, c_i+ - c_i); keeps c_i+

and the server, over the sampled set ``S`` of the ``N`` clients::

    x <- x + eta_g mean_S(dy)        (the server optimizer; SGD lr 1 = eta_g 1)
    c <- c + sum_S(dc) / N

As in the paper, updates are averaged with weight 1 per client (not by example count). The
correction ``c - c_i`` is the exact gradient of the data-independent term ``<c - c_i, y>``,
passed to local training as a regularizer, so record-level DP-SGD composes with it unchanged:
``c_i`` is then computed from DP outputs only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    ServerState,
    server_apply,
)
from jaxfl.algorithms.local import local_train
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.tree import tree_add, tree_scale, tree_sub, tree_vdot
from jaxfl.types import ClientData, Params, PRNGKey


class ScaffoldServer(NamedTuple):
    """SCAFFOLD's server-side state next to the global params: the server optimizer's state
    and the server control variate ``c`` (shaped like the params)."""

    opt_state: optax.OptState
    control: Params


def scaffold(
    loss_fn: LossFn,
    server_optimizer: optax.GradientTransformation,
    *,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    num_clients: int,
    dp: DPSGD | None = None,
) -> FederatedAlgorithm:
    """SCAFFOLD with local SGD of step ``learning_rate`` (``eta_l``) for ``epochs`` epochs of
    ``batch_size`` minibatches, over a federation of ``num_clients`` (``N``) clients.

    The update a client sends is the pair ``(dy, dc)``; ``ServerState.opt_state`` is a
    :class:`ScaffoldServer`. ``dp``: record-level DP-SGD for every local step.
    """
    if learning_rate <= 0:
        raise ValueError(f"SCAFFOLD needs a local learning rate > 0, got {learning_rate}.")
    if num_clients < 1:
        raise ValueError(f"SCAFFOLD needs num_clients >= 1, got {num_clients}.")
    local_sgd = optax.sgd(learning_rate)

    def init(params: Params) -> ServerState:
        control = jax.tree.map(jnp.zeros_like, params)
        state = ScaffoldServer(server_optimizer.init(params), control)
        return ServerState(params, state, jnp.zeros((), jnp.int32))

    def broadcast(state: ServerState) -> tuple[Params, Params]:
        return state.params, state.opt_state.control

    def client_init(params: Params) -> Params:
        return jax.tree.map(jnp.zeros_like, params)

    def client_update(
        sent: tuple[Params, Params], data: ClientData, key: PRNGKey, control_i: Params
    ) -> ClientOutput:
        x, control = sent
        correction = tree_sub(control, control_i)
        res = local_train(
            loss_fn, local_sgd, x, data, key, batch_size=batch_size, epochs=epochs, dp=dp,
            regularizer=lambda p: tree_vdot(correction, p),
        )  # fmt: skip
        dy = tree_sub(res.params, x)
        steps = res.num_steps.astype(jnp.float32)
        # A client that took no step (no examples) keeps its control variate.
        scale = jnp.where(steps > 0, 1.0 / (jnp.maximum(steps, 1.0) * learning_rate), 0.0)
        # dc = c_i+ - c_i = -c + (x - y) / (K eta_l) = -c - dy / (K eta_l)
        dc = jax.tree.map(lambda d, c: jnp.where(steps > 0, -c, 0.0) - scale * d, dy, control)
        metrics = {**res.sums, "num_steps": steps}
        weight = (data.count > 0).astype(jnp.float32)
        return ClientOutput((dy, dc), weight, metrics, tree_add(control_i, dc))

    def aggregate(weighted_sum, weight_sum, key):
        del key
        dy_sum, dc_sum = weighted_sum
        return tree_scale(dy_sum, 1.0 / jnp.maximum(weight_sum, 1e-12)), tree_scale(
            dc_sum, 1.0 / num_clients
        )

    def server_update(state: ServerState, mean_update) -> ServerState:
        dy, dc = mean_update
        inner = ServerState(state.params, state.opt_state.opt_state, state.round)
        new = server_apply(server_optimizer, inner, dy)
        control = tree_add(state.opt_state.control, dc)
        return ServerState(new.params, ScaffoldServer(new.opt_state, control), new.round)

    return FederatedAlgorithm(
        "scaffold",
        init,
        broadcast,
        client_update,
        server_update,
        aggregate,
        client_init=client_init,
    )
