"""Stateful clients: SCAFFOLD and Ditto equal plain reference loops on every backend, keep their
client state across rounds and resume exactly from a checkpoint."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, make_client_arrays, max_abs_diff

from configs import debug
from jaxfl.algorithms import classification_loss, fedavg
from jaxfl.algorithms.ditto import PERSONAL_STREAM, ditto
from jaxfl.algorithms.local import epoch_permutations
from jaxfl.algorithms.scaffold import scaffold
from jaxfl.backends import StreamingBackend, make_backend
from jaxfl.checkpoint import Checkpointer
from jaxfl.errors import ConfigError
from jaxfl.metrics import read_metrics
from jaxfl.secure.aggregators import make_host_aggregator
from jaxfl.simulate import CLIENT_STREAM, Simulator, client_key
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate
from jaxfl.validate import validate_config

COUNTS = [5, 9, 0, 7, 3, 6]
BATCH, EPOCHS, LR = 4, 2, 0.1
SEED = 2
ROUNDS = 3
PER_ROUND = 3  # of 6: clients sit rounds out, so their state must persist in between


@functools.partial(jax.jit, static_argnums=0)
def _step(grad, params, batch, extra):
    """``params - LR (grad(params; batch) + extra)``."""
    g = grad(params, batch, jnp.ones(len(batch["label"])))
    return jax.tree.map(lambda p, gi, ci: p - LR * (gi + ci), params, g, extra)


def _sgd_steps(grad, params, examples, n, key, correction):
    """Plain minibatch SGD, one example list per step: ``params - LR (g + correction(p))``
    over ``EPOCHS`` shuffles of the client's ``n`` examples (the engine's shuffle order)."""
    perms = np.asarray(epoch_permutations(key, jnp.ones(n), EPOCHS))
    steps = 0
    for e in range(EPOCHS):
        for b in range(math.ceil(n / BATCH)):
            idx = perms[e, b * BATCH : (b + 1) * BATCH]
            batch = {k: v[idx] for k, v in examples.items()}
            params = _step(grad, params, batch, correction(params))
            steps += 1
    return params, steps


def _client(arrays, c):
    n = int(arrays.counts[c])
    return {k: jnp.asarray(v[c, :n]) for k, v in arrays.examples.items()}, n


def scaffold_reference(loss, params, arrays, sampled):
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II) as a Python loop."""
    grad = jax.jit(jax.grad(lambda p, ex, m: loss(p, ex, m)[0]))
    stream = jax.random.fold_in(jax.random.key(SEED), CLIENT_STREAM)
    zeros = jax.tree.map(jnp.zeros_like, params)
    x, c = params, zeros
    c_i = [zeros] * len(COUNTS)
    for r, ids in enumerate(sampled):
        dys, dcs = [], []
        for i in ids:
            examples, n = _client(arrays, i)
            if n == 0:
                continue
            key = client_key(stream, jnp.int32(r), jnp.int32(i))
            drift = jax.tree.map(jnp.subtract, c, c_i[i])
            y, k = _sgd_steps(grad, x, examples, n, key, lambda p, d=drift: d)
            new = jax.tree.map(
                lambda ci, cc, xx, yy, k=k: ci - cc + (xx - yy) / (k * LR), c_i[i], c, x, y
            )
            dys.append(jax.tree.map(jnp.subtract, y, x))
            dcs.append(jax.tree.map(jnp.subtract, new, c_i[i]))
            c_i[i] = new
        x = jax.tree.map(lambda xx, *d: xx + sum(d) / len(d), x, *dys)
        c = jax.tree.map(lambda cc, *d: cc + sum(d) / len(COUNTS), c, *dcs)
    return x, c, c_i


