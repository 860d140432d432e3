"""FedAvg rounds over many clients streamed from a memory-mapped file: time and peak RSS vs K.

    python benchmarks/many_clients.py --clients 1000,10000 --clients-per-round 1000 \
        --json benchmarks/results/many_clients_cpu_2core.json

Writes ``max(K) x per-client`` random 28x28x3 float32 images to one memory-mapped ``.npy`` file
in pieces of ``--write-clients`` clients (10,000 x 100 is 9.4 GB: never held in RAM; kept in
``--scratch`` and reused by later runs), then, for every K, in a fresh process: the first K
clients' rows as lazy per-client views (:func:`jaxfl.data.stack_clients` with ``lazy=True``),
the small CNN, FedAvg with 1 local epoch, ``config.placement = "stream"`` and
``config.chunk_size = 0`` (chosen by :mod:`jaxfl.memory` under ``--memory-limit-gb``), built by
:func:`jaxfl.factories.build_runner` as a run of ``configs/debug.py`` would be. One warm-up
round (compiles), then ``--rounds`` timed rounds. Reports s/round, clients/s, peak RSS and the
chunk chosen; peak RSS at two K shows memory bounded by the chunk, not by K.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHANNELS = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="1000,10000", help="comma list of K")
    p.add_argument("--per-client", type=int, default=100, help="examples per client")
    p.add_argument("--clients-per-round", type=int, default=0, help="0 = all K")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=28, help="images are SIZE x SIZE x 3")
    p.add_argument("--memory-limit-gb", type=float, default=1.0, help="0 = half the device's")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "jaxfl_many_clients"))
    p.add_argument("--write-clients", type=int, default=100, help="clients per write")
    p.add_argument("--json", default=None)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: run one K
    p.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: its JSON row
    return p.parse_args(argv)


def image_shape(size: int) -> tuple[int, int, int]:
    return (size, size, CHANNELS)


def image_path(scratch: str, clients: int, per_client: int, size: int) -> Path:
    return Path(scratch) / f"image_{clients}x{per_client}x{size}.npy"


def write_images(path: Path, clients: int, per_client: int, size: int, piece: int = 100) -> float:
    """Random images ``[clients * per_client, size, size, 3]`` float32 into a ``.npy`` at
    ``path``, ``piece`` clients at a time with plain file writes (no mapping, so this process
    holds one piece); an existing file of that shape is kept. Returns the seconds spent writing."""
    rows = clients * per_client
    shape = image_shape(size)
    if path.exists():
        try:
            if np.load(path, mmap_mode="r").shape == (rows, *shape):
                return 0.0
        except ValueError:
            pass
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    header = np.lib.format.open_memmap(tmp, "w+", np.float32, (rows, *shape))
    del header  # the file now has its header and its full (sparse) size
    offset = np.load(tmp, mmap_mode="r").offset
    rng = np.random.default_rng(0)
    with open(tmp, "r+b") as f:
        f.seek(offset)
        for c in range(0, clients, piece):
            n = (min(c + piece, clients) - c) * per_client
            f.write(rng.random((n, *shape), dtype=np.float32).tobytes())
    tmp.rename(path)
    return time.perf_counter() - start


class _ChunkLog(logging.Handler):
    """Keeps jaxfl's log lines about the chunk it chose (what the JSON records as why)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "chunk" in msg.lower():
            self.lines.append(msg)


def run_one(args: argparse.Namespace, k: int) -> dict:
    """K clients in this process, read from the file of the largest K of ``args.clients``."""
    big = max(int(c) for c in args.clients.split(","))
    path = image_path(args.scratch, big, args.per_client, args.image_size)
    return measure(
        path,
        k,
        per_client=args.per_client,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        batch_size=args.batch_size,
        memory_limit_gb=args.memory_limit_gb,
        strategy=args.strategy,
    )


