"""Shared fixtures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from helpers import TinyMLP


@pytest.fixture
def tiny_model():
    return TinyMLP()


@pytest.fixture
def tiny_params(tiny_model):
    return tiny_model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