def ditto_reference(loss, params, arrays, sampled, lam):
    """Ditto (Li et al. 2021, Algorithm 1) over FedAvg with local SGD, as a Python loop."""
    grad = jax.jit(jax.grad(lambda p, ex, m: loss(p, ex, m)[0]))
    stream = jax.random.fold_in(jax.random.key(SEED), CLIENT_STREAM)
    none = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    w = params
    v = [params] * len(COUNTS)
    for r, ids in enumerate(sampled):
        updates, weights = [], []
        for i in ids:
            examples, n = _client(arrays, i)
            if n == 0:
                continue
            key = client_key(stream, jnp.int32(r), jnp.int32(i))
            local, _ = _sgd_steps(grad, w, examples, n, key, none)
            updates.append(jax.tree.map(jnp.subtract, local, w))
            weights.append(n)
            pull = lambda p, w=w: jax.tree.map(lambda a, b: lam * (a - b), p, w)  # noqa: E731
            personal_key = jax.random.fold_in(key, PERSONAL_STREAM)
            v[i], _ = _sgd_steps(grad, v[i], examples, n, personal_key, pull)
        share = np.asarray(weights) / sum(weights)
        w = jax.tree.map(
            lambda ww, *u, s=share: ww + sum(si * ui for si, ui in zip(s, u, strict=True)),
            w,
            *updates,
        )
    return w, v


def _scaffold(model):
    loss = classification_loss(model.apply)
    alg = scaffold(
        loss, optax.sgd(1.0), learning_rate=LR, batch_size=BATCH, epochs=EPOCHS,
        num_clients=len(COUNTS),
    )  # fmt: skip
    return loss, alg


def _ditto(model, lam=0.5):
    loss = classification_loss(model.apply)
    alg = ditto(loss, optax.sgd(LR), optax.sgd(1.0), batch_size=BATCH, epochs=EPOCHS, lam=lam)
    return loss, alg


def _run(algorithm, arrays, params, backend, **kw):
    sim = Simulator(
        algorithm, arrays, seed=SEED, backend=backend, clients_per_round=PER_ROUND, **kw
    )
    state = sim.init(params)
    for r in range(ROUNDS):
        state, _ = sim.run_round(state, r)
    return sim, state


def _rows(clients):
    """Every client's state from a stacked ``[K', ...]`` pytree (K' >= K: shard_map pads)."""
    return [jax.tree.map(lambda a, c=c: np.asarray(a)[c], clients) for c in range(len(COUNTS))]


# One backend per kind of mapping: vmapped, sharded over a mesh, a Python loop over clients
# streamed from the host (test_backends.py checks every backend against the others).
BACKENDS = [("vmap", 0, 0), ("shard_map", 2, 0), ("loop", 0, 2)]


def _backend(strategy, devices, stream):
    backend = make_backend(strategy, chunk_size=2, devices=jax.devices()[:devices] or None)
    return StreamingBackend(backend, stream) if stream else backend


def test_scaffold_equals_its_reference_loop_on_every_backend(tiny_model, tiny_params):
    loss, algorithm = _scaffold(tiny_model)
    arrays = make_client_arrays(COUNTS, n_slots=10)
    sampler = Simulator(algorithm, arrays, seed=SEED, clients_per_round=PER_ROUND, strategy="loop")
    sampled = [sampler.sample_clients(r) for r in range(ROUNDS)]
    # Some client trains in two rounds with a round out in between: its state must persist.
    assert any(c in sampled[0] and c not in sampled[1] and c in sampled[2] for c in range(6))
    x, c, c_i = scaffold_reference(loss, tiny_params, arrays, sampled)
    assert max_abs_diff(c, jax.tree.map(jnp.zeros_like, c)) > 1e-3  # the control moved
    for strategy, devices, stream in BACKENDS:
        _, state = _run(algorithm, arrays, tiny_params, _backend(strategy, devices, stream))
        assert_trees_close(state.params, x, atol=2e-5)
        assert_trees_close(state.opt_state.control, c, atol=2e-5)
        for got, want in zip(_rows(state.clients), c_i, strict=True):
            assert_trees_close(got, want, atol=2e-5)


