"""Draws from the operating system's CSPRNG (``os.urandom``) for host-side privacy randomness.

Used where a seeded generator would let anyone holding the logged seed recompute a draw: the
CKKS ring's mask ``R`` (always) and, with ``config.secure_randomness``, SecAgg+ stochastic
rounding and Poisson client sampling. Nothing here is seeded, logged or reproducible.
"""

from __future__ import annotations

import os

import numpy as np

_MANTISSA = 53


def os_uniform(shape: int | tuple[int, ...]) -> np.ndarray:
    """Uniform float64 in ``[0, 1)`` of ``shape``, 53 random bits each, from ``os.urandom``."""
    n = int(np.prod(shape))
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - _MANTISSA)
    return (words.astype(np.float64) * 2.0**-_MANTISSA).reshape(shape)


def os_normal(size: int, sigma: float) -> np.ndarray:
    """``[size]`` float64 draws of ``N(0, sigma^2)`` (Box–Muller on :func:`os_uniform`)."""
    half = -(-size // 2)
    u1, u2 = 1.0 - os_uniform(half), os_uniform(half)  # u1 in (0, 1]: log is finite
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return (sigma * np.concatenate([radius * np.cos(angle), radius * np.sin(angle)]))[:size]


class OsRandom:
    """The part of ``numpy.random.Generator`` that :func:`jaxfl.secure.quantize.quantize` uses,
    drawing from ``os.urandom``."""

    def random(self, shape: int | tuple[int, ...]) -> np.ndarray:
        return os_uniform(shape)
