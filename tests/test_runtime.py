"""Process tuning is opt-out and reports whether it applied."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxfl.runtime import NO_TUNING_ENV, tune_cpu_malloc


def test_opt_out_env_skips_tuning(monkeypatch):
    monkeypatch.setenv(NO_TUNING_ENV, "1")
    assert tune_cpu_malloc.__wrapped__() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applies_on_glibc(monkeypatch):
    monkeypatch.delenv(NO_TUNING_ENV, raising=False)
    assert tune_cpu_malloc.__wrapped__() is True


def test_import_raises_xla_collective_timeouts_unless_the_user_set_them():
    code = (
        "import jaxfl, os, jax; jax.numpy.ones(1).block_until_ready(); "
        "print(os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=604800" in out.stdout
    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "XLA_FLAGS": mine}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.count("terminate_timeout") == 1 and mine in out.stdout
