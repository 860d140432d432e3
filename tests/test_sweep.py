"""Sweeps: parsing, grid, run names, overrides, summaries, and one tiny real resumable sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from configs import debug
from jaxfl.sweep import (
    apply_overrides,
    grid,
    parse_sweep,
    run_name,
    run_sweep,
    summarize,
    write_summary,
)


@pytest.fixture
def config():
    return debug.get_config()


def test_parse_sweep_types_and_alias(config):
    sweep = parse_sweep(
        [
            "num_clients=5,10",
            "algorithm=fedavg,fedprox",
            "local.learning_rate=0.1,1e-2",
            "data.image_shape=(28,28,1),(32,32,1)",
        ],
        config,
    )
    assert sweep == [
        ("num_clients", [5, 10]),
        ("algorithm", ["fedavg", "fedprox"]),
        ("local.learning_rate", [0.1, 0.01]),
        ("data.image_shape", [(28, 28, 1), (32, 32, 1)]),
    ]
    assert all(isinstance(v, int) for v in sweep[0][1])
    assert isinstance(sweep[2][1][0], float)


def test_parse_sweep_bool_and_float_from_int_text():
    import ml_collections

    config = ml_collections.ConfigDict({"flag": False, "lr": 0.1})
    assert parse_sweep(["flag=true,False", "lr=1"], config) == [
        ("flag", [True, False]),
        ("lr", [1.0]),
    ]


def test_quoted_strings_mean_the_string_inside_alone_or_in_a_tuple(config):
    """Regression: ('none','secagg') gave the protection "'none'", quotes and all."""
    out = apply_overrides(
        config, {"attack.protections": "('none', \"secagg\")", "algorithm.name": "'fedprox'"}
    )
    assert out.attack.protections == ("none", "secagg")
    assert out.algorithm.name == "fedprox"
    assert apply_overrides(config, {"attack.protections": "(none,ckks)"}).attack.protections == (
        "none",
        "ckks",
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo=1,2", r"no field 'foo'. Valid top-level fields: algorithm, attack, checkpoint_every"),
        ("local.lr=1", r"config.local has no field 'lr'.*learning_rate"),
        ("local=1", r"group of fields without a 'name'.*local.epochs"),
        ("num_clients=5,x", r"'x' is not an int"),
        ("num_clients", r"must look like KEY=VALUE1,VALUE2"),
        ("num_clients=5,,6", r"empty value"),
        ("num_clients=5,5", r"lists a value twice"),
    ],
)
def test_parse_sweep_errors(config, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep([spec], config)


def test_parse_sweep_rejects_a_field_swept_twice(config):
    with pytest.raises(ValueError, match="already swept"):
        parse_sweep(["algorithm=fedavg", "algorithm.name=fedprox"], config)


def test_grid_is_the_product_first_key_slowest():
    points = grid([("a", [1, 2]), ("b", ["x", "y", "z"])])
    assert len(points) == 6
    assert points[:2] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
    assert grid([]) == [{}]


def test_run_name_is_readable_and_safe():
    assert run_name({"num_clients": 5, "algorithm": "fedavg"}) == "num_clients=5__algorithm=fedavg"
    assert run_name({"local.learning_rate": 0.001}) == "local.learning_rate=0.001"
    assert run_name({"data.image_shape": (28, 28, 1)}) == "data.image_shape=28x28x1"
    assert run_name({"data.data_dir": "/a b/c"}) == "data.data_dir=-a-b-c"
    assert run_name({}) == "base"
    long = run_name({"data.data_dir": "x" * 500})
    assert len(long) <= 120 and long != run_name({"data.data_dir": "x" * 501})


def test_apply_overrides_copies(config):
    new = apply_overrides(config, {"algorithm": "fedprox", "num_clients": "3", "local.epochs": 1})
    assert (new.algorithm.name, new.num_clients, new.local.epochs) == ("fedprox", 3, 1)
    assert (config.algorithm.name, config.num_clients, config.local.epochs) == ("fedavg", 8, 2)
    with pytest.raises(ValueError, match="no field 'nope'"):
        apply_overrides(config, {"nope": 1})


def _fake_metrics(run_dir: Path, accuracies: list[float | None], rounds: int | None = None):
    """A run directory with one metrics line per round (None = round without evaluation)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for r, acc in enumerate(accuracies, 1):
        m = {"round": r, "train_loss": 1.0 / r, "wall_time_s": 2.0 * r}
        if acc is not None:
            m.update(test_accuracy=acc, test_auc=acc + 0.1, test_loss=1.0 - acc)
        lines.append(json.dumps(m) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    (run_dir / "config.json").write_text(json.dumps({"rounds": rounds or len(accuracies)}))


def test_summarize_fake_runs(tmp_path):
    _fake_metrics(tmp_path / "good", [0.5, None, 0.8, 0.7])
    _fake_metrics(tmp_path / "partial", [0.4], rounds=3)
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "sweep_run.json").write_text(
        json.dumps({"overrides": {"num_clients": 3}, "status": "failed", "error": "Boom: x\ny|z"})
    )
    rows = summarize(
        [tmp_path / "good", tmp_path / "partial", tmp_path / "failed", tmp_path / "gone"]
    )
    good, partial, failed, gone = rows
    assert good["status"] == "done" and good["rounds_done"] == 4
    assert good["final_test_accuracy"] == 0.7 and good["final_test_auc"] == pytest.approx(0.8)
    assert (good["best_test_accuracy"], good["best_round"]) == (0.8, 3)
    assert good["wall_time_s"] == 8.0
    assert (partial["status"], partial["rounds_done"]) == ("incomplete", 1)
    assert (failed["status"], failed["num_clients"], failed["error"]) == (
        "failed",
        3,
        "Boom: x\ny|z",
    )
    assert failed["final_test_accuracy"] is None
    assert (gone["status"], gone["rounds_done"]) == ("missing", 0)

    markdown = write_summary(rows, tmp_path)
    assert (tmp_path / "summary.md").read_text() == markdown
    lines = markdown.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| run | num_clients | status |")
    assert "Boom: x y\\|z" in markdown  # one line per row, pipes escaped
    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["good", "partial", "failed", "gone"]
    assert table[0]["final_test_accuracy"] == "0.7" and table[2]["error"] == "Boom: x\ny|z"


