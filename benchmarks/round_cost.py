"""Seconds per federated round of several algorithms on one config (training only, no eval).

Builds the config's data, model and algorithm through ``jaxfl.factories`` exactly as
``experiments/run.py`` does, then times ``run_round`` (median of ``--repeats`` rounds after one
compiling warm-up round) for each algorithm name:

    python benchmarks/round_cost.py --json out.json
    python benchmarks/round_cost.py --config configs/debug.py --algorithms fedavg,perfedavg_fo

An algorithm name ending in ``:dp`` runs it with record-level DP-SGD (noise multiplier 1,
clip 1). ``--strategies auto,loop`` times each algorithm under each strategy (``loop``: a plain
Python loop over a jitted per-client update, the per-client baseline); ``--set KEY=VALUE``
overrides config fields. The U-Net row of the README (5 hospitals x 64 phantom slices of
128x128, all slices used for training):

    python benchmarks/round_cost.py --config configs/covid_seg.py --repeats 2 \
        --algorithms fedavg,perfedavg_fo,fedavg:dp --strategies auto,loop \
        --set data.source=ct_phantoms --set data.ct.sites=data --set data.ct.lung_only=False \
        --set 'data.ct.phantom_size=(128,128)' --set data.ct.patients_per_site=4 \
        --set data.ct.num_slices=16 --set data.ct.test_fraction=0 \
        --set partition.heldout_fraction=0 --set task.balanced_weights=False

3D rows: ``--conv3d auto,canonical`` times each row with each 3D convolution implementation
(``canonical``: jaxfl's 3D path before im2col, see ``jaxfl.models.conv``), side by side;
``--isolate`` runs every row in a fresh process, so each row's ``peak_rss_mib`` is its own:

    python benchmarks/round_cost.py --config configs/medmnist3d.py --algorithms fedavg \
        --conv3d auto,canonical --isolate --repeats 1

JSON: a list of ``{algorithm, strategy, conv3d, seconds_per_round, vs_first, vs_loop, clients,
peak_rss_mib, backend}`` (``vs_first``: over the first row's time; ``vs_loop``: the ``loop``
strategy's time for the same algorithm over this row's, i.e. the speed-up over a per-client
loop).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxfl import factories
from jaxfl.models.conv import conv3d_impl
from jaxfl.privacy.plan import plan_privacy
from jaxfl.runtime import peak_rss_mib
from jaxfl.simulate import INIT_STREAM, num_sampled_clients
from jaxfl.sweep import apply_overrides
from jaxfl.train import load_federated_data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/perfedavg_hetero.py")
    p.add_argument(
        "--algorithms", default="fedavg,fedprox,perfedavg_fo,perfedavg_pppml,perfedavg_hf,local"
    )
    p.add_argument("--strategies", default="auto", help="comma-separated config.strategy values")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    p.add_argument("--conv3d", default="auto", help="comma-separated 3D conv implementations")
    p.add_argument("--isolate", action="store_true", help="one fresh process per row")
    p.add_argument("--baseline", default="", help="git ref whose code times the same rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def load_config(path: str):
    """``get_config()`` of a config file given by path."""
    # Shipped configs import ``configs.debug``: the repository root must be importable.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def seconds_per_round(config, repeats: int) -> tuple[float, object, dict]:
    """Median wall seconds of ``run_round`` for ``config`` (after a compiling warm-up).

    Also returns the runner and the last round's metrics.
    """
    fed = load_federated_data(config)
    model = factories.build_model(config, fed.num_classes)
    sampling = factories.clients_per_round(config)
    privacy = plan_privacy(
        config, np.asarray(fed.train.counts), num_sampled_clients(sampling, config.num_clients)
    )
    runner, _ = factories.build_runner(
        config, factories.build_task(config, fed), model, fed.train, privacy, sampling, None
    )
    key = jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
    state = runner.init(factories.init_params(model, fed.train.examples["image"][0], key))
    state, _ = runner.run_round(state, 0)
    jax.block_until_ready(state)
    times, metrics = [], {}
    for r in range(1, repeats + 1):
        start = time.perf_counter()
        state, metrics = runner.run_round(state, r)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times), runner, metrics


def configure(args: argparse.Namespace, spec: str, strategy: str):
    """The config for algorithm ``spec`` (``name`` or ``name:dp``) under ``strategy``."""
    name, _, variant = spec.partition(":")
    overrides = dict(o.split("=", 1) for o in args.set)
    overrides.update({"algorithm": name, "strategy": strategy})
    if variant == "dp":
        overrides.update(
            {"dp.mode": "record", "dp.target_epsilon": "0", "dp.noise_multiplier": "1.0",
             "dp.clip_norm": "1.0"}
        )  # fmt: skip
    elif variant:
        raise SystemExit(f"unknown algorithm variant {variant!r} in {spec!r}; use NAME or NAME:dp")
    return apply_overrides(load_config(args.config), overrides)


def measure(args: argparse.Namespace, spec: str, strategy: str, impl: str) -> dict:
    """One row: ``spec`` under ``strategy`` with 3D convolutions as ``impl``."""
    with conv3d_impl(impl):
        seconds, runner, metrics = seconds_per_round(configure(args, spec, strategy), args.repeats)
    return {
        "algorithm": spec,
        "strategy": strategy,
        "conv3d": impl,
        "resolved": runner.strategy,
        "seconds_per_round": seconds,
        "clients": runner.num_clients,
        "local_steps_mean": metrics.get("local_steps_mean"),
        "peak_rss_mib": peak_rss_mib(),
        "config": args.config,
        "overrides": args.set,
        "backend": jax.default_backend(),
    }


def measure_isolated(argv: list[str], spec: str, strategy: str, impl: str) -> dict:
    """:func:`measure` in a fresh Python process (its peak RSS is this row's alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "row.json")
        one = ["--algorithms", spec, "--strategies", strategy, "--conv3d", impl, "--json", out]
        subprocess.run([sys.executable, __file__, *argv, *one], check=True, stdout=sys.stderr)
        with open(out) as f:
            return json.load(f)[0]


def measure_baseline(argv: list[str], ref: str, spec: str, strategy: str) -> dict:
    """The row as the code at git ``ref`` times it (its own round_cost.py, in a worktree)."""
    repo = Path(__file__).resolve().parents[1]
    config = str(Path(parse_args(argv).config).resolve())
    keep = []
    skip_next = False
    for a in argv:  # drop options the older script may not know, and the relative config path
        if skip_next:
            skip_next = False
        elif a in ("--conv3d", "--baseline", "--json", "--config"):
            skip_next = True
        elif a != "--isolate" and not a.startswith(("--conv3d=", "--baseline=", "--json=")):
            keep.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "tree", str(Path(tmp) / "row.json")
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), ref],
                       check=True, stdout=sys.stderr)  # fmt: skip
        try:
            cmd = [sys.executable, str(tree / "benchmarks" / "round_cost.py"), *keep,
                   "--config", config, "--algorithms", spec, "--strategies", strategy,
                   "--json", out]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=tree, env=env)
            with open(out) as f:
                row = json.load(f)[0]
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                           check=False)  # fmt: skip
    row["conv3d"] = f"code@{ref}"
    row.setdefault("peak_rss_mib", float("nan"))
    return row


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The row runs add their own selection flags after these (argparse keeps the last); a row
    # process must not time the baseline again.
    base, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--baseline":
            skip = True
        elif a != "--isolate" and not a.startswith("--baseline="):
            base.append(a)
    rows = []
    for spec in args.algorithms.split(","):
        for strategy in args.strategies.split(","):
            impls = args.conv3d.split(",") + ([f"code@{args.baseline}"] if args.baseline else [])
            for impl in impls:
                if impl.startswith("code@"):
                    row = measure_baseline(base, impl[len("code@") :], spec, strategy)
                elif args.isolate:
                    row = measure_isolated(base, spec, strategy, impl)
                else:
                    row = measure(args, spec, strategy, impl)
                seconds = row["seconds_per_round"]
                row["vs_first"] = seconds / (rows[0]["seconds_per_round"] if rows else seconds)
                rows.append(row)
                print(
                    f"{spec:16s} {strategy:10s} {impl:9s} {seconds:8.2f} s/round   "
                    f"{row['vs_first']:5.2f}x   peak RSS {row['peak_rss_mib']:7.0f} MiB",
                    flush=True,
                )
    loop = {
        (r["algorithm"], r["conv3d"]): r["seconds_per_round"]
        for r in rows
        if r["strategy"] == "loop"
    }
    for r in rows:
        if (r["algorithm"], r["conv3d"]) in loop:
            r["vs_loop"] = loop[r["algorithm"], r["conv3d"]] / r["seconds_per_round"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
