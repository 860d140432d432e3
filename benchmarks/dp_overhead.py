"""Record-level DP-SGD overhead: examples/s of the DP client step vs the plain one.

Both rows run one FedAvg round of K clients (each with N examples, one local epoch of batch B)
through the engine's ``Simulator`` with the same strategy (``vmap`` by default: clients
vmapped in one jit). The DP row adds Poisson sampling, per-example gradients (vmapped over
examples inside the vmapped client update), clipping and noise. Examples/s counts the
examples actually processed (``num_seen``: for DP, the Poisson-sampled ones).

    python benchmarks/dp_overhead.py --json out.json
    python benchmarks/dp_overhead.py --models cnn --clients 8 --strategy loop

JSON: a list of ``{model, clients, nondp_examples_per_s, dp_examples_per_s, overhead}``
(overhead = nondp / dp) plus the settings and backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax

from jaxfl.algorithms import classification_loss, fedavg
from jaxfl.data import iid, stack_clients, synthetic_dataset
from jaxfl.models import get_model
from jaxfl.privacy.dp_sgd import DPSGD, resolve_per_example
from jaxfl.simulate import Simulator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="cnn,dpresnet")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--examples", type=int, default=64, help="examples per client (N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=28, help="square RGB inputs of this size")
    p.add_argument("--strategy", default="vmap")
    p.add_argument(
        "--microbatch", type=int, default=0, help="DP micro-batch size (0 = the batch size)"
    )
    p.add_argument("--per-example", default="auto", help="auto | vmap | scan")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def time_round(algorithm, arrays, params, args) -> tuple[float, float]:
    """``(examples/s, client-steps/s)`` of one round: medians of ``--repeats`` after a warm-up."""
    sim = Simulator(algorithm, arrays, strategy=args.strategy, chunk_size=args.clients)
    state = algorithm.init(params)
    state, _ = sim.run_round(state, 0)
    jax.block_until_ready(state)
    examples, steps = [], []
    for r in range(1, args.repeats + 1):
        start = time.perf_counter()
        state, metrics = sim.run_round(state, r)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        examples.append(metrics["examples_seen"] / seconds)
        steps.append(metrics["local_steps_mean"] * metrics["clients"] / seconds)
    return statistics.median(examples), statistics.median(steps)


def measure(name: str, args: argparse.Namespace) -> dict:
    """One row: model ``name``'s plain and DP-SGD rounds with the settings in ``args``."""
    shape = (args.image_size, args.image_size, 3)
    data = synthetic_dataset(8, shape, n_train=args.clients * args.examples, n_val=0, n_test=0)
    parts = iid(data.train.labels, args.clients, seed=0)
    arrays = stack_clients(data.train.examples(), parts)
    model = get_model(name, 8)
    params = model.init(jax.random.key(0), np.zeros((1, *shape), np.float32))["params"]
    loss = classification_loss(model.apply)
    kw = dict(batch_size=args.batch_size, epochs=1)
    micro = args.microbatch or args.batch_size
    plain = fedavg(loss, optax.sgd(0.05), optax.sgd(1.0), **kw)
    dp = fedavg(
        loss, optax.sgd(0.05), optax.sgd(1.0),
        dp=DPSGD(1.0, 1.0, microbatch_size=micro, per_example=args.per_example), **kw,
    )  # fmt: skip
    nondp_rate, nondp_steps = time_round(plain, arrays, params, args)
    dp_rate, dp_steps = time_round(dp, arrays, params, args)
    return {
        "model": name,
        "clients": args.clients,
        "nondp_examples_per_s": nondp_rate,
        "dp_examples_per_s": dp_rate,
        "overhead": nondp_rate / dp_rate,
        "nondp_steps_per_s": nondp_steps,
        "dp_steps_per_s": dp_steps,
        "examples_per_client": args.examples,
        "batch_size": args.batch_size,
        "microbatch_size": micro,
        "per_example": resolve_per_example(args.per_example),
        "strategy": args.strategy,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for name in args.models.split(","):
        row = measure(name, args)
        rows.append(row)
        print(
            f"{name:9s} K={args.clients:<4d} non-DP {row['nondp_examples_per_s']:9.1f} ex/s   "
            f"DP {row['dp_examples_per_s']:9.1f} ex/s   overhead {row['overhead']:.2f}x",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