def test_client_state_checkpoint_resumes_under_another_device_layout(
    tmp_path, tiny_model, tiny_params
):
    # Regression: the checkpoint held the backend's padded rows (6 clients on 4 devices: 8),
    # so a run could not resume on another device count. It holds [K] host rows now.
    loss, algorithm = _scaffold(tiny_model)
    arrays = make_client_arrays(COUNTS, n_slots=10)
    sampler = Simulator(algorithm, arrays, seed=SEED, clients_per_round=PER_ROUND, strategy="loop")
    x, c, c_i = scaffold_reference(
        loss, tiny_params, arrays, [sampler.sample_clients(r) for r in range(ROUNDS)]
    )
    layouts = [_backend("shard_map", 4, 0), _backend("loop", 0, 2), _backend("vmap", 0, 0)]
    state = None
    for r, backend in enumerate(layouts):
        sim = Simulator(algorithm, arrays, seed=SEED, backend=backend, clients_per_round=PER_ROUND)
        state = sim.init(tiny_params)
        if r:
            ckpt = Checkpointer(tmp_path, 1)
            state = sim.restore_state(ckpt.restore(sim.checkpoint_state(state)))
            ckpt.close()
        state, _ = sim.run_round(state, r)
        ckpt = Checkpointer(tmp_path, 1)
        ckpt.maybe_save(r + 1, sim.checkpoint_state(state))
        ckpt.close()
        assert jax.tree.leaves(sim.checkpoint_state(state).clients)[0].shape[0] == len(COUNTS)
    assert_trees_close(state.params, x, atol=2e-5)
    assert_trees_close(state.opt_state.control, c, atol=2e-5)
    for got, want in zip(_rows(state.clients), c_i, strict=True):
        assert_trees_close(got, want, atol=2e-5)


def test_ditto_equals_its_reference_loop_on_every_backend(tiny_model, tiny_params):
    loss, algorithm = _ditto(tiny_model)
    arrays = make_client_arrays(COUNTS, n_slots=10)
    sampler = Simulator(algorithm, arrays, seed=SEED, clients_per_round=PER_ROUND, strategy="loop")
    sampled = [sampler.sample_clients(r) for r in range(ROUNDS)]
    w, v = ditto_reference(loss, tiny_params, arrays, sampled, lam=0.5)
    never = set(range(len(COUNTS))) - set().union(*map(set, sampled))
    for strategy, devices, stream in BACKENDS:
        _, state = _run(algorithm, arrays, tiny_params, _backend(strategy, devices, stream))
        assert_trees_close(state.params, w, atol=2e-5)
        for c, (got, want) in enumerate(zip(_rows(state.clients), v, strict=True)):
            assert_trees_close(got, want, atol=2e-5)
            if c in never or COUNTS[c] == 0:  # never trained: still the initial model
                assert_trees_close(got, tiny_params, atol=0)


def test_ditto_global_model_is_fedavg_and_lam_pulls_personal_models(tiny_model, tiny_params):
    arrays = make_client_arrays(COUNTS, n_slots=10)
    loss = classification_loss(tiny_model.apply)
    plain = fedavg(loss, optax.sgd(LR), optax.sgd(1.0), batch_size=BATCH, epochs=EPOCHS)
    sim = Simulator(plain, arrays, seed=SEED, clients_per_round=PER_ROUND, strategy="loop")
    fed_state, _ = sim.run_round(sim.init(tiny_params), 0)
    trained = [c for c in sim.sample_clients(0) if COUNTS[c]]
    distances = []
    for lam in (0.0, 9.0):
        algorithm = _ditto(tiny_model, lam)[1]
        sim = Simulator(algorithm, arrays, seed=SEED, clients_per_round=PER_ROUND, strategy="loop")
        state, _ = sim.run_round(sim.init(tiny_params), 0)
        assert_trees_close(state.params, fed_state.params, atol=1e-6)
        # Round 0's global model is the initial one: lam pulls personal models towards it.
        rows = _rows(state.clients)
        distances.append([max_abs_diff(rows[c], tiny_params) for c in trained])
    assert np.all(np.asarray(distances[1]) < 0.7 * np.asarray(distances[0]))


def test_ditto_with_secure_aggregation_equals_plain(tiny_model, tiny_params):
    _, algorithm = _ditto(tiny_model)
    arrays = make_client_arrays(COUNTS, n_slots=10)
    _, plain = _run(algorithm, arrays, tiny_params, make_backend("loop"))
    secagg = make_host_aggregator("secagg", seed=0)
    _, secure = _run(algorithm, arrays, tiny_params, make_backend("loop"), host_aggregator=secagg)
    assert_trees_close(secure.params, plain.params, atol=2e-5)  # SecAgg+ quantization
    assert_trees_close(secure.clients, plain.clients, atol=2e-5)  # pulled to those params


