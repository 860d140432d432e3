"""Several processes on jax.distributed (localhost, XLA:CPU with gloo) give one process's result."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import debug
from jaxfl import distributed
from jaxfl.errors import ConfigError
from jaxfl.metrics import read_metrics
from jaxfl.sweep import apply_overrides
from jaxfl.validate import validate_config

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: every process compiles the round once. shard_map in both runs, so the one
# process differs only by its mesh (1 device vs 2 processes x 1).
SMALL = (
    "--config.num_clients=4",
    "--config.data.n_train=160",
    "--config.data.n_test=40",
    "--config.model.name=mlp",
    "--config.local.epochs=1",
    "--config.strategy=shard_map",
    "--config.eval_every=1",
)
COMPARED = ("train_loss", "test_loss", "test_accuracy", "heldout_accuracy_mean", "examples_seen")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, args: tuple[str, ...], processes: int) -> list[str]:
    """``experiments.run`` on the debug config as ``processes`` processes of one job (1: a plain
    run); each process sees one CPU device. Returns every process's log; fails the test with
    the logs of any that failed."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT), "JAXFL_CPU_DEVICES": "1"}
    base = [sys.executable, "-m", "experiments.run", "--config=configs/debug.py"]
    command = [*base, f"--workdir={workdir}", *SMALL, *args]
    cmds = distributed.localhost_commands(command, processes, _free_port())
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in cmds
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process of {cmds[0]} did not finish in 300 s")
    failed = [o[-3000:] for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
    assert not failed, "\n\n".join(failed)
    return outs


def _assert_same_rounds(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [m["round"] for m in ma] == [m["round"] for m in mb]
    for x, y in zip(ma, mb, strict=True):
        for key in COMPARED:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, err_msg=f"{key}, round {x}")


def test_two_processes_give_the_result_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, ("--config.rounds=2",), 1)
    outs = _launch(two, ("--config.rounds=2",), 2)
    assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
    assert "shard_map over 2 cpu devices" in outs[0]
    _assert_same_rounds(one, two)
    # Process 0 alone writes the workdir's files: one line per round, not one per process.
    assert len(read_metrics(two / "metrics.jsonl")) == 2


@pytest.mark.slow
def test_stateful_clients_on_two_processes_resume_from_one_process_checkpoint(tmp_path):
    # SCAFFOLD's control variates are sharded over both processes' devices; the checkpoint a
    # single process wrote after round 2 resumes on two processes, and vice versa. 5 clients:
    # one device holds 5 rows, two hold 6 (padded), and the checkpoint neither.
    args = (
        "--config.algorithm.name=scaffold",
        "--config.local.optimizer=sgd",
        "--config.num_clients=5",
    )
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    _launch(one, (*args, "--config.rounds=4"), 1)
    _launch(mixed, (*args, "--config.rounds=2"), 1)
    _launch(mixed, (*args, "--config.rounds=3"), 2)
    _launch(mixed, (*args, "--config.rounds=4"), 1)
    _assert_same_rounds(one, mixed)


@pytest.mark.slow
def test_secure_aggregation_and_os_randomness_agree_across_processes(tmp_path):
    # SecAgg+ masks and the OS CSPRNG's draws come from process 0, so the processes hold one
    # model: both report the same metrics (and the run finishes: no process waits forever).
    outs = _launch(
        tmp_path / "two",
        (
            "--config.rounds=2",
            "--config.secure.aggregator=secagg",
            "--config.secure_randomness=True",
        ),
        2,
    )
    finals = [
        ast.literal_eval(line.split("final: ", 1)[1])
        for out in outs
        for line in out.splitlines()
        if "final: " in line
    ]
    assert len(finals) == 2 and finals[0]["secure_survivors"] == 4
    for final in finals:  # each process's own clock
        del final["round_time_s"], final["wall_time_s"]
    assert finals[0] == finals[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy": "loop"}, "use strategy 'shard_map'"),
        ({"distributed.num_processes": -1}, "num_processes=-1"),
        ({"distributed.num_processes": 2, "distributed.process_id": 2}, "must be below"),
        ({"distributed.coordinator_address": "localhost"}, "'HOST:PORT'"),
    ],
)
def test_distributed_config_errors_name_the_field(overrides, message):
    config = apply_overrides(debug.get_config(), {"distributed.enabled": True, **overrides})
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_one_process_is_the_identity():
    # No jax.distributed here: the helpers leave values alone and run on this process.
    assert not distributed.multi_process() and distributed.is_primary()
    assert distributed.from_primary(lambda x: x + 1, 1) == 2
    tree = {"a": np.ones(3)}
    assert distributed.to_global(tree) is tree
    distributed.barrier("no-op")
