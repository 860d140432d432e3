"""The accelerator benchmark suite's CPU dry run, row isolation and resume (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def run_suite(out: Path, *flags: str, inject: dict | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if inject:
        env["JAXFL_GPU_SUITE_INJECT"] = json.dumps(inject)
    cmd = [sys.executable, str(SUITE), "--preset", "cpu-dry", "--out", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text())


@pytest.mark.slow  # ~55 s; run it (pytest -m slow tests/test_gpu_suite.py) before any GPU call
def test_cpu_dry_run_measures_every_row_kind(tmp_path):
    report = run_suite(tmp_path)
    rows = {r["id"]: r for r in report["rows"]}
    assert [r for r in report["rows"] if r["error"]] == []
    assert {r["section"] for r in report["rows"]} == {
        "throughput",
        "throughput_e4",
        "dpresnet",
        "dp_overhead",
        "perfedavg",
        "many_clients",
        "multi_process",
    }
    env = report["environment"]
    assert env["backend"] == "cpu" and env["jax_version"] and env["device"]
    # jaxfl exposes one XLA:CPU device per core: auto shards clients when there are several.
    assert env["auto_strategy"] == ("shard_map" if env["device_count"] > 1 else "loop")
    assert rows["throughput/cnn/K=4/E=1/shard_map"]["updates_per_s"] > 0
    for r in report["rows"]:
        for key in ("updates_per_s", "ratio_vs_loop", "fraction_of_limit"):
            assert key in r
        assert r["peak_device_memory_mb"] is None  # XLA:CPU reports no memory statistics
        if r["kind"] != "multi_process":  # timed as s/round against one process
            assert r["updates_per_s"] > 0
    many = rows["many_clients/cnn/K=8/stream_auto_chunk"]
    assert 1 <= many["chunk"] <= 8 and many["peak_rss_mib"] > 0 and "streaming" in many["backend"]
    multi = rows["multi_process/cnn/K=4/2_processes_cpu"]
    assert multi["same_results"] and multi["seconds_per_round"] > 0
    base = rows["throughput/cnn/K=4/E=1/loop_baseline"]
    vmap = rows["throughput/cnn/K=4/E=1/vmap"]
    limit = rows["throughput/cnn/K=4/E=1/single_batch_limit"]
    assert base["ratio_vs_loop"] == 1.0
    assert abs(vmap["ratio_vs_loop"] - vmap["updates_per_s"] / base["updates_per_s"]) < 1e-9
    assert abs(vmap["fraction_of_limit"] - vmap["updates_per_s"] / limit["updates_per_s"]) < 1e-9
    assert rows["throughput_e4/cnn/K=2/E=4/loop"]["local_steps"] == 4
    dp = rows["dp_overhead/cnn/K=2/vmap"]
    assert dp["per_example"] == "vmap" and dp["overhead"] > 0
    assert {f["fastest"] for f in report["fastest"]} <= {"vmap", "chunked", "loop", "shard_map"}
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| throughput | cnn | 4 | 1 | vmap |" in md
    assert f"auto` resolves to `{env['auto_strategy']}`" in md


@pytest.mark.slow  # 30 s of worker restarts and a deliberate timeout; run with -m slow
def test_a_crashing_or_hanging_row_does_not_stop_the_suite(tmp_path):
    prefix = "throughput/cnn/K=2/E=1/"
    inject = {prefix + "loop": "crash", prefix + "chunked": "hang"}
    flags = ("--sections", "throughput", "--clients", "2", "--row-timeout-s", "12")
    report = run_suite(tmp_path, *flags, inject=inject)
    rows = {r["id"].removeprefix(prefix): r for r in report["rows"]}
    assert list(rows) == [
        "loop_baseline", "single_batch_limit", "loop", "chunked", "vmap", "shard_map"
    ]  # fmt: skip
    assert rows["loop"]["error"].startswith("worker exited with code 3")
    assert rows["chunked"]["error"] == "timeout after 12 s"
    for ok in ("loop_baseline", "single_batch_limit", "vmap"):
        assert rows[ok]["error"] is None and rows[ok]["updates_per_s"] > 0
    assert rows["vmap"]["ratio_vs_loop"] is not None

    # --resume keeps the measured rows; with no budget left the failed ones are marked skipped.
    again = run_suite(tmp_path, *flags, "--resume", "--budget-s", "0")
    rows2 = {r["id"].removeprefix(prefix): r for r in again["rows"]}
    assert rows2["vmap"]["updates_per_s"] == rows["vmap"]["updates_per_s"]
    assert rows2["loop"]["error"].startswith("skipped: suite budget spent")


def test_a_worker_that_cannot_start_fails_every_row_once(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "no_such_platform"}
    cmd = [sys.executable, str(SUITE), "--preset", "cpu-dry", "--out", str(tmp_path)]
    cmd += ["--sections", "perfedavg"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert len(rows) == 2
    assert all(r["error"].startswith("worker failed to start") for r in rows)
