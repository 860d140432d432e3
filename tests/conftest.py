"""Shared fixtures."""

from __future__ import annotations

import jax

# Eight host devices (before anything starts JAX) so the multi-device paths run in every test
# that uses ``auto``, and shard_map can be checked on sub-meshes of 1, 2 and 8 devices.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from helpers import TinyMLP  # noqa: E402


@pytest.fixture
def tiny_model():
    return TinyMLP()


@pytest.fixture
def tiny_params(tiny_model):
    return tiny_model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
