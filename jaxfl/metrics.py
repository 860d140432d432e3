"""Host-side metrics: accuracy, MedMNIST-style macro one-vs-rest AUC, and metrics.jsonl files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def softmax(logits: ArrayLike, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of ``logits [..., C]`` along ``axis``; same shape, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)  # shift so exp never overflows
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def accuracy(labels: ArrayLike, logits_or_probs: ArrayLike) -> float:
    """Top-1 accuracy of ``logits_or_probs [N, C]`` against int ``labels [N]`` (or ``[N, 1]``)."""
    y = np.asarray(labels).reshape(-1)
    scores = np.asarray(logits_or_probs)
    if y.size == 0:
        return float("nan")
    return float(np.mean(np.argmax(scores, axis=-1) == y))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x [N]``, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auc(is_positive: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of ``scores [N]`` for boolean ``is_positive [N]`` via the Mann–Whitney U statistic.

    Ties count one half, as in the trapezoidal ROC AUC. NaN if either class is absent.
    """
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(s)[pos].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0  # pairs (pos, neg) with pos ranked higher
    return u / (n_pos * n_neg)


def macro_auc_ovr(labels: ArrayLike, probs: ArrayLike) -> float:
    """MedMNIST ``getAUC`` of ``probs [N, C]`` for int ``labels [N]``: macro one-vs-rest AUC.

    Binary (C == 2, or 1-D scores) → AUC of the class-1 score; otherwise the mean over classes of
    one-vs-rest AUC. Unlike MedMNIST (whose sklearn call would raise), classes with no positive
    or no negative example are skipped; NaN if none remain.
    """
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or p.shape[-1] == 2:
        score = p if p.ndim == 1 else p[:, 1]
        return binary_auc(y == 1, score)
    aucs = [binary_auc(y == c, p[:, c]) for c in range(p.shape[-1])]
    valid = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rounds logged in a ``metrics.jsonl`` (empty if the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
