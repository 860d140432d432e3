"""Host-side secure aggregation cost: seconds and bytes per client for each aggregator.

Each row runs rounds of ``K`` clients through one aggregator of ``jaxfl.secure``: random float32
updates (``N(0, 0.01)``, ``D`` parameters) with unequal weights in, the weighted mean out.
``plain`` is the float64 weighted mean computed by numpy on the host (what the in-jit mean
does); its ``server_s`` is that computation. Sizes default to 1e5, 1e6 and DPResNet's 4,802,120
parameters.

    python benchmarks/secure_agg.py --json out.json
    python benchmarks/secure_agg.py --sizes 100000 --aggregators secagg,ckks --clients 4

Per row: ``client_s`` mean seconds per client per round (SecAgg+: quantize, keys, shares,
masks; CKKS: encrypt; ring: the client's hop, the initiator's share included), ``server_s``
(SecAgg+: summing and unmasking; CKKS: adding and serializing the encrypted sum; ring: 0, the
server only relays), ``decrypt_s`` (CKKS: the key holder, once per round), ``round_s`` (wall
seconds of the whole host step; for the ring the hops are sequential),
``bytes_per_client`` (mean bytes a client sends) vs ``plain_bytes_per_client`` (4 D),
``s_per_mparam_per_client`` = ``(client_s + server_s / K + decrypt_s) / (D / 1e6)`` (decrypt
counted in full for every client, a conservative reading of "encrypt + aggregate + decrypt
per client"), ``max_abs_error`` of the mean vs the float64 weighted mean, and
``peak_rss_mib``: every row runs in its own subprocess, so this is that row's peak resident
memory (the ``[K, D]`` float32 inputs included). Timings are medians over ``--repeats``
rounds (round index varies), the error is the worst over them.

JSON: a list of ``{aggregator, params, clients, client_s, server_s, bytes_per_client,
plain_bytes_per_client, ...}`` with the extras above plus ``expansion`` (bytes / plain bytes),
the settings and ``load_avg_1m`` (other processes share these CPUs; noisy when it is high).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from jaxfl.runtime import peak_rss_mib
from jaxfl.secure import AGGREGATORS, make_host_aggregator

DPRESNET_PARAMS = 4_802_120


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=f"100000,1000000,{DPRESNET_PARAMS}")
    p.add_argument("--aggregators", default=",".join(AGGREGATORS))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="rounds per row (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: "aggregator:size"
    args = p.parse_args(argv)
    args.size_list = [int(s) for s in args.sizes.split(",")]
    args.aggregator_list = args.aggregators.split(",")
    unknown = sorted(set(args.aggregator_list) - set(AGGREGATORS))
    if unknown:
        p.error(f"unknown aggregators {unknown}; choose from {AGGREGATORS}")
    return args


def run_row(args: argparse.Namespace, name: str, size: int) -> dict:
    """Time ``--repeats`` rounds of aggregator ``name`` on ``[K, size]`` updates."""
    K = args.clients
    rng = np.random.default_rng(args.seed)
    updates = rng.normal(0.0, 0.01, (K, size)).astype(np.float32)
    weights = rng.integers(50, 500, K).astype(np.float64)
    expected = (weights[:, None] * updates.astype(np.float64)).sum(0) / weights.sum()
    aggregator = make_host_aggregator(name, seed=args.seed)
    rounds, error = [], 0.0
    for r in range(args.repeats):
        if aggregator is None:
            start = time.perf_counter()
            mean = (weights[:, None] * updates).sum(0) / weights.sum()
            elapsed = time.perf_counter() - start
            stats = {
                "client_s": 0.0,
                "server_s": elapsed,
                "round_s": elapsed,
                "bytes_per_client": 4.0 * size,
                "plain_bytes_per_client": 4.0 * size,
            }
        else:
            mean, _, stats = aggregator.aggregate(updates, weights, r)
        error = max(error, float(np.abs(mean - expected).max()))
        rounds.append(stats)
    row = {key: statistics.median(s[key] for s in rounds) for key in rounds[0]}
    row.setdefault("decrypt_s", 0.0)
    row.update(
        aggregator=name,
        params=size,
        clients=K,
        expansion=row["bytes_per_client"] / row["plain_bytes_per_client"],
        s_per_mparam_per_client=(
            (row["client_s"] + row["server_s"] / K + row["decrypt_s"]) / (size / 1e6)
        ),
        max_abs_error=error,
        peak_rss_mib=peak_rss_mib(),
        repeats=args.repeats,
    )
    return row


def run_row_isolated(argv: list[str], name: str, size: int) -> dict:
    """Run one row in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--row", f"{name}:{size}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"aggregator": name, "params": size, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'aggregator':<10} {'params':>9} {'K':>3} {'client s':>9} {'server s':>9} "
        f"{'decrypt s':>9} {'round s':>8} {'MB/client':>9} {'x plain':>7} {'s/M/client':>10} "
        f"{'max err':>8} {'RSS MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['aggregator']:<10} {r['params']:>9} error: {r['error']}")
            continue
        print(
            f"{r['aggregator']:<10} {r['params']:>9} {r['clients']:>3} {r['client_s']:>9.3f} "
            f"{r['server_s']:>9.3f} {r['decrypt_s']:>9.3f} {r['round_s']:>8.2f} "
            f"{r['bytes_per_client'] / 1e6:>9.2f} {r['expansion']:>7.2f} "
            f"{r['s_per_mparam_per_client']:>10.3f} {r['max_abs_error']:>8.1e} "
            f"{r['peak_rss_mib']:>8.0f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.row:  # internal: one isolated row, printed as one JSON line
        name, size = args.row.split(":")
        print(json.dumps(run_row(args, name, int(size))))
        return []
    rows = []
    for size in args.size_list:
        for name in args.aggregator_list:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            row = run_row_isolated(argv, name, size)
            row.update(load_avg_1m=load, cpu_count=os.cpu_count(), host=platform.node())
            rows.append(row)
            print(f"[{name} D={size}] done (load {load})", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
