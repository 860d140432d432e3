"""Ditto (Li et al. 2021), written for ONE client: FedAvg plus a personal model per client.

Every client keeps a personal model ``v_i`` (its state; the initial global model at first).
A sampled client does two things with the global model ``w`` it receives:

- the global part, exactly FedAvg's client update (local training from ``w``, the update
  ``w_i - w`` sent to the server, DP included when configured);
- the personal part, local training of ``v_i`` on the objective
  ``F_i(v) + lam / 2 ||v - w||^2`` (the paper's Algorithm 1 step with the global model of the
  round), which never leaves the client.

``lam = 0`` gives local-only personal models next to FedAvg; large ``lam`` pulls them to the
global model. The personal models are what Ditto evaluates, each on its client's held-out split
(``personal_params``).
"""

from __future__ import annotations

import jax
import optax

from jaxfl.algorithms.base import ClientOutput, FederatedAlgorithm, LossFn
from jaxfl.algorithms.fedavg import fedavg
from jaxfl.algorithms.local import local_train
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.privacy.update_dp import UpdateDP
from jaxfl.tree import tree_sq_norm, tree_sub
from jaxfl.types import ClientData, Params, PRNGKey

# The personal model's shuffles: folded into the client's key, apart from the global part's.
PERSONAL_STREAM = 7


def ditto(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    lam: float,
    dp: DPSGD | None = None,
    update_dp: UpdateDP | None = None,
) -> FederatedAlgorithm:
    """Ditto over FedAvg (``client_optimizer`` for both parts, ``epochs`` epochs each);
    ``dp`` / ``update_dp`` protect what the global part sends, as for FedAvg."""
    if lam < 0:
        raise ValueError(f"Ditto lam must be >= 0, got {lam}.")
    base = fedavg(
        loss_fn, client_optimizer, server_optimizer,
        batch_size=batch_size, epochs=epochs, dp=dp, update_dp=update_dp,
    )  # fmt: skip

    def client_update(
        global_params: Params, data: ClientData, key: PRNGKey, personal: Params
    ) -> ClientOutput:
        out = base.client_update(global_params, data, key)
        res = local_train(
            loss_fn, client_optimizer, personal, data, jax.random.fold_in(key, PERSONAL_STREAM),
            batch_size=batch_size, epochs=epochs,
            regularizer=lambda v: 0.5 * lam * tree_sq_norm(tree_sub(v, global_params)),
        )  # fmt: skip
        return out._replace(state=res.params)

    return base._replace(
        name="ditto",
        client_update=client_update,
        client_init=lambda params: params,
        personal_params=lambda personal: personal,
    )
