"""FedAvg / FedOpt (McMahan et al. 2017; Reddi et al. 2021) and FedProx (Li et al. 2020)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    ServerState,
    local_train,
    server_apply,
)
from jaxfl.privacy.dp_sgd import DPSGD, local_train_dp
from jaxfl.tree import tree_sq_norm, tree_sub
from jaxfl.types import ClientData, Params, PRNGKey


def fedprox(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    mu: float,
    dp: DPSGD | None = None,
) -> FederatedAlgorithm:
    """FedProx: local objective ``f(w) + mu/2 ||w - w_global||^2``; ``mu = 0`` is FedAvg.

    Each client's update is ``w_local - w_global`` weighted by its number of training examples;
    the server applies the weighted mean with ``server_optimizer`` (SGD lr 1 = FedAvg,
    Adam = FedAdam). With ``dp``, local training is record-level DP-SGD (Poisson sampling at
    rate ``batch_size / n``, per-example clipping, Gaussian noise on the sum).
    """
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}.")

    def init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def broadcast(state: ServerState) -> Params:
        return state.params

    def client_update(global_params: Params, data: ClientData, key: PRNGKey) -> ClientOutput:
        regularizer = None
        if mu > 0:

            def regularizer(p):
                return 0.5 * mu * tree_sq_norm(tree_sub(p, global_params))

        kw = dict(batch_size=batch_size, epochs=epochs, regularizer=regularizer)
        extra = {}
        if dp is None:
            res = local_train(loss_fn, client_optimizer, global_params, data, key, **kw)
        else:
            res, clipped = local_train_dp(
                loss_fn, client_optimizer, global_params, data, key, dp=dp, **kw
            )
            extra["dp_clipped"] = clipped
        metrics = {
            **extra,
            "loss_sum": res.loss_sum,
            "correct": res.correct,
            "num_seen": res.num_seen,
            "num_steps": res.num_steps.astype(jnp.float32),
        }
        weight = data.count.astype(jnp.float32)
        return ClientOutput(tree_sub(res.params, global_params), weight, metrics)

    def server_update(state: ServerState, mean_update: Params) -> ServerState:
        return server_apply(server_optimizer, state, mean_update)

    name = "fedprox" if mu > 0 else "fedavg"
    return FederatedAlgorithm(name, init, broadcast, client_update, server_update)


def fedavg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    dp: DPSGD | None = None,
) -> FederatedAlgorithm:
    """FedAvg (FedOpt with the given server optimizer): FedProx with ``mu = 0``."""
    return fedprox(
        loss_fn,
        client_optimizer,
        server_optimizer,
        batch_size=batch_size,
        epochs=epochs,
        mu=0.0,
        dp=dp,
    )
