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
:func:`jaxfl.algorithms.base.local_train` for the same key, so ``fo`` with ``alpha = 0`` is
exactly local SGD with learning rate ``beta``. Both inner and outer steps are plain SGD, as in
both references; the optimizer state is therefore empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    epoch_permutations,
    fedopt_server,
)
from jaxfl.tree import tree_sub, tree_vdot
from jaxfl.types import ClientData, LocalResult, Params, PRNGKey

PERFEDAVG_VARIANTS = ("fo", "hf", "pppml")


def _axpy(a: float | jax.Array, x: Params, y: Params) -> Params:
    """``y + a * x`` leaf by leaf."""
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    inner: tuple[jax.Array, jax.Array, jax.Array],
    outer: tuple[jax.Array, jax.Array, jax.Array],
    hessian: tuple[jax.Array, jax.Array, jax.Array] | None,
    alpha: float,
) -> tuple[Params, dict[str, jax.Array]]:
    """The Per-FedAvg direction at ``params`` from batches ``(images, labels, mask)``.

    ``grad f(temp; D')`` with ``temp = params - alpha grad f(params; D)``; with a ``hessian``
    batch ``D''`` it is multiplied by ``(I - alpha H(params; D''))`` (Hessian-free variant).
    Returns the direction and the outer batch's ``loss_sum``/``correct`` at ``temp``.
    """

    def loss(p, batch):
        return loss_fn(p, *batch)

    inner_grad, _ = jax.grad(loss, has_aux=True)(params, inner)
    temp = _axpy(-alpha, inner_grad, params)
    outer_grad, aux = jax.grad(loss, has_aux=True)(temp, outer)
    if hessian is not None:
        # H v = grad <grad f, v> (reverse over reverse): jaxfl's convolutions have a custom
        # VJP, which forward mode (jax.jvp) cannot differentiate.
        v = jax.lax.stop_gradient(outer_grad)

        def directional(p):
            return tree_vdot(jax.grad(loss, has_aux=True)(p, hessian)[0], v)

        hvp = jax.grad(directional)(params)
        outer_grad = _axpy(-alpha, hvp, outer_grad)
    return outer_grad, aux


def perfedavg_local_train(
    loss_fn: LossFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    batch_size: int,
    epochs: int,
    alpha: float,
    beta: float,
    variant: str,
) -> LocalResult:
    """Per-FedAvg local training of one client on its padded data (see the module docstring).

    ``loss_sum``/``correct``/``num_seen`` describe the outer batches ``D'`` evaluated at the
    adapted weights: the loss Per-FedAvg minimizes. Padding is never sampled.
    """
    if variant not in PERFEDAVG_VARIANTS:
        raise ValueError(f"Per-FedAvg variant {variant!r}; choose one of {PERFEDAVG_VARIANTS}.")
    n_slots = data.mask.shape[0]
    slots_per_epoch = -(-n_slots // batch_size) * batch_size
    count = data.count.astype(jnp.int32)
    batches_per_epoch = jnp.maximum((count + batch_size - 1) // batch_size, 1)
    # Stream 0 is local_train's shuffle (the outer batches of fo/hf); 1 and 2 are independent.
    streams = 1 if variant == "pppml" else (3 if variant == "hf" else 2)
    keys = [key] + [jax.random.fold_in(key, s) for s in range(1, streams)]
    perms = jnp.stack([epoch_permutations(k, data.mask, epochs) for k in keys])
    perms = jnp.pad(perms, ((0, 0), (0, 0), (0, slots_per_epoch - n_slots)))
    steps_per_epoch = (batches_per_epoch + 1) // 2 if variant == "pppml" else batches_per_epoch
    total_steps = jnp.where(count > 0, epochs * steps_per_epoch, 0)

    def batch(stream, epoch, b):
        start = b * batch_size
        idx = jax.lax.dynamic_slice(perms[stream, epoch], (start,), (batch_size,))
        m = ((start + jnp.arange(batch_size)) < count).astype(jnp.float32)
        return data.images[idx], data.labels[idx], m

    def body(carry):
        step, p, loss_sum, correct, seen = carry
        epoch, j = step // steps_per_epoch, step % steps_per_epoch
        if variant == "pppml":  # consecutive pair; an odd last batch pairs with the first
            inner = batch(0, epoch, 2 * j)
            outer = batch(0, epoch, (2 * j + 1) % batches_per_epoch)
            hessian = None
        else:
            inner, outer = batch(1, epoch, j), batch(0, epoch, j)
            hessian = batch(2, epoch, j) if variant == "hf" else None
        direction, aux = meta_gradient(loss_fn, p, inner, outer, hessian, alpha)
        return (
            step + 1,
            _axpy(-beta, direction, p),
            loss_sum + aux["loss_sum"],
            correct + aux["correct"],
            seen + jnp.sum(outer[2]),
        )

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((), jnp.int32), params, zero, zero, zero)
    steps, p, loss_sum, correct, seen = jax.lax.while_loop(lambda c: c[0] < total_steps, body, init)
    return LocalResult(p, loss_sum, correct, seen, steps)


def perfedavg(
    loss_fn: LossFn,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    epochs: int,
    alpha: float = 1e-2,
    beta: float = 1e-3,
    variant: str = "fo",
) -> FederatedAlgorithm:
    """Per-FedAvg: MAML-style local steps, FedAvg aggregation (weights = example counts).

    Defaults ``alpha = 1e-2``, ``beta = 1e-3`` are PPPML-HMI's (RAD-ChestCT). Evaluate it with
    :func:`jaxfl.personalize.make_personalized_eval` (``alpha``-steps on local data, then test).
    """
    if variant not in PERFEDAVG_VARIANTS:
        raise ValueError(f"Per-FedAvg variant {variant!r}; choose one of {PERFEDAVG_VARIANTS}.")
    if alpha < 0 or beta <= 0:
        raise ValueError(f"Per-FedAvg needs alpha >= 0 and beta > 0, got {alpha=}, {beta=}.")

    init, broadcast, server_update = fedopt_server(server_optimizer)

    def client_update(global_params: Params, data: ClientData, key: PRNGKey) -> ClientOutput:
        res = perfedavg_local_train(
            loss_fn,
            global_params,
            data,
            key,
            batch_size=batch_size,
            epochs=epochs,
            alpha=alpha,
            beta=beta,
            variant=variant,
        )
        metrics = {
            "loss_sum": res.loss_sum,
            "correct": res.correct,
            "num_seen": res.num_seen,
            "num_steps": res.num_steps.astype(jnp.float32),
        }
        update = tree_sub(res.params, global_params)
        return ClientOutput(update, data.count.astype(jnp.float32), metrics)

    return FederatedAlgorithm(f"perfedavg_{variant}", init, broadcast, client_update, server_update)