def test_scaffold_refuses_host_aggregation_and_the_audit_refuses_stateful(tiny_model, tiny_params):
    _, algorithm = _scaffold(tiny_model)
    arrays = make_client_arrays(COUNTS, n_slots=10)
    with pytest.raises(ValueError, match="SCAFFOLD divides its control-variate sum"):
        Simulator(algorithm, arrays, host_aggregator=make_host_aggregator("secagg", seed=0))
    sim = Simulator(algorithm, arrays, strategy="loop")
    with pytest.raises(ValueError, match="privacy audit does not replay"):
        sim.client_outputs(sim.init(tiny_params), 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm.name": "scaffold"}, "set local.optimizer='sgd'"),
        (
            {"algorithm.name": "scaffold", "local.optimizer": "sgd", "local.momentum": 0.9},
            "scaffold' with local.momentum=0.9",
        ),
        (
            {"algorithm.name": "scaffold", "local.optimizer": "sgd", "dp.mode": "local_update"},
            "not the control variates",
        ),
        (
            {"algorithm.name": "scaffold", "local.optimizer": "sgd", "secure.aggregator": "ckks"},
            "set secure.aggregator='plain'",
        ),
        ({"algorithm.name": "ditto", "algorithm.lam": -1.0}, "algorithm.lam=-1.0 must be >= 0"),
        (
            {"algorithm.name": "ditto", "personalization.enabled": True},
            "Set personalization.enabled=False",
        ),
    ],
)
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(debug.get_config(), overrides))


SMALL = {
    "rounds": 4,
    "checkpoint_every": 1,
    "num_clients": 4,
    "clients_per_round": 2,
    "data.n_train": 160,
    "data.n_test": 40,
    "local.epochs": 1,
    "local.optimizer": "sgd",
    "local.learning_rate": 0.05,
    "model.name": "mlp",
}


class KilledError(Exception):
    """Stands for the process dying in the middle of a round."""


@pytest.mark.parametrize("name", ["scaffold", "ditto"])
def test_interrupted_stateful_run_resumes_exactly(tmp_path, monkeypatch, name):
    config = apply_overrides(debug.get_config(), {**SMALL, "algorithm.name": name})
    full = train_and_evaluate(config, tmp_path / "full")

    run_round = Simulator.run_round

    def dies_in_round_3(self, state, round_idx):
        if round_idx == 2:
            raise KilledError
        return run_round(self, state, round_idx)

    monkeypatch.setattr(Simulator, "run_round", dies_in_round_3)
    with pytest.raises(KilledError):
        train_and_evaluate(config, tmp_path / "cut")
    monkeypatch.setattr(Simulator, "run_round", run_round)
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 2
    resumed = train_and_evaluate(config, tmp_path / "cut")

    drop = lambda m: {k: v for k, v in m.items() if not k.endswith("_time_s")}  # noqa: E731
    assert drop(resumed) == drop(full)
    states = []
    for run in ("full", "cut"):
        ckpt = Checkpointer(tmp_path / run, 1)
        states.append(ckpt.manager.restore(4)["state"])
        ckpt.close()
    assert_trees_close(states[0], states[1], atol=0)
    clients = jax.tree.leaves(states[0]["clients"])
    assert clients and clients[0].shape[0] == 4  # every client's state, and only theirs
    if name == "ditto":
        assert "personalized_accuracy_mean" in full


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scaffold", "ditto"])
def test_killed_stateful_run_resumes_to_identical_metrics(tmp_path, name):
    """The SIGKILL version of the interrupted run above (tests/test_resume.py for FedAvg)."""
    overrides = {**SMALL, "algorithm.name": name, "rounds": 6}
    full = tmp_path / "full"
    train_and_evaluate(apply_overrides(debug.get_config(), overrides), full)
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "experiments.run", "--config=configs/debug.py",
               f"--workdir={tmp_path / 'cut'}", *flags]  # fmt: skip
    env = {**os.environ, "CI": "1", "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(read_metrics(metrics)) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming" in done.stderr
    drop = lambda m: {k: v for k, v in m.items() if not k.endswith("_time_s")}  # noqa: E731
    assert [drop(m) for m in read_metrics(metrics)] == [
        drop(m) for m in read_metrics(full / "metrics.jsonl")
    ]
