"""Record-level DP-SGD (Abadi et al. 2016) for ONE client, jittable and vmappable over clients.

Sampling is Poisson, as the accountant assumes (``jaxfl.privacy.accounting.dp_sgd_event``): each
draw includes every real example independently with probability ``q``, so batch sizes vary. To
keep static shapes without truncating a large draw (which would void the guarantee), the
selected examples are processed in fixed-size micro-batches inside a ``while_loop`` whose trip
count is ``ceil(selected / microbatch_size)``. Padded slots are never selected: they contribute
nothing and do not change the sensitivity.

:func:`privatize` owns clip → sum → noise → normalize for any per-example vector (a gradient,
or a Hessian-vector product for Per-FedAvg HF); :func:`dp_sgd_gradient` is its gradient case.
Local training with DP is :func:`jaxfl.algorithms.local.local_train` with ``dp=DPSGD(...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxfl.privacy.update_dp import add_gaussian_noise
from jaxfl.rng import slot_uniforms
from jaxfl.tree import tree_add, tree_scale
from jaxfl.types import Batch, ClientData, LossFn, Params, PRNGKey, take

# per_example(params, batch of ONE example) -> (vector pytree shaped like params, scalar sums)
PerExampleFn = Callable[[Params, Batch], tuple[Params, dict[str, jax.Array]]]


class DPSGDStep(NamedTuple):
    """A privatized mean and what it assumed.

    ``sensitivity`` bounds one example's L2 contribution to the noised sum (= ``clip_norm``);
    ``noise_std`` is the std of the Gaussian added to that sum (= noise_multiplier * clip_norm);
    ``sums`` are the per-example scalars (``loss_sum``, the task's sums) over selected examples.
    """

    grad: Params
    sensitivity: jax.Array
    noise_std: jax.Array
    num_selected: jax.Array
    num_clipped: jax.Array
    sums: dict[str, jax.Array]


def gradient_of(loss_fn: LossFn) -> PerExampleFn:
    """The per-example function of DP-SGD: one example's loss gradient and its metric sums."""

    def one(params, example):
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            params, example, jnp.ones((1,), jnp.float32)
        )
        return grad, {**aux, "loss_sum": loss}

    return one


def per_example_grads(
    loss_fn: LossFn, params: Params, batch: Batch
) -> tuple[dict[str, jax.Array], Params]:
    """Per-example sums (``loss_sum``, the task's; each ``[b]``) and gradients (``[b, ...]``)."""
    grads, sums = _vmapped(gradient_of(loss_fn), params, batch)
    return sums, grads


def _vmapped(per_example: PerExampleFn, params: Params, batch: Batch):
    one = lambda p, ex: per_example(p, jax.tree.map(lambda a: a[None], ex))
    return jax.vmap(one, in_axes=(None, 0))(params, batch)


def _selected(v: jax.Array, m: jax.Array) -> jax.Array:
    """``v`` where the example is selected and finite (a non-finite loss is left out), else 0."""
    return jnp.where((m > 0) & jnp.isfinite(v), v, 0.0)


