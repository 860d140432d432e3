"""Record-level DP-SGD (Abadi et al. 2016) for ONE client, jittable and vmappable over clients.

Sampling is Poisson, as the accountant assumes (``jaxfl.privacy.accounting.dp_sgd_event``): each
step includes every real example independently with probability ``q``, so batch sizes vary. To
keep static shapes without truncating a large draw (which would void the guarantee), the
selected examples are processed in fixed-size micro-batches inside a ``while_loop`` whose trip
count is ``ceil(selected / microbatch_size)``. Padded slots are never selected: they contribute
nothing and do not change the sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl.privacy.update_dp import add_gaussian_noise
from jaxfl.rng import slot_uniforms
from jaxfl.tree import tree_add, tree_scale
from jaxfl.types import ClientData, LocalResult, LossFn, Params, PRNGKey


class DPSGDStep(NamedTuple):
    """A privatized gradient and what it assumed.

    ``sensitivity`` bounds one example's L2 contribution to the noised sum (= ``clip_norm``);
    ``noise_std`` is the std of the Gaussian added to that sum (= noise_multiplier * clip_norm).
    """

    grad: Params
    sensitivity: jax.Array
    noise_std: jax.Array
    num_selected: jax.Array
    num_clipped: jax.Array
    loss_sum: jax.Array
    correct: jax.Array


def per_example_grads(
    loss_fn: LossFn, params: Params, images: jax.Array, labels: jax.Array
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Params]:
    """Per-example ``(loss [b], aux)`` and gradients (each leaf ``[b, ...]``), vmapped."""

    def one(p, x, y):
        return loss_fn(p, x[None], y[None], jnp.ones((1,), jnp.float32))

    grad_fn = jax.value_and_grad(one, has_aux=True)
    return jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, images, labels)


def clipped_sum_scan(
    loss_fn: LossFn,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    clip_norm: float,
) -> tuple[Params, jax.Array, jax.Array, jax.Array]:
    """Clipped per-example gradients summed one at a time: ``(sum, clipped, loss, correct)``.

    The same result as :func:`per_example_grads` + :func:`clip_and_sum`, but only one example's
    gradient exists at a time. On CPU that wins: a vmapped batch materializes a
    ``[b, *param]`` gradient (for SmallCNN's dense layer 16 x 3136 x 128 floats) that is
    written once and read twice, while one example's gradient stays in cache. Masked and
    non-finite examples are handled as in :func:`clip_and_sum` (selected out, never multiplied
    by 0); a non-finite loss is left out of the loss sum.
    """

    def one(carry, xym):
        acc, clipped, loss_sum, correct = carry
        x, y, m = xym
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            params, x[None], y[None], jnp.ones((1,), jnp.float32)
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grad)))
        keep = (m > 0) & jnp.isfinite(norm)
        scale = jnp.where(keep, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
        return (
            tree_add(acc, jax.tree.map(lambda g: jnp.where(keep, g * scale, 0.0), grad)),
            clipped + ((norm > clip_norm) | ~jnp.isfinite(norm)) * (m > 0),
            loss_sum + jnp.where((m > 0) & jnp.isfinite(loss), loss, 0.0),
            correct + jnp.where(m > 0, aux["correct"], 0.0),
        ), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
    return jax.lax.scan(one, init, (images, labels, mask))[0]


def clip_and_sum(grads: Params, mask: jax.Array, clip_norm: float) -> tuple[Params, jax.Array]:
    """Clip each example's gradient to L2 norm ``clip_norm`` and sum the unmasked ones.

    ``grads`` leaves are ``[b, ...]``, ``mask`` ``[b]``. Masked slots are selected out with
    ``where`` (never multiplied by 0, which an inf or NaN in padding would turn into NaN), and a
    selected example whose gradient is not finite contributes zero (it is clipped to norm 0,
    which keeps the sensitivity bound) and is counted as clipped. Returns the sum and the number
    of unmasked examples whose norm exceeded ``clip_norm`` or was not finite.
    """
    sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads))
    norms = jnp.sqrt(sq)
    keep = (mask > 0) & jnp.isfinite(norms)
    scale = jnp.where(keep, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)), 0.0)

    def weighted_sum(g):
        kept = jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
        return jnp.tensordot(scale, kept, axes=1)

    clipped = ((norms > clip_norm) | ~jnp.isfinite(norms)) & (mask > 0)
    return jax.tree.map(weighted_sum, grads), jnp.sum(clipped.astype(jnp.float32))


def poisson_order(key: PRNGKey, mask: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    """Poisson-sample real slots with probability ``rate``: (slots, selected first; count).

    Each slot's draw comes from ``fold_in(key, slot)``, so padding does not change the sample.
    """
    u = slot_uniforms(key, mask.shape[0])
    selected = (u < rate) & (mask > 0)
    order = jnp.argsort(jnp.where(selected, u, jnp.inf)).astype(jnp.int32)
    return order, jnp.sum(selected).astype(jnp.int32)


def dp_sgd_gradient(
    loss_fn: LossFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    sampling_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    microbatch_size: int,
    per_example: str = "auto",
) -> DPSGDStep:
    """One DP-SGD gradient: Poisson sample → per-example grads → clip → sum → noise → normalize.

    The noise ``N(0, (noise_multiplier * clip_norm)^2)`` is added to the SUM of clipped
    gradients, which is then divided by the fixed ``expected_batch_size`` (``q * n``), not by
    the realized batch size (which would leak it). ``per_example`` picks how a micro-batch's
    clipped gradients are formed: ``vmap`` (all at once), ``scan`` (one at a time) or ``auto``
    (see :func:`resolve_per_example`); the result is the same.
    """
    scan = resolve_per_example(per_example) == "scan"
    sample_key, noise_key = jax.random.split(key)
    order, count = poisson_order(sample_key, data.mask, sampling_rate)
    slots = -(-order.shape[0] // microbatch_size) * microbatch_size
    order = jnp.pad(order, (0, slots - order.shape[0]))
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry):
        j, acc, clipped, loss_sum, correct = carry
        start = j * microbatch_size
        idx = jax.lax.dynamic_slice(order, (start,), (microbatch_size,))
        m = ((start + jnp.arange(microbatch_size)) < count).astype(jnp.float32)
        images, labels = data.images[idx], data.labels[idx]
        if scan:
            summed, n_clipped, losses, n_correct = clipped_sum_scan(
                loss_fn, params, images, labels, m, clip_norm
            )
        else:
            (per_loss, aux), grads = per_example_grads(loss_fn, params, images, labels)
            summed, n_clipped = clip_and_sum(grads, m, clip_norm)
            losses = jnp.sum(jnp.where((m > 0) & jnp.isfinite(per_loss), per_loss, 0.0))
            n_correct = jnp.sum(jnp.where(m > 0, aux["correct"], 0.0))
        return (
            j + 1,
            tree_add(acc, summed),
            clipped + n_clipped,
            loss_sum + losses,
            correct + n_correct,
        )

    zero = jnp.zeros((), jnp.float32)
    n_micro = (count + microbatch_size - 1) // microbatch_size
    _, total, clipped, loss_sum, correct = jax.lax.while_loop(
        lambda c: c[0] < n_micro, body, (jnp.zeros((), jnp.int32), zeros, zero, zero, zero)
    )
    std = noise_multiplier * clip_norm
    grad = tree_scale(add_gaussian_noise(total, std, noise_key), 1.0 / expected_batch_size)
    return DPSGDStep(
        grad,
        jnp.asarray(clip_norm, jnp.float32),
        jnp.asarray(std, jnp.float32),
        count,
        clipped,
        loss_sum,
        correct,
    )


PER_EXAMPLE_MODES = ("auto", "vmap", "scan")


def resolve_per_example(mode: str) -> str:
    """``auto`` → ``scan`` on CPU (measured 2.3x faster for SmallCNN), ``vmap`` on accelerators."""
    if mode not in PER_EXAMPLE_MODES:
        raise ValueError(f"per_example must be one of {PER_EXAMPLE_MODES}, got {mode!r}")
    if mode == "auto":
        return "scan" if jax.default_backend() == "cpu" else "vmap"
    return mode


class DPSGD(NamedTuple):
    """Record-level DP-SGD settings for local training (expected batch = the local batch size)."""

    clip_norm: float
    noise_multiplier: float
    microbatch_size: int = 32
    per_example: str = "auto"


def local_train_dp(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    batch_size: int,
    epochs: int,
    dp: DPSGD,
    regularizer: Callable[[Params], jax.Array] | None = None,
) -> tuple[LocalResult, jax.Array]:
    """DP-SGD local training: ``epochs * ceil(n / batch_size)`` steps with Poisson rate ``B / n``.

    The same schedule the accountant composes for a client with ``n`` examples. A
    data-independent ``regularizer`` (FedProx) adds its exact gradient after privatization.
    Returns the result and the number of clipped per-example gradients.
    """
    count = data.count.astype(jnp.int32)
    total_steps = epochs * ((count + batch_size - 1) // batch_size)
    rate = jnp.minimum(1.0, batch_size / jnp.maximum(count, 1).astype(jnp.float32))

    def body(carry):
        step, p, opt_state, loss_sum, correct, seen, clipped = carry
        out = dp_sgd_gradient(
            loss_fn,
            p,
            data,
            jax.random.fold_in(key, step),
            sampling_rate=rate,
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            expected_batch_size=batch_size,
            microbatch_size=dp.microbatch_size,
            per_example=dp.per_example,
        )
        grad = out.grad if regularizer is None else tree_add(out.grad, jax.grad(regularizer)(p))
        updates, opt_state = optimizer.update(grad, opt_state, p)
        return (
            step + 1,
            optax.apply_updates(p, updates),
            opt_state,
            loss_sum + out.loss_sum,
            correct + out.correct,
            seen + out.num_selected.astype(jnp.float32),
            clipped + out.num_clipped,
        )

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((), jnp.int32), params, optimizer.init(params), zero, zero, zero, zero)
    steps, p, _, loss_sum, correct, seen, clipped = jax.lax.while_loop(
        lambda c: c[0] < total_steps, body, init
    )
    return LocalResult(p, loss_sum, correct, seen, steps), clipped
