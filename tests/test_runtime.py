"""Process tuning is opt-out and reports whether it applied."""

from __future__ import annotations

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
