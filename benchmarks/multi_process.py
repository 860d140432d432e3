"""One process vs several on jax.distributed, the same work on the same machine: s/round, results.

    python benchmarks/multi_process.py --json benchmarks/results/multi_process_cpu_2core.json

Runs ``experiments.run`` with ``configs/debug.py`` (small CNN, FedAvg) and ``--clients`` clients,
``--rounds`` rounds, three ways, one after another: one process with ``shard_map`` over
``--processes`` XLA:CPU devices (the single-process baseline of the same mesh), then
``--processes`` processes of one ``jax.distributed`` job with one device each (the same mesh,
its collectives now across processes over gloo), and one process with one device. Reports
the median ``round_time_s`` of the rounds after the first (which compiles), the ratio to the
single-process mesh (the issue's target: within 1.2x), and whether every round's metrics agree
to 1e-5. Set ``--platform`` to run on an accelerator's processes instead (one device each).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # jaxfl from this checkout, installed or not

from jaxfl.distributed import localhost_commands  # noqa: E402

COMPARED = ("train_loss", "test_loss", "test_accuracy", "examples_seen")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="the first one compiles; not timed")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--n-train", type=int, default=6400, help="examples over all clients")
    p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of every process")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--timeout-s", type=int, default=1200)
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, workdir: Path, processes: int, devices: int) -> float:
    """One run (``processes`` processes, ``devices`` devices each); returns its wall seconds."""
    env = {
        **os.environ,
        "CI": "1",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": args.platform,
        "JAXFL_CPU_DEVICES": str(devices),
    }
    base = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/debug.py",
        f"--workdir={workdir}",
        f"--config.num_clients={args.clients}",
        f"--config.data.n_train={args.n_train}",
        f"--config.rounds={args.rounds}",
        "--config.strategy=shard_map",
        "--config.checkpoint_every=0",
    ]
    cmds = localhost_commands(base, processes, _free_port())
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in cmds
    ]
    outs = [p.communicate(timeout=args.timeout_s)[0].decode() for p in procs]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode:
            raise SystemExit(f"run failed ({' '.join(cmds[0])}):\n{out[-3000:]}")
    return time.perf_counter() - start


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="jaxfl_multi_process_"))
    runs = [
        (f"1 process x {args.processes} devices", 1, args.processes),
        (f"{args.processes} processes x 1 device", args.processes, 1),
        ("1 process x 1 device", 1, 1),
    ]
    rows = []
    for name, processes, devices in runs:
        workdir = scratch / name.replace(" ", "_")
        wall = launch(args, workdir, processes, devices)
        m = metrics(workdir)
        timed = [r["round_time_s"] for r in m[1:]]
        rows.append(
            {
                "run": name,
                "processes": processes,
                "devices_per_process": devices,
                "clients": args.clients,
                "rounds_timed": len(timed),
                "round_s_median": float(np.median(timed)),
                "round_s": timed,
                "wall_s": wall,
                "metrics": [{k: r[k] for k in COMPARED} for r in m],
            }
        )
    base = rows[0]
    for row in rows:
        row["ratio_vs_one_process_mesh"] = row["round_s_median"] / base["round_s_median"]
        row["same_results"] = all(
            np.allclose([a[k] for k in COMPARED], [b[k] for k in COMPARED], rtol=1e-5)
            for a, b in zip(row["metrics"], base["metrics"], strict=True)
        )
    print(f"{'run':<28} {'s/round':>8} {'vs 1-process mesh':>18} {'same results':>13}")
    for row in rows:
        print(
            f"{row['run']:<28} {row['round_s_median']:>8.2f} "
            f"{row['ratio_vs_one_process_mesh']:>17.2f}x {str(row['same_results']):>13}"
        )
    if args.json:
        env = {"platform": args.platform, "cores": os.cpu_count(), "date": time.strftime("%F")}
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
