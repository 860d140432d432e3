"""jaxfl vs a plain PyTorch per-client loop on the BloodMNIST paper's client workload.

Both rows train DPResNet (4,802,120 parameters, GroupNorm) for ``--epochs`` local epochs of
Adam(1e-3), batch 32, on ``--clients`` clients of ``--examples`` 28x28x3 examples each, one
after another (a federated round without aggregation cost), from the same global model:

- ``jaxfl:S``: ``Simulator.run_round`` with client-execution strategy ``S`` for each ``S`` in
  ``--strategies`` (default ``auto``: ``shard_map`` over one XLA:CPU device per core, and
  ``loop``: one device);
- ``torch``: what a Flower/PyTorch client does: copy the global model, a fresh Adam, shuffled
  batches, ``loss.backward(); opt.step()``, the update ``w_local - w_global``; clients in a
  plain Python loop, ``torch.set_num_threads(os.cpu_count())``.

Each row runs in its own subprocess (so CPU% is that framework's) and reports seconds per
round (median of ``--repeats`` after one warm-up round), seconds per local step and CPU%
(process CPU time / wall time over the timed rounds). ``speed_vs_torch`` = torch s/round /
jaxfl s/round (>= 1: jaxfl faster). PyTorch is optional: without it the torch row says so.

    python benchmarks/torch_reference.py --json out.json
    python benchmarks/torch_reference.py --clients 10 --examples 86   # the paper's round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--examples", type=int, default=86, help="training examples per client")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--strategies",
        default="auto,loop",
        help="jaxfl rows: comma-separated client-execution strategies (auto, loop, shard_map, ...)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: torch | jaxfl:S
    return p.parse_args(argv)


def steps_per_round(args) -> int:
    return args.clients * args.epochs * math.ceil(args.examples / args.batch_size)


def _data(args):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.clients, args.examples, 28, 28, 3), dtype=np.float32)
    labels = rng.integers(0, 8, size=(args.clients, args.examples)).astype(np.int32)
    return images, labels


def _timed(run_round, args) -> dict:
    run_round(0)  # compile / warm up
    seconds, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for r in range(1, args.repeats + 1):
        start = time.perf_counter()
        run_round(r)
        seconds.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    s = statistics.median(seconds)
    return {
        "seconds_per_round": s,
        "seconds_per_step": s / steps_per_round(args),
        "cpu_percent": 100 * cpu,
    }


def jaxfl_row(args, strategy: str) -> dict:
    import jax
    import numpy as np
    import optax

    from jaxfl.algorithms import classification_loss, fedavg
    from jaxfl.models import DPResNet, count_params
    from jaxfl.simulate import Simulator
    from jaxfl.types import ClientArrays

    images, labels = _data(args)
    model = DPResNet(num_classes=8)
    params = model.init(jax.random.key(0), images[0, :1])["params"]
    algorithm = fedavg(
        classification_loss(model.apply), optax.adam(1e-3), optax.sgd(1.0),
        batch_size=args.batch_size, epochs=args.epochs,
    )  # fmt: skip
    arrays = ClientArrays(
        {"image": images, "label": labels},
        np.ones(labels.shape, np.float32),
        np.full(args.clients, args.examples),
    )
    sim = Simulator(algorithm, arrays, strategy=strategy)
    state = sim.init(params)

    def run_round(r):
        jax.block_until_ready(sim.run_round(state, r)[0])

    return {
        "row": f"jaxfl:{strategy}",
        "resolved": sim.strategy,
        "devices": len(getattr(sim.backend, "devices", [jax.devices()[0]])),
        "params": count_params(params),
        **_timed(run_round, args),
    }


def torch_row(args) -> dict:
    try:
        import torch
        from torch import nn
    except ImportError:
        return {"row": "torch", "error": "PyTorch is not installed (pip install torch)"}

    torch.set_num_threads(os.cpu_count())

    def conv(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def block(cin, cout, stride=1):
        return nn.Sequential(
            conv(cin, cout, stride), nn.GroupNorm(32, cout), nn.ReLU(),
            conv(cout, cout), nn.GroupNorm(32, cout),
        )  # fmt: skip

    class DPResNet(nn.Module):  # the seed paper's CustomResNet, as jaxfl.models.DPResNet
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                conv(3, 64), nn.GroupNorm(32, 64), nn.ReLU(),
                conv(64, 128), nn.GroupNorm(32, 128), nn.ReLU(),
            )  # fmt: skip
            self.res1, self.res2, self.res3 = (
                block(128, 128),
                block(128, 256, 2),
                block(256, 512, 2),
            )
            self.fc = nn.Linear(512, 8)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.res1(x)
            x = self.res3(self.res2(x))
            return self.fc(x.mean(dim=(2, 3)))

    images, labels = _data(args)
    x_all = torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous()  # NCHW per client
    y_all = torch.from_numpy(labels).long()
    torch.manual_seed(0)
    global_model = DPResNet()
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)

    def run_round(r):
        for c in range(args.clients):
            model = DPResNet()
            model.load_state_dict(global_model.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(args.epochs):
                order = torch.randperm(args.examples, generator=generator)
                for start in range(0, args.examples, args.batch_size):
                    idx = order[start : start + args.batch_size]
                    opt.zero_grad()
                    loss_fn(model(x_all[c, idx]), y_all[c, idx]).backward()
                    opt.step()
            with torch.no_grad():  # the update a client would send
                pairs = zip(model.parameters(), global_model.parameters(), strict=True)
                [p.detach() - q for p, q in pairs]

    params = sum(p.numel() for p in global_model.parameters())
    return {"row": "torch", "params": params, "torch_version": torch.__version__,
            **_timed(run_round, args)}  # fmt: skip


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.row:
        kind, _, strategy = args.row.partition(":")
        print(json.dumps(jaxfl_row(args, strategy) if kind == "jaxfl" else torch_row(args)))
        return []
    rows = []
    jaxfl_rows = [f"jaxfl:{s}" for s in args.strategies.split(",") if s]
    for row in ("torch", *jaxfl_rows):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--row", row]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        err = out.stderr.strip().splitlines()[-1:] or [""]
        rows.append(json.loads(lines[-1]) if lines else {"row": row, "error": err[0]})
    torch_s = rows[0].get("seconds_per_round")
    for r in rows:
        r.update(clients=args.clients, examples=args.examples, epochs=args.epochs,
                 batch_size=args.batch_size, steps_per_round=steps_per_round(args),
                 cpu_count=os.cpu_count())  # fmt: skip
        s = r.get("seconds_per_round")
        r["speed_vs_torch"] = torch_s / s if s and torch_s else None
    print(f"{'row':16s} {'s/round':>9s} {'s/step':>8s} {'CPU%':>6s} {'vs torch':>9s}  error")
    for r in rows:
        cells = [
            _fmt(r.get(k), spec)
            for k, spec in [
                ("seconds_per_round", "9.2f"),
                ("seconds_per_step", "8.3f"),
                ("cpu_percent", "6.0f"),
                ("speed_vs_torch", "9.2f"),
            ]
        ]
        print(f"{r['row']:16s} {' '.join(cells)}  {r.get('error', '')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
