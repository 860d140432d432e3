"""Membership inference: was this example in a client's training data?

- **Loss threshold** (Yeom et al. 2018): members have lower loss; the score is ``-loss``.
- **Likelihood ratio, shadow-free** (the offline LiRA of Carlini et al. 2022 with reference
  models that federated learning already has): the target model's logit-scaled confidence
  ``phi = log p_y - log(1 - p_y)`` is compared with its distribution under reference models
  that never trained on the example, one Gaussian per example: the score is
  ``(phi - mean_ref) / std_ref``. For a client's personalized model the references are the
  other clients' personalized models, so no shadow model is trained. With one reference (or
  none) it falls back to a global mean and std over the reference scores.

Scores are higher for "member"; :func:`roc_auc` and :func:`tpr_at_fpr` summarize an attack.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Params = object
ApplyFn = Callable[..., jax.Array]


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve: P(member score > non-member score), ties counted half."""
    m = np.asarray(member_scores, np.float64)
    n = np.asarray(nonmember_scores, np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("an AUC needs at least one member and one non-member score")
    ranks = _average_ranks(np.concatenate([m, n]))
    return float((ranks[: m.size].sum() - m.size * (m.size + 1) / 2) / (m.size * n.size))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing their mean rank (the Mann-Whitney U form)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> float:
    """The fraction of members flagged by the threshold that flags at most ``fpr`` of the
    non-members (strictly above the non-members' ``1 - fpr`` quantile)."""
    n = np.sort(np.asarray(nonmember_scores, np.float64))
    allowed = int(np.floor(fpr * n.size))
    threshold = n[n.size - 1 - allowed] if allowed < n.size else -np.inf
    return float(np.mean(np.asarray(member_scores) > threshold))


def statistics_fn(apply_fn: ApplyFn) -> Callable:
    """A jitted ``(params, images [B, ...], labels [B]) -> (loss [B], phi [B])``: the
    cross-entropy and the logit-scaled confidence of the true class. A segmenter's masks
    ``[B, H, W]`` score the means over their labelled pixels (negative labels are ignored)."""
    return jax.jit(lambda p, x, y: _statistics(apply_fn, p, x, y))


def example_statistics(
    stats_fn: Callable, params: Params, images: jax.Array, labels: jax.Array, batch: int = 256
) -> dict[str, np.ndarray]:
    """Per-example ``loss`` and ``phi`` of :func:`statistics_fn` on ``images [N, ...]`` with
    ``labels [N]``, ``batch`` at a time."""
    losses, phis = [], []
    for start in range(0, images.shape[0], batch):
        loss, phi = stats_fn(params, images[start : start + batch], labels[start : start + batch])
        losses.append(np.asarray(loss))
        phis.append(np.asarray(phi))
    return {"loss": np.concatenate(losses), "phi": np.concatenate(phis)}


def _statistics(apply_fn, params, images, labels):
    logp = jax.nn.log_softmax(apply_fn({"params": params}, images))
    labelled = labels >= 0
    y = jnp.where(labelled, labels, 0).astype(jnp.int32)
    true = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    # log(1 - p_y) as the logsumexp of the other classes: exact where p_y rounds to 1.
    others = jnp.where(jax.nn.one_hot(y, logp.shape[-1]) > 0, -jnp.inf, logp)
    phi = true - jax.scipy.special.logsumexp(others, axis=-1)
    axes = tuple(range(1, labels.ndim))
    weight = labelled.astype(logp.dtype)
    count = jnp.maximum(weight.sum(axis=axes), 1.0)
    return (-true * weight).sum(axis=axes) / count, (phi * weight).sum(axis=axes) / count


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.'s score: ``-loss`` (low loss = member)."""
    return -np.asarray(losses)


def likelihood_ratio_scores(phi: np.ndarray, reference_phi: np.ndarray) -> np.ndarray:
    """Offline LiRA scores of examples with target-model confidences ``phi [N]`` against
    ``reference_phi [M, N]``: the same examples under ``M`` models that did not train on them.
    Per-example mean and std for ``M >= 2`` (std floored at a tenth of the global std so a
    constant reference cannot divide by zero), global ones for ``M = 1``."""
    ref = np.atleast_2d(np.asarray(reference_phi, np.float64))
    phi = np.asarray(phi, np.float64)
    if ref.shape[1] != phi.shape[0]:
        raise ValueError(f"reference_phi {ref.shape} must be [M, {phi.shape[0]}]")
    floor = 0.1 * ref.std() + 1e-6
    if ref.shape[0] == 1:
        return (phi - ref.mean()) / max(ref.std(), 1e-6)
    return (phi - ref.mean(axis=0)) / np.maximum(ref.std(axis=0), floor)


def attack_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """``auc`` and ``tpr_at_1pct_fpr`` of one attack."""
    return {
        "auc": roc_auc(member_scores, nonmember_scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01),
    }
