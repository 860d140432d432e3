"""End to end: the debug config trains, learns and writes metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from configs import debug
from jaxfl.train import train_and_evaluate

REQUIRED = {"round", "train_loss", "test_accuracy", "test_auc", "test_loss", "wall_time_s"}


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    config = debug.get_config()
    workdir = tmp_path_factory.mktemp("debug")
    return train_and_evaluate(config, workdir), workdir, config


def test_fedavg_learns_synthetic_task(debug_run):
    final, _, _ = debug_run
    assert final["test_accuracy"] > 0.9
    assert final["test_auc"] > 0.95


def test_metrics_jsonl_has_one_line_per_round(debug_run):
    _, workdir, config = debug_run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(1, config.rounds + 1))
    for m in lines:
        assert m.keys() >= REQUIRED
        assert len(m["heldout_accuracy"]) == config.num_clients
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert json.loads((workdir / "config.json").read_text())["num_clients"] == config.num_clients
