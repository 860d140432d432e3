"""Single-label classification: ``{"image": [N, *spatial, C], "label": [N] int}``, logits out."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.metrics import accuracy, macro_auc_ovr, softmax
from jaxfl.tasks.base import Task
from jaxfl.types import Batch


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Softmax cross-entropy training; accuracy, macro one-vs-rest AUC and NLL evaluation."""

    name: str = "classification"
    target_key: str = "label"
    required: tuple[str, ...] = ("image", "label")
    primary: str = "accuracy"
    headline: tuple[str, ...] = ("accuracy",)

    def example_losses(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        """Cross-entropy of ``logits [B, C]`` against ``label [B]`` (or soft labels ``[B, C]``,
        the relaxed target gradient inversion optimizes): ``[B]``."""
        label = batch["label"]
        if label.ndim == outputs.ndim:
            return optax.softmax_cross_entropy(outputs, label)
        return optax.softmax_cross_entropy_with_integer_labels(outputs, label)

    def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """``correct [B]``: 1.0 where the argmax is the label (a soft label's argmax)."""
        label = batch["label"]
        label = jnp.argmax(label, -1) if label.ndim == outputs.ndim else label
        return {"correct": (jnp.argmax(outputs, -1) == label).astype(jnp.float32)}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``train_loss`` and ``train_accuracy`` per example seen."""
        out = super().train_metrics(sums)
        if "correct" in sums:
            out["train_accuracy"] = sums["correct"] / max(sums.get("num_seen", 0.0), 1.0)
        return out

    def eval_stats(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """The logits ``[B, C]``."""
        return {"logits": outputs}

    def evaluate(self, stats: Mapping[str, np.ndarray], examples: Batch) -> dict[str, float]:
        """Accuracy, macro one-vs-rest AUC (MedMNIST's) and mean cross-entropy."""
        logits = stats["logits"]
        probs = softmax(logits)
        labels = np.asarray(examples["label"]).reshape(-1)
        nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
        return {
            "accuracy": accuracy(labels, logits),
            "auc": macro_auc_ovr(labels, probs),
            "loss": float(np.mean(nll)),
        }

    def client_metrics(
        self, stats: Mapping[str, np.ndarray], examples: Batch, valid: np.ndarray
    ) -> dict[str, float]:
        """Held-out accuracy of one client (NaN without held-out examples)."""
        n = int(valid.sum())
        if n == 0:
            return {"accuracy": float("nan")}
        correct = np.argmax(stats["logits"], -1) == np.asarray(examples["label"])
        return {"accuracy": float(np.sum(correct[valid])) / n}

    def check(self, examples: Batch, num_classes: int, where: str) -> None:
        """Labels must be integers in ``[0, num_classes)``, one per example."""
        super().check(examples, num_classes, where)
        labels = np.asarray(examples["label"])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}.")
