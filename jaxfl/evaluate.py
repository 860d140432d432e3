"""Evaluation of a global model: official test split and every client's held-out split."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxfl.metrics import accuracy, macro_auc_ovr, softmax
from jaxfl.types import ClientArrays, Params, Split

PredictFn = Callable[[Params, jax.Array], jax.Array]


def make_predict_fn(apply_fn: Callable[..., jax.Array]) -> PredictFn:
    """A jitted ``(params, images [B, ...]) -> logits [B, C]`` for a flax ``apply_fn``."""
    return jax.jit(lambda params, images: apply_fn({"params": params}, images))


def predict(
    predict_fn: PredictFn, params: Params, images: np.ndarray, batch_size: int
) -> np.ndarray:
    """Logits ``[N, C]`` for ``images [N, ...]``, in batches padded to ``batch_size``.

    Padding the last batch keeps one compiled shape for every evaluation.
    """
    n = images.shape[0]
    out = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - batch.shape[0]
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(predict_fn(params, batch))[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate_global(
    predict_fn: PredictFn, params: Params, split: Split, batch_size: int = 256
) -> dict[str, float]:
    """Accuracy, macro one-vs-rest AUC and mean cross-entropy on a centralized split."""
    logits = predict(predict_fn, params, split.images, batch_size)
    probs = softmax(logits)
    labels = np.asarray(split.labels)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    return {
        "test_accuracy": accuracy(labels, logits),
        "test_auc": macro_auc_ovr(labels, probs),
        "test_loss": float(np.mean(nll)),
    }


def evaluate_clients(
    predict_fn: PredictFn, params: Params, heldout: ClientArrays, batch_size: int = 256
) -> np.ndarray:
    """Accuracy of ONE global model on every client's held-out split: ``[K]`` (NaN if empty).

    All clients share the parameters, so their padded examples are evaluated as one flat batch.
    """
    k, n = heldout.labels.shape[:2]
    flat = np.asarray(heldout.images).reshape(k * n, *heldout.images.shape[2:])
    logits = predict(predict_fn, params, flat, batch_size)
    correct = (logits.argmax(-1).reshape(k, n) == np.asarray(heldout.labels)) * heldout.mask
    return per_client_accuracy(correct.sum(1), heldout.counts)


def per_client_accuracy(correct, counts) -> np.ndarray:
    """``correct / count`` per client ``[K]``; NaN for a client without held-out examples."""
    counts = np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.asarray(correct, np.float64) / counts, np.nan)
