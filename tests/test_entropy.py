"""OS-CSPRNG draws (jaxfl.secure.entropy): distribution checks with a seeded negative control."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from jaxfl.secure.entropy import OsRandom, os_normal, os_uniform


def test_uniform_is_uniform_in_the_unit_interval():
    u = os_uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    # Negative control: the test does reject a visibly non-uniform sample.
    assert stats.kstest(u**1.05, "uniform").pvalue < 1e-4


def test_normal_has_the_requested_moments():
    x = os_normal(100_001, 3.0)
    assert x.shape == (100_001,)
    assert abs(x.mean()) < 0.05 and abs(x.std() - 3.0) < 0.05
    assert stats.kstest(x / 3.0, "norm").pvalue > 1e-4
    assert stats.kstest(x / 2.7, "norm").pvalue < 1e-4  # wrong scale: rejected


def test_draws_are_never_repeated_or_seeded():
    a, b = os_uniform((4, 8)), os_uniform((4, 8))
    assert a.shape == (4, 8) and not np.array_equal(a, b)
    assert OsRandom().random((3,)).shape == (3,)


@pytest.mark.parametrize("size", [0, 1, 2, 7])
def test_normal_sizes(size):
    assert os_normal(size, 1.0).shape == (size,)
