"""Segmentation losses and Dice / IoU metrics (PPPML-HMI's COVID-19 CT infection task).

Shapes: logits ``[B, H, W, C]`` (C classes, class 0 = background), integer masks ``[B, H, W]``.

Device side (pure ``jnp``, jittable): every loss returns one value per example, ``[B]``, so the
engine can zero out padded examples and DP-SGD can clip per example; :func:`dice_stats` returns
per-example pixel counts ``[B, C-1]`` for the foreground classes. Counts, unlike Dice values,
add up across batches, slices, clients and hosts, so evaluation gathers counts and computes the
scores once on the host.

Host side (numpy): :func:`dice_from_counts` / :func:`iou_from_counts` turn counts into scores;
:func:`per_slice_dice`, :func:`per_case_dice` and :func:`summarize` aggregate them.

Empty masks. When a class is absent from both the prediction and the truth (P + T = 0), Dice
and IoU are 0/0. ``empty="one"`` scores that as 1.0 (nothing to find, nothing found: perfect);
``empty="nan"`` scores it NaN, which the ``nanmean`` summaries then leave out. Defaults:

* per case (volume-level, counts summed over all slices of the case first): ``"one"``. A case
  without infection that the model also leaves clean deserves full marks; such cases are rare.
* per slice: ``"nan"``, i.e. excluded. Most CT slices hold no lesion, so scoring them 1.0
  would let the mean slice Dice reward a model that predicts nothing.

A slice or case with truth but no prediction (or the reverse) scores 0 under both.

Ignored pixels. A mask pixel equal to :data:`IGNORE_LABEL` (e.g. padding that brings a slice to
a size the U-Net accepts) carries no label: every loss and count here leaves it out, whatever
the logits there. A slice with no labelled pixel has loss 0.

Soft masks. The losses also take ``mask [B, H, W, C]``: per-pixel class probabilities (every
pixel labelled), the relaxed target a gradient-inversion attack optimizes
(:mod:`jaxfl.attacks`). A one-hot soft mask gives the integer mask's loss exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Empty = Literal["one", "nan"]
LossKind = Literal["ce", "dice", "ce+dice"]

IGNORE_LABEL = -1
_EMPTY = ("one", "nan")
_COUNT_KEYS = ("inter", "pred", "true")


def _check_labels(logits: jax.Array, mask: jax.Array) -> None:
    if logits.ndim != 4 or mask.shape not in (logits.shape[:-1], logits.shape):
        raise ValueError(
            "expected logits [B, H, W, C] and mask [B, H, W] (or soft [B, H, W, C]), got "
            f"{logits.shape} and {mask.shape}"
        )


def _targets(mask: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """(labelled pixels ``[B, H, W]`` float, target probabilities ``[B, H, W, C]``, zero on
    ignored pixels) of an integer or a soft mask."""
    if mask.ndim == 4:
        return jnp.ones(mask.shape[:-1], jnp.float32), mask.astype(jnp.float32)
    valid, labels = _labelled(mask)
    keep = valid.astype(jnp.float32)
    return keep, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * keep[..., None]


def pixel_cross_entropy(
    logits: jax.Array, mask: jax.Array, class_weights: Sequence[float] | None = None
) -> jax.Array:
    """Per-example pixel-wise softmax cross-entropy, optionally class-balanced: ``[B]``.

    ``logits [B, H, W, C]``, ``mask [B, H, W]`` integer labels in ``[0, C)`` (or soft
    ``[B, H, W, C]``: the expected cross-entropy and weight under each pixel's target). With
    ``CE_p = -log softmax(logits_p)[y_p]`` over the pixels ``p`` of one example:

    * ``class_weights=None``: ``mean_p CE_p``;
    * ``class_weights=w`` (length C, positive): ``sum_p w[y_p] CE_p / sum_p w[y_p]``, the
      weighted mean PyTorch's ``CrossEntropyLoss(weight=w)`` takes, per example. This is
      PPPML-HMI's class-balanced loss, e.g. ``w = (1.0, 524.46)`` (background, infection). An
      example with only background pixels gets the plain mean, whatever ``w``.
    """
    _check_labels(logits, mask)
    valid, t = _targets(mask, logits.shape[-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -(t * logp).sum(axis=-1)
    if class_weights is None:
        return _weighted_mean(ce, valid)
    w_c = np.asarray(class_weights, dtype=np.float32)
    if w_c.shape != (logits.shape[-1],) or not np.all(w_c > 0):
        raise ValueError(
            f"class_weights must be {logits.shape[-1]} positive numbers (one per class), "
            f"got {w_c.tolist()}"
        )
    # w[y_p] for an integer mask (0 where ignored); the expected weight for a soft one.
    return _weighted_mean(ce, t @ jnp.asarray(w_c))


def _labelled(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(labelled pixels ``[B, H, W]`` bool, labels with ignored pixels set to class 0)."""
    valid = mask != IGNORE_LABEL
    return valid, jnp.where(valid, mask, 0).astype(jnp.int32)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum w v / sum w`` per example ``[B]``; 0 where no pixel has weight (``where``, so no
    0/0 reaches values or gradients)."""
    total = weights.sum(axis=(1, 2))
    num = jnp.where(weights > 0, weights * values, 0.0).sum(axis=(1, 2))
    return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0)


def balanced_class_weights(masks: Any, num_classes: int) -> np.ndarray:
    """Inverse-frequency class weights ``[num_classes]`` from label masks, background = 1.0.

    ``w[c] = count[0] / count[c]`` over all pixels of ``masks`` (any shape, integer labels in
    ``[0, num_classes)``): each class then carries the same total weight in
    :func:`pixel_cross_entropy`. PPPML-HMI's (1.0, 524.46) is this for infection covering
    ~0.19% of pixels. Compute it on the training masks (pooled, or agreed across clients) and
    pass it as ``class_weights``. Raises if a class never occurs (its weight would be infinite).
    """
    labels = np.asarray(masks)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"mask labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)
    absent = np.flatnonzero(counts == 0).tolist()
    if absent:
        raise ValueError(
            f"classes {absent} never occur in the masks, so inverse-frequency weights are "
            "undefined; compute them on data that holds every class or pass class_weights "
            "explicitly"
        )
    return counts[0] / counts.astype(np.float64)


def soft_dice_loss(
    logits: jax.Array, mask: jax.Array, *, eps: float = 1.0, include_background: bool = False
) -> jax.Array:
    """Per-example soft Dice loss ``[B]``: 1 - mean over classes of soft Dice.

    With ``p = softmax(logits)`` and one-hot truth ``t`` (or a soft mask's probabilities),
    per example and class c:
    ``dice_c = (2 sum_px p t + eps) / (sum_px p + sum_px t + eps)``, averaged over the
    foreground classes 1..C-1 (all C with ``include_background``). ``eps`` smooths empty
    classes: a class absent from truth and prediction scores ~1 (loss ~0) rather than 0/0.
    """
    _check_labels(logits, mask)
    num_classes = logits.shape[-1]
    if not include_background and num_classes < 2:
        raise ValueError("soft_dice_loss without background needs C >= 2 classes")
    valid, t = _targets(mask, num_classes)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid[..., None]
    inter = (p * t).sum(axis=(1, 2))
    denom = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    dice = (2.0 * inter + eps) / (denom + eps)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - dice.mean(axis=-1)


def segmentation_loss(
    kind: LossKind = "ce", class_weights: Sequence[float] | None = None, *, dice_eps: float = 1.0
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A per-example loss ``fn(logits [B, H, W, C], mask [B, H, W]) -> [B]`` by name.

    ``"ce"``: :func:`pixel_cross_entropy` (class-balanced with ``class_weights``, PPPML-HMI's
    loss); ``"dice"``: :func:`soft_dice_loss` over the foreground classes; ``"ce+dice"``: their
    unweighted sum, the usual combination (CE for well-behaved early gradients, Dice to
    counter the foreground/background imbalance).
    """
    if kind not in ("ce", "dice", "ce+dice"):
        raise ValueError(f"unknown segmentation loss {kind!r}; valid: 'ce', 'dice', 'ce+dice'")
    if kind == "dice" and class_weights is not None:
        raise ValueError("class_weights apply to the cross-entropy; kind='dice' has none")

    def loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
        total = jnp.zeros(logits.shape[0], jnp.float32)
        if kind in ("ce", "ce+dice"):
            total = total + pixel_cross_entropy(logits, mask, class_weights)
        if kind in ("dice", "ce+dice"):
            total = total + soft_dice_loss(logits, mask, eps=dice_eps)
        return total

    return loss


def dice_stats(
    logits_or_pred: jax.Array, mask: jax.Array, num_classes: int
) -> dict[str, jax.Array]:
    """Per-example pixel counts ``{"inter", "pred", "true"}``, each ``[B, C-1]`` (foreground).

    ``logits_or_pred`` is logits ``[B, H, W, C]`` (argmax taken) or predicted labels
    ``[B, H, W]``; ``mask [B, H, W]`` the true labels (:data:`IGNORE_LABEL` pixels are not
    counted). For class c in 1..C-1: ``inter`` counts
    pixels predicted c that are c, ``pred`` pixels predicted c, ``true`` pixels that are c
    (int32). Jittable; feed the counts to the host-side functions of this module.
    """
    if logits_or_pred.ndim == mask.ndim + 1 and logits_or_pred.shape[:-1] == mask.shape:
        pred = jnp.argmax(logits_or_pred, axis=-1)
    elif logits_or_pred.shape == mask.shape:
        pred = logits_or_pred
    else:
        raise ValueError(
            "expected logits [B, H, W, C] or predicted labels [B, H, W] with mask [B, H, W], "
            f"got {logits_or_pred.shape} and {mask.shape}"
        )
    classes = jnp.arange(1, num_classes)
    axes = tuple(range(1, mask.ndim))
    # Ignored pixels are never a foreground label, and their predictions are not counted.
    p = (pred[..., None] == classes) & (mask != IGNORE_LABEL)[..., None]
    t = mask[..., None] == classes
    return {
        "inter": (p & t).sum(axis=axes, dtype=jnp.int32),
        "pred": p.sum(axis=axes, dtype=jnp.int32),
        "true": t.sum(axis=axes, dtype=jnp.int32),
    }


def _score(num: np.ndarray, den: np.ndarray, empty: Empty) -> np.ndarray:
    if empty not in _EMPTY:
        raise ValueError(f"empty must be 'one' or 'nan', got {empty!r}")
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)
    if empty == "one":
        out[den == 0] = 1.0
    return out


def dice_from_counts(inter: Any, pred: Any, true: Any, empty: Empty = "one") -> np.ndarray:
    """Dice ``2I / (P + T)`` elementwise from counts (any matching shapes), float64.

    Where ``P + T == 0``: 1.0 for ``empty="one"``, NaN for ``empty="nan"`` (module docstring).
    """
    i, p, t = (np.asarray(a, dtype=np.float64) for a in (inter, pred, true))
    return _score(2.0 * i, p + t, empty)


def iou_from_counts(inter: Any, pred: Any, true: Any, empty: Empty = "one") -> np.ndarray:
    """IoU (Jaccard) ``I / (P + T - I)`` elementwise from counts, float64; ``empty`` as Dice."""
    i, p, t = (np.asarray(a, dtype=np.float64) for a in (inter, pred, true))
    return _score(i, p + t - i, empty)


def _host_counts(
    stats: Mapping[str, Any], valid_mask: Any | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Counts as int64 ``[N, C-1]`` arrays, and the boolean ``[N]`` selection of real examples."""
    counts = {k: np.asarray(stats[k]).astype(np.int64) for k in _COUNT_KEYS}
    if any(c.shape != counts["inter"].shape or c.ndim != 2 for c in counts.values()):
        raise ValueError(
            f"stats must hold {_COUNT_KEYS} arrays of one shape [N, C-1], got "
            f"{ {k: c.shape for k, c in counts.items()} }"
        )
    n = counts["inter"].shape[0]
    valid = np.ones(n, bool) if valid_mask is None else np.asarray(valid_mask, dtype=bool)
    if valid.shape != (n,):
        raise ValueError(f"valid_mask must have shape ({n},), got {valid.shape}")
    return counts, valid


def per_slice_dice(
    stats: Mapping[str, Any], valid_mask: Any | None = None, empty: Empty = "nan"
) -> np.ndarray:
    """Dice of each real slice ``[n_valid, C-1]`` from :func:`dice_stats` counts ``[N, C-1]``.

    ``valid_mask [N]`` (bool) keeps the real examples and drops padding; None keeps all.
    Default ``empty="nan"``: slices without the class in truth and prediction are excluded.
    """
    counts, valid = _host_counts(stats, valid_mask)
    return dice_from_counts(*(counts[k][valid] for k in _COUNT_KEYS), empty=empty)


def per_slice_iou(
    stats: Mapping[str, Any], valid_mask: Any | None = None, empty: Empty = "nan"
) -> np.ndarray:
    """IoU of each real slice ``[n_valid, C-1]``; arguments as :func:`per_slice_dice`."""
    counts, valid = _host_counts(stats, valid_mask)
    return iou_from_counts(*(counts[k][valid] for k in _COUNT_KEYS), empty=empty)


def per_case_counts(
    stats: Mapping[str, Any], case_ids: Any, valid_mask: Any | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Counts summed over the slices of each case: ``(case_ids_unique [K], {key: [K, C-1]})``.

    ``case_ids [N]`` names the case (volume, patient) of every slice (ints or strings);
    ``valid_mask [N]`` drops padded examples before summing. Cases come out sorted.
    """
    counts, valid = _host_counts(stats, valid_mask)
    ids = np.asarray(case_ids)
    if ids.shape != valid.shape:
        raise ValueError(f"case_ids must have shape {valid.shape}, got {ids.shape}")
    unique, inverse = np.unique(ids[valid], return_inverse=True)
    summed = {}
    for k in _COUNT_KEYS:
        total = np.zeros((len(unique), counts[k].shape[1]), np.int64)
        np.add.at(total, inverse.ravel(), counts[k][valid])
        summed[k] = total
    return unique, summed


def per_case_dice(
    stats: Mapping[str, Any], case_ids: Any, valid_mask: Any | None = None, empty: Empty = "one"
) -> tuple[np.ndarray, np.ndarray]:
    """Volume-level Dice per case: ``(case_ids_unique [K], dice [K, C-1])``.

    Sums each case's counts over all its slices first, then ``2I / (P + T)``: this is the Dice
    of the whole volume, not the mean of its slice Dice. Default ``empty="one"``.
    """
    unique, summed = per_case_counts(stats, case_ids, valid_mask)
    return unique, dice_from_counts(*(summed[k] for k in _COUNT_KEYS), empty=empty)


def per_case_iou(
    stats: Mapping[str, Any], case_ids: Any, valid_mask: Any | None = None, empty: Empty = "one"
) -> tuple[np.ndarray, np.ndarray]:
    """Volume-level IoU per case: ``(case_ids_unique [K], iou [K, C-1])``, as per_case_dice."""
    unique, summed = per_case_counts(stats, case_ids, valid_mask)
    return unique, iou_from_counts(*(summed[k] for k in _COUNT_KEYS), empty=empty)


def nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN columns without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def summarize(
    stats: Mapping[str, Any],
    case_ids: Any,
    valid_mask: Any | None = None,
    case_groups: Mapping[Hashable, Hashable] | None = None,
    *,
    empty_case: Empty = "one",
    empty_slice: Empty = "nan",
) -> dict[str, Any]:
    """Dice / IoU summary of one evaluation: per case, mean over cases, per group, per slice.

    Arguments as :func:`per_case_dice`; ``case_groups`` maps every case id to its group (e.g.
    its hospital / client). Returns (arrays over the foreground classes, ``[C-1]``, unless
    noted; means are ``nanmean``):

    * ``case_ids [K]``, ``case_dice [K, C-1]``, ``case_iou [K, C-1]``;
    * ``dice``, ``iou``: means over cases (each case counts once, whatever its slice count);
    * ``slice_dice``, ``slice_iou``: means over the real slices (``empty_slice`` convention);
    * ``groups``: ``{group: {"dice", "iou", "num_cases"}}`` over that group's cases, when
      ``case_groups`` is given.
    """
    unique, summed = per_case_counts(stats, case_ids, valid_mask)
    case_dice = dice_from_counts(*(summed[k] for k in _COUNT_KEYS), empty=empty_case)
    case_iou = iou_from_counts(*(summed[k] for k in _COUNT_KEYS), empty=empty_case)
    out: dict[str, Any] = {
        "case_ids": unique,
        "case_dice": case_dice,
        "case_iou": case_iou,
        "dice": nanmean(case_dice),
        "iou": nanmean(case_iou),
        "slice_dice": nanmean(per_slice_dice(stats, valid_mask, empty_slice)),
        "slice_iou": nanmean(per_slice_iou(stats, valid_mask, empty_slice)),
    }
    if case_groups is not None:
        missing = [c for c in unique.tolist() if c not in case_groups]
        if missing:
            raise ValueError(f"case_groups has no group for cases {missing}")
        labels = [case_groups[c] for c in unique.tolist()]
        groups = {}
        for g in dict.fromkeys(labels):
            sel = np.array([lab == g for lab in labels])
            groups[g] = {
                "dice": nanmean(case_dice[sel]),
                "iou": nanmean(case_iou[sel]),
                "num_cases": int(sel.sum()),
            }
        out["groups"] = groups
    return out
