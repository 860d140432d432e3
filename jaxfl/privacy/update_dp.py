"""Update-level DP: clip a client's whole model update; add Gaussian noise locally or centrally.

- ``local`` (the BloodMNIST paper's mode, done honestly): each client clips its update to L2
  norm ``C`` and adds ``N(0, std^2)`` itself before anything leaves the client, so it composes
  with secure aggregation and protects against the server.
- ``central`` (DP-FedAvg, McMahan et al. 2018): clients clip their updates, the server adds
  ``N(0, (z C)^2)`` to the SUM and divides by the expected number of clients (fixed
  denominator, so one client changes the sum by at most ``C``: user-level DP).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxfl.tree import tree_scale, tree_sq_norm
from jaxfl.types import Params, PRNGKey


class UpdateDP(NamedTuple):
    """Clip norm ``C`` and the Gaussian std applied to one update (local) or to the sum
    (central); ``expected_clients`` is the central mode's fixed denominator."""

    mode: str
    clip_norm: float
    noise_std: float
    expected_clients: float = 1.0


def clip_update(update: Params, clip_norm: float) -> tuple[Params, jax.Array]:
    """Scale ``update`` to global L2 norm at most ``clip_norm``; returns it and the old norm."""
    norm = jnp.sqrt(tree_sq_norm(update))
    return tree_scale(update, jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))), norm


def add_gaussian_noise(tree: Params, std: float | jax.Array, key: PRNGKey) -> Params:
    """``tree + N(0, std^2)`` independently per coordinate."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = [
        x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noised)
