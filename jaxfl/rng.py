"""Named randomness helpers shared by local training and DP sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfl.types import PRNGKey


def slot_uniforms(key: PRNGKey, n: int) -> jax.Array:
    """``[n]`` uniforms, slot ``i`` from ``fold_in(key, i)``: slot ``i``'s draw does not depend on
    ``n``, so the amount of padding never changes which real examples are drawn."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(n))
