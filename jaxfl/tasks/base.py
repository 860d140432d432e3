"""The Task interface: what the examples are, how they are scored, and what gets reported.

The engine (local training, DP-SGD, Per-FedAvg, personalization, secure aggregation, the
simulator) never names a feature or a metric: it calls the functions built here from a
:class:`Task` and moves their outputs around. A task supplies

- its example structure: the features it needs (``required``) and which one the model reads
  (``input_key``);
- per-example losses and per-example metric values from the model's outputs, which
  :func:`make_loss` masks (padded examples contribute nothing) and sums per batch;
- how the training sums become the rates logged each round (:meth:`Task.train_metrics`);
- per-example evaluation statistics (jittable, :meth:`Task.eval_stats`) and how the host turns
  them into metrics for the global test split (:meth:`Task.evaluate`) and for one client's
  held-out split (:meth:`Task.client_metrics`);
- its ``primary`` metric: what progress bars, sweep summaries and plots show by default.

Adding a task is a new subclass plus a model; nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.data.lazy import is_lazy
from jaxfl.types import Batch, ClientArrays, LossFn, Params

ApplyFn = Callable[..., jax.Array]
StatsFn = Callable[[Params, Batch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class of tasks; subclasses override the per-example and host-side methods."""

    name: str = "task"
    input_key: str = "image"
    # The feature the loss scores the output against (None: the task has no target).
    target_key: str | None = None
    required: tuple[str, ...] = ("image",)
    primary: str = "loss"
    # Metrics the progress bar shows, after train_loss (names without the test_/... prefix).
    headline: tuple[str, ...] = ()

    def example_losses(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        """Per-example training loss ``[B]`` from the model's ``outputs [B, ...]``."""
        raise NotImplementedError

    def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Per-example values ``[B]`` whose sums over training batches are logged."""
        return {}

    def train_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Round metrics from the training sums (``loss_sum``, ``num_seen`` and the task's)."""
        seen = max(sums.get("num_seen", 0.0), 1.0)
        out = {}
        if "loss_sum" in sums:
            out["train_loss"] = sums["loss_sum"] / seen
        return out

    def eval_stats(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Per-example evaluation statistics ``[B, ...]`` (jittable; reduced on the host)."""
        raise NotImplementedError

    def evaluate(self, stats: Mapping[str, np.ndarray], examples: Batch) -> dict[str, float]:
        """Metrics of one model on a centralized split (``stats``/``examples`` ``[N, ...]``)."""
        raise NotImplementedError

    def client_metrics(
        self, stats: Mapping[str, np.ndarray], examples: Batch, valid: np.ndarray
    ) -> dict[str, float]:
        """Metrics of one client's held-out split (``[N, ...]``, real examples where ``valid``);
        NaN when it has none. ``examples`` holds every feature but the input (the targets)."""
        raise NotImplementedError

    def check(self, examples: Batch, num_classes: int, where: str) -> None:
        """Raise a ValueError naming ``where`` if ``examples`` lacks a feature this task needs."""
        missing = [k for k in self.required if k not in examples]
        if missing:
            raise ValueError(
                f"{where}: the {self.name} task needs features {self.required}, but "
                f"{sorted(examples)} has no {missing}."
            )


def make_loss(task: Task, apply_fn: ApplyFn) -> LossFn:
    """``loss_fn(params, batch, mask [B]) -> (mean loss over real examples, sums)`` for a flax
    ``apply_fn``: the task's per-example losses and metrics, padded examples selected out."""

    def loss_fn(params, batch, mask):
        outputs = apply_fn({"params": params}, batch[task.input_key])
        real = mask > 0
        # Select, never multiply: a NaN in a padded example must not reach the sums.
        per_example = jnp.where(real, task.example_losses(outputs, batch), 0.0)
        loss_sum = jnp.sum(per_example)
        sums = {"loss_sum": loss_sum}
        for k, v in task.example_metrics(outputs, batch).items():
            sums[k] = jnp.sum(jnp.where(real, v, 0.0))
        return loss_sum / jnp.maximum(jnp.sum(mask), 1.0), sums

    return loss_fn


def make_stats_fn(task: Task, apply_fn: ApplyFn) -> StatsFn:
    """A jitted ``(params, batch) -> per-example eval stats`` for a flax ``apply_fn``."""
    return jax.jit(
        lambda params, batch: task.eval_stats(
            apply_fn({"params": params}, batch[task.input_key]), batch
        )
    )


def batched_stats(
    stats_fn: StatsFn, params: Params, examples: Batch, batch_size: int
) -> dict[str, np.ndarray]:
    """``stats_fn`` over ``examples [N, ...]`` in batches padded to ``batch_size``: ``[N, ...]``.

    Padding the last batch keeps one compiled shape for every evaluation.
    """
    n = len(next(iter(examples.values())))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v[start : start + batch_size]) for k, v in examples.items()}
        real = len(next(iter(batch.values())))
        if real < batch_size:
            batch = {
                k: np.concatenate([v, np.zeros((batch_size - real, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        out = stats_fn(params, batch)
        parts.append({k: np.asarray(v)[:real] for k, v in out.items()})
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate_split(
    task: Task, stats_fn: StatsFn, params: Params, examples: Batch, batch_size: int = 256
) -> dict[str, float]:
    """The task's metrics of one global model on a centralized split, prefixed ``test_``
    (none for an empty split: a run without test patients reports held-out metrics only)."""
    if not len(next(iter(examples.values()))):
        return {}
    stats = batched_stats(stats_fn, params, examples, batch_size)
    return {f"test_{k}": v for k, v in task.evaluate(stats, examples).items()}


def client_summaries(
    task: Task, stats: Mapping[str, Any], heldout: ClientArrays
) -> dict[str, np.ndarray]:
    """Per-client metrics ``name -> [K]`` from per-example stats ``[K, N, ...]``.

    The input feature is not read: metrics come from the stats and the targets (so streamed
    volumes are not all read again)."""
    stats = {k: np.asarray(v) for k, v in stats.items()}
    examples = {k: np.asarray(v) for k, v in heldout.examples.items() if k != task.input_key}
    mask = np.asarray(heldout.mask) > 0
    rows = [
        task.client_metrics(
            {k: v[c] for k, v in stats.items()}, {k: v[c] for k, v in examples.items()}, mask[c]
        )
        for c in range(heldout.num_clients)
    ]
    names = rows[0].keys() if rows else ()
    return {name: np.asarray([r[name] for r in rows], np.float64) for name in names}


def evaluate_clients(
    task: Task, stats_fn: StatsFn, params: Params, heldout: ClientArrays, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """ONE global model on every client's held-out split: ``name -> [K]`` (NaN if empty).

    All clients share the parameters, so their padded examples are evaluated as one flat batch
    (lazy features are read batch by batch, the same batches).
    """
    k, n = heldout.mask.shape[:2]
    flat = {
        key: v.flat_clients() if is_lazy(v) else np.asarray(v).reshape(k * n, *v.shape[2:])
        for key, v in heldout.examples.items()
    }
    stats = batched_stats(stats_fn, params, flat, batch_size)
    stats = {key: v.reshape(k, n, *v.shape[1:]) for key, v in stats.items()}
    return client_summaries(task, stats, heldout)