def test_summary_shows_personalized_accuracy_only_when_logged(tmp_path):
    _fake_metrics(tmp_path / "global", [0.5, 0.6])
    assert "personalized" not in write_summary(summarize([tmp_path / "global"]), tmp_path)
    run = tmp_path / "personal"
    _fake_metrics(run, [0.5, 0.6])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = {**json.loads(lines[-1]), "personalized_accuracy_mean": 0.9,
            "personalized_accuracy_std": 0.05}  # fmt: skip
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps(last) + "\n")
    rows = summarize([tmp_path / "global", run])
    assert rows[1]["final_personalized_accuracy_mean"] == 0.9
    assert rows[0]["final_personalized_accuracy_mean"] is None
    assert "final_personalized_accuracy_std" in write_summary(rows, tmp_path).splitlines()[0]


def _fake_train(calls: list[str], fail: str | None = None):
    """A train_fn that logs ``config.rounds`` rounds, or raises if the algorithm is ``fail``."""

    def train(config, workdir):
        calls.append(Path(workdir).name)
        if config.algorithm.name == fail:
            raise RuntimeError("diverged")
        _fake_metrics(Path(workdir), [0.5] * config.rounds)
        (Path(workdir) / "config.json").write_text(config.to_json_best_effort())

    return train


def test_failed_run_is_recorded_and_retried(config, tmp_path):
    config.rounds = 2
    specs = ["algorithm=fedavg,fedprox"]
    calls: list[str] = []
    rows = run_sweep(config, specs, tmp_path, train_fn=_fake_train(calls, fail="fedprox"))
    assert [(r["algorithm"], r["status"]) for r in rows] == [
        ("fedavg", "done"),
        ("fedprox", "failed"),
    ]
    assert rows[1]["error"] == "RuntimeError: diverged"
    assert "failed" in (tmp_path / "summary.md").read_text()

    # Re-running retries only the failed run; a longer sweep resumes the finished one.
    calls.clear()
    rows = run_sweep(config, specs, tmp_path, train_fn=_fake_train(calls))
    assert calls == ["algorithm=fedprox"]
    assert [r["status"] for r in rows] == ["skipped", "done"]
    assert rows[1]["error"] is None
    config.rounds = 3
    calls.clear()
    run_sweep(config, specs, tmp_path, train_fn=_fake_train(calls))
    assert calls == ["algorithm=fedavg", "algorithm=fedprox"]


def test_finished_run_with_another_config_is_not_reused(config, tmp_path):
    config.rounds = 1
    run_sweep(config, ["num_clients=2"], tmp_path, train_fn=_fake_train([]))
    config.seed = 1
    rows = run_sweep(config, ["num_clients=2"], tmp_path, train_fn=_fake_train([]))
    assert rows[0]["status"] == "failed" and "different config" in rows[0]["error"]


def test_tiny_real_sweep_and_resume(config, tmp_path):
    config.rounds = 1
    config.data.n_train = 160
    config.data.n_test = 64
    config.local.epochs = 1
    specs = ["num_clients=2,3"]
    rows = run_sweep(config, specs, tmp_path)
    assert [(r["run"], r["status"], r["rounds_done"]) for r in rows] == [
        ("num_clients=2", "done", 1),
        ("num_clients=3", "done", 1),
    ]
    assert all(0.0 <= r["final_test_accuracy"] <= 1.0 for r in rows)
    assert all(r["best_round"] == 1 and r["wall_time_s"] > 0 for r in rows)
    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["num_clients"], r["status"]) for r in table] == [("2", "done"), ("3", "done")]
    assert (tmp_path / "summary.md").read_text().count("| num_clients=") == 2

    metrics = [tmp_path / r["run"] / "metrics.jsonl" for r in rows]
    mtimes = [m.stat().st_mtime_ns for m in metrics]
    again = run_sweep(config, specs, tmp_path)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert [m.stat().st_mtime_ns for m in metrics] == mtimes
    assert [r["final_test_accuracy"] for r in again] == [r["final_test_accuracy"] for r in rows]
