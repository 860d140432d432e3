"""Tasks: what a federated run learns and how it is scored (see :mod:`jaxfl.tasks.base`)."""

from __future__ import annotations

from jaxfl.tasks.base import (
    StatsFn,
    Task,
    batched_stats,
    client_summaries,
    evaluate_clients,
    evaluate_split,
    make_loss,
    make_stats_fn,
)
from jaxfl.tasks.classification import Classification

CLASSIFICATION = Classification()

__all__ = [
    "CLASSIFICATION",
    "Classification",
    "StatsFn",
    "Task",
    "batched_stats",
    "client_summaries",
    "evaluate_clients",
    "evaluate_split",
    "make_loss",
    "make_stats_fn",
]
