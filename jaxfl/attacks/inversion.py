"""Gradient inversion: reconstruct training examples from the gradient a client sends.

What a server (or anyone who sees one client's update) can recover when nothing protects it:

- **DLG** (Zhu et al. 2019): dummy images and soft labels, optimized so that their gradient
  matches the observed one in squared L2 distance.
- **iDLG** (Zhao et al. 2020): for batch 1, the label is read off the last layer's gradient
  (:func:`recover_labels`), then only the image is optimized (L2 matching).
- **Inverting gradients** (Geiping et al. 2020): cosine distance between the gradients plus a
  total-variation prior, Adam with step decay.

Every attack runs restarts x targets in one jitted, vmapped call (:func:`invert`): the dummy
data of each restart is its own draw, and the best restart by matching loss is kept. Shapes:
an observed gradient is a pytree like the model's parameters; images are ``[B, *spatial, C]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import optax

Params = Any
# grad_fn(params, images [B, ...], soft labels [B, C]) -> gradient pytree (like params)
GradFn = Callable[[Params, jax.Array, jax.Array], Params]

ATTACKS = ("dlg", "idlg", "inverting")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One gradient-inversion attack.

    ``method``: ``"dlg"``, ``"idlg"`` or ``"inverting"``; ``steps`` Adam steps at
    ``learning_rate`` (``"inverting"`` decays it by 10x at 3/8, 5/8 and 7/8 of the steps, as
    Geiping et al.); ``tv_weight``: the total-variation prior (``"inverting"`` only);
    ``restarts``: independent dummy draws, the best kept; ``value_range``: where images live
    (dummies are clipped to it after each step).
    """

    method: str = "idlg"
    steps: int = 900
    learning_rate: float = 0.1
    tv_weight: float = 1e-4
    restarts: int = 1
    value_range: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.method not in ATTACKS:
            raise ValueError(f"attack method {self.method!r}; choose one of {ATTACKS}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


# The reference code's iDLG (Adam lr 0.1, ~900 iterations; ../shared/REFERENCES.md).
PPPML_IDLG = AttackConfig(method="idlg", steps=900, learning_rate=0.1)


def recover_labels(
    last_kernel_grad: jax.Array, last_bias_grad: jax.Array | None = None
) -> jax.Array:
    """iDLG's label of a batch-1 gradient: the class whose output-layer gradient is negative.

    With softmax cross-entropy the output bias gradient is ``p - onehot(y)``: negative only at
    ``y``. The kernel gradient ``h (p - onehot(y))^T`` [H, C] has the same sign pattern when
    the features ``h`` are non-negative (after a ReLU): its column sums are used when there is
    no bias. Returns ``[1]`` int32.
    """
    score = last_bias_grad if last_bias_grad is not None else last_kernel_grad.sum(axis=0)
    return jnp.argmin(score).astype(jnp.int32)[None]


def gradient_distance(observed: Params, dummy: Params, method: str) -> jax.Array:
    """Squared L2 distance (DLG, iDLG) or ``1 - cosine`` over all leaves (inverting)."""
    obs, dum = jax.tree.leaves(observed), jax.tree.leaves(dummy)
    if method == "inverting":
        dot = sum(jnp.vdot(a, b) for a, b in zip(obs, dum, strict=True))
        na = jnp.sqrt(sum(jnp.vdot(a, a) for a in obs))
        nb = jnp.sqrt(sum(jnp.vdot(b, b) for b in dum))
        return 1.0 - dot / jnp.maximum(na * nb, 1e-12)
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(obs, dum, strict=True))


def total_variation(images: jax.Array) -> jax.Array:
    """Mean absolute difference between neighbouring pixels along every spatial axis."""
    spatial = range(1, images.ndim - 1)
    return sum(jnp.mean(jnp.abs(jnp.diff(images, axis=a))) for a in spatial)