def measure(
    path: Path,
    k: int,
    *,
    per_client: int,
    clients_per_round: int = 0,
    rounds: int = 1,
    batch_size: int = 16,
    memory_limit_gb: float = 1.0,
    strategy: str = "auto",
) -> dict:
    """The first ``k`` clients of the images at ``path`` (``per_client`` rows each) as lazy
    views, streamed with an automatic chunk: build, one warm-up round, ``rounds`` timed rounds.
    Returns the row (times, peak RSS, the chunk and why)."""
    import jax

    from configs import debug
    from jaxfl import factories
    from jaxfl.data import stack_clients
    from jaxfl.runtime import peak_rss_mib
    from jaxfl.simulate import INIT_STREAM

    log = _ChunkLog()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.INFO)
    n = per_client
    image = np.load(path, mmap_mode="r")[: k * n]  # a view: nothing is read
    rng = np.random.default_rng(1)
    examples = {"image": image, "label": rng.integers(0, 8, k * n).astype(np.int32)}
    clients = [np.arange(c * n, (c + 1) * n) for c in range(k)]
    train = stack_clients(examples, clients, lazy=True)
    config = debug.get_config()
    config.num_clients = k
    config.placement = "stream"
    config.chunk_size = 0
    config.memory_limit_gb = memory_limit_gb
    config.strategy = strategy
    config.clients_per_round = clients_per_round
    config.local.batch_size = batch_size
    config.local.epochs = 1
    model = factories.build_model(config, 8)
    task = factories.build_task(config)
    start = time.perf_counter()
    runner, _ = factories.build_runner(config, task, model, train, None, clients_per_round, None)
    build_s = time.perf_counter() - start
    key = jax.random.fold_in(jax.random.key(0), INIT_STREAM)
    state = runner.init(factories.init_params(model, train.examples["image"][0], key))
    start = time.perf_counter()
    state, _ = runner.run_round(state, 0)
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - start
    rss_after_warmup = peak_rss_mib()
    times, metrics = [], {}
    for r in range(rounds):
        start = time.perf_counter()
        state, metrics = runner.run_round(state, 1 + r)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    per_round = runner.per_round
    seconds = float(np.median(times))
    return {
        "clients": k,
        "per_client": n,
        "clients_per_round": per_round,
        "image_shape": list(image.shape[1:]),
        "data_gib": image.nbytes / 2**30,
        "backend": runner.backend.description,
        "chunk": runner.backend.chunk,
        "chunk_log": log.lines,
        "memory_limit_gb": memory_limit_gb,
        "batch_size": batch_size,
        "local_steps_mean": metrics.get("local_steps_mean"),
        "examples_seen": metrics.get("examples_seen"),
        "build_s": build_s,
        "warmup_round_s": warmup_s,
        "round_s": times,
        "seconds_per_round": seconds,
        "clients_per_s": per_round / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_after_warmup_mib": rss_after_warmup,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
    }


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one:
        Path(args.row).write_text(json.dumps(run_one(args, args.one)))
        return []
    ks = [int(c) for c in args.clients.split(",")]
    path = image_path(args.scratch, max(ks), args.per_client, args.image_size)
    written = write_images(path, max(ks), args.per_client, args.image_size, args.write_clients)
    print(f"data file {path} (written in {written:.0f} s)", file=sys.stderr)
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    print(
        "    K  per round  data GiB  chunk   s/round  clients/s  peak RSS MiB  backend",
        flush=True,
    )
    for k in ks:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "row.json")
            cmd = [sys.executable, __file__, *argv, "--one", str(k), "--row", out]
            env = {**os.environ, "PYTHONPATH": root}
            subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
            rows.append(json.loads(Path(out).read_text()))
        r = rows[-1]
        print(
            f"{r['clients']:5d}  {r['clients_per_round']:9d}  {r['data_gib']:8.2f}  "
            f"{r['chunk']:5d}  {r['seconds_per_round']:8.1f}  {r['clients_per_s']:9.1f}  "
            f"{r['peak_rss_mib']:12.0f}  {r['backend']}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
