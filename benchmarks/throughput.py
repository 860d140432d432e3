"""Client-execution throughput: the engine's strategies vs a Python loop vs one big batch.

Every row does the same work: one FedAvg round of ``K`` clients, each running ``E`` local SGD
steps on a batch of ``B`` examples (``--model``, SmallCNN by default, on ``28x28x3`` inputs, 8
classes). Each client gets
exactly ``B`` real examples and ``epochs = E``, so ``local_train`` takes exactly ``E`` steps.

Run (from the repository root)::

    python benchmarks/throughput.py --clients 8,64,512 --json out.json
    python benchmarks/throughput.py --clients 64 --strategies loop,loop_baseline --repeats 5
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python benchmarks/throughput.py --clients 64

Rows (``strategy``):

- ``vmap`` / ``chunked`` / ``scan`` / ``loop`` / ``shard_map``: ``Simulator.run_round`` with
  that client-execution strategy (``chunked`` uses ``--chunk-size``; ``shard_map`` uses every
  visible device: set ``JAX_NUM_CPU_DEVICES`` for a CPU count other than one per core);
- ``auto``: ``Simulator.run_round`` with ``strategy="auto"``; ``resolved`` says what it became
  on this backend;
- ``loop_baseline``: how fedjax / Flower simulation run clients: a Python loop calling
  ``jax.jit(algorithm.client_update)`` on per-client arrays sliced before timing, collecting the
  updates, then a jitted weighted mean and server update;
- ``single_batch_limit``: ``E`` SGD steps on ONE batch of ``K*B`` examples (``client_update``
  with batch size ``K*B``): what the hardware does with that many examples at once, the
  reference that vectorizing clients tries to approach.

Metric: ``updates_per_s`` = client-steps per second = ``K*E / median seconds per round``, after
a warm-up round (compilation) and ``--repeats`` timed rounds, each synchronised with
``block_until_ready``. ``ratio_vs_loop`` divides by the ``loop_baseline`` row of the same ``K``;
``fraction_of_limit`` by the ``single_batch_limit`` row (a limit counts ``K*E`` client-steps
too). By default every row runs in its own subprocess, so ``peak_rss_mb`` is that row's peak
resident memory, and a row that exceeds ``--row-timeout`` or ``--row-memory-mb`` is killed and
recorded with an ``error`` instead of stopping the benchmark. On a shared, noisy machine use
``--interleave`` (all rows of a ``K`` in one process, their timed rounds alternated) for A/B
comparisons. Every row, baselines included, runs with :func:`jaxfl.runtime.tune_cpu_malloc`
(the allocator setting the engine's ``loop`` strategy applies); ``--no-mallopt`` turns it off.

On XLA:CPU, ``single_batch_limit`` is not a ceiling: one large batch falls out of cache and is
slower per example than many batches of ``B``, so ``fraction_of_limit`` can exceed 1.
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
from collections.abc import Callable
from typing import Any

from jaxfl.runtime import NO_TUNING_ENV, peak_rss_mib, tune_cpu_malloc

ENGINE_STRATEGIES = ("vmap", "chunked", "scan", "loop", "shard_map", "auto")
BASELINE, LIMIT = "loop_baseline", "single_batch_limit"
ALL_ROWS = (*ENGINE_STRATEGIES, BASELINE, LIMIT)
# Rows needed to fill ratio fields are run first for each client count.
ROW_ORDER = (BASELINE, LIMIT, "auto", "loop", "scan", "shard_map", "chunked", "vmap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="8,64,512", help="comma-separated client counts K")
    p.add_argument("--strategies", default=",".join(ALL_ROWS), help="rows to run (comma list)")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size B")
    p.add_argument("--local-steps", type=int, default=1, help="local steps E per client")
    p.add_argument("--chunk-size", type=int, default=64, help="clients per chunk (chunked)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--model", default="cnn", help="model name in jaxfl.models (cnn, dpresnet)")
    p.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per row (median)")
    p.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row (isolated)")
    p.add_argument("--row-memory-mb", type=float, default=None, help="kill a row above this RSS")
    p.add_argument("--no-isolate", action="store_true", help="run rows in this process")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="run all rows of a K in this process, alternating their timed rounds",
    )
    p.add_argument(
        "--no-mallopt",
        dest="mallopt",
        action="store_false",
        help="skip jaxfl.runtime.tune_cpu_malloc in every row (by default all rows, baselines "
        "included, get the allocator setting the engine's loop strategy applies)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: "K:strategy"
    args = p.parse_args(argv)
    args.client_counts = [int(k) for k in args.clients.split(",") if k]
    args.rows = [s for s in args.strategies.split(",") if s]
    unknown = set(args.rows) - set(ALL_ROWS)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; choose from {ALL_ROWS}")
    return args


# --------------------------------------------------------------------------- workload


def make_workload(args: argparse.Namespace, num_clients: int, batch_size: int | None = None):
    """``--model``, FedAvg with local SGD, initial server state and ``num_clients`` client arrays.

    Every client holds exactly ``batch_size`` (default ``B``) random examples, no padding. At
    most 256 clients' worth of examples is drawn and then tiled: drawing 10,000 clients' images
    would take longer than the rounds being timed, and the values do not affect the work done.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxfl.algorithms import classification_loss, fedavg
    from jaxfl.models import get_model
    from jaxfl.types import ClientArrays

    b = batch_size or args.batch_size
    model = get_model(args.model, args.num_classes)
    shape = (args.image_size, args.image_size, args.channels)
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, *shape)))["params"]
    algorithm = fedavg(
        classification_loss(model.apply),
        optax.sgd(args.lr),
        optax.sgd(1.0),
        batch_size=b,
        epochs=args.local_steps,
    )
    rng = np.random.default_rng(args.seed)
    drawn = min(num_clients, 256)
    reps = -(-num_clients // drawn)
    images = rng.standard_normal((drawn, b, *shape), dtype=np.float32)
    labels = rng.integers(0, args.num_classes, size=(drawn, b)).astype(np.int32)
    arrays = ClientArrays(
        {
            "image": np.tile(images, (reps,) + (1,) * (images.ndim - 1))[:num_clients],
            "label": np.tile(labels, (reps, 1))[:num_clients],
        },
        np.ones((num_clients, b), np.float32),
        np.full((num_clients,), b, np.int32),
    )
    return algorithm, algorithm.init(params), arrays


def engine_round_fn(args, num_clients: int, strategy: str) -> tuple[Callable[[int], Any], dict]:
    """A round of ``Simulator.run_round`` with ``strategy``; extra row fields."""
    import jax

    from jaxfl.simulate import Simulator

    algorithm, state, arrays = make_workload(args, num_clients)
    sim = Simulator(
        algorithm, arrays, seed=args.seed, strategy=strategy, chunk_size=args.chunk_size
    )

    def run(r: int):
        new_state, metrics = sim.run_round(state, r)
        jax.block_until_ready(new_state)
        return metrics

    extra = {"resolved": sim.strategy, "devices": len(getattr(sim.backend, "devices", [None]))}
    if sim.strategy == "chunked":
        extra["chunk_size"] = args.chunk_size
    return run, extra


def baseline_round_fn(args, num_clients: int) -> tuple[Callable[[int], Any], dict]:
    """fedjax/Flower-style round: Python loop over a jitted ``client_update`` on pre-sliced data."""
    import jax
    import jax.numpy as jnp

    from jaxfl.simulate import CLIENT_STREAM, client_key
    from jaxfl.tree import tree_scale

    algorithm, state, arrays = make_workload(args, num_clients)
    # One batched transfer of the pre-sliced clients (K separate device_puts are slow at 10k).
    clients = jax.device_put([arrays.client(c) for c in range(num_clients)])
    stream = jax.random.fold_in(jax.random.key(args.seed), CLIENT_STREAM)
    client_update = jax.jit(algorithm.client_update)
    broadcast = jax.jit(algorithm.broadcast)

    @jax.jit
    def aggregate(state, updates, weights):
        weights = jnp.stack(weights)
        stacked = jax.tree.map(lambda *u: jnp.stack(u), *updates)
        total = jax.tree.map(lambda u: jnp.tensordot(weights, u, axes=1), stacked)
        mean = tree_scale(total, 1.0 / jnp.maximum(jnp.sum(weights), 1e-12))
        return algorithm.server_update(state, mean)

    def run(r: int):
        keys = [client_key(stream, jnp.int32(r), jnp.int32(c)) for c in range(num_clients)]
        jax.block_until_ready(keys)  # key derivation is not client work; keep it out of timing
        t0 = time.perf_counter()
        b = broadcast(state)
        outs = [client_update(b, data, k) for data, k in zip(clients, keys, strict=True)]
        new_state = aggregate(state, [o.update for o in outs], [o.weight for o in outs])
        jax.block_until_ready(new_state)
        return time.perf_counter() - t0

    return run, {"resolved": BASELINE}


def limit_round_fn(args, num_clients: int) -> tuple[Callable[[int], Any], dict]:
    """``E`` SGD steps of ONE client holding all ``K*B`` examples as a single batch."""
    import jax

    kb = num_clients * args.batch_size
    algorithm, state, arrays = make_workload(args, 1, batch_size=kb)
    data = jax.device_put(arrays.client(0))
    client_update = jax.jit(algorithm.client_update)
    key = jax.random.key(args.seed)

    def run(r: int):
        out = client_update(state.params, data, key)
        jax.block_until_ready(out)

    return run, {"resolved": LIMIT, "limit_batch": kb}


def build_row(args, num_clients: int, strategy: str) -> tuple[Callable[[int], float], dict]:
    """Set up one row; returns ``timed(r) -> seconds for round r`` and extra row fields."""
    if strategy == BASELINE:
        run, extra = baseline_round_fn(args, num_clients)
    elif strategy == LIMIT:
        run, extra = limit_round_fn(args, num_clients)
    else:
        run, extra = engine_round_fn(args, num_clients, strategy)

    def timed(r: int) -> float:
        t0 = time.perf_counter()
        out = run(r)
        # The baseline times itself (it excludes host-side key derivation).
        return out if isinstance(out, float) else time.perf_counter() - t0

    return timed, extra


def row_result(args, num_clients: int, strategy: str, times: list[float], first: float) -> dict:
    import jax

    seconds = statistics.median(times)
    return {
        "clients": num_clients,
        "strategy": strategy,
        "updates_per_s": num_clients * args.local_steps / seconds,
        "seconds_per_round": seconds,
        "first_round_s": first,
        "repeats_done": len(times),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "peak_rss_mb": peak_rss_mib(),
    }


def time_row(args, num_clients: int, strategy: str, budget_s: float) -> dict:
    """Warm up (compile) then time up to ``--repeats`` rounds, staying within ``budget_s``."""
    t_start = time.perf_counter()
    timed, extra = build_row(args, num_clients, strategy)
    first = timed(0)
    times = []
    for r in range(1, args.repeats + 1):
        times.append(timed(r))
        remaining = budget_s - (time.perf_counter() - t_start)
        if remaining < times[-1] * 1.2:
            break
    return {**row_result(args, num_clients, strategy, times, first), **extra}


def time_rows_interleaved(args, num_clients: int, strategies: list[str]) -> list[dict]:
    """All rows of one ``K`` in this process, their timed rounds alternated (fair under load).

    ``peak_rss_mb`` is then the process's peak so far, not the row's own.
    """
    built, rows = {}, {}
    for s in strategies:
        try:
            timed, extra = build_row(args, num_clients, s)
            built[s] = (timed, extra, timed(0), [])
        except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
            rows[s] = _error_row(num_clients, s, f"{type(e).__name__}: {e}")
    for r in range(1, args.repeats + 1):
        for timed, _, _, times in built.values():
            times.append(timed(r))
    for s, (_, extra, first, times) in built.items():
        rows[s] = {**row_result(args, num_clients, s, times, first), **extra, "interleaved": True}
    return [rows[s] for s in strategies]


def _error_row(num_clients: int, strategy: str, error: str, rss: float | None = None) -> dict:
    return {
        "clients": num_clients,
        "strategy": strategy,
        "updates_per_s": None,
        "error": error[:300],
        "peak_rss_mb": rss,
    }


# --------------------------------------------------------------------------- row isolation


def _read_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_row_isolated(argv: list[str], args, num_clients: int, strategy: str) -> dict:
    """Run one row in a subprocess; kill it past ``--row-timeout`` / ``--row-memory-mb``."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--row", f"{num_clients}:{strategy}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, max_rss, error = time.perf_counter(), 0.0, None
    while proc.poll() is None:
        rss = _read_rss_mb(proc.pid)
        max_rss = max(max_rss, rss or 0.0)
        if time.perf_counter() - t0 > args.row_timeout:
            error = f"timeout after {args.row_timeout:.0f}s"
        elif args.row_memory_mb and rss and rss > args.row_memory_mb:
            error = f"killed at {rss:.0f} MiB RSS > --row-memory-mb {args.row_memory_mb:.0f}"
        if error:
            proc.kill()
            break
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if error is None:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = stderr.strip().splitlines()[-1:] or [""]
        error = f"exit code {proc.returncode}: {tail[0][:300]}"
    return _error_row(num_clients, strategy, error, max_rss or None)


def run_row_inline(args, num_clients: int, strategy: str) -> dict:
    try:
        return time_row(args, num_clients, strategy, args.row_timeout)
    except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
        return _error_row(num_clients, strategy, f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- report


def add_ratios(rows: list[dict], key: Callable[[dict], Any] = lambda r: r["clients"]) -> None:
    """Fill ``loop_updates_per_s``, ``ratio_vs_loop`` and ``fraction_of_limit`` within each
    group of rows with the same ``key`` (by default the client count)."""
    by_k: dict[Any, dict[str, dict]] = {}
    for r in rows:
        by_k.setdefault(key(r), {})[r["strategy"]] = r
    for r in rows:
        same_k = by_k[key(r)]
        loop = (same_k.get(BASELINE) or {}).get("updates_per_s")
        limit = (same_k.get(LIMIT) or {}).get("updates_per_s")
        ups = r.get("updates_per_s")
        r["loop_updates_per_s"] = loop
        r["ratio_vs_loop"] = ups / loop if ups and loop else None
        r["fraction_of_limit"] = ups / limit if ups and limit else None


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'K':>5} {'strategy':<19} {'resolved':<14} {'steps/s':>9} {'vs loop':>8} "
        f"{'of limit':>8} {'s/round':>8} {'1st(s)':>7} {'RSS MiB':>8}  error"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['clients']:>5} {r['strategy']:<19} {r.get('resolved', '-'):<14} "
            f"{_fmt(r.get('updates_per_s'), '9.1f')} {_fmt(r.get('ratio_vs_loop'), '8.2f')} "
            f"{_fmt(r.get('fraction_of_limit'), '8.2f')} "
            f"{_fmt(r.get('seconds_per_round'), '8.3f')} {_fmt(r.get('first_round_s'), '7.1f')} "
            f"{_fmt(r.get('peak_rss_mb'), '8.0f')}  {r.get('error', '')}"
        )


def config_fields(args) -> dict:
    return {
        "batch_size": args.batch_size,
        "local_steps": args.local_steps,
        "chunk_size_flag": args.chunk_size,
        "image_shape": [args.image_size, args.image_size, args.channels],
        "num_classes": args.num_classes,
        "model": args.model,
        "repeats": args.repeats,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mallopt": args.mallopt,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.mallopt:
        os.environ[NO_TUNING_ENV] = "1"  # also stops the Simulator from applying it
    elif not tune_cpu_malloc():
        print("glibc mallopt unavailable; running without it", file=sys.stderr)
    if args.row:  # internal: one isolated row, printed as one JSON line
        k, strategy = args.row.split(":")
        print(json.dumps(time_row(args, int(k), strategy, args.row_timeout)))
        return []
    rows = []
    for k in args.client_counts:
        strategies = [s for s in ROW_ORDER if s in args.rows]
        if args.interleave:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            for row in time_rows_interleaved(args, k, strategies):
                rows.append({**row, **config_fields(args), "load_avg_1m": load})
            continue
        for strategy in strategies:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            if args.no_isolate:
                row = run_row_inline(args, k, strategy)
            else:
                row = run_row_isolated(argv, args, k, strategy)
            row.update(config_fields(args), load_avg_1m=load)
            rows.append(row)
            ups = row.get("updates_per_s")
            print(
                f"[K={k} {strategy}] {_fmt(ups, '.1f')} client-steps/s "
                f"(load {_fmt(load, '.2f')}) {row.get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
    add_ratios(rows)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
