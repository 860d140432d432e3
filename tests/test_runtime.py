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


def _import_jaxfl(env: dict, pre: str = "") -> subprocess.CompletedProcess:
    """Import jaxfl in a fresh interpreter with ``env``; prints XLA_FLAGS and the conv choice."""
    code = (
        f"{pre}import jaxfl, os, jax; from jaxfl import runtime; "
        "jax.numpy.ones(1).block_until_ready(); "
        "print(os.environ.get('XLA_FLAGS', '')); print(runtime.cpu_convolution_choice)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    return out


def test_import_raises_xla_collective_timeouts_unless_the_user_set_them():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = _import_jaxfl(env)
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=604800" in out.stdout
    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
    out = _import_jaxfl({**env, "XLA_FLAGS": mine})
    assert out.stdout.count("terminate_timeout") == 1 and mine in out.stdout


def test_import_keeps_convolutions_off_ynnpack_unless_told_otherwise():
    from jaxfl.runtime import KEEP_YNN_CONV_ENV, YNN_CONV_FLAG, YNN_FUSION_FLAG, _jaxlib_knows

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", KEEP_YNN_CONV_ENV)}
    known = _jaxlib_knows(YNN_FUSION_FLAG.encode(), b"INDIVIDUAL_CONVOLUTION")
    assert (YNN_CONV_FLAG in _import_jaxfl(env).stdout) is known
    # The user's own YNN setting wins, the opt-out keeps XLA's default, and a JAX that already
    # started its backends is left alone (the flag would be read too late to matter).
    mine = f"--{YNN_FUSION_FLAG}=-reduce" if known else ""
    out = _import_jaxfl({**env, "XLA_FLAGS": mine}).stdout
    assert YNN_CONV_FLAG not in out and ("set by the user" in out) is known
    out = _import_jaxfl({**env, KEEP_YNN_CONV_ENV: "1"}).stdout
    assert YNN_CONV_FLAG not in out and KEEP_YNN_CONV_ENV in out
    out = _import_jaxfl(env, pre="import jax; jax.numpy.ones(1); ").stdout
    assert YNN_CONV_FLAG not in out and "before jaxfl was imported" in out


def test_jaxlib_probe_finds_real_strings_only():
    from jaxfl.runtime import _jaxlib_knows

    assert _jaxlib_knows(b"xla_cpu_collective_call_terminate_timeout_seconds")
    assert not _jaxlib_knows(b"xla_cpu_no_such_flag_in_any_jaxlib_9f3a")
