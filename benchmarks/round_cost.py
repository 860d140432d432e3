"""Seconds per federated round of several algorithms on one config (training only, no eval).

Builds the config's data, model and algorithm through ``jaxfl.factories`` exactly as
``experiments/run.py`` does, then times ``run_round`` (median of ``--repeats`` rounds after one
compiling warm-up round) for each algorithm name:

    python benchmarks/round_cost.py --json out.json
    python benchmarks/round_cost.py --config configs/debug.py --algorithms fedavg,perfedavg_fo

JSON: a list of ``{algorithm, seconds_per_round, vs_first, clients, strategy, backend}``
(``vs_first`` = this algorithm's time over the first algorithm's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import jax
import numpy as np

from jaxfl import factories
from jaxfl.privacy.plan import plan_privacy
from jaxfl.simulate import INIT_STREAM, num_sampled_clients


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/perfedavg_hetero.py")
    p.add_argument(
        "--algorithms", default="fedavg,fedprox,perfedavg_fo,perfedavg_pppml,perfedavg_hf,local"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def load_config(path: str):
    """``get_config()`` of a config file given by path."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def seconds_per_round(config, repeats: int) -> tuple[float, object, dict]:
    """Median wall seconds of ``run_round`` for ``config`` (after a compiling warm-up).

    Also returns the runner and the last round's metrics.
    """
    dataset = factories.build_dataset(config)
    fed = factories.build_federated_data(config, dataset)
    model = factories.build_model(config, fed.num_classes)
    sampling = factories.clients_per_round(config)
    privacy = plan_privacy(
        config, np.asarray(fed.train.counts), num_sampled_clients(sampling, config.num_clients)
    )
    runner, _ = factories.build_runner(config, model, fed.train, privacy, sampling, None)
    key = jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
    state = runner.init(factories.init_params(model, fed.train.images[0], key))
    state, _ = runner.run_round(state, 0)
    jax.block_until_ready(state)
    times, metrics = [], {}
    for r in range(1, repeats + 1):
        start = time.perf_counter()
        state, metrics = runner.run_round(state, r)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times), runner, metrics


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for name in args.algorithms.split(","):
        config = load_config(args.config)
        config.algorithm.name = name
        seconds, runner, _ = seconds_per_round(config, args.repeats)
        first = rows[0]["seconds_per_round"] if rows else seconds
        row = {
            "algorithm": name,
            "seconds_per_round": seconds,
            "vs_first": seconds / first,
            "clients": runner.num_clients,
            "strategy": runner.strategy,
            "config": args.config,
            "backend": jax.default_backend(),
        }
        rows.append(row)
        print(f"{name:16s} {seconds:8.2f} s/round   {row['vs_first']:5.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