def _schedule(config: AttackConfig) -> optax.Schedule:
    if config.method != "inverting":
        return optax.constant_schedule(config.learning_rate)
    marks = {int(config.steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)}
    return optax.piecewise_constant_schedule(config.learning_rate, marks)


def _one_restart(
    grad_fn: GradFn,
    params: Params,
    observed: Params,
    key: jax.Array,
    shape: tuple[int, ...],
    num_classes: int,
    labels: jax.Array | None,
    config: AttackConfig,
    label_shape: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One restart: ``(images [B, ...], label probabilities [*label_shape, C], final matching
    loss)``."""
    k_img, k_lab = jax.random.split(key)
    lo, hi = config.value_range
    dummy = {"images": jax.random.uniform(k_img, shape, minval=lo, maxval=hi)}
    if labels is None:  # DLG: soft labels are unknowns too
        dummy["logits"] = jax.random.normal(k_lab, (*label_shape, num_classes))
    fixed = None if labels is None else jax.nn.one_hot(labels, num_classes)

    def objective(d):
        soft = jax.nn.softmax(d["logits"]) if fixed is None else fixed
        loss = gradient_distance(observed, grad_fn(params, d["images"], soft), config.method)
        if config.method == "inverting":
            loss = loss + config.tv_weight * total_variation(d["images"])
        return loss

    opt = optax.adam(_schedule(config))

    def step(carry, _):
        d, state = carry
        loss, g = jax.value_and_grad(objective)(d)
        updates, state = opt.update(g, state, d)
        d = optax.apply_updates(d, updates)
        d = {**d, "images": jnp.clip(d["images"], lo, hi)}
        return (d, state), loss

    (dummy, _), _ = jax.lax.scan(step, (dummy, opt.init(dummy)), None, length=config.steps)
    final = objective(dummy)
    soft = jax.nn.softmax(dummy["logits"]) if fixed is None else fixed
    return dummy["images"], soft, final


def invert(
    grad_fn: GradFn,
    params: Params,
    observed: Params,
    key: jax.Array,
    shape: tuple[int, ...],
    num_classes: int,
    config: AttackConfig = PPPML_IDLG,
    labels: jax.Array | None = None,
    first_restart: int = 0,
    label_shape: tuple[int, ...] | None = None,
) -> dict[str, jax.Array]:
    """Reconstruct the batch behind ``observed`` (one client's gradient of ``grad_fn``).

    ``shape``: the batch's image shape ``[B, *spatial, C]``; ``labels [B]``: known labels, or
    for iDLG the ones :func:`recover_labels` reads off the output layer (required for
    ``"idlg"``, ignored by ``"dlg"``, which optimizes soft labels). Restart ``r`` draws its
    dummies from ``fold_in(key, first_restart + r)``, so restarts can be split across calls.
    ``label_shape``: the labels' shape without the class axis, ``(B,)`` by default; a
    segmentation mask's ``(B, H, W)`` makes DLG reconstruct the mask with the image.
    Returns the best restart's ``images``, ``label_probs [*label_shape, C]`` and ``loss``, and
    every restart's ``losses [R]`` and ``all_images [R, B, ...]``.
    """
    label_shape = tuple(label_shape) if label_shape is not None else (shape[0],)
    if config.method == "idlg" and labels is None:
        raise ValueError(
            "iDLG optimizes images for known labels: pass labels=recover_labels(<output "
            "layer's kernel gradient>, <its bias gradient>) (batch 1), or use method='dlg'"
        )
    if config.method == "dlg":
        labels = None
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(
        first_restart + jnp.arange(config.restarts)
    )
    # One program for every restart (params and the observation are arguments, not constants
    # folded into it); eager dispatch would compile each op of the final evaluation apart.
    run = jax.jit(
        jax.vmap(
            lambda k, p, obs, lab: _one_restart(
                grad_fn, p, obs, k, shape, num_classes, lab, config, label_shape
            ),
            in_axes=(0, None, None, None),
        )
    )
    images, probs, losses = run(keys, params, observed, labels)
    best = jnp.argmin(losses)
    return {
        "images": images[best],
        "label_probs": probs[best],
        "loss": losses[best],
        "losses": losses,
        "all_images": images,
    }


def local_update_fn(grad_fn: GradFn, learning_rate: float, steps: int) -> GradFn:
    """What a FedAvg client sends after ``steps`` full-batch SGD steps at ``learning_rate``:
    ``params - params_after`` as a function of the batch, for :func:`invert` (Geiping et al.'s
    multi-step threat model; the attacker knows the client's learning rate and step count)."""

    def update(params, images, soft_labels):
        def step(p, _):
            g = grad_fn(p, images, soft_labels)
            return jax.tree.map(lambda a, b: a - learning_rate * b, p, g), None

        final, _ = jax.lax.scan(step, params, None, length=steps)
        return jax.tree.map(lambda a, b: a - b, params, final)

    return update


def invert_many(
    grad_fn: GradFn,
    params: Params,
    observed: Params,
    keys: jax.Array,
    shape: tuple[int, ...],
    num_classes: int,
    config: AttackConfig = PPPML_IDLG,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """:func:`invert` for ``T`` targets at once: ``observed`` stacks their gradients along a
    leading axis, ``keys [T]`` and ``labels [T, B]`` go with them; every output gains a leading
    ``T`` axis. Targets x restarts run as one vmapped program."""
    one = lambda obs, key, lab: invert(  # noqa: E731
        grad_fn, params, obs, key, shape, num_classes, config, lab
    )
    if labels is None:
        return jax.vmap(lambda obs, key: one(obs, key, None))(observed, keys)
    return jax.vmap(one)(observed, keys, labels)


def psnr(
    reference: jax.Array, reconstruction: jax.Array, value_range: tuple[float, float]
) -> jax.Array:
    """Peak signal-to-noise ratio (dB) per image of ``[B, ...]`` pairs over ``value_range``."""
    peak = value_range[1] - value_range[0]
    axes = tuple(range(1, reference.ndim))
    mse = jnp.mean((reference - reconstruction) ** 2, axis=axes)
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, 1e-20))


def ssim(
    reference: jax.Array, reconstruction: jax.Array, value_range: tuple[float, float]
) -> jax.Array:
    """Structural similarity (dm-pix, 11-pixel Gaussian window) per image of ``[B, H, W, C]``
    pairs, both mapped from ``value_range`` onto [0, 1]; windows shrink to fit small images. A
    volume ``[B, D, H, W, C]`` scores the mean over its ``D`` slices."""
    lo, hi = value_range
    a, b = (reference - lo) / (hi - lo), (reconstruction - lo) / (hi - lo)
    if a.ndim == 5:
        n, d = a.shape[:2]
        slices = ssim(a.reshape(n * d, *a.shape[2:]), b.reshape(n * d, *b.shape[2:]), (0.0, 1.0))
        return slices.reshape(n, d).mean(axis=1)
    size = min(11, *reference.shape[1:3])
    return dm_pix.ssim(a, b, max_val=1.0, filter_size=size, filter_sigma=1.5 * size / 11)


def match_reconstructions(
    references: jax.Array, reconstructions: jax.Array, value_range: tuple[float, float]
) -> dict[str, jax.Array]:
    """Each reference image's best reconstruction by PSNR (a batch attack returns its images in
    no particular order): ``psnr [B]``, ``ssim [B]`` and ``index [B]`` into
    ``reconstructions``."""
    pairwise = jax.vmap(
        lambda r: psnr(jnp.broadcast_to(r, reconstructions.shape), reconstructions, value_range)
    )(references)
    index = jnp.argmax(pairwise, axis=1)
    best = reconstructions[index]
    return {
        "psnr": jnp.max(pairwise, axis=1),
        "ssim": ssim(references, best, value_range),
        "index": index,
    }
