"""FedAvg / FedOpt (McMahan et al. 2017; Reddi et al. 2021) and FedProx (Li et al. 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    fedopt_server,
    weighted_mean,
)
from jaxfl.algorithms.local import local_train
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.privacy.update_dp import UpdateDP, add_gaussian_noise, clip_update
from jaxfl.tree import tree_scale, tree_sq_norm, tree_sub
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
    update_dp: UpdateDP | None = None,
) -> FederatedAlgorithm:
    """FedProx: local objective ``f(w) + mu/2 ||w - w_global||^2``; ``mu = 0`` is FedAvg.

    Each client's update is ``w_local - w_global`` weighted by its number of training examples;
    the server applies the weighted mean with ``server_optimizer`` (SGD lr 1 = FedAvg,
    Adam = FedAdam). With ``dp``, local training is record-level DP-SGD (Poisson sampling at
    rate ``batch_size / n``, per-example clipping, Gaussian noise on the sum). With
    ``update_dp``, each update is clipped to ``C`` and noised on the client (``local``), or
    clients get weight 1 and the server noises the sum (``central``, DP-FedAvg).
    """
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}.")

    init, broadcast, server_update = fedopt_server(server_optimizer)

    def client_update(global_params: Params, data: ClientData, key: PRNGKey) -> ClientOutput:
        regularizer = None
        if mu > 0:

            def regularizer(p):
                return 0.5 * mu * tree_sq_norm(tree_sub(p, global_params))

        if update_dp is not None:
            key, noise_key = jax.random.split(key)
        res = local_train(
            loss_fn, client_optimizer, global_params, data, key,
            batch_size=batch_size, epochs=epochs, dp=dp, regularizer=regularizer,
        )  # fmt: skip
        metrics = {**res.sums, "num_steps": res.num_steps.astype(jnp.float32)}
        weight = data.count.astype(jnp.float32)
        update = tree_sub(res.params, global_params)
        if update_dp is not None:
            update, norm = clip_update(update, update_dp.clip_norm)
            metrics["update_clipped"] = (norm > update_dp.clip_norm).astype(jnp.float32)
            if update_dp.mode == "local":
                update = add_gaussian_noise(update, update_dp.noise_std, noise_key)
            else:  # central: weight 1 each, so one client moves the sum by at most C
                weight = (data.count > 0).astype(jnp.float32)
        return ClientOutput(update, weight, metrics)

    aggregate = weighted_mean
    if update_dp is not None and update_dp.mode == "central":

        def aggregate(weighted_sum, weight_sum, key):
            del weight_sum  # a fixed denominator keeps the sensitivity at C / expected_clients
            noised = add_gaussian_noise(weighted_sum, update_dp.noise_std, key)
            return tree_scale(noised, 1.0 / update_dp.expected_clients)

    name = "fedprox" if mu > 0 else "fedavg"
    return FederatedAlgorithm(name, init, broadcast, client_update, server_update, aggregate)


def fedavg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    dp: DPSGD | None = None,
    update_dp: UpdateDP | None = None,
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
        update_dp=update_dp,
    )
