"""Small pytree helpers used by algorithms and the simulator."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``."""
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a: PyTree, s: jax.Array | float) -> PyTree:
    """Leafwise ``s * a`` for a scalar ``s``."""
    return jax.tree.map(lambda x: x * s, a)


def tree_sq_norm(a: PyTree) -> jax.Array:
    """Squared global L2 norm over all leaves."""
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product ``<a, b>`` over all leaves."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