def clipped_sum_scan(
    per_example: PerExampleFn, params: Params, batch: Batch, mask: jax.Array, clip_norm: float
) -> tuple[Params, jax.Array, dict[str, jax.Array]]:
    """Clipped per-example vectors summed one at a time: ``(sum, clipped, sums)``.

    The same result as the vmapped path + :func:`clip_and_sum`, but only one example's vector
    exists at a time. On CPU that wins: a vmapped batch materializes a ``[b, *param]``
    gradient (for SmallCNN's dense layer 16 x 3136 x 128 floats) that is written once and read
    twice, while one example's gradient stays in cache. Masked and non-finite examples are
    handled as in :func:`clip_and_sum` (selected out, never multiplied by 0).
    """
    shapes = jax.eval_shape(per_example, params, jax.tree.map(lambda a: a[:1], batch))

    def one(carry, xm):
        acc, clipped, sums = carry
        example, m = xm
        vec, scalars = per_example(params, jax.tree.map(lambda a: a[None], example))
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(vec)))
        keep = (m > 0) & jnp.isfinite(norm)
        scale = jnp.where(keep, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
        return (
            tree_add(acc, jax.tree.map(lambda g: jnp.where(keep, g * scale, 0.0), vec)),
            clipped + ((norm > clip_norm) | ~jnp.isfinite(norm)) * (m > 0),
            {k: sums[k] + _selected(v, m) for k, v in scalars.items()},
        ), None

    zero = jnp.zeros((), jnp.float32)
    init = (
        jax.tree.map(jnp.zeros_like, params),
        zero,
        {k: zero for k in shapes[1]},
    )
    return jax.lax.scan(one, init, (batch, mask))[0]


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


def privatize(
    per_example: PerExampleFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    sampling_rate: float | jax.Array,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    microbatch_size: int,
    per_example_mode: str = "auto",
) -> DPSGDStep:
    """Poisson sample → per-example vectors → clip → sum → noise → normalize.

    The noise ``N(0, (noise_multiplier * clip_norm)^2)`` is added to the SUM of clipped
    vectors, which is then divided by the fixed ``expected_batch_size`` (``q * n``), not by
    the realized batch size (which would leak it). ``per_example_mode`` picks how a
    micro-batch's clipped vectors are formed: ``vmap`` (all at once), ``scan`` (one at a time)
    or ``auto`` (see :func:`resolve_per_example`); the result is the same.
    """
    scan = resolve_per_example(per_example_mode) == "scan"
    sample_key, noise_key = jax.random.split(key)
    order, count = poisson_order(sample_key, data.mask, sampling_rate)
    slots = -(-order.shape[0] // microbatch_size) * microbatch_size
    order = jnp.pad(order, (0, slots - order.shape[0]))
    zeros = jax.tree.map(jnp.zeros_like, params)
    one_example = jax.tree.map(lambda a: a[:1], data.examples)
    sum_keys = jax.eval_shape(per_example, params, one_example)[1]

    def body(carry):
        j, acc, clipped, sums = carry
        start = j * microbatch_size
        idx = jax.lax.dynamic_slice(order, (start,), (microbatch_size,))
        m = ((start + jnp.arange(microbatch_size)) < count).astype(jnp.float32)
        batch = take(data.examples, idx)
        if scan:
            summed, n_clipped, batch_sums = clipped_sum_scan(
                per_example, params, batch, m, clip_norm
            )
        else:
            vecs, per = _vmapped(per_example, params, batch)
            summed, n_clipped = clip_and_sum(vecs, m, clip_norm)
            batch_sums = {k: jnp.sum(_selected(v, m)) for k, v in per.items()}
        return (
            j + 1,
            tree_add(acc, summed),
            clipped + n_clipped,
            {k: sums[k] + batch_sums[k] for k in sums},
        )

    zero = jnp.zeros((), jnp.float32)
    n_micro = (count + microbatch_size - 1) // microbatch_size
    init = (jnp.zeros((), jnp.int32), zeros, zero, {k: zero for k in sum_keys})
    _, total, clipped, sums = jax.lax.while_loop(lambda c: c[0] < n_micro, body, init)
    std = noise_multiplier * clip_norm
    grad = tree_scale(add_gaussian_noise(total, std, noise_key), 1.0 / expected_batch_size)
    return DPSGDStep(
        grad,
        jnp.asarray(clip_norm, jnp.float32),
        jnp.asarray(std, jnp.float32),
        count,
        clipped,
        sums,
    )


def dp_sgd_gradient(
    loss_fn: LossFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    *,
    sampling_rate: float | jax.Array,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    microbatch_size: int,
    per_example: str = "auto",
) -> DPSGDStep:
    """One DP-SGD gradient of ``loss_fn`` (see :func:`privatize`)."""
    return privatize(
        gradient_of(loss_fn),
        params,
        data,
        key,
        sampling_rate=sampling_rate,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        microbatch_size=microbatch_size,
        per_example_mode=per_example,
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
