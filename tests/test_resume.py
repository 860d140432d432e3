"""Checkpoint/resume: a killed run, re-run, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from configs import debug
from jaxfl.checkpoint import ConfigMismatchError
from jaxfl.metrics import read_metrics
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "rounds": 5,
    "checkpoint_every": 1,
    "num_clients": 4,
    "data.n_train": 240,
    "data.n_test": 100,
    "local.epochs": 1,
}


def _config():
    return apply_overrides(debug.get_config(), SMALL)


def _command(workdir: Path) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
    return [sys.executable, "-m", "experiments.run", "--config=configs/debug.py",
            f"--workdir={workdir}", *flags]  # fmt: skip


def _without_times(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.endswith("_time_s")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    train_and_evaluate(_config(), workdir)
    return read_metrics(workdir / "metrics.jsonl")


def test_killed_run_resumes_to_identical_metrics(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    # The same device count as this process (conftest.py): shard_map's float summation order
    # follows the mesh, and the metrics must match bit for bit.
    env = {**os.environ, "CI": "1", "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
    proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    metrics_path = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_metrics(metrics_path)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(metrics_path))
    assert 2 <= killed_at < SMALL["rounds"]

    done = subprocess.run(_command(workdir), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming" in done.stderr
    resumed = read_metrics(metrics_path)
    assert [m["round"] for m in resumed] == list(range(1, SMALL["rounds"] + 1))
    assert [_without_times(m) for m in resumed] == [_without_times(m) for m in uninterrupted]


def test_finished_run_can_be_extended(tmp_path, uninterrupted):
    config = _config()
    config.rounds = 3
    train_and_evaluate(config, tmp_path)
    config.rounds = 5
    final = train_and_evaluate(config, tmp_path)
    assert _without_times(final) == _without_times(uninterrupted[-1])


def test_different_config_refuses_to_resume(tmp_path):
    config = _config()
    config.rounds = 1
    train_and_evaluate(config, tmp_path)
    config.local.learning_rate = 0.5
    with pytest.raises(ConfigMismatchError, match="local.learning_rate: 0.003 -> 0.5"):
        train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["local"]["learning_rate"] == 0.003
