"""Peak memory of one federated round on volumes: client data on the device vs streamed.

    python benchmarks/volume_memory.py --clients 3 --per-client 200 --size 70 --json out.json
    python benchmarks/volume_memory.py --clients 100 --per-client 20 --size 28

Writes ``clients x per-client`` random volumes of ``size^3`` (float32) to a memory-mapped
``.npy`` file (as jaxfl's volume cache holds them), then times one FedAvg round (after a
compiling warm-up round) of a tiny 3D DenseNet under ``config.placement = device`` (clients
stacked into RAM, then onto the device) and ``stream`` (clients read lazily from the file,
``chunk_size`` at a time), each in a fresh process. Reports the data size, peak RSS (on CPU
the device is the host, so this is both) and, on an accelerator, the device's peak bytes in
use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--per-client", type=int, default=200)
    p.add_argument("--size", type=int, default=70)
    p.add_argument("--chunk-size", type=int, default=1)
    p.add_argument("--placements", default="device,stream")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one placement
    p.add_argument("--scratch", default="", help=argparse.SUPPRESS)  # internal: the data file
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, placement: str) -> dict:
    """One placement in this process: build the data, run two rounds, report memory."""
    import jax
    import ml_collections

    from configs import debug
    from jaxfl import factories
    from jaxfl.data import stack_clients
    from jaxfl.runtime import peak_rss_mib
    from jaxfl.simulate import INIT_STREAM

    k, n, s = args.clients, args.per_client, args.size
    # The volumes go to a memory-mapped .npy file one client at a time, as jaxfl's volume cache
    # holds them; streamed runs read clients from it lazily, device runs stack them into RAM.
    rng = np.random.default_rng(0)
    path = Path(args.scratch) / "image.npy"
    image = np.lib.format.open_memmap(path, "w+", np.float32, (k * n, s, s, s, 1))
    for c in range(k):
        image[c * n : (c + 1) * n] = rng.uniform(-1, 1, (n, s, s, s, 1))
    image.flush()
    del image
    examples = {
        "image": np.load(path, mmap_mode="r"),
        "label": rng.integers(0, 2, k * n).astype(np.int32),
    }
    clients = [np.arange(c * n, (c + 1) * n) for c in range(k)]
    train = stack_clients(examples, clients, lazy=placement == "stream")
    config = debug.get_config()
    config.num_clients = k
    config.placement = placement
    config.chunk_size = args.chunk_size
    config.local.batch_size = 8
    config.local.epochs = 1
    config.model = ml_collections.ConfigDict(
        dict(name="densenet", growth_rate=4, block_config=(1, 1), init_features=8, stem_kernel=3)
    )
    model = factories.build_model(config, 2)
    runner, _ = factories.build_runner(
        config, factories.build_task(config), model, train, None, 0, None
    )
    key = jax.random.fold_in(jax.random.key(0), INIT_STREAM)
    state = runner.init(factories.init_params(model, train.examples["image"][0], key))
    state, _ = runner.run_round(state, 0)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, _ = runner.run_round(state, 1)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "placement": placement,
        "backend": runner.backend.description,
        "clients": k,
        "per_client": n,
        "size": s,
        "data_gib": train.examples["image"].nbytes / 2**30,
        "seconds_per_round": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "device_peak_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20,
        "platform": device.platform,
    }


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one:
        row = run_one(args, args.one)
        Path(args.json).write_text(json.dumps(row))
        return [row]
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    for placement in args.placements.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "row.json")
            cmd = [sys.executable, __file__, *argv, "--one", placement, "--json", out]
            cmd += ["--scratch", tmp]
            env = {**os.environ, "PYTHONPATH": root}
            subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
            rows.append(json.loads(Path(out).read_text()))
        r = rows[-1]
        print(
            f"{r['clients']:4d} x {r['per_client']:4d} x {r['size']}^3 ({r['data_gib']:.2f} GiB) "
            f"{placement:7s} {r['seconds_per_round']:7.1f} s/round  "
            f"peak RSS {r['peak_rss_mib']:7.0f} MiB  device peak {r['device_peak_mib']:.0f} MiB",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
