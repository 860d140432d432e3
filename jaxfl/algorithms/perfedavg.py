"""Personalized FedAvg (Per-FedAvg, Fallah et al. 2020), written for ONE client.

Each local step is a MAML step: adapt with one SGD step of size ``alpha`` on a batch ``D``,
evaluate the gradient of the adapted model on a batch ``D'`` and apply it, with step ``beta``,
to the weights before adaptation. The server averages the resulting models like FedAvg, so the
global model is an initialization from which one ``alpha``-step personalizes well.

Variants (``variant=``):

- ``fo`` (first order, Per-FedAvg (FO)): ``temp = w - alpha grad f(w; D)``,
  ``w <- w - beta grad f(temp; D')``.
- ``hf`` (Hessian-free, Per-FedAvg (HF)): ``w <- w - beta (I - alpha H(w; D'')) grad f(temp; D')``
  with the Hessian-vector product from ``jax.grad`` of ``<grad f, v>`` (no Hessian is formed).
- ``pppml``: what PPPML-HMI's code (from the pFedMe code base) does: the same first-order
  step, but ``D`` and ``D'`` are *consecutive* batches of one shuffled pass over the data (a
  local step consumes two batches, so an epoch has half as many steps), where ``fo``/``hf``
  draw ``D``, ``D'``, ``D''`` from independent shuffles (Fallah et al. sample them
  independently).

``fo``/``hf`` take ``epochs * ceil(n / batch_size)`` steps; ``D'`` follows the same shuffles as
FedAvg's local SGD for the same key, so ``fo`` with ``alpha = 0`` is exactly local SGD with
learning rate ``beta``. Both inner and outer steps are plain SGD, as in both references.

The meta-step is a :class:`jaxfl.algorithms.local.StepRule` of the one local-training loop, so
record-level DP composes with it: each batch (``D``, ``D'`` and, for HF, ``D''``) is then its
own privatized Poisson draw, and the accountant counts 2 (FO, pppml) or 3 (HF) draws a step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxfl.algorithms.base import ClientOutput, FederatedAlgorithm, LossFn, fedopt_server
from jaxfl.algorithms.local import StepRule, dp_counts, local_train
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.tree import tree_sub
from jaxfl.types import ClientData, Params, PRNGKey

PERFEDAVG_VARIANTS = ("fo", "hf", "pppml")


def _axpy(a: float | jax.Array, x: Params, y: Params) -> Params:
    """``y + a * x`` leaf by leaf."""
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def meta_gradient(
    inner_grad: Callable[[Params], tuple[Params, dict]],
    outer_grad: Callable[[Params], tuple[Params, dict]],
    hvp: Callable[[Params, Params], tuple[Params, dict]] | None,
    params: Params,
    alpha: float,
) -> tuple[Params, dict[str, jax.Array]]:
    """The Per-FedAvg direction at ``params``.

    ``grad f(temp; D')`` with ``temp = params - alpha grad f(params; D)``; with ``hvp`` (the
    Hessian-free variant, ``hvp(params, v) = H(params; D'') v``) it is multiplied by
    ``(I - alpha H)``. Each callable returns its value and sums; the result carries the outer
    batch's sums (its loss at ``temp``) plus the DP draw counts of the other batches.
    """
    g_in, sums_in = inner_grad(params)
    temp = _axpy(-alpha, g_in, params)
    direction, sums = outer_grad(temp)
    extra = [sums_in]
    if hvp is not None:
        hv, sums_h = hvp(params, jax.lax.stop_gradient(direction))
        direction = _axpy(-alpha, hv, direction)
        extra.append(sums_h)
    for more in extra:
        for k, v in dp_counts(more).items():
            sums = {**sums, k: sums[k] + v}
    return direction, sums


def perfedavg_rule(alpha: float, variant: str) -> StepRule:
    """Per-FedAvg's meta-step as a local-training rule (see the module docstring)."""
    if variant not in PERFEDAVG_VARIANTS:
        raise ValueError(f"Per-FedAvg variant {variant!r}; choose one of {PERFEDAVG_VARIANTS}.")

    def direction(oracle, params, epoch, j, bpe, regularizer):
        del regularizer
        if variant == "pppml":  # consecutive pair; an odd last batch pairs with the first
            inner, outer = (0, epoch, 2 * j), (0, epoch, (2 * j + 1) % jnp.maximum(bpe, 1))
        else:  # D from an independent shuffle, D' from FedAvg's
            inner, outer = (1, epoch, j), (0, epoch, j)
        hvp = None
        if variant == "hf":
            hvp = lambda p, v: oracle.hvp(p, v, 2, epoch, j)
        return meta_gradient(
            lambda p: oracle.grad(p, *inner), lambda p: oracle.grad(p, *outer), hvp, params, alpha
        )

    return StepRule(
        f"perfedavg_{variant}",
        direction,
        steps_per_epoch=(lambda bpe: (bpe + 1) // 2) if variant == "pppml" else (lambda bpe: bpe),
        streams=1 if variant == "pppml" else (3 if variant == "hf" else 2),
        draws_per_step=3 if variant == "hf" else 2,
        pairs_batches=variant == "pppml",
    )


def perfedavg(
    loss_fn: LossFn,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    alpha: float = 1e-2,
    beta: float = 1e-3,
    variant: str = "fo",
    dp: DPSGD | None = None,
) -> FederatedAlgorithm:
    """Per-FedAvg: MAML-style local steps, FedAvg aggregation (weights = example counts).

    Defaults ``alpha = 1e-2``, ``beta = 1e-3`` are PPPML-HMI's (RAD-ChestCT). The outer step is
    plain SGD with step ``beta``. With ``dp``, every batch of a meta-step is a DP-SGD draw.
    Evaluate it with :func:`jaxfl.personalize.make_personalized_eval` (``alpha``-steps on local
    data, then test).
    """
    if alpha < 0 or beta <= 0:
        raise ValueError(f"Per-FedAvg needs alpha >= 0 and beta > 0, got {alpha=}, {beta=}.")
    rule = perfedavg_rule(alpha, variant)
    init, broadcast, server_update = fedopt_server(server_optimizer)
    outer = optax.sgd(beta)

    def client_update(global_params: Params, data: ClientData, key: PRNGKey) -> ClientOutput:
        res = local_train(
            loss_fn, outer, global_params, data, key,
            batch_size=batch_size, epochs=epochs, rule=rule, dp=dp,
        )  # fmt: skip
        metrics = {**res.sums, "num_steps": res.num_steps.astype(jnp.float32)}
        update = tree_sub(res.params, global_params)
        return ClientOutput(update, data.count.astype(jnp.float32), metrics)

    return FederatedAlgorithm(f"perfedavg_{variant}", init, broadcast, client_update, server_update)
