"""Gradient-inversion throughput: targets x restarts in one vmapped call vs a Python loop.

    python benchmarks/attack_throughput.py --targets 8 --restarts 4 --steps 300 --json out.json

The model is a small CNN (two 3x3 convs, ReLU, dense) on 28x28x1 images, the attack iDLG with
labels read off the output layer. The loop row runs the same single-target, single-restart
attack, jitted once, target by target and restart by restart (what the reference code does);
the vmapped row runs ``jaxfl.attacks.invert_many`` once. Reports reconstructions per second
(targets x restarts / wall time, compile excluded) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxfl.attacks import AttackConfig, invert, invert_many, recover_labels


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    model = SmallCNN()
    shape = (1, 28, 28, 1)
    params = model.init(jax.random.key(0), jnp.zeros(shape))["params"]

    def grad_fn(prm, images, soft):
        loss = lambda q: optax.softmax_cross_entropy(
            model.apply({"params": q}, images), soft
        ).mean()  # noqa: E731
        return jax.grad(loss)(prm)

    t = args.targets
    images = jax.random.uniform(jax.random.key(1), (t, *shape), minval=-1, maxval=1)
    true = jax.random.randint(jax.random.key(2), (t, 1), 0, 10)
    observed = jax.vmap(lambda x, y: grad_fn(params, x, jax.nn.one_hot(y, 10)))(images, true)
    out = observed["Dense_0"]
    labels = jax.vmap(recover_labels)(out["kernel"], out["bias"])
    keys = jax.random.split(jax.random.key(3), t)

    many_cfg = AttackConfig(method="idlg", steps=args.steps, restarts=args.restarts)
    many = jax.jit(lambda o, k, lab: invert_many(grad_fn, params, o, k, shape, 10, many_cfg, lab))
    jax.block_until_ready(many(observed, keys, labels))  # compile
    start = time.perf_counter()
    jax.block_until_ready(many(observed, keys, labels))
    vmapped = time.perf_counter() - start

    one_cfg = AttackConfig(method="idlg", steps=args.steps, restarts=1)
    one = jax.jit(
        lambda o, k, lab, r: invert(
            grad_fn, params, o, k, shape, 10, one_cfg, lab, first_restart=r
        )["images"]
    )
    pick = lambda i: jax.tree.map(lambda g: g[i], observed)  # noqa: E731
    jax.block_until_ready(one(pick(0), keys[0], labels[0], 0))  # compile
    start = time.perf_counter()
    for i in range(t):
        for r in range(args.restarts):
            jax.block_until_ready(one(pick(i), keys[i], labels[i], r))
    loop = time.perf_counter() - start

    n = t * args.restarts
    row = {
        "targets": t,
        "restarts": args.restarts,
        "steps": args.steps,
        "vmapped_s": vmapped,
        "loop_s": loop,
        "vmapped_per_s": n / vmapped,
        "loop_per_s": n / loop,
        "speedup": loop / vmapped,
        "label_accuracy": float(jnp.mean(labels == true)),
        "device": str(jax.devices()[0]),
    }
    print(f"{'mode':8s} {'s':>8s} {'reconstructions/s':>18s}")
    print(f"{'loop':8s} {loop:8.2f} {row['loop_per_s']:18.2f}")
    print(f"{'vmapped':8s} {vmapped:8.2f} {row['vmapped_per_s']:18.2f}   ({row['speedup']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
