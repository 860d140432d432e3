"""Named randomness helpers shared by local training and DP sampling."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.types import PRNGKey


def slot_uniforms(key: PRNGKey, n: int) -> jax.Array:
    """``[n]`` uniforms, slot ``i`` from ``fold_in(key, i)``: slot ``i``'s draw does not depend on
    ``n``, so the amount of padding never changes which real examples are drawn."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(n))


def os_key() -> PRNGKey:
    """A fresh JAX key whose 64 bits of key data come from the OS CSPRNG (``os.urandom``).

    Inside jit, draws are JAX's threefry counter-based generator under this key: the key, not
    the generator, is what a logged seed can no longer give away.
    """
    return jax.random.wrap_key_data(np.frombuffer(os.urandom(8), dtype=np.uint32).copy())
