"""The one local-training loop, with a pluggable per-step rule and gradient oracle.

Every algorithm's client work, and personalized adaptation, is :func:`local_train`: a
``while_loop`` over steps that asks a :class:`StepRule` for the step's direction and applies it
with an optax optimizer. The rule sees batches only through an :class:`Oracle`:

- :func:`minibatch_oracle`: gradients of the masked mean loss on shuffled minibatches (batch
  ``b`` of epoch ``e`` of shuffle stream ``s``; streams are independent shuffles);
- :func:`dp_oracle`: record-level DP-SGD (Poisson sample at rate ``B / n``, per-example clip,
  Gaussian noise on the sum, :func:`jaxfl.privacy.dp_sgd.privatize`), one privatized draw per
  batch the rule asks for, so DP composes with every rule.

Rules: :data:`SGD` (FedAvg / FedProx / local-only / adaptation) and Per-FedAvg's meta-step
(:func:`jaxfl.algorithms.perfedavg.perfedavg_rule`). A rule says how many draws one step makes
(``draws_per_step``), which is what the accountant composes (:func:`dp_draws_per_round`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.privacy.dp_sgd import DPSGD, gradient_of, privatize
from jaxfl.rng import slot_uniforms
from jaxfl.tree import tree_add, tree_vdot
from jaxfl.types import ClientData, LocalResult, LossFn, Params, PRNGKey, take

Regularizer = Callable[[Params], jax.Array]
Sums = dict[str, jax.Array]
# Counts every DP draw adds to the sums, whichever batch of a step it privatized.
DP_COUNTS = ("dp_clipped", "dp_selected")


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


def stream_key(key: PRNGKey, stream: int) -> PRNGKey:
    """Stream 0 is the client's key itself (FedAvg's shuffles); stream ``s > 0`` folds in ``s``."""
    return key if stream == 0 else jax.random.fold_in(key, stream)


class Oracle(NamedTuple):
    """Gradients on one client's batches.

    ``grad(params, stream, epoch, b, regularizer) -> (grad, sums)``: the gradient for batch
    ``b`` of epoch ``epoch`` of shuffle ``stream`` (plus the exact gradient of a
    data-independent ``regularizer``); sums hold ``loss_sum``, ``num_seen``, the task's sums and,
    under DP, :data:`DP_COUNTS`. ``hvp(params, v, stream, epoch, b) -> (H v, sums)``.
    """

    grad: Callable[..., tuple[Params, Sums]]
    hvp: Callable[..., tuple[Params, Sums]]


def minibatch_oracle(
    loss_fn: LossFn, data: ClientData, key: PRNGKey, *, batch_size: int, epochs: int, streams: int
) -> Oracle:
    """Exact minibatch gradients; batch ``b`` of epoch ``e`` of stream ``s`` is slots
    ``[b B, (b + 1) B)`` of that epoch's shuffle (a partial last batch is masked)."""
    n_slots = data.mask.shape[0]
    slots_per_epoch = -(-n_slots // batch_size) * batch_size
    perms = jnp.stack(
        [epoch_permutations(stream_key(key, s), data.mask, epochs) for s in range(streams)]
    )
    perms = jnp.pad(perms, ((0, 0), (0, 0), (0, slots_per_epoch - n_slots)))
    count = data.count.astype(jnp.int32)

    def batch(stream, epoch, b):
        start = b * batch_size
        idx = jax.lax.dynamic_slice(perms[stream, epoch], (start,), (batch_size,))
        m = ((start + jnp.arange(batch_size)) < count).astype(jnp.float32)
        return take(data.examples, idx), m

    def grad(params, stream, epoch, b, regularizer=None):
        examples, m = batch(stream, epoch, b)

        def objective(p):
            loss, aux = loss_fn(p, examples, m)
            return (loss if regularizer is None else loss + regularizer(p)), aux

        g, aux = jax.grad(objective, has_aux=True)(params)
        return g, {**aux, "num_seen": jnp.sum(m)}

    def hvp(params, v, stream, epoch, b):
        # H v = grad <grad f, v> (reverse over reverse): jaxfl's convolutions have a custom
        # VJP, which forward mode (jax.jvp) cannot differentiate.
        examples, m = batch(stream, epoch, b)
        directional = lambda p: tree_vdot(jax.grad(loss_fn, has_aux=True)(p, examples, m)[0], v)
        return jax.grad(directional)(params), {}

    return Oracle(grad, hvp)


def dp_oracle(
    loss_fn: LossFn, data: ClientData, key: PRNGKey, dp: DPSGD, *, batch_size: int
) -> Oracle:
    """Record-level DP-SGD: every batch the rule asks for is a fresh Poisson draw at rate
    ``B / n``, privatized on its own (clip each example's vector to ``dp.clip_norm``, add
    ``N(0, (z C)^2)`` to the sum, divide by ``B``).

    Draw ``b`` of epoch ``e`` of stream ``s`` is keyed ``fold_in(stream_key(key, s), e * bpe + b)``
    (``bpe`` batches per epoch): for FedAvg that is ``fold_in(key, step)``.
    """
    count = data.count.astype(jnp.int32)
    rate = jnp.minimum(1.0, batch_size / jnp.maximum(count, 1).astype(jnp.float32))
    bpe = jnp.maximum((count + batch_size - 1) // batch_size, 1)
    kw = dict(
        sampling_rate=rate,
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        expected_batch_size=batch_size,
        microbatch_size=dp.microbatch_size,
        per_example_mode=dp.per_example,
    )

    def draw(per_example, params, stream, epoch, b):
        k = jax.random.fold_in(stream_key(key, stream), epoch * bpe + b)
        out = privatize(per_example, params, data, k, **kw)
        counts = {
            "dp_clipped": out.num_clipped,
            "dp_selected": out.num_selected.astype(jnp.float32),
        }
        return out, counts

    def grad(params, stream, epoch, b, regularizer=None):
        out, counts = draw(gradient_of(loss_fn), params, stream, epoch, b)
        g = out.grad
        if regularizer is not None:  # data-independent: its exact gradient costs no privacy
            g = tree_add(g, jax.grad(regularizer)(params))
        return g, {**out.sums, "num_seen": counts["dp_selected"], **counts}

    def hvp(params, v, stream, epoch, b):
        def per_example(p, example):
            one = jnp.ones((1,), jnp.float32)
            directional = lambda q: tree_vdot(
                jax.grad(loss_fn, has_aux=True)(q, example, one)[0], v
            )
            return jax.grad(directional)(p), {}

        out, counts = draw(per_example, params, stream, epoch, b)
        return out.grad, counts

    return Oracle(grad, hvp)


class StepRule(NamedTuple):
    """How one local step forms its direction from an :class:`Oracle`.

    ``direction(oracle, params, epoch, j, batches_per_epoch, regularizer) -> (direction,
    sums)`` for step ``j`` of epoch ``epoch``; ``steps_per_epoch(batches_per_epoch)``;
    ``streams``: independent shuffles it reads; ``draws_per_step``: batches one step consumes
    (each a privatized draw under DP).
    """

    name: str
    direction: Callable[..., tuple[Params, Sums]]
    steps_per_epoch: Callable[[jax.Array], jax.Array] = lambda bpe: bpe
    streams: int = 1
    draws_per_step: int = 1
    # Pairs consecutive batches (one step per two batches): the step count halves.
    pairs_batches: bool = False


def _sgd_direction(oracle, params, epoch, j, bpe, regularizer):
    del bpe
    return oracle.grad(params, 0, epoch, j, regularizer)


SGD = StepRule("sgd", _sgd_direction)


def dp_counts(sums: Sums) -> Sums:
    """The DP draw counts of ``sums`` (empty without DP)."""
    return {k: sums[k] for k in DP_COUNTS if k in sums}


def batches_per_epoch(count, batch_size: int):
    """``ceil(count / batch_size)`` for an int or a traced count."""
    return (count + batch_size - 1) // batch_size


def dp_draws_per_round(rule: StepRule, n: int, batch_size: int, epochs: int) -> int:
    """Privatized draws one round of ``rule`` makes on a client with ``n`` examples: what the
    accountant composes (each a Poisson-subsampled Gaussian at rate ``B / n``)."""
    bpe = math.ceil(max(int(n), 1) / batch_size)
    steps = -(-bpe // 2) if rule.pairs_batches else bpe
    return epochs * steps * rule.draws_per_step


def local_train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    batch_size: int,
    epochs: int,
    rule: StepRule = SGD,
    dp: DPSGD | None = None,
    regularizer: Regularizer | None = None,
    steps: int | None = None,
) -> LocalResult:
    """Train one client on its padded data with ``rule``'s steps and ``optimizer``.

    A client with ``n`` real examples takes ``epochs * rule.steps_per_epoch(ceil(n / B))``
    steps (``epochs * ceil(n / B)`` for SGD, as if it trained alone on unpadded data; a partial
    last batch is masked); padding contributes no gradient, no loss and no steps. With
    ``steps``, exactly that many steps run instead (adaptation), step ``j`` taking batch
    ``j mod b`` of shuffle ``j // b``. With ``dp``, every batch is a DP-SGD draw
    (:func:`dp_oracle`). The optimizer state starts fresh, as in the reference systems.
    """
    # A count known when tracing (a numpy integer: a gradient-inversion attacker's replica of
    # one client) fixes the step count, so the steps run as a reverse-differentiable scan.
    static = isinstance(data.count, np.integer)
    count = int(data.count) if static else data.count.astype(jnp.int32)
    bpe = batches_per_epoch(count, batch_size)
    per_epoch = rule.steps_per_epoch(bpe)
    if steps is None:
        total_steps = epochs * per_epoch
    else:
        total_steps = int(steps) if static else jnp.asarray(steps, jnp.int32)
        epochs = max(int(steps), 1)  # at most one shuffle per step
    if dp is None:
        oracle = minibatch_oracle(
            loss_fn, data, key, batch_size=batch_size, epochs=epochs, streams=rule.streams
        )
    else:
        oracle = dp_oracle(loss_fn, data, key, dp, batch_size=batch_size)

    def direction(p, step):
        period = jnp.maximum(per_epoch, 1)
        return rule.direction(oracle, p, step // period, step % period, bpe, regularizer)

    sums_shape = jax.eval_shape(direction, params, jnp.zeros((), jnp.int32))[1]

    def body(carry):
        step, p, opt_state, sums = carry
        d, step_sums = direction(p, step)
        updates, opt_state = optimizer.update(d, opt_state, p)
        return (
            step + 1,
            optax.apply_updates(p, updates),
            opt_state,
            {k: sums[k] + step_sums[k] for k in sums},
        )

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((), jnp.int32), params, optimizer.init(params), {k: zero for k in sums_shape})
    if not static:
        n, p, _, sums = jax.lax.while_loop(lambda c: c[0] < total_steps, body, init)
    else:
        (n, p, _, sums), _ = jax.lax.scan(
            lambda c, _: (body(c), None), init, None, length=int(total_steps)
        )
    return LocalResult(p, sums, n)
