"""Shared fixtures."""

from __future__ import annotations

import tempfile

import jax

# Eight host devices (before anything starts JAX) so the multi-device paths run in every test
# that uses ``auto``, and shard_map can be checked on sub-meshes of 1, 2 and 8 devices.
jax.config.update("jax_num_cpu_devices", 8)
# Many tests compile the same programs (the debug config's rounds, a tiny U-Net's step): a
# persistent compilation cache, fresh for each pytest run, compiles each of them once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxfl-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from helpers import TinyMLP  # noqa: E402


@pytest.fixture
def tiny_model():
    return TinyMLP()


@pytest.fixture
def tiny_params(tiny_model):
    return tiny_model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
